"""Send a PNG (or a few scalars) to whatever loggers the trainer has; the PNG always stays in the run folder.

Callbacks that draw figures share this so that W&B gets `wandb.Image`s, TensorBoard gets `add_image`, and runs
without an image-capable logger (CSV, none) still keep every figure under ``<run folder>/figures/``.
Loggers are matched by capability (``experiment.add_image``) rather than class where possible, so a logger
wrapping TensorBoard's writer works too.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


def figure_path(trainer: L.Trainer, stage: str, name: str) -> Path:
    """``<run folder>/figures/<stage>/<name>_step<global step>.png`` (a new file per evaluation)."""
    return Path(trainer.default_root_dir) / "figures" / stage / f"{name}_step{trainer.global_step:06d}.png"


def is_wandb(logger) -> bool:
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - wandb is a core dependency
        return False
    return isinstance(logger, WandbLogger)


def log_image(trainer: L.Trainer, key: str, path: str | Path, caption: str | None = None) -> None:
    """Log the PNG at `path` under `key` to every logger able to show images (rank 0 only)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if is_wandb(logger):
            import wandb

            logger.experiment.log({key: wandb.Image(str(path), caption=caption),
                                   "trainer/global_step": trainer.global_step})
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            array = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, array, trainer.global_step, dataformats="HWC")


def log_scalars(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Log metrics straight to the loggers: callbacks run after the module's own `self.log` calls are flushed."""
    if not trainer.is_global_zero or not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
