"""What `train.py` and `eval.py` run: build everything from the config, fit, test, report.

Each method names a train and an evaluate function ``(cfg) -> dict[str, float]`` and a checkpoint loader
``(cfg, datamodule) -> (model, path)`` under ``method:`` (conf/method/): single-stage models use `fit_and_test` /
`evaluate_checkpoint` / `load_trained_model` below, a method with several stages (IRGen) its own. `train.py`
always calls ``method.train`` and `eval.py` always ``method.evaluate`` (or, with ``query=``, `irlab.query` on
``method.load``'s model), so an experiment cannot turn an evaluation into a training run. What every run builds
(datamodule, model, callbacks, trainer) comes from `irlab.builders`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from datamodules.base import RetrievalDataModule
from datamodules.errors import MissingFileError
from datamodules.paths import expand_path
from irlab.builders import (
    build_datamodule,
    build_model,
    build_trainer,
    log_hyperparameters,
    logged_metrics,
)
from irlab.checkpoints import model_class_name, read_checkpoint
from irlab.provenance import run_provenance, start_clock
from irlab.query import query_checkpoint
from irlab.reporting import print_metrics, write_metrics

log = logging.getLogger(__name__)
# Lightning 2.6 says these on every fresh fit(ckpt_path=None): irlab chooses what to resume from explicitly
# (ckpt_path=last / on_exception, IRGen stage folders), so for a fresh run they are wrong and only confuse
warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=None\)` was called without a model")
warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint")


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``last`` / ``on_exception`` name this run folder's checkpoints; anything else must be an existing file.

    ``last`` (end of the last finished epoch) resumes exactly: same final metrics as an uninterrupted run.
    ``on_exception`` (written on SIGTERM or a crash, mid-epoch) loses less work but replays part of an epoch.
    """
    if ckpt_path in (None, ""):
        return None
    if ckpt_path in ("last", "on_exception"):
        candidate = Path(output_dir) / "checkpoints" / f"{ckpt_path}.ckpt"
        if not candidate.is_file():
            raise MissingFileError(
                f"ckpt_path={ckpt_path} but {candidate} does not exist. To resume, run again in the same folder "
                f"(hydra.run.dir=<old run folder>) or pass ckpt_path=/path/to/{ckpt_path}.ckpt"
            )
        return str(candidate)
    path = expand_path(ckpt_path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    return str(path)


SIGTERM_EXIT = 143  # 128 + SIGTERM: what schedulers expect from a job that was terminated


def this_command(*extra: str) -> str:
    """The command line of this run (its overrides, minus ``ckpt_path`` and run folders) plus `extra`."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        script = "eval.py" if hc.job.config_name == "eval" else "train.py"
        kept = [o for o in hc.overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir=", "hydra.sweep."))]
    except ValueError:  # no Hydra context (direct API use)
        script, kept = "train.py", []
    return " ".join(["python", script, *kept, *extra])


def fit_or_exit(trainer: L.Trainer, resume: str, *args, **kwargs) -> None:
    """``trainer.fit`` that turns SIGTERM into exit code 143 with the command that resumes, instead of a bare
    traceback (or an exit code 0, when Lightning swallowed it), so that a scheduler records a failure and the
    user knows what to type. Lightning has saved ``on_exception.ckpt`` by then."""
    try:
        trainer.fit(*args, **kwargs)
    except SIGTERMException:
        pass
    else:
        if not trainer.received_sigterm:
            return
    log.error(f"received SIGTERM: training stopped and its state was saved. Resume with:\n  {resume}")
    raise SystemExit(SIGTERM_EXIT)


def fit_and_test(cfg: DictConfig) -> dict[str, float]:
    """Train a model on the configured split, then evaluate the best checkpoint on the test split."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    model = build_model(cfg.model, datamodule)
    trainer = build_trainer(cfg)
    log_hyperparameters(trainer, cfg, model, datamodule)
    log.info(f"data: {datamodule.describe()}")
    if datamodule.split.val_is_test:
        log.warning("no validation split (dataset.val_fraction=0): validation reports the TEST set, so "
                    "checkpoint selection sees test labels. Set dataset.val_fraction for honest model selection.")

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

    if trainer.is_global_zero:
        write_metrics(output_dir / "metrics.json", metrics, datamodule.describe(),
                      provenance=run_provenance(cfg, datamodule))
        print_metrics(metrics, title=f"{cfg.task_name}: {datamodule.name} / {datamodule.protocol}")
    return metrics


def load_trained_model(cfg: DictConfig, datamodule: RetrievalDataModule) -> tuple[L.LightningModule, str]:
    """(the model of ``cfg.model`` with the weights of ``ckpt_path``, the checkpoint's path): weights only, no
    pickle; a checkpoint of another model class is refused by name."""
    ckpt = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    model = build_model(cfg.model, datamodule)
    state = read_checkpoint(ckpt, expected_class=model_class_name(model))
    model.load_state_dict(state["state_dict"])
    return model, ckpt


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, float]:
    """Load a trained checkpoint and evaluate it on the configured split."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    model, ckpt = load_trained_model(cfg, datamodule)
    return evaluate_model(cfg, model, datamodule, ckpt)


def evaluate_model(cfg: DictConfig, model: L.LightningModule, datamodule: RetrievalDataModule, ckpt: str,
                   row_names: dict[str, str] | None = None) -> dict[str, float]:
    """Evaluate a loaded model on ``split`` (test by default), write ``metrics.json`` and print the table: the
    part every method's evaluate function shares."""
    trainer = build_trainer(cfg)
    stage = cfg.get("split", "test")
    if stage == "val":
        trainer.validate(model, datamodule=datamodule, verbose=False)
    else:
        trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = logged_metrics(trainer, f"{stage}/")
    if trainer.is_global_zero:
        data = {**datamodule.describe(), "checkpoint": str(ckpt)}
        write_metrics(Path(cfg.paths.output_dir) / "metrics.json", metrics, data, row_names,
                      provenance=run_provenance(cfg, datamodule))
        print_metrics(metrics, title=f"eval {Path(ckpt).name}: {datamodule.name} / {datamodule.protocol}",
                      row_names=row_names)
    return metrics


ACTIONS = ("train", "evaluate")


def run(cfg: DictConfig, action: str = "train") -> dict[str, float]:
    """Call the method's ``train`` or ``evaluate`` function (``cfg.method.<action>``)."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    start_clock()
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    output_dir = cfg.paths.get("output_dir")
    log.info(f"run folder: {output_dir}")
    if action == "evaluate" and cfg.get("query"):
        metrics = query_checkpoint(cfg)
    else:
        metrics = hydra.utils.get_method(cfg.method[action])(cfg)
    if rank_zero_only.rank == 0:
        print(f"run folder: {output_dir}", flush=True)  # metrics.json, checkpoints, figures
    return metrics
