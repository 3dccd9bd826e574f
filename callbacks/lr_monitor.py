"""Lightning's `LearningRateMonitor` that stands down quietly (one debug line) when the run has no logger.

The stock callback raises in ``on_train_start`` without a logger, which would make ``logger=null`` runs (the
default, tests, debugging) fail just because the callback list is shared. Everything else is unchanged.
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor

log = logging.getLogger(__name__)


class SafeLearningRateMonitor(LearningRateMonitor):
    _disabled = False

    def on_train_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        self._disabled = not trainer.loggers
        if self._disabled:
            # the default run has no logger on purpose: nothing is wrong, so no warning
            log.debug("SafeLearningRateMonitor: no logger configured, learning rates are not logged (logger=csv)")
            return
        super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if not self._disabled:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if not self._disabled:
            super().on_train_epoch_start(trainer, *args, **kwargs)
