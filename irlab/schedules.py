"""Learning-rate schedules as plain config (a mapping with ``name``), so checkpoints keep plain hyper-parameters.

* ``warmup_cosine`` -- linear warm-up over ``warmup_fraction`` of the run, then cosine to ``min_lr_ratio`` x
  the base rate; stepped per optimizer step (``interval: step``) or per epoch (``interval: epoch``, where
  ``warmup_fraction: 0`` equals ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=max_epochs)``).
* ``cosine_restarts`` -- timm's ``CosineLRScheduler`` as the IRGen reference code uses it (its
  ``scheduler/cosine_lr.py``, stepped at fractional epochs ``epoch + (batch + 1) / batches``): ``t`` in epochs;
  for ``t < warmup_t`` the rate rises linearly from ``warmup_lr_init``; after it, cycle ``i = t // t_initial``
  runs a cosine from ``base x cycle_decay**i`` down to ``lr_min`` (absolute rates, the same for every parameter
  group), and from cycle ``cycle_limit`` on the rate stays at ``lr_min``. The warm-up is *inside* the first
  cycle (timm's ``warmup_prefix=False``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

SCHEDULES = ("warmup_cosine", "cosine_restarts")
# CosineAnnealingLR(T_max=max_epochs), stepped per epoch: the baseline's and the IRGen tokenizer's default
COSINE_PER_EPOCH = {"name": "warmup_cosine", "warmup_fraction": 0.0, "min_lr_ratio": 0.0, "interval": "epoch"}
_KEYS = {
    "warmup_cosine": {"warmup_fraction": 0.0, "min_lr_ratio": 0.0, "interval": "step"},
    "cosine_restarts": {"t_initial": 100.0, "lr_min": 0.0, "warmup_t": 0.0, "warmup_lr_init": 0.0,
                        "cycle_decay": 1.0, "cycle_limit": 1},
}


def schedule_settings(schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """The schedule's own settings with defaults filled in. Unknown names and keys are errors that list the
    valid ones; keys of the *other* schedules are dropped, because Hydra merges a preset's ``schedule`` into the
    default one (a ``cosine_restarts`` preset arrives with the default's ``warmup_fraction``)."""
    schedule = dict(schedule or {"name": "warmup_cosine"})
    name = schedule.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name must be one of {SCHEDULES}, got {name!r}")
    known = {key for keys in _KEYS.values() for key in keys}
    unknown = set(schedule) - known
    if unknown:
        raise ValueError(f"schedule {name} takes {sorted(_KEYS[name])}, got unknown {sorted(unknown)}")
    return {"name": name, **_KEYS[name], **{k: v for k, v in schedule.items() if k in _KEYS[name]}}


def warmup_cosine_factor(t: float, total: float, warmup_fraction: float, min_lr_ratio: float) -> float:
    """Multiplier of the base rate at step (or epoch) ``t`` of ``total``."""
    warmup = min(total - 1, int(warmup_fraction * total))
    if t < warmup:
        return (t + 1) / (warmup + 1)
    progress = min(1.0, (t - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_restarts_lr(t: float, base_lr: float, *, t_initial: float, lr_min: float = 0.0, warmup_t: float = 0.0,
                       warmup_lr_init: float = 0.0, cycle_decay: float = 1.0, cycle_limit: int = 1) -> float:
    """The rate at epoch ``t`` (fractional) for a group whose base rate is ``base_lr`` (timm semantics)."""
    if t < warmup_t:
        return warmup_lr_init + t * (base_lr - warmup_lr_init) / warmup_t
    cycle = int(t // t_initial)
    if cycle >= cycle_limit:
        return lr_min
    peak = base_lr * cycle_decay**cycle
    return lr_min + 0.5 * (peak - lr_min) * (1 + math.cos(math.pi * (t - cycle * t_initial) / t_initial))


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Mapping[str, Any] | None, *, total_steps: int,
                    steps_per_epoch: int, max_epochs: int) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config (LambdaLR, one multiplier per parameter group) for ``schedule``."""
    s = schedule_settings(schedule)
    if s["name"] == "warmup_cosine":
        per_epoch = s["interval"] == "epoch"
        total = max(1, max_epochs if per_epoch else total_steps)

        def factor(t: int) -> float:
            return warmup_cosine_factor(t, total, s["warmup_fraction"], s["min_lr_ratio"])

        lambdas = [factor] * len(optimizer.param_groups)
        interval = "epoch" if per_epoch else "step"
    else:
        options = {k: v for k, v in s.items() if k != "name"}
        per_step = max(1, steps_per_epoch)

        def group_factor(base: float):
            return lambda step: cosine_restarts_lr(step / per_step, base, **options) / base if base > 0 else 0.0

        lambdas = [group_factor(group["lr"]) for group in optimizer.param_groups]
        interval = "step"
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return {"scheduler": scheduler, "interval": interval}


def trainer_scheduler(trainer, optimizer: torch.optim.Optimizer, schedule: Mapping[str, Any] | None) -> dict[str, Any]:
    """`build_scheduler` sized by a Lightning trainer's run (stepping batches, epochs)."""
    total = max(1, int(trainer.estimated_stepping_batches))
    epochs = max(1, int(trainer.max_epochs or 1))
    return build_scheduler(optimizer, schedule, total_steps=total, steps_per_epoch=math.ceil(total / epochs),
                           max_epochs=epochs)
