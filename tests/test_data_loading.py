"""Loader settings for GPU nodes, checked on the CPU: uint8 batches normalised after transfer equal the float path,
scaled JPEG decoding keeps boxes and sizes right, worker counts follow the CPUs a job has."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.base import open_rgb
from datamodules.cub import CUBDataModule
from datamodules.loading import auto_workers, resolve_flag


def test_uint8_batches_normalised_after_transfer_equal_the_float_path(fake_cub):
    kw = dict(root=str(fake_cub), image_size=16, resize_size=20, batch_size=4, eval_batch_size=12, num_workers=0)
    on_cpu, on_device = CUBDataModule(**kw), CUBDataModule(**kw, normalize_on_device=True)
    for dm in (on_cpu, on_device):
        dm.setup()
    floats = next(iter(on_cpu.test_dataloader()))
    raw = next(iter(on_device.test_dataloader()))
    assert floats["image"].dtype == torch.float32 and raw["image"].dtype == torch.uint8
    batch = on_device.on_after_batch_transfer(raw, 0)  # what Lightning calls once the batch is on the device
    torch.testing.assert_close(batch["image"], floats["image"], atol=1e-6, rtol=0)
    assert next(iter(on_device.train_dataloader()))["image"].dtype == torch.uint8


def smooth_jpeg(path, size=(1024, 683)) -> np.ndarray:
    """A photo-like JPEG (smooth gradients: libjpeg's scaled decode is meant for such content)."""
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    pixels = (np.stack([x, y, (x + y) / 2], -1) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=92)
    return pixels


def test_jpeg_draft_decodes_smaller_but_covers_the_resize(tmp_path):
    path = tmp_path / "photo.jpg"
    smooth_jpeg(path)
    full = open_rgb(path)
    drafted = open_rgb(path, min_side=256)
    assert full.size == (1024, 683) and drafted.size == (512, 342)  # 1/2: 1/4 would leave 171 px < 256
    assert min(open_rgb(path, min_side=80).size) >= 80 and open_rgb(path, min_side=80).size[0] == 128  # 1/8
    assert open_rgb(path, min_side=400).size == (1024, 683)  # 1/2 would not cover 400 px: full decode
    box = (100, 50, 900, 650)
    crop_full, crop_drafted = open_rgb(path, box), open_rgb(path, box, min_side=200)
    assert crop_full.size == (800, 600) and crop_drafted.size == (400, 300)
    # the same region: the drafted crop equals the full crop downscaled, up to JPEG/scaling error
    reference = np.asarray(crop_full.resize((400, 300), Image.BILINEAR), dtype=float)
    assert np.abs(np.asarray(crop_drafted, dtype=float) - reference).mean() < 3.0
    png = tmp_path / "photo.png"
    Image.open(path).save(png)
    assert open_rgb(png, min_side=100).size == (1024, 683)  # only JPEGs are drafted


def test_auto_workers_follow_the_job_cpus(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert auto_workers(8) == 7 and auto_workers(1) == 63
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "10")  # SLURM: already per rank
    assert auto_workers(8) == 9
    with pytest.raises(ValueError, match="dataset.pin_memory"):
        resolve_flag("yes", "pin_memory")
    assert resolve_flag("auto", "pin_memory") is torch.cuda.is_available()


def test_a_training_run_with_uint8_batches(fake_cub):
    """Lightning hands the loops' uint8 batches to the datamodule's hook: a model never sees uint8."""
    import lightning as L

    from irlab.baseline import EmbeddingBaseline
    from irlab.optim import preset

    dm = CUBDataModule(root=str(fake_cub), image_size=32, resize_size=32, batch_size=4, num_workers=0,
                       normalize_on_device=True)
    dm.setup()
    model = EmbeddingBaseline(num_classes=dm.num_classes, arch="cnn_small",
                              optimizer=preset("optimizer", "adamw", lr=1e-3))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step >= 1 and "val/R@1" in trainer.callback_metrics  # uint8 into a conv would raise
