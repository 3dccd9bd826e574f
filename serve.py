"""Look at retrieval in a browser: `python serve.py index=<dir> [port=8000]` (irlab/serve.py), then open the page it
prints. `POST /search` (form field `file`) answers JSON for scripts."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import irlab.wait_policy  # noqa: F401 - first, before torch loads (OpenMP threads sleep when waiting)
from irlab.cli import user_errors_as_messages
from irlab.run_config import with_checkpoint_run_config, with_index_checkpoint
from irlab.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    with user_errors_as_messages():
        run(with_checkpoint_run_config(with_index_checkpoint(cfg), "serve"), "serve")


if __name__ == "__main__":
    main()
