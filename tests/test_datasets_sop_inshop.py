"""Stanford Online Products and In-shop readers on tiny fake copies of the official downloads: layouts, labels,
splits, boxes, errors (CUB and CARS: tests/test_datasets.py)."""

from __future__ import annotations

import shutil

import pytest

from datamodules import (
    AnnotationError,
    DatasetLayoutError,
    InShopDataModule,
    SOPDataModule,
)
from tests.fixtures.dataset_loading import (
    labels_of,
    loaded,
    malformed_line_error,
    missing_image_error,
    replace_line,
    splits_of,
)
from tests.fixtures.fake_datasets import (
    INSHOP_TOP,
    SOP_TOP,
    inshop_item_id,
    make_fake_inshop,
    make_fake_sop,
)


# ---- Stanford Online Products ------------------------------------------------------------------------------
@pytest.mark.parametrize("top_folder", [True, False])
def test_sop_reads_both_layouts_with_official_split(tmp_path, top_folder):
    dm = loaded(SOPDataModule, make_fake_sop(tmp_path / "sop", top_folder=top_folder))
    assert labels_of(dm) == [c for c in (1, 2, 3, 4) for _ in range(3)]
    assert splits_of(dm) == ["train"] * 6 + ["test"] * 6
    assert all(r.path.endswith(".JPG") and r.bbox is None for r in dm.records)
    assert dm.split.train_classes.tolist() == [1, 2]
    test = dm.split.test
    assert (
        test.record_ids.tolist() == list(range(6, 12)) and test.query_mask.all() and test.gallery_mask.all()
    )


def test_sop_has_no_closed_set_and_no_boxes(fake_sop):
    with pytest.raises(ValueError, match="closed_set"):
        loaded(SOPDataModule, fake_sop, protocol="closed_set")
    with pytest.raises(ValueError, match="no bounding boxes"):
        loaded(SOPDataModule, fake_sop, crop=True)


def test_sop_missing_annotation_file(fake_sop):
    (fake_sop / SOP_TOP / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="missing Ebay_test.txt") as err:
        loaded(SOPDataModule, fake_sop)
    assert SOPDataModule.url in str(err.value)


@pytest.mark.parametrize(
    ("line", "text", "match"),
    [
        (1, "image_id class_id path", "expected the header"),
        (3, "2 1 bicycle_final/x_1.JPG", "expected 4 columns"),
        (4, "3 one 1 bicycle_final/111085122801_2.JPG", "class_id must be an integer"),
    ],
)
def test_sop_malformed_line(fake_sop, line, text, match):
    malformed_line_error(SOPDataModule, fake_sop, fake_sop / SOP_TOP / "Ebay_train.txt", line, text, match)


def test_sop_missing_image(fake_sop):
    missing_image_error(SOPDataModule, fake_sop, 7, "Ebay_test.txt:3: image .* does not exist")


def test_sop_test_classes_must_not_repeat_train_classes(fake_sop):
    replace_line(fake_sop / SOP_TOP / "Ebay_test.txt", 2, "1 2 3 chair_final/111085122803_0.JPG")
    with pytest.raises(AnnotationError, match=r"class ids \[2\] also appear"):
        loaded(SOPDataModule, fake_sop)


# ---- In-shop Clothes Retrieval -----------------------------------------------------------------------------
INSHOP_LAYOUTS = {
    "official-top": {"top_folder": INSHOP_TOP},
    "InShop-top": {"top_folder": "InShop"},
    "contents": {"top_folder": None},
    "img-at-top": {"top_folder": None, "images_at_top": True},
}
ITEMS = [inshop_item_id(k) for k in range(4)]


@pytest.mark.parametrize("layout", list(INSHOP_LAYOUTS))
def test_inshop_reads_every_layout(tmp_path, layout):
    dm = loaded(InShopDataModule, make_fake_inshop(tmp_path / "isc", **INSHOP_LAYOUTS[layout]))
    assert labels_of(dm) == [item for item in ITEMS for _ in range(3)]
    assert splits_of(dm) == ["train"] * 6 + ["query", "gallery", "gallery"] * 2
    assert dm.records[0].bbox == (2.0, 3.0, 38.0, 29.0)
    assert "/img/WOMEN/Dresses/id_00000002/" in dm.records[0].path


