"""Training throughput in images per second, logged as ``train/images_per_sec`` and shown in the progress bar.

Measured between consecutive training-batch ends (so data loading, forward, backward and optimizer step all
count) over a sliding window, multiplied by the world size (every rank processes a batch of the same size).
The clock restarts after each validation and at each epoch start so evaluation time is never counted.
"""

from __future__ import annotations

import time
from collections import deque

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def batch_size_of(batch) -> int:
    """Number of images in a batch: dict batches use ``image``; tuples/lists their first tensor."""
    if isinstance(batch, dict):
        batch = batch.get("image", next(iter(batch.values())))
    elif isinstance(batch, list | tuple):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"ImagesPerSecond: cannot tell the batch size of a {type(batch).__name__}; "
                        "use dict batches with an 'image' tensor")
    return int(batch.shape[0])


class ImagesPerSecond(Callback):
    def __init__(self, window: int = 20, prog_bar: bool = True, key: str = "train/images_per_sec") -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"ImagesPerSecond.window must be >= 1, got {window}")
        self.key, self.prog_bar = key, prog_bar
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._last: float | None = None

    def _restart_clock(self, *_) -> None:
        self._last = time.perf_counter()

    on_train_epoch_start = _restart_clock

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart_clock()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._samples.append((batch_size_of(batch) * trainer.world_size, now - self._last))
        self._last = now
        seconds = sum(dt for _, dt in self._samples)
        if seconds > 0:
            rate = sum(n for n, _ in self._samples) / seconds
            pl_module.log(self.key, rate, prog_bar=self.prog_bar, on_step=True, on_epoch=False, batch_size=1)
