"""What `train.py` and `eval.py` run: build everything from the config, fit, test, report.

Each method names a train and an evaluate function ``(cfg) -> dict[str, float]`` and a checkpoint loader
``(cfg, datamodule) -> (model, path)`` under ``method:`` (conf/method/): single-stage models use `fit_and_test` /
`evaluate_checkpoint` / `load_trained_model` below, a method with several stages (IRGen) its own. `train.py`
always calls ``method.train`` and `eval.py` always ``method.evaluate`` (or, with ``query=``, `irlab.query` on
``method.load``'s model), so an experiment cannot turn an evaluation into a training run.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from callbacks.gpu_layout import GpuLayout
from datamodules.base import RetrievalDataModule
from irlab.atomic_files import StreamingCheckpointIO
from irlab.checkpoints import model_class_name, read_checkpoint
from irlab.distributed import install_hydra_ddp_launch
from irlab.paths import expand_path
from irlab.provenance import run_provenance, start_clock
from irlab.reporting import print_metrics, write_metrics

log = logging.getLogger(__name__)
# Lightning 2.6 says these on every fresh fit(ckpt_path=None): irlab chooses what to resume from explicitly
# (ckpt_path=last / on_exception, IRGen stage folders), so for a fresh run they are wrong and only confuse
warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=None\)` was called without a model")
warnings.filterwarnings("ignore", message=r".*\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint")


def instantiate_group(group: DictConfig | None, kind: type,
                      adapt: Callable[[type, DictConfig], dict] | None = None) -> list:
    """Instantiate every `_target_` entry of a config group (callbacks, loggers); None means none.

    ``adapt(target_class, conf)`` returns extra keyword arguments for an entry (IRGen's stages send each
    stage's checkpoints to its own folder this way)."""
    objects = []
    for name, conf in (group or {}).items():
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            continue
        extra = adapt(hydra.utils.get_class(conf._target_), conf) if adapt else {}
        obj = hydra.utils.instantiate(conf, **extra)
        if not isinstance(obj, kind):
            raise TypeError(f"{name}: expected a {kind.__name__}, got {type(obj).__name__}")
        objects.append(obj)
    return objects


def logged_metrics(trainer: L.Trainer, *prefixes: str) -> dict[str, float]:
    """The trainer's latest logged values whose names start with one of `prefixes`, as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)}


def build_datamodule(cfg: DictConfig) -> RetrievalDataModule:
    datamodule = hydra.utils.instantiate(cfg.dataset)
    datamodule.setup()
    return datamodule


def build_model(model_cfg: DictConfig, datamodule: RetrievalDataModule, **runtime) -> L.LightningModule:
    """Instantiate the model, filling `num_classes: null` from the datamodule's training split. Not recursive: the
    ``optimizer`` / ``scheduler`` nodes reach the module as config (it builds them in ``configure_optimizers``)
    and stay plain data in its checkpoints."""
    target = hydra.utils.get_class(model_cfg._target_)
    params = inspect.signature(target.__init__).parameters
    if "num_classes" in params and model_cfg.get("num_classes") is None:
        runtime.setdefault("num_classes", datamodule.num_classes)
    return hydra.utils.instantiate(model_cfg, _recursive_=False, **runtime)


def check_accelerator(trainer_cfg: DictConfig) -> None:
    """``trainer=gpu`` / ``ddp`` on a machine without a CUDA GPU: say which trainer to use instead."""
    if str(trainer_cfg.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError("this trainer config needs a CUDA GPU, and none is visible here. Use trainer=default "
                           "(picks what the machine has) or trainer=cpu; for DDP on CPU, trainer=ddp_cpu")


def build_callbacks(cfg: DictConfig, adapt: Callable[[type, DictConfig], dict] | None = None) -> list[Callback]:
    return instantiate_group(cfg.get("callbacks"), Callback, adapt)


def build_trainer(cfg: DictConfig, trainer_cfg: DictConfig | None = None, callbacks: list[Callback] | None = None,
                  **overrides) -> L.Trainer:
    """The one place every trainer is built (each method, each stage): accelerator check, the Hydra-aware DDP
    launch (extra ranks re-run this job in its own folder, also under ``-m``), callbacks and loggers from the
    config. ``trainer_cfg`` replaces ``cfg.trainer`` (a stage's merged settings); ``callbacks`` the configured
    callbacks (already built and adapted by the caller)."""
    trainer_cfg = cfg.trainer if trainer_cfg is None else trainer_cfg
    check_accelerator(trainer_cfg)
    install_hydra_ddp_launch()
    callbacks = build_callbacks(cfg) if callbacks is None else callbacks
    callbacks = [*callbacks, GpuLayout()]  # TF32 and channels-last on GPU trainers (callbacks/gpu_layout.py)
    loggers = instantiate_group(cfg.get("logger"), Logger)
    overrides.setdefault("plugins", [StreamingCheckpointIO()])  # checkpoints streamed to disk, then renamed
    return hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, **overrides)


def log_hyperparameters(trainer: L.Trainer, cfg: DictConfig, model: L.LightningModule, dm) -> None:
    """Send the resolved config, parameter counts and split description to every logger."""
    if not trainer.loggers:
        return
    params = {
        # without the `hydra` node: present when composed with the compose API, not resolvable outside a sweep
        "cfg": OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True),
        "model/params_total": sum(p.numel() for p in model.parameters()),
        "model/params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "data": dm.describe(),
    }
    for logger in trainer.loggers:
        logger.log_hyperparams(params)


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
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path} but {candidate} does not exist. To resume, run again in the same folder "
                f"(hydra.run.dir=<old run folder>) or pass ckpt_path=/path/to/{ckpt_path}.ckpt"
            )
        return str(candidate)
    path = expand_path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
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

    if cfg.get("test"):
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
        from irlab.query import query_checkpoint  # eval.py query=...: rankings and a grid instead of metrics

        metrics = query_checkpoint(cfg)
    else:
        metrics = hydra.utils.get_method(cfg.method[action])(cfg)
    if rank_zero_only.rank == 0:
        print(f"run folder: {output_dir}", flush=True)  # metrics.json, checkpoints, figures
    return metrics
