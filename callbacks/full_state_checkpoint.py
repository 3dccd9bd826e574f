"""``last.ckpt`` (the full training state: weights, optimizer, schedule, random generators) at a cadence that
fits the model's size: every ``every_n_epochs`` epochs and/or every ``every_n_minutes`` minutes, and always after
the last epoch; SIGTERM and crashes are `OnExceptionCheckpoint`'s job.

Why not Lightning's ModelCheckpoint alone: it refuses epochs *and* time together, and with ``every_n_epochs=N``
it skips the final epoch unless N divides it. Why a cadence at all: AREIR E=48 writes 6 GB and the IRGen
generator 2.25 GB per save (README, "Disk"); every epoch for 100-400 epochs is hours of writing on slow disks.
The decision is rank 0's, broadcast, so that every rank enters the checkpoint's barrier together.
"""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from irlab.module import is_last_epoch


class FullStateCheckpoint(ModelCheckpoint):
    def __init__(self, *args, every_n_epochs: int = 1, every_n_minutes: float | None = None, **kwargs) -> None:
        if every_n_epochs < 0 or (every_n_minutes is not None and every_n_minutes <= 0):
            raise ValueError(f"every_n_epochs must be >= 0 and every_n_minutes > 0 or null, got {every_n_epochs}, "
                             f"{every_n_minutes}")
        super().__init__(*args, every_n_epochs=1, **kwargs)
        self.period_epochs, self.every_n_minutes = every_n_epochs, every_n_minutes
        self._saved_at = time.monotonic()

    def due(self, trainer: L.Trainer) -> bool:
        """Whether this epoch end saves (rank 0's clock decides for every rank)."""
        last = trainer.should_stop or is_last_epoch(trainer)
        by_epochs = bool(self.period_epochs) and (trainer.current_epoch + 1) % self.period_epochs == 0
        by_time = self.every_n_minutes is not None and time.monotonic() - self._saved_at >= 60 * self.every_n_minutes
        return bool(trainer.strategy.broadcast(last or by_epochs or by_time, src=0))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.due(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            self._saved_at = time.monotonic()
