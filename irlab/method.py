"""What a method is to the runner (`irlab.runner`): three functions of ``(cfg, datamodule)``, and the report
its train or evaluate function hands back, which the runner writes (``metrics.json``) and prints once.

The runner seeds the run and builds its datamodule before calling any of them, so a method starts from the
same state whichever entry point (``train.py``, ``eval.py``, ``eval.py query=...``) called it.
`evaluate_model` is the evaluation every method shares once it has loaded its model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from datamodules.base import RetrievalDataModule
from irlab.builders import build_trainer, logged_metrics


@dataclass
class RunReport:
    """A finished train or evaluate call: its metrics, the table title, what was measured (merged into the
    datamodule's description in ``metrics.json``) and the names of ranking rows (IRGen: beam, kNN, ...)."""

    metrics: dict[str, float]
    title: str
    data: dict = field(default_factory=dict)
    row_names: dict[str, str] | None = None


MethodStep = Callable[[DictConfig, RetrievalDataModule], RunReport]
ModelLoader = Callable[[DictConfig, RetrievalDataModule], tuple[L.LightningModule, str]]


@dataclass(frozen=True)
class Method:
    """``train`` fits and tests, ``evaluate`` scores ``ckpt_path`` and never trains, ``load`` returns
    (the model of ``ckpt_path``, its path) for `irlab.query`."""

    name: str
    train: MethodStep
    evaluate: MethodStep
    load: ModelLoader


def evaluate_model(cfg: DictConfig, model: L.LightningModule, datamodule: RetrievalDataModule, ckpt: str,
                   row_names: dict[str, str] | None = None) -> RunReport:
    """Evaluate a loaded model on ``split`` (test by default)."""
    trainer = build_trainer(cfg)
    stage = cfg.split  # conf/eval.yaml
    if stage == "val":
        trainer.validate(model, datamodule=datamodule, verbose=False)
    else:
        trainer.test(model, datamodule=datamodule, verbose=False)
    return RunReport(logged_metrics(trainer, f"{stage}/"), f"eval {Path(ckpt).name}", {"checkpoint": str(ckpt)},
                     row_names)