@pytest.mark.parametrize("protocol", ["zero_shot", "closed_set"])
def test_inshop_query_gallery_split_under_both_protocols(fake_inshop, protocol):
    dm = loaded(InShopDataModule, fake_inshop, protocol=protocol)
    if protocol == "zero_shot":  # train items only: disjoint from the gallery's
        assert dm.split.train_ids.tolist() == list(range(6)) and dm.split.train_classes.tolist() == ITEMS[:2]
    else:  # the IRGen paper's trainval setting: train + gallery items, never a query
        assert dm.split.train_ids.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 10, 11]
        assert dm.split.train_classes.tolist() == ITEMS
    assert dm.split.target_ids.tolist() == dm.split.train_ids.tolist()
    test = dm.split.test
    assert test.record_ids[test.query_mask].tolist() == [6, 9]
    assert test.record_ids[test.gallery_mask].tolist() == [7, 8, 10, 11]
    assert (test.self_exclusion() == -1).all()


def test_inshop_closed_set_validation_keeps_every_gallery_image_a_target(fake_inshop):
    dm = loaded(InShopDataModule, fake_inshop, protocol="closed_set", val_fraction=0.34, seed=0)
    split = dm.split
    val_queries = split.val.record_ids[split.val.query_mask]
    assert len(val_queries) and not set(val_queries) & set(split.train_ids)  # held out as inputs
    gallery = split.test.record_ids[split.test.gallery_mask]
    assert set(gallery) <= set(split.target_ids)  # ... but every test-database image stays a target
    assert set(val_queries) <= set(split.target_ids)
    assert not set(split.test.record_ids[split.test.query_mask]) & set(split.target_ids)  # queries never


def test_inshop_boxes_are_optional_unless_cropping(tmp_path):
    root = make_fake_inshop(tmp_path / "isc", with_boxes=False)
    assert all(r.bbox is None for r in loaded(InShopDataModule, root).records)
    with pytest.raises(DatasetLayoutError, match="list_bbox_inshop.txt"):
        loaded(InShopDataModule, root, crop=True)


def test_inshop_crop(fake_inshop):
    assert loaded(InShopDataModule, fake_inshop, crop=True).load_image(0).size == (36, 26)


def test_inshop_missing_partition_or_images(fake_inshop):
    base = fake_inshop / INSHOP_TOP
    shutil.rmtree(base / "Img")
    with pytest.raises(DatasetLayoutError, match="Img/img"):
        loaded(InShopDataModule, fake_inshop)
    (base / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="missing Eval/list_eval_partition.txt"):
        loaded(InShopDataModule, fake_inshop)


@pytest.mark.parametrize(
    ("file", "line", "text", "match"),
    [
        ("Eval/list_eval_partition.txt", 1, "13", "announces 13 rows but has 12"),
        ("Eval/list_eval_partition.txt", 2, "image_name item_id", "expected the header"),
        ("Eval/list_eval_partition.txt", 5, "img/WOMEN/Dresses/id_00000002/03_3_front.jpg id_00000002",
         "columns"),
        ("Eval/list_eval_partition.txt", 6, "img/MEN/Denim/id_00000009/01_1_front.jpg item9 train",
         "item_id"),
        ("Eval/list_eval_partition.txt", 9, "img/WOMEN/Dresses/id_00000016/01_1_front.jpg id_00000016 test",
         "evaluation_status"),
        ("Anno/list_bbox_inshop.txt", 4, "img/WOMEN/Dresses/id_00000002/01_1_front.jpg 1 1 2 3 x 29",
         "box coordinate"),
    ],
)  # fmt: skip
def test_inshop_malformed_line(fake_inshop, file, line, text, match):
    malformed_line_error(InShopDataModule, fake_inshop, fake_inshop / INSHOP_TOP / file, line, text, match)


def test_inshop_missing_image(fake_inshop):
    missing_image_error(InShopDataModule, fake_inshop, 10, "list_eval_partition.txt:13: image .* does not exist")
