"""Embed a gallery once into an index folder: `python index.py ckpt_path=<ckpt> gallery=<folder | test> out=<dir>`.

Search it with `python eval.py index=<dir> query=<image | folder>` or `python serve.py index=<dir>`
(irlab/saved_index.py).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import irlab.wait_policy  # noqa: F401 - first, before torch loads (OpenMP threads sleep when waiting)
from irlab.cli import user_errors_as_messages
from irlab.run_config import with_checkpoint_run_config
from irlab.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="index")
def main(cfg: DictConfig) -> None:
    with user_errors_as_messages():
        run(with_checkpoint_run_config(cfg, "index"), "index")


if __name__ == "__main__":
    main()
