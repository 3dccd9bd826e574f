"""Benchmark readers on tiny fake copies of the official downloads: layouts, labels, splits, boxes, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hydra.utils import instantiate
from PIL import Image

from datamodules import (
    AnnotationError,
    CarsDataModule,
    CUBDataModule,
    DatasetLayoutError,
    InShopDataModule,
    SOPDataModule,
)
from tests.fixtures.dataset_loading import (
    SMALL,
    labels_of,
    loaded,
    malformed_line_error,
    missing_image_error,
    splits_of,
)
from tests.fixtures.fake_datasets import (
    CUB_TOP,
    GRAY_RECORD,
    PNG_RECORD,
    SOP_TOP,
    WIDE_BOX,
    WIDE_RECORD,
    _save_structs,
    make_fake_cars,
    make_fake_cub,
    make_fake_inshop,
    make_fake_sop,
)
from tests.helpers import compose_config

# ---- behaviour every dataset shares ------------------------------------------------------------------------
ALL = {
    "cub": (CUBDataModule, make_fake_cub, {}),
    "car": (CarsDataModule, make_fake_cars, {}),
    "car-devkit": (CarsDataModule, make_fake_cars, {"form": "devkit"}),
    "sop": (SOPDataModule, make_fake_sop, {}),
    "isc": (InShopDataModule, make_fake_inshop, {}),
}


@pytest.mark.parametrize("name", list(ALL))
def test_train_batch_is_rgb_with_contiguous_labels(tmp_path, name):
    cls, make, kwargs = ALL[name]
    dm = loaded(cls, make(tmp_path / "d", **kwargs))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert set(batch["label"].tolist()) <= set(range(dm.num_classes))
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["image"].shape[1:] == (3, 32, 32)


@pytest.mark.parametrize("name", list(ALL))
def test_grayscale_and_png_named_jpg_load_as_rgb(tmp_path, name):
    cls, make, kwargs = ALL[name]
    dm = loaded(cls, make(tmp_path / "d", **kwargs))
    with Image.open(dm.records[GRAY_RECORD].path) as raw:
        assert raw.mode == "L"
    with Image.open(dm.records[PNG_RECORD].path) as raw:
        assert raw.format == "PNG" and dm.records[PNG_RECORD].path.lower().endswith(".jpg")
    for record_id in (GRAY_RECORD, PNG_RECORD):
        assert dm.load_image(record_id).mode == "RGB"
    position = int(np.flatnonzero(dm.split.train_ids == GRAY_RECORD)[0])
    assert dm.train_dataset()[position]["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["cub", "car", "sop", "isc"])
def test_missing_root_names_expected_files_and_download_page(tmp_path, name):
    cls = ALL[name][0]
    with pytest.raises(DatasetLayoutError) as err:
        loaded(cls, tmp_path / "nowhere")
    message = str(err.value)
    assert (
        "does not exist" in message and cls.url.split()[0] in message and str(tmp_path / "nowhere") in message
    )


@pytest.mark.parametrize("name", ["cub", "car", "sop", "isc"])
def test_empty_root_is_a_layout_error(tmp_path, name):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="found none"):
        loaded(ALL[name][0], tmp_path / "empty")


def test_default_root_is_data_dir_slash_name(fake_data_dir):
    for cls in (CUBDataModule, CarsDataModule, SOPDataModule, InShopDataModule):
        dm = cls(data_dir=str(fake_data_dir), **SMALL)
        dm.setup()
        assert dm.root == fake_data_dir / cls.name and len(dm.records) == 12


@pytest.mark.parametrize("name", ["cub", "car", "sop", "isc"])
def test_hydra_config_composes_and_instantiates(fake_data_dir, tmp_path, name):
    overrides = [f"dataset={name}", f"paths.data_dir={fake_data_dir}", "seed=3", "protocol=closed_set",
                 "dataset.image_size=32", "dataset.resize_size=36", "dataset.num_workers=0"]  # fmt: skip
    cfg = compose_config(overrides, output_dir=tmp_path)
    dm = instantiate(cfg.dataset)
    assert dm.name == name and dm.seed == 3 and dm.crop is False and dm.protocol == "closed_set"
    assert dm.root == fake_data_dir / name
    if name == "sop":  # SOP's official splits have disjoint classes: closed-set is refused, zero-shot works
        with pytest.raises(ValueError, match="closed_set"):
            dm.setup()
        dm.protocol = "zero_shot"
    dm.setup()
    assert len(dm.records) == 12


def test_unknown_top_folder_name_is_found_when_it_is_the_only_one(tmp_path):
    make_fake_sop(tmp_path / "x", top_folder=True)
    (tmp_path / "x" / SOP_TOP).rename(tmp_path / "x" / "SOP_v1")
    assert len(loaded(SOPDataModule, tmp_path / "x").records) == 12
    make_fake_sop(tmp_path / "x" / "SOP_v2", top_folder=False)
    with pytest.raises(DatasetLayoutError, match="several subfolders"):
        loaded(SOPDataModule, tmp_path / "x")


# ---- CUB-200-2011 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_folder", [True, False])
def test_cub_reads_both_layouts(tmp_path, top_folder):
    dm = loaded(CUBDataModule, make_fake_cub(tmp_path / "cub", top_folder=top_folder))
    assert labels_of(dm) == [c for c in (1, 2, 3, 4) for _ in range(3)]
    assert splits_of(dm) == ["train", "train", "test"] * 4
    assert dm.records[0].bbox == (1.5, 2.0, 21.5, 17.0)  # x y w h -> x1 y1 x1+w y1+h
    assert dm.records[1].bbox == (2.5, 2.0, 22.5, 17.0)
    assert all(Path(r.path).is_file() for r in dm.records)


def test_cub_zero_shot_trains_on_first_half_of_class_ids(fake_cub):
    dm = loaded(CUBDataModule, fake_cub)
    assert dm.split.train_classes.tolist() == [1, 2] and dm.num_classes == 2
    assert sorted(set(dm.split.test.labels.tolist())) == [3, 4]
    assert dm.split.test.query_mask.all() and dm.split.test.gallery_mask.all()
    assert dm.train_labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_cub_closed_set_uses_the_official_split(fake_cub):
    dm = loaded(CUBDataModule, fake_cub, protocol="closed_set")
    assert dm.split.train_ids.tolist() == [i for i in range(12) if i % 3 != 2]
    test = dm.split.test
    assert test.record_ids[test.query_mask].tolist() == [2, 5, 8, 11]
    assert test.record_ids[test.gallery_mask].tolist() == dm.split.train_ids.tolist()
    assert dm.num_classes == 4


def test_cub_crop_uses_box_and_clamps_it_to_the_image(fake_cub):
    dm = loaded(CUBDataModule, fake_cub, crop=True)
    assert dm.load_image(0).size == (21, 15)  # (1.5, 2, 21.5, 17): x1 floored, x2 rounded
    assert dm.records[9].bbox == (1.5, 2.0, 51.5, 17.0)  # wider than the 40 px image
    assert dm.load_image(9).size == (39, 15)


def test_cub_without_boxes_loads_but_cannot_crop(fake_cub):
    (fake_cub / CUB_TOP / "bounding_boxes.txt").unlink()
    assert all(r.bbox is None for r in loaded(CUBDataModule, fake_cub).records)
    with pytest.raises(DatasetLayoutError, match="bounding_boxes.txt"):
        loaded(CUBDataModule, fake_cub, crop=True)


@pytest.mark.parametrize("missing", ["images.txt", "image_class_labels.txt", "train_test_split.txt"])
def test_cub_missing_annotation_file(fake_cub, missing):
    (fake_cub / CUB_TOP / missing).unlink()
    with pytest.raises(DatasetLayoutError) as err:
        loaded(CUBDataModule, fake_cub)
    assert missing in str(err.value) and CUBDataModule.url in str(err.value)


@pytest.mark.parametrize(
    ("file", "line", "text", "match"),
    [
        ("image_class_labels.txt", 3, "3 three", "class id must be an integer"),
        ("image_class_labels.txt", 4, "4", "expected 2 columns"),
        ("images.txt", 2, "x 002.Species_1/a.jpg", "image id must be an integer"),
        ("train_test_split.txt", 5, "5 2", "split flag"),
        ("bounding_boxes.txt", 6, "6 1.0 2.0 w 4.0", "box coordinate"),
        ("image_class_labels.txt", 7, "6 3", "image id 6 already on line 6"),
    ],
)
def test_cub_malformed_line_names_file_and_line(fake_cub, file, line, text, match):
    malformed_line_error(CUBDataModule, fake_cub, fake_cub / CUB_TOP / file, line, text, match)


def test_cub_missing_image_names_the_annotation_line(fake_cub):
    error, name = missing_image_error(CUBDataModule, fake_cub, 4, "does not exist")
    assert "images.txt:5:" in str(error) and name in str(error)


def test_cub_inconsistent_ids_between_files(fake_cub):
    split_file = fake_cub / CUB_TOP / "train_test_split.txt"
    split_file.write_text("".join(split_file.read_text().splitlines(keepends=True)[:-1]) + "99 1\n")
    with pytest.raises(AnnotationError) as err:
        loaded(CUBDataModule, fake_cub)
    message = str(err.value)
    assert "train_test_split.txt" in message and "[12]" in message and "[99]" in message


# ---- CARS196 -----------------------------------------------------------------------------------------------
CARS_FORMS = {
    "annos": {},
    "annos-top": {"top_folder": "stanford_cars"},
    "devkit": {"form": "devkit"},
    "devkit-top": {"form": "devkit", "top_folder": "stanford_cars"},
    "devkit-labels-in-devkit": {"form": "devkit", "labels_in_devkit": True},
    "devkit-kaggle-nesting": {"form": "devkit", "nested": True},
}


@pytest.mark.parametrize("form", list(CARS_FORMS))
def test_cars_reads_every_form(tmp_path, form):
    kwargs = CARS_FORMS[form]
    dm = loaded(CarsDataModule, make_fake_cars(tmp_path / "car", **kwargs))
    assert len(dm.records) == 12
    assert sorted(labels_of(dm)) == [c for c in (1, 2, 3, 4) for _ in range(3)]
    assert splits_of(dm).count("train") == 8 and splits_of(dm).count("test") == 4
    assert {r.label for r in dm.records if r.split == "test"} == {1, 2, 3, 4}
    assert dm.records[0].bbox == (1.0, 2.0, 37.0, 28.0)
    assert all(isinstance(v, float) for v in dm.records[0].bbox)
    if kwargs.get("form") == "devkit":  # train and test files both start at 00001.jpg, in their own folders
        assert Path(dm.records[0].path).name == Path(dm.records[8].path).name == "00001.jpg"
        assert Path(dm.records[8].path).parent.name == "cars_test"


def test_cars_fixture_stores_small_integers_as_matlab_did(fake_cars):
    entries = scipy.io.loadmat(str(fake_cars / "cars_annos.mat"))["annotations"][0]
    assert entries[0]["bbox_x1"].dtype == np.uint8 and entries[0]["class"].dtype == np.uint8
    assert entries[WIDE_RECORD]["bbox_x1"].dtype == np.uint8
    assert entries[WIDE_RECORD]["bbox_x2"].dtype == np.uint16


@pytest.mark.parametrize("form", ["annos", "devkit"])
def test_cars_mixed_uint8_uint16_box_is_exact_and_crops(tmp_path, form):
    dm = loaded(CarsDataModule, make_fake_cars(tmp_path / "car", form=form), crop=True)
    assert dm.records[WIDE_RECORD].bbox == tuple(float(v) for v in WIDE_BOX)
    x1, y1, x2, y2 = WIDE_BOX
    assert dm.load_image(WIDE_RECORD).size == (x2 - x1, y2 - y1)


def test_cars_zero_shot_and_closed_set(fake_cars):
    dm = loaded(CarsDataModule, fake_cars)
    assert dm.split.train_classes.tolist() == [1, 2]
    assert sorted(set(dm.split.test.labels.tolist())) == [3, 4]
    closed = loaded(CarsDataModule, fake_cars, protocol="closed_set")
    test = closed.split.test
    assert test.record_ids[test.query_mask].tolist() == [2, 5, 8, 11]
    assert closed.num_classes == 4


def test_cars_all_images_form_without_car_ims(fake_cars):
    shutil.rmtree(fake_cars / "car_ims")
    with pytest.raises(DatasetLayoutError, match="car_ims"):
        loaded(CarsDataModule, fake_cars)


def test_cars_devkit_without_labelled_test_annotations(fake_cars_devkit):
    (fake_cars_devkit / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetLayoutError, match="cars_test_annos_withlabels.mat"):
        loaded(CarsDataModule, fake_cars_devkit)


def test_cars_devkit_without_image_folder(fake_cars_devkit):
    shutil.rmtree(fake_cars_devkit / "cars_test")
    with pytest.raises(DatasetLayoutError, match="cars_test/"):
        loaded(CarsDataModule, fake_cars_devkit)


@pytest.mark.parametrize("form", ["annos", "devkit"])
def test_cars_missing_image_names_file_and_entry(tmp_path, form):
    root = make_fake_cars(tmp_path / "car", form=form)
    dm = loaded(CarsDataModule, root)
    Path(dm.records[10].path).unlink()
    with pytest.raises(AnnotationError, match="does not exist") as err:
        loaded(CarsDataModule, root)
    # record 10 is entry 11 of cars_annos.mat, or entry 3 of the test file (8 train images come first)
    where = (
        "cars_annos.mat: annotations entry 11" if form == "annos" else "withlabels.mat: annotations entry 3"
    )
    assert where in str(err.value)


def _cars_rows(n: int = 2) -> list[dict]:
    return [
        {"relative_im_path": f"car_ims/{i:06d}.jpg", "bbox_x1": 1, "bbox_y1": 1, "bbox_x2": 9, "bbox_y2": 9,
         "class": 1, "test": 0}
        for i in range(1, n + 1)
    ]  # fmt: skip


def test_cars_malformed_entry_names_file_and_entry(fake_cars):
    rows = _cars_rows()
    rows[1]["class"] = "seven"
    _save_structs(fake_cars / "cars_annos.mat", rows)
    with pytest.raises(
        AnnotationError, match=r"cars_annos.mat: annotations entry 2: class must be an integer"
    ):
        loaded(CarsDataModule, fake_cars)


def test_cars_missing_field_or_variable(fake_cars):
    rows = [{k: v for k, v in row.items() if k != "test"} for row in _cars_rows()]
    _save_structs(fake_cars / "cars_annos.mat", rows)
    with pytest.raises(AnnotationError, match=r"lacks field\(s\) \['test'\]"):
        loaded(CarsDataModule, fake_cars)
    scipy.io.savemat(str(fake_cars / "cars_annos.mat"), {"something_else": np.zeros(3)})
    with pytest.raises(AnnotationError, match="no variable 'annotations'"):
        loaded(CarsDataModule, fake_cars)


def test_cars_unreadable_mat_file(fake_cars):
    (fake_cars / "cars_annos.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(AnnotationError, match="cars_annos.mat"):
        loaded(CarsDataModule, fake_cars)
