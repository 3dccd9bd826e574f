"""The single-stage method (baseline, AREIR, any `RetrievalModule` of ``model:``): fit on the configured split
and test the checkpoint selected on validation; evaluate or load a trained checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from datamodules.base import RetrievalDataModule
from irlab.builders import build_model, build_trainer, log_hyperparameters, logged_metrics
from irlab.checkpoints import model_class_name, read_checkpoint, resolve_ckpt_path
from irlab.fitting import fit_or_exit
from irlab.method import Method, RunReport, evaluate_model
from irlab.run_config import this_command

log = logging.getLogger(__name__)


def fit_and_test(cfg: DictConfig, datamodule: RetrievalDataModule) -> RunReport:
    """Train a model on the configured split, then evaluate the best checkpoint on the test split."""
    output_dir = Path(cfg.paths.output_dir)
    model = build_model(cfg.model, datamodule)
    trainer = build_trainer(cfg)
    log_hyperparameters(trainer, cfg, model, datamodule)
    resume = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if resume:  # a text file or a plain state dict: a clear error now, not an unpickler's KeyError in Lightning
        read_checkpoint(resume)
    fit_or_exit(trainer, this_command("ckpt_path=on_exception", f"hydra.run.dir={output_dir}"), model,
                datamodule=datamodule, ckpt_path=resume)
    metrics = logged_metrics(trainer, "val/", "train/")

    if cfg.test:  # conf/train.yaml
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            log.info(f"testing best checkpoint {best}")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
        metrics.update(logged_metrics(trainer, "test/"))
    return RunReport(metrics, cfg.task_name)


def load_trained_model(cfg: DictConfig, datamodule: RetrievalDataModule) -> tuple[L.LightningModule, str]:
    """(the model of ``cfg.model`` with the weights of ``ckpt_path``, the checkpoint's path): weights only, no
    pickle; a checkpoint of another model class is refused by name."""
    ckpt = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    model = build_model(cfg.model, datamodule)
    state = read_checkpoint(ckpt, expected_class=model_class_name(model))
    model.load_state_dict(state["state_dict"])
    return model, ckpt


def evaluate_checkpoint(cfg: DictConfig, datamodule: RetrievalDataModule) -> RunReport:
    """Load a trained checkpoint and evaluate it on ``split``."""
    model, ckpt = load_trained_model(cfg, datamodule)
    return evaluate_model(cfg, model, datamodule, ckpt)


SINGLE_STAGE = Method("single_stage", train=fit_and_test, evaluate=evaluate_checkpoint, load=load_trained_model)
