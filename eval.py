"""Evaluate a trained checkpoint: `python eval.py ckpt_path=<run>/checkpoints/epoch_XXX.ckpt`; search with it:
`python eval.py ckpt_path=<ckpt> query=<image | folder>` or, against a saved index, `python eval.py index=<dir>
query=<image | folder>`.

The checkpoint's own run supplies the experiment and overrides (`irlab.run_config`); anything typed here is
applied on top (`split=val`, `irgen.generator.beam_size=30`, or another `experiment=`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import irlab.wait_policy  # noqa: F401 - first, before torch loads (OpenMP threads sleep when waiting)
from irlab.cli import user_errors_as_messages
from irlab.run_config import with_checkpoint_run_config, with_index_checkpoint
from irlab.runner import run


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors_as_messages():
        run(with_checkpoint_run_config(with_index_checkpoint(cfg)), "evaluate")


if __name__ == "__main__":
    main()
