"""Train a retrieval model: `python train.py [experiment=...] [key=value ...]` (Hydra; `-m` for sweeps)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import irlab.wait_policy  # noqa: F401 - first, before torch loads (OpenMP threads sleep when waiting)
from irlab.cli import require_plugins, user_errors_as_messages
from irlab.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors_as_messages():
        metrics = run(cfg, "train")
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


if __name__ == "__main__":
    require_plugins(sys.argv[1:])
    main()
