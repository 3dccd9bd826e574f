"""Base for callbacks that draw on an evaluation: hands them each new `RetrievalModule.last_eval` exactly once.

`RetrievalModule` evaluates in its own ``on_*_epoch_end``, which Lightning calls *after* the callbacks' hook of
the same name, so consumers hook ``on_validation_end`` / ``on_test_end`` instead. Only global rank 0 holds a
result (it ran the search); other ranks, sanity checks and models without ``last_eval`` are skipped.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback

from irlab.module import is_last_epoch


class EvalResultCallback(Callback):
    """``val_every``: act on every that-many-th validation (the first and the last epoch's always); test results
    always. Why: a figure per validation is 1,000+ files in a 400-epoch run."""

    def __init__(self, val_every: int = 1) -> None:
        super().__init__()
        if val_every < 1:
            raise ValueError(f"val_every must be >= 1, got {val_every}")
        self.val_every = val_every
        self._seen: object | None = None
        self._validations = 0

    def on_eval(self, trainer: L.Trainer, pl_module: L.LightningModule, result) -> None:
        """Subclasses: act on `result` (an `irlab.module.EvalResult`) of stage ``result.stage``."""
        raise NotImplementedError

    def _consume(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        result = getattr(pl_module, "last_eval", None)
        if trainer.sanity_checking or not trainer.is_global_zero or result is None or result is self._seen:
            return
        if result.stage != stage:
            return
        self._seen = result
        if stage == "val":
            self._validations += 1
            if (self._validations - 1) % self.val_every and not is_last_epoch(trainer):
                return
        self.on_eval(trainer, pl_module, result)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._consume(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._consume(trainer, pl_module, "test")
