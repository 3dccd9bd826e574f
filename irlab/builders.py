"""Everything a run builds from its config, in one place for every method and stage: the datamodule, the
model, callbacks, loggers and the trainer (with the Hydra-aware DDP launch), and the hyper-parameters sent to
the loggers. The runner (`irlab.runner`), the single-stage method, IRGen's stages and the query path all build
through these."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelSummary
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from callbacks.approximate_search import ApproximateSearchRows
from callbacks.gpu_layout import GpuLayout
from callbacks.model_summary import ModelSummaryTable
from datamodules.base import RetrievalDataModule
from datamodules.errors import UserInputError
from irlab.atomic_files import StreamingCheckpointIO
from irlab.distributed import install_hydra_ddp_launch
from irlab.quiet_output import quiet_lightning
from irlab.retrieval.ann import INDEXES

log = logging.getLogger(__name__)


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


def approximate_indexes(cfg: DictConfig) -> dict[str, dict]:
    """``evaluation.indexes`` with each index's settings (``evaluation.<index>``); {} when none are asked for."""
    evaluation = cfg.get("evaluation") or {}  # absent in configs composed by older runs' overrides
    names = list(evaluation.get("indexes") or [])
    unknown = sorted(set(names) - set(INDEXES))
    if unknown:
        raise UserInputError(f"evaluation.indexes: unknown {unknown}; choose from {list(INDEXES)}")
    return {name: OmegaConf.to_container(evaluation.get(name) or OmegaConf.create({})) for name in names}


def build_trainer(cfg: DictConfig, trainer_cfg: DictConfig | None = None, callbacks: list[Callback] | None = None,
                  **overrides) -> L.Trainer:
    """The one place every trainer is built (each method, each stage): accelerator check, the Hydra-aware DDP
    launch (extra ranks re-run this job in its own folder, also under ``-m``), callbacks and loggers from the
    config. ``trainer_cfg`` replaces ``cfg.trainer`` (a stage's merged settings); ``callbacks`` the configured
    callbacks (already built and adapted by the caller)."""
    trainer_cfg = cfg.trainer if trainer_cfg is None else trainer_cfg
    check_accelerator(trainer_cfg)
    quiet_lightning()  # no cloud-logger tip or always-true notices in every run's output
    install_hydra_ddp_launch()
    callbacks = build_callbacks(cfg) if callbacks is None else callbacks
    callbacks = [*callbacks, GpuLayout()]  # TF32 and channels-last on GPU trainers (callbacks/gpu_layout.py)
    indexes = approximate_indexes(cfg)
    if indexes:  # evaluation.indexes: ANN rows beside the exact one (irlab/retrieval/ann.py)
        callbacks.append(ApproximateSearchRows(indexes))
    if trainer_cfg.get("enable_model_summary", True) is not False and \
            not any(isinstance(c, ModelSummary) for c in callbacks):  # else Lightning adds its own, FLOPs and all
        callbacks.append(ModelSummaryTable())
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
