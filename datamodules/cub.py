"""CUB-200-2011: 11,788 bird photos of 200 species, read from the official ``CUB_200_2011.tgz``.

The annotation files are joined on the image id: ``images.txt`` (``<id> <relpath>``),
``image_class_labels.txt`` (``<id> <class 1..200>``), ``train_test_split.txt`` (``<id> <1=train|0=test>``)
and ``bounding_boxes.txt`` (``<id> x y w h``, converted to ``x1, y1, x1 + w, y1 + h``). Labels keep the
official 1..200 ids so that the zero-shot split is the standard one (classes 1-100 train, 101-200 test).
A box reaching outside its image is clamped when the image is loaded (`open_rgb`), not here, because the
image size is unknown at read time.
"""

from __future__ import annotations

from pathlib import Path

from datamodules.base import RetrievalDataModule
from datamodules.layout import ExistingFiles, find_dataset_dir, parse_float, parse_int, read_table, require
from datamodules.records import AnnotationError, DatasetLayoutError, ImageRecord

IMAGES = "images.txt"
LABELS = "image_class_labels.txt"
SPLIT = "train_test_split.txt"
BOXES = "bounding_boxes.txt"
EXPECTED = [
    "CUB_200_2011/images.txt",
    "CUB_200_2011/image_class_labels.txt",
    "CUB_200_2011/train_test_split.txt",
    "CUB_200_2011/bounding_boxes.txt (needed for crop=true)",
    "CUB_200_2011/images/<NNN.species>/<file>.jpg",
]


def _read_by_id(path: Path, n_values: int) -> dict[int, tuple[int, list[str]]]:
    """{image id: (line number, the other fields)}; duplicate ids are an error."""
    rows: dict[int, tuple[int, list[str]]] = {}
    for line_number, fields in read_table(path, 1 + n_values):
        image_id = parse_int(fields[0], path, line_number, "image id")
        if image_id in rows:
            raise AnnotationError(
                path, line_number, f"image id {image_id} already on line {rows[image_id][0]}"
            )
        rows[image_id] = (line_number, fields[1:])
    return rows


def _check_same_ids(reference: Path, ids: set[int], other: Path, other_ids: set[int]) -> None:
    """Files joined on the image id must list the same ids; say which ones differ and where."""
    if ids == other_ids:
        return
    only_ref, only_other = sorted(ids - other_ids), sorted(other_ids - ids)
    parts = []
    if only_ref:
        parts.append(
            f"{len(only_ref)} image id(s) of {reference.name} are missing here (e.g. {only_ref[:5]})"
        )
    if only_other:
        parts.append(f"{len(only_other)} image id(s) are not in {reference.name} (e.g. {only_other[:5]})")
    raise AnnotationError(other, None, "; ".join(parts) + ". The files come from different CUB versions?")


class CUBDataModule(RetrievalDataModule):
    name = "cub"
    zero_shot_split = "class_halves"
    url = "https://www.vision.caltech.edu/datasets/cub_200_2011/"

    def read_records(self) -> list[ImageRecord]:
        base = find_dataset_dir(
            self.root, ["CUB_200_2011"], [IMAGES], dataset=self.name, url=self.url, expected=EXPECTED
        )
        require(base, [IMAGES, LABELS, SPLIT], dataset=self.name, url=self.url, expected=EXPECTED)
        if self.crop:
            require(base, [BOXES], dataset=self.name, url=self.url, expected=EXPECTED)

        images = _read_by_id(base / IMAGES, 1)
        labels = _read_by_id(base / LABELS, 1)
        splits = _read_by_id(base / SPLIT, 1)
        boxes = _read_by_id(base / BOXES, 4) if (base / BOXES).exists() else None
        for path, rows in [(base / LABELS, labels), (base / SPLIT, splits), (base / BOXES, boxes)]:
            if rows is not None:
                _check_same_ids(base / IMAGES, set(images), path, set(rows))

        existing = ExistingFiles()
        records = []
        for image_id in sorted(images):
            line_number, (relpath,) = images[image_id]
            path = base / "images" / relpath
            if str(path) not in existing:
                raise AnnotationError(base / IMAGES, line_number, f"image {path} does not exist")
            label_line, (label,) = labels[image_id]
            split_line, (flag,) = splits[image_id]
            if flag not in ("0", "1"):
                raise AnnotationError(
                    base / SPLIT, split_line, f"split flag must be 1 (train) or 0 (test), got {flag!r}"
                )
            bbox = None
            if boxes is not None:
                box_line, values = boxes[image_id]
                x, y, w, h = (parse_float(v, base / BOXES, box_line, "box coordinate") for v in values)
                bbox = (x, y, x + w, y + h) if w > 0 and h > 0 else None  # degenerate: leave uncropped
            records.append(
                ImageRecord(
                    path=str(path),
                    label=parse_int(label, base / LABELS, label_line, "class id"),
                    split="train" if flag == "1" else "test",
                    bbox=bbox,
                    bbox_source=f"{base / BOXES}:{box_line}" if bbox is not None else None,
                )
            )
        if not records:
            raise DatasetLayoutError(self.name, base, f"{IMAGES} lists no images.", EXPECTED, self.url)
        return records
