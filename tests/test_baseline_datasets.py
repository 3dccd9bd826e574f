"""The baseline trains a few steps and evaluates on a fake copy of every benchmark dataset."""

import pytest

from irlab.runner import run
from tests.helpers import compose_config

TINY = ["trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "dataset.image_size=32", "dataset.resize_size=36", "dataset.batch_size=4", "dataset.num_workers=0",
        "model.arch=resnet18", "model.embedding_dim=16"]


@pytest.mark.parametrize("dataset,protocol", [("cub", "zero_shot"), ("car", "closed_set"), ("sop", "zero_shot"),
                                              ("isc", "zero_shot"), ("cub", "closed_set")])
def test_baseline_runs_on_fake_dataset(dataset, protocol, fake_data_dir, tmp_path):
    overrides = TINY + [f"dataset={dataset}", f"protocol={protocol}", f"paths.data_dir={fake_data_dir}"]
    metrics = run(compose_config(overrides, output_dir=tmp_path))
    assert 0.0 <= metrics["test/R@1"] <= 1.0
    assert "test/MAP@R" in metrics and "val/R@1" in metrics


def test_crop_option_trains_on_boxes(fake_data_dir, tmp_path):
    overrides = TINY + ["dataset=cub", "dataset.crop=true", f"paths.data_dir={fake_data_dir}"]
    assert 0.0 <= run(compose_config(overrides, output_dir=tmp_path))["test/R@1"] <= 1.0
