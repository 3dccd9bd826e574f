"""A module's optimizer and learning-rate schedule from its `_partial_` config nodes (conf/optimizer/,
conf/scheduler/), so every model configures them the same way and the YAML is the one place values live.

A module lists its parameter groups (with an ``lr_scale`` each: a pretrained trunk slower than its head, a frozen
encoder left out) and calls `configure_optimization` from ``configure_optimizers``; the nodes are stored in the
module's hyper-parameters as plain data, so checkpoints stay loadable with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[1] / "conf"


def preset(group: str, name: str, **values) -> dict[str, Any]:
    """``conf/<group>/<name>.yaml`` (group: optimizer | scheduler) with `values` on top, as a plain dict: the
    node a module built in Python (not from its model config) is given, e.g.
    ``EmbeddingBaseline(10, optimizer=preset("optimizer", "adamw", lr=1e-3))``."""
    path = CONF / group / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no preset {path}; the {group} presets: "
                                f"{sorted(p.stem for p in (CONF / group).glob('*.yaml'))}")
    return {**OmegaConf.to_container(OmegaConf.load(path)), **values}


def require_optimizer(optimizer: Mapping | None, model: str) -> dict[str, Any]:
    """The optimizer node as a plain dict; a clear error when a module is built without one."""
    if not optimizer or "_target_" not in optimizer:
        raise ValueError(f"{model} needs an optimizer node, e.g. optimizer={{'_target_': 'torch.optim.AdamW', "
                         f"'_partial_': True, 'lr': 1e-3}}: build the model from its config (conf/model/, "
                         f"irlab.builders.build_model) or pass one: irlab.optim.preset('optimizer', 'adamw', lr=...)")
    return dict(optimizer)


def configure_optimization(optimizer_cfg: Mapping, scheduler_cfg: Mapping | None, groups: list[dict],
                           trainer) -> torch.optim.Optimizer | dict[str, Any]:
    """What ``configure_optimizers`` returns: the optimizer over `groups` (each at ``lr x lr_scale``) and, when
    a scheduler node is given, its Lightning ``lr_scheduler`` config sized by `trainer`'s run."""
    conf = dict(optimizer_cfg)
    base_lr = float(conf["lr"])
    groups = [{**g, "params": list(g["params"]), "lr": base_lr * g.get("lr_scale", 1.0)} for g in groups]
    groups = [{k: v for k, v in g.items() if k != "lr_scale"} for g in groups if g["params"]]
    if conf.get("fused"):
        params = [p for g in groups for p in g["params"]]
        if not all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params):
            log.info("optimizer: fused step off (parameters that are not float32 on CPU/CUDA)")
            conf["fused"] = False
    optimizer = hydra.utils.instantiate(conf, _convert_="all")(groups)
    if not scheduler_cfg:
        return optimizer
    scheduler = hydra.utils.instantiate(dict(scheduler_cfg), _convert_="all")(optimizer, trainer)
    return {"optimizer": optimizer, "lr_scheduler": scheduler}


def module_optimization(module, groups: list[dict]) -> torch.optim.Optimizer | dict[str, Any]:
    """``configure_optimizers`` of a module whose hyper-parameters hold ``optimizer`` / ``scheduler`` nodes:
    `configure_optimization` over its parameter `groups`, sized by its trainer."""
    optimizer = require_optimizer(module.hparams.optimizer, type(module).__name__)
    return configure_optimization(optimizer, module.hparams.scheduler, groups, module.trainer)
