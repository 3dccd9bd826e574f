"""Learning-rate schedules, each a function ``(optimizer, trainer, **settings) -> Lightning lr_scheduler dict``
named by a `_partial_` config node (conf/scheduler/), sized by the trainer's run (epochs, optimizer steps).

* `warmup_cosine` -- linear warm-up over ``warmup_fraction`` of the run, then cosine to ``min_lr_ratio`` x the
  base rate; stepped per optimizer step (``interval: step``) or per epoch (``interval: epoch``, where
  ``warmup_fraction: 0`` equals ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=max_epochs)``).
* `cosine_restarts` -- timm's ``CosineLRScheduler`` as the IRGen reference code uses it (its
  ``scheduler/cosine_lr.py``, stepped at fractional epochs ``epoch + (batch + 1) / batches``): ``t`` in epochs;
  for ``t < warmup_t`` the rate rises linearly from ``warmup_lr_init``; after it, cycle ``i = t // t_initial``
  runs a cosine from ``base x cycle_decay**i`` down to ``lr_min`` (absolute rates, the same for every parameter
  group), and from cycle ``cycle_limit`` on the rate stays at ``lr_min``. The warm-up is *inside* the first
  cycle (timm's ``warmup_prefix=False``).
* `multistep` -- the rate x ``gamma`` at each milestone, milestones as fractions of the epochs (AREIR's).
* `constant` -- the base rate throughout (a scheduler node that a recipe can still override, unlike null).

Settings have no Python defaults: the YAML files are the one place they are written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

INTERVALS = ("step", "epoch")


def run_length(trainer) -> tuple[int, int]:
    """(optimizer steps, epochs) of a Lightning trainer's run, at least 1 each."""
    return max(1, int(trainer.estimated_stepping_batches)), max(1, int(trainer.max_epochs or 1))


def warmup_cosine_factor(t: float, total: float, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Multiplier of the base rate at step (or epoch) ``t`` of ``total``."""
    warmup = min(total - 1, int(warmup_fraction * total))
    if t < warmup:
        return (t + 1) / (warmup + 1)
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_restarts_lr(t: float, base_lr: float, *, t_initial: float, lr_min: float, warmup_t: float,
                       warmup_lr_init: float, cycle_decay: float, cycle_limit: int) -> float:
    """The rate at epoch ``t`` (fractional) for a group whose base rate is ``base_lr`` (timm semantics)."""
    if t < warmup_t:
        return warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_t
    cycle = int(t // t_initial)
    if cycle >= cycle_limit:
        return lr_min
    peak = base_lr * cycle_decay**cycle
    return lr_min + 0.5 * (peak - lr_min) * (1 + math.cos(math.pi * (t - cycle * t_initial) / t_initial))


def warmup_cosine(optimizer: torch.optim.Optimizer, trainer, *, warmup_fraction: float, min_lr_ratio: float,
                  interval: str) -> dict[str, Any]:
    if interval not in INTERVALS:
        raise ValueError(f"scheduler.interval must be one of {INTERVALS}, got {interval!r}")
    steps, epochs = run_length(trainer)
    total = epochs if interval == "epoch" else steps

    def factor(t: int) -> float:
        return warmup_cosine_factor(t, total, warmup_fraction, min_lr_ratio)

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": interval}


def cosine_restarts(optimizer: torch.optim.Optimizer, trainer, **timm_settings) -> dict[str, Any]:
    """`cosine_restarts_lr` per parameter group (each relative to its own base rate), stepped per step."""
    steps, epochs = run_length(trainer)
    per_epoch = max(1, math.ceil(steps / epochs))

    def group_factor(base: float):
        return lambda step: cosine_restarts_lr(step / per_epoch, base, **timm_settings) / base if base > 0 else 0.0

    lambdas = [group_factor(group["lr"]) for group in optimizer.param_groups]
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas), "interval": "step"}


def multistep(optimizer: torch.optim.Optimizer, trainer, *, milestones: Sequence[float], gamma: float
              ) -> dict[str, Any]:
    _, epochs = run_length(trainer)
    at = sorted(int(f * epochs) for f in milestones)  # as the AREIR reference: int(0.5 * epochs)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=at, gamma=gamma)
    return {"scheduler": scheduler, "interval": "epoch"}


def constant(optimizer: torch.optim.Optimizer, trainer) -> dict[str, Any]:
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0), "interval": "epoch"}
