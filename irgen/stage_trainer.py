"""The trainer of one IRGen stage and the stage folder's checkpoints: which settings the stage trains with,
where its checkpoints go, what it resumes from and which checkpoint it hands on (`fit_stage`: the fit both
stages share)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from omegaconf import DictConfig, OmegaConf

from callbacks.full_state_checkpoint import FullStateCheckpoint
from callbacks.learning_curve import LearningCurve
from irlab.builders import build_callbacks, build_trainer, log_hyperparameters
from irlab.checkpoints import read_checkpoint
from irlab.fitting import fit_or_exit
from irlab.run_config import this_command

log = logging.getLogger("irgen.pipeline")  # one logger for every stage of the pipeline

# a stage folder's full training state (what an interrupted stage resumes from) and its crash/SIGTERM twin
LAST_CHECKPOINT, ON_EXCEPTION_CHECKPOINT = "last.ckpt", "on_exception.ckpt"
# what debug=fast limits; it wins over a stage's own settings (a generator preset's 100 epochs)
DEBUG_KEYS = ("max_epochs", "limit_train_batches", "limit_val_batches", "limit_test_batches", "num_sanity_val_steps")


def stage_trainer_config(cfg: DictConfig, stage: str) -> DictConfig:
    """`trainer` with ``irgen.stage_trainer.<stage>`` merged on top; under ``debug=fast`` the debug limits win
    over the stage's own epochs (a generator preset's 100 epochs must not run in a smoke test)."""
    overrides = cfg.irgen.stage_trainer[stage] or {}  # conf/irgen/default.yaml
    merged = OmegaConf.merge(cfg.trainer, overrides)
    if cfg.debug_run:
        merged = OmegaConf.merge(merged, {k: cfg.trainer[k] for k in DEBUG_KEYS if k in cfg.trainer},
                                 {"check_val_every_n_epoch": 1})
    return merged


def build_stage_trainer(cfg: DictConfig, stage: str, ckpt_dir: Path, monitor: str = "val/R@1") -> L.Trainer:
    """A trainer whose checkpoints (best by `monitor` and last.ckpt) go to the stage's artifact sub-folder, built
    by the shared `build_trainer` (DDP launch, loggers) with the stage's trainer settings."""
    def adapt(target: type, conf: DictConfig) -> dict:
        if issubclass(target, OnExceptionCheckpoint):  # where this stage's resume looks (`resume_checkpoint`)
            return {"dirpath": str(ckpt_dir)}
        if issubclass(target, ModelCheckpoint):  # the selected model and last.ckpt go to the stage's folder
            extra = {"dirpath": str(ckpt_dir)}
            if conf.get("monitor") is not None:
                extra.update(monitor=monitor, mode="max")
            return extra
        if issubclass(target, LearningCurve):  # one curve per stage in the run folder
            return {"monitor": monitor, "name": f"learning_curve_{stage}"}
        return {}

    callbacks = build_callbacks(cfg, adapt)
    resumable = not cfg.debug_run  # debug=fast writes no full training state (conf/debug/fast.yaml)
    if resumable and not any(isinstance(c, ModelCheckpoint) and c.monitor is None for c in callbacks):
        callbacks.append(FullStateCheckpoint(  # resume needs it
            dirpath=str(ckpt_dir), filename=Path(LAST_CHECKPOINT).stem, save_top_k=1, enable_version_counter=False,
            save_on_train_epoch_end=True))
    return build_trainer(cfg, trainer_cfg=stage_trainer_config(cfg, stage), callbacks=callbacks)


def resume_checkpoint(stage_dir: Path) -> str | None:
    """The newest of the stage's ``on_exception.ckpt`` (SIGTERM or a crash, mid-epoch) and ``last.ckpt``."""
    found = [p for p in (stage_dir / ON_EXCEPTION_CHECKPOINT, stage_dir / LAST_CHECKPOINT) if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime_ns)) if found else None


def select_checkpoint(trainer: L.Trainer, last: Path) -> tuple[Path | None, str]:
    """The checkpoint model selection picked (best validation metric), else ``last.ckpt``, else None (the model
    as training left it); and a note saying which, recorded in the artifact."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file():
        return Path(best), f"best {trainer.checkpoint_callback.monitor}"
    if last.is_file():
        return last, "last (no validation metric was monitored)"
    return None, "final in-memory model (no checkpoint was written)"


def load_weights(model: L.LightningModule, path: Path | None) -> None:
    """Load a Lightning checkpoint's weights (buffers included: codebooks, identifiers) safely into `model`."""
    if path is not None:
        model.load_state_dict(read_checkpoint(path)["state_dict"])


def fit_stage(trainer: L.Trainer, cfg: DictConfig, stage: str, model: L.LightningModule, datamodule,
              stage_dir: Path) -> tuple[Path | None, str]:
    """Log the stage's hyper-parameters, fit it (resuming an interrupted fit of the stage folder; a SIGTERM
    exits with the command that resumes) and return the checkpoint selected to hand on (`select_checkpoint`)."""
    log_hyperparameters(trainer, cfg, model, datamodule)
    resume = resume_checkpoint(stage_dir)
    if resume:
        log.info(f"{stage}: resuming the interrupted stage from {resume}")
    fit_or_exit(trainer, f"{this_command()}   (the {stage} stage resumes from {stage_dir})", model,
                datamodule=datamodule, ckpt_path=resume, weights_only=True)
    return select_checkpoint(trainer, stage_dir / LAST_CHECKPOINT)
