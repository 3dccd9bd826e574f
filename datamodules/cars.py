"""CARS196 (Stanford Cars): 16,185 photos of 196 car models, read from either official distribution.

* The "all images" form: ``cars_annos.mat`` (struct array ``annotations``: relative_im_path, bbox_x1,
  bbox_y1, bbox_x2, bbox_y2, class, test) next to ``car_ims/000001.jpg`` ...
* The devkit form (also what torchvision's ``stanford_cars`` folder and the Kaggle mirrors hold):
  ``cars_train/``, ``cars_test/``, ``devkit/cars_train_annos.mat`` (bbox_*, class, fname) and
  ``cars_test_annos_withlabels.mat`` (at the top or inside ``devkit/``; the devkit's own
  ``cars_test_annos.mat`` has no labels). Kaggle nests the image folders (``cars_train/cars_train/``)
  and the devkit (``car_devkit/devkit/``); both are accepted.

MATLAB stores each integer field with the smallest type that holds it (uint8 for 112, uint16 for 300), so
every value is cast to a Python int before any arithmetic: ``uint8(200) + uint8(100)`` would wrap to 44.
Labels keep the official 1..196 ids (zero-shot: classes 1-98 train, 99-196 test). Boxes are the official
``x1, y1, x2, y2`` pixel coordinates; a box reaching outside its image is clamped at load time by `open_rgb`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from datamodules.base import RetrievalDataModule
from datamodules.layout import ExistingFiles, find_dataset_dir, first_existing
from datamodules.records import AnnotationError, DatasetLayoutError, ImageRecord

ANNOS = "cars_annos.mat"
DEVKIT_DIRS = ["devkit", "car_devkit/devkit"]
TRAIN_ANNOS = "cars_train_annos.mat"
TEST_ANNOS = "cars_test_annos_withlabels.mat"
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
EXPECTED = [
    "cars_annos.mat and car_ims/000001.jpg ... (the 'all images' download), or",
    "cars_train/, cars_test/, devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat "
    "(at the top or in devkit/) (the devkit download)",
]
MARKERS = [ANNOS, "car_ims", "cars_train", *(f"{d}/{TRAIN_ANNOS}" for d in DEVKIT_DIRS)]


def _scalar(value):
    """Unwrap loadmat's nesting (1x1 arrays, 0-d object arrays, 1-element cell) into a Python scalar."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"expected a single value, got an array of shape {value.shape}")
        value = value.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def load_mat_structs(path: Path, variable: str, fields: tuple[str, ...]) -> list[dict]:
    """The struct array `variable` of a .mat file as a list of {field: Python scalar} (entry order kept).

    Loads with ``squeeze_me=False`` and ``struct_as_record=True`` so that one and many entries have the same
    shape, then unwraps each value; integers become Python ints whatever their MATLAB type.
    """
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=False, struct_as_record=True)
    except NotImplementedError as exc:  # MATLAB v7.3 files are HDF5
        raise AnnotationError(
            path, None, f"unsupported .mat version ({exc}); re-download the original file"
        ) from exc
    except Exception as exc:  # scipy raises ValueError, IndexError, TypeError... on a damaged file
        raise AnnotationError(path, None, f"cannot read the .mat file: {exc}") from exc
    if variable not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise AnnotationError(path, None, f"no variable {variable!r} (found {found})")
    array = np.asarray(mat[variable])
    names = array.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise AnnotationError(path, None, f"{variable} lacks field(s) {missing} (has {list(names)})")
    rows = []
    for index, entry in enumerate(array.reshape(-1), start=1):
        row = {}
        for field in fields:
            try:
                value = _scalar(entry[field])
            except ValueError as exc:
                raise AnnotationError(path, None, f"{variable} entry {index}: field {field}: {exc}") from None
            if isinstance(value, bytes):
                value = value.decode()
            if field != "fname" and field != "relative_im_path":
                if isinstance(value, str) or not float(value).is_integer():
                    raise AnnotationError(
                        path, None, f"{variable} entry {index}: {field} must be an integer, got {value!r}"
                    )
                value = int(value)
            elif not isinstance(value, str):
                raise AnnotationError(
                    path, None, f"{variable} entry {index}: {field} must be a string, got {value!r}"
                )
            row[field] = value
        rows.append(row)
    return rows


