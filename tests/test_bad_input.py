"""Bad input gets an error that names the file (and line), or -- for corrupt images, when asked -- a skip."""

import logging

import pytest

from datamodules.base import ImageReadError, collate_skipping_missing
from datamodules.cub import CUBDataModule
from datamodules.records import AnnotationError
from tests.fixtures.fake_datasets import CUB_TOP, make_fake_cub


def _cub(root, **kwargs):
    dm = CUBDataModule(root=str(root), image_size=32, resize_size=32, batch_size=4, **kwargs)
    dm.setup()
    return dm


def _truncate_first_image(dm) -> str:
    path = dm.records[0].path
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    return path


def test_truncated_image_error_names_the_file_and_the_fix(tmp_path):
    dm = _cub(make_fake_cub(tmp_path / "cub"))
    path = _truncate_first_image(dm)
    with pytest.raises(ImageReadError, match="skip_corrupt") as err:
        dm.load_image(0)
    assert path in str(err.value)


def test_skip_corrupt_drops_the_image_and_counts_it(tmp_path, caplog):
    dm = _cub(make_fake_cub(tmp_path / "cub"), skip_corrupt=True)
    _truncate_first_image(dm)
    dataset = dm.train_dataset()
    assert dataset.ids[0] == 0  # record 0 (class 1) is a zero-shot training image
    with caplog.at_level(logging.WARNING, logger="datamodules.base"):
        samples = [dataset[i] for i in range(len(dataset))]
    assert [s is None for s in samples] == [True] + [False] * (len(dataset) - 1)
    assert "skipped unreadable image #1" in caplog.text
    batch = collate_skipping_missing(samples)
    assert len(batch["image"]) == len(dataset) - 1 and 0 not in batch["index"].tolist()
    with pytest.raises(ImageReadError, match="every image"):
        collate_skipping_missing([None, None])


def test_box_outside_the_image_names_the_annotation_line(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    boxes = root / CUB_TOP / "bounding_boxes.txt"
    lines = boxes.read_text().splitlines()
    image_id = lines[2].split()[0]
    lines[2] = f"{image_id} 5000 5000 10 10"  # the third image's box, far outside its 40x30 pixels
    boxes.write_text("\n".join(lines) + "\n")
    dm = _cub(root, crop=True)
    with pytest.raises(AnnotationError, match=r"bounding_boxes.txt:3: .*outside image"):
        dm.load_image(2)
    dm.load_image(0)  # the other boxes still crop fine


def test_box_overhanging_the_edge_is_clamped(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    boxes = root / CUB_TOP / "bounding_boxes.txt"
    lines = boxes.read_text().splitlines()
    image_id = lines[0].split()[0]
    lines[0] = f"{image_id} 30 20 50 50"  # starts inside a 40x30 image, ends beyond it
    boxes.write_text("\n".join(lines) + "\n")
    assert _cub(root, crop=True).load_image(0).size == (10, 10)
