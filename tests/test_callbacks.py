"""Callbacks: figures and statistics from `last_eval`, images/s in the progress bar, LR monitor without logger."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from callbacks import CodebookUsage, ImagesPerSecond, PRCurvePlot, RetrievalGrid, SafeLearningRateMonitor
from callbacks.codebook_usage import usage_summary
from callbacks.retrieval_grid import grid_rows
from datamodules.digits import DigitsDataModule
from irlab.module import EvalResult, RetrievalModule
from irlab.retrieval import RetrievalReport


class TinyModel(RetrievalModule):
    """A linear embedding of 16 px digits: enough to drive the evaluation loop in a second."""

    def __init__(self, num_classes: int, with_stats: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16))
        self.head = nn.Linear(16, num_classes)
        if with_stats:  # what an IRGen tokenizer exposes: usage counts of every code, per level
            self.codebook_usage = {"usage": [np.array([5, 0, 3, 0]), np.ones(8)], "collision_rate": 0.25}

    def embed(self, images):
        return self.net(images)

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.head(self.embed(batch["image"])), batch["label"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ImageLogger(Logger):
    """Records what callbacks send: scalars and `experiment.add_image` calls (the TensorBoard interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.metrics = [], {}

    name, version = "memory", 0

    @property
    def experiment(self):
        return self

    def add_image(self, tag, array, step, dataformats):
        self.images.append((tag, array.shape, dataformats))

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


@pytest.fixture(scope="module")
def datamodule():
    dm = DigitsDataModule(image_size=16, resize_size=16, batch_size=32, eval_batch_size=64, val_fraction=0.4)
    dm.setup()
    return dm


def _fit(tmp_path: Path, dm, model, loggers, callbacks) -> L.Trainer:
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_epochs=1, limit_train_batches=3,
                        limit_val_batches=2, num_sanity_val_steps=0, logger=loggers, callbacks=callbacks,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    return trainer


def test_callbacks_draw_figures_and_log_them(tmp_path, datamodule):
    logger = ImageLogger()
    callbacks = [PRCurvePlot(), RetrievalGrid(num_queries=3, top_k=4), CodebookUsage(), ImagesPerSecond(window=5),
                 SafeLearningRateMonitor()]
    trainer = _fit(tmp_path, datamodule, TinyModel(datamodule.num_classes, with_stats=True), logger, callbacks)
    figures = sorted(p.name for p in (tmp_path / "figures" / "val").glob("*.png"))
    assert [f.rsplit("_step", 1)[0] for f in figures] == ["identifier_usage", "pr_curve", "retrieval_grid"]
    tags = {tag for tag, shape, fmt in logger.images if len(shape) == 3 and shape[2] == 3 and fmt == "HWC"}
    assert tags == {"val/pr_curve_image", "val/retrieval_grid", "val/identifier_usage"}
    assert logger.metrics["ids/level0/used_fraction"] == 0.5 and logger.metrics["ids/collision_rate"] == 0.25
    assert any(k.startswith("lr-SGD") for k in logger.metrics)
    assert trainer.progress_bar_metrics["train/images_per_sec"] > 0


def test_no_logger_no_codebooks_still_runs(tmp_path, datamodule, recwarn):
    callbacks = [SafeLearningRateMonitor(), CodebookUsage(), ImagesPerSecond(), PRCurvePlot()]
    _fit(tmp_path, datamodule, TinyModel(datamodule.num_classes), False, callbacks)
    # the default run has no logger on purpose: the LR monitor stands down without a warning
    assert not [w for w in recwarn if "no logger" in str(w.message)]
    names = [p.name for p in (tmp_path / "figures" / "val").glob("*.png")]
    assert len(names) == 1 and names[0].startswith("pr_curve")  # PNG kept in the run folder, no identifier plot


def test_grid_rows_map_subset_rows_back_to_eval_set_positions():
    # the evaluated subset holds eval-set positions 10, 11, 20, 21, 30 (a limited loader on 2 ranks)
    positions = np.array([10, 11, 20, 21, 30])
    labels = np.zeros(40, dtype=np.int64)
    labels[[10, 20, 30]], labels[[11, 21]] = 1, 2
    report = RetrievalReport(metrics={}, neighbors=np.array([[2, 1, -1], [0, 1, 2]]),
                             scores=np.array([[0.9, 0.8, np.nan], [0.7, 0.6, 0.5]]))
    result = EvalResult("val", report, 5, query_positions=np.array([0, 3]),
                        gallery_positions=np.array([1, 2, 4]), positions=positions)
    rows = grid_rows(result, labels, num_queries=2, top_k=3)
    assert [r.query for r in rows] == [10, 21]
    np.testing.assert_array_equal(rows[0].neighbors, [30, 20])  # -1 padding dropped
    np.testing.assert_array_equal(rows[0].correct, [True, True])
    np.testing.assert_array_equal(rows[1].neighbors, [11, 20, 30])
    np.testing.assert_array_equal(rows[1].correct, [True, False, False])


def test_usage_summary():
    stats = usage_summary([np.array([4, 0, 0, 0]), np.array([1, 1, 1, 1])])
    assert stats["ids/level0/used_fraction"] == 0.25 and stats["ids/level0/perplexity"] == pytest.approx(1.0)
    assert stats["ids/level1/used_fraction"] == 1.0 and stats["ids/level1/perplexity"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="non-negative counts"):
        usage_summary([np.array([-1, 2])])


def test_figures_every_nth_validation_and_the_last():
    from types import SimpleNamespace

    from callbacks.base import EvalResultCallback

    class Counting(EvalResultCallback):
        def __init__(self) -> None:
            super().__init__(val_every=3)
            self.epochs: list[int] = []

        def on_eval(self, trainer, pl_module, result) -> None:
            self.epochs.append(trainer.current_epoch + 1)

    callback = Counting()
    for epoch in range(8):
        trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, max_epochs=8, current_epoch=epoch)
        module = SimpleNamespace(last_eval=SimpleNamespace(stage="val"))  # a new result each epoch
        callback.on_validation_end(trainer, module)
    test_module = SimpleNamespace(last_eval=SimpleNamespace(stage="test"))
    callback.on_test_end(trainer, test_module)
    assert callback.epochs == [1, 4, 7, 8, 8]  # every 3rd validation, the last one, and the test