def _record(row: dict, path: Path, split: str, existing: ExistingFiles, mat: Path, index: int) -> ImageRecord:
    if str(path) not in existing:
        raise AnnotationError(mat, None, f"annotations entry {index}: image {path} does not exist")
    x1, y1, x2, y2 = (float(row[f]) for f in BOX_FIELDS)
    bbox = (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None  # a degenerate box leaves the image uncropped
    source = f"{mat} annotations entry {index}" if bbox is not None else None
    return ImageRecord(path=str(path), label=row["class"], split=split, bbox=bbox, bbox_source=source)


class CarsDataModule(RetrievalDataModule):
    name = "car"
    zero_shot_split = "class_halves"
    url = (
        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (if offline, a Kaggle mirror such as "
        "https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset, completed with the devkit's "
        "cars_train_annos.mat and cars_test_annos_withlabels.mat)"
    )

    def read_records(self) -> list[ImageRecord]:
        base = find_dataset_dir(
            self.root,
            ["stanford_cars", "CARS196", "cars196"],
            MARKERS,
            dataset=self.name,
            url=self.url,
            expected=EXPECTED,
        )
        devkit = first_existing(base, [f"{d}/{TRAIN_ANNOS}" for d in DEVKIT_DIRS])
        if (base / ANNOS).exists() and ((base / "car_ims").is_dir() or devkit is None):
            records = self._read_all_images_form(base)
        elif devkit is not None:
            records = self._read_devkit_form(base, devkit.parent)
        else:
            raise DatasetLayoutError(
                self.name, base, f"found neither {ANNOS} nor devkit/{TRAIN_ANNOS}.", EXPECTED, self.url
            )
        if not records:
            raise DatasetLayoutError(
                self.name, base, "the annotation files list no images.", EXPECTED, self.url
            )
        return records

    def _read_all_images_form(self, base: Path) -> list[ImageRecord]:
        mat = base / ANNOS
        if not (base / "car_ims").is_dir():
            raise DatasetLayoutError(
                self.name, base, f"{ANNOS} found but car_ims/ is missing.", EXPECTED, self.url
            )
        rows = load_mat_structs(mat, "annotations", ("relative_im_path", *BOX_FIELDS, "class", "test"))
        existing = ExistingFiles()
        records = []
        for index, row in enumerate(rows, start=1):
            if row["test"] not in (0, 1):
                raise AnnotationError(
                    mat, None, f"annotations entry {index}: test must be 0 or 1, got {row['test']}"
                )
            split = "test" if row["test"] == 1 else "train"
            records.append(_record(row, base / row["relative_im_path"], split, existing, mat, index))
        return records

    def _read_devkit_form(self, base: Path, devkit: Path) -> list[ImageRecord]:
        test_mat = first_existing(base, [TEST_ANNOS, *(f"{d}/{TEST_ANNOS}" for d in DEVKIT_DIRS)])
        if test_mat is None:
            raise DatasetLayoutError(
                self.name,
                base,
                f"missing {TEST_ANNOS} (the devkit's cars_test_annos.mat has no labels; download the "
                "labelled file separately and put it next to cars_test/ or into devkit/).",
                EXPECTED,
                self.url,
            )
        existing = ExistingFiles()
        records = []
        for split, mat, folder in [
            ("train", devkit / TRAIN_ANNOS, "cars_train"),
            ("test", test_mat, "cars_test"),
        ]:
            images = first_existing(base, [f"{folder}/{folder}", folder])  # Kaggle nests the folder in itself
            if images is None or not images.is_dir():
                raise DatasetLayoutError(
                    self.name, base, f"missing the image folder {folder}/.", EXPECTED, self.url
                )
            rows = load_mat_structs(mat, "annotations", (*BOX_FIELDS, "class", "fname"))
            for index, row in enumerate(rows, start=1):
                records.append(_record(row, images / row["fname"], split, existing, mat, index))
        return records
