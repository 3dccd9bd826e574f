"""Precision-recall curve of every evaluation: a PNG in the run folder, an image and a `wandb.plot.line` on W&B."""

from __future__ import annotations

import lightning as L
import numpy as np

from callbacks.base import EvalResultCallback
from callbacks.media import figure_path, is_wandb, log_image
from irlab.retrieval import plot_pr_curve


class PRCurvePlot(EvalResultCallback):
    """Plots ``last_eval.report.pr_curve`` (micro-averaged precision/recall at ranks 1..k)."""

    def __init__(self, stages: tuple[str, ...] = ("val", "test"), val_every: int = 1) -> None:
        super().__init__(val_every)
        self.stages = tuple(stages)

    def on_eval(self, trainer: L.Trainer, pl_module: L.LightningModule, result) -> None:
        curve = result.report.pr_curve
        if result.stage not in self.stages or not curve or len(curve.get("recall", ())) == 0:
            return
        title = f"{result.stage} precision-recall (step {trainer.global_step})"
        path = plot_pr_curve(curve, figure_path(trainer, result.stage, "pr_curve"), title=title,
                             others=result.report.other_curves, label=result.report.curve_label)
        key = f"{result.stage}/pr_curve"
        log_image(trainer, f"{key}_image", path)
        for logger in trainer.loggers:
            if is_wandb(logger):
                self._log_wandb_line(logger, key, curve, title, trainer.global_step)

    @staticmethod
    def _log_wandb_line(logger, key: str, curve: dict, title: str, step: int) -> None:
        import wandb

        recall = np.asarray(curve["recall"], dtype=float).reshape(-1)
        precision = np.asarray(curve["precision"], dtype=float).reshape(-1)
        keep = np.isfinite(recall) & np.isfinite(precision)
        table = wandb.Table(data=np.stack([recall[keep], precision[keep]], 1).tolist(), columns=["recall", "precision"])
        plot = wandb.plot.line(table, "recall", "precision", title=title)
        logger.experiment.log({key: plot, "trainer/global_step": step})
