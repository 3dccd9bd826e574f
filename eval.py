"""Evaluate a trained checkpoint: `python eval.py experiment=... ckpt_path=/path/to/run/checkpoints/last.ckpt`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from irlab.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg, "evaluate")


if __name__ == "__main__":
    main()
