"""The validation metric of every epoch: printed at the end of training, saved as JSON and as a PNG curve.

A run that cannot show learning (best checkpoint at epoch 0, a flat curve) is visible at a glance; the files
are ``<run folder>/learning_curve.{png,json}`` (the IRGen stages write theirs under their own names).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class LearningCurve(L.Callback):
    def __init__(self, monitor: str = "val/R@1", name: str = "learning_curve") -> None:
        super().__init__()
        self.monitor, self.name = monitor, name
        self.epochs: list[int] = []
        self.values: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or trainer.state.fn != "fit":
            return
        if self.epochs and self.epochs[-1] == trainer.current_epoch:  # several validations in one epoch
            self.values[-1] = float(value)
        else:
            self.epochs.append(int(trainer.current_epoch))
            self.values.append(float(value))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.epochs:
            return
        best = max(range(len(self.values)), key=self.values.__getitem__)
        line = "  ".join(f"{e}:{v:.3f}" for e, v in zip(self.epochs, self.values, strict=True))
        print(f"{self.monitor} per epoch: {line}   (best: epoch {self.epochs[best]})", flush=True)
        folder = Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"monitor": self.monitor, "epochs": self.epochs, "values": self.values, "best_epoch": self.epochs[best]}
        (folder / f"{self.name}.json").write_text(json.dumps(data, indent=1))
        self._plot(folder / f"{self.name}.png", best)

    def _plot(self, path: Path, best: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(self.epochs, self.values, marker="o")
        ax.plot([self.epochs[best]], [self.values[best]], marker="*", markersize=14, color="tab:red", linestyle="",
                label=f"best: epoch {self.epochs[best]} ({self.values[best]:.3f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(self.monitor)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
