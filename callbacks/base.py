"""Base for callbacks that draw on an evaluation: hands them each new `RetrievalModule.last_eval` exactly once.

`RetrievalModule` evaluates in its own ``on_*_epoch_end``, which Lightning calls *after* the callbacks' hook of
the same name, so consumers hook ``on_validation_end`` / ``on_test_end`` instead. Only global rank 0 holds a
result (it ran the search); other ranks, sanity checks and models without ``last_eval`` are skipped.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class EvalResultCallback(Callback):
    def __init__(self) -> None:
        super().__init__()
        self._seen: object | None = None

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
        self.on_eval(trainer, pl_module, result)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._consume(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._consume(trainer, pl_module, "test")
