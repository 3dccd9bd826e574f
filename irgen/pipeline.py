"""IRGen as a pipeline of stages sharing one artifact folder: `python train.py experiment=<x>_irgen`.

``method: irgen`` (conf/method/irgen.yaml) selects `IRGEN` (registered in `irlab.methods`): training is this
pipeline, evaluation and loading a generator checkpoint are `irgen.generator_checkpoint`. Stages run in `STAGE_ORDER`;
``irgen.stage`` picks one (``tokenizer`` | ``generator``) or ``all``. Every stage writes into
``irgen.artifact_dir`` (shared across runs, keyed by dataset, protocol and seed), so that:

* a finished stage is reused (its outputs are validated against this run's dataset and config, and a mismatch
  stops the run with the command that rebuilds it: ``irgen.rebuild=true``),
* an interrupted stage resumes from the ``last.ckpt`` in its sub-folder.

Where things are: `irgen.tokenizer_stage` and `irgen.generator_stage` (the stages), `irgen.stage_trainer` (each
stage's trainer and checkpoints), `irgen.signatures` (what outputs must match to be reused),
`irgen.stage_context` (what stages share). Adding a stage = a ``fn(ctx: PipelineContext) -> dict[str, float]``
and its clearer, registered below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from datamodules.base import RetrievalDataModule
from datamodules.paths import expand_path
from irgen.generator_checkpoint import evaluate_generator, load_trained_generator
from irgen.generator_stage import clear_generator_outputs, generator_stage
from irgen.stage_context import PipelineContext
from irgen.tokenizer_stage import clear_tokenizer_outputs, tokenizer_stage
from irlab.method import Method, RunReport

log = logging.getLogger(__name__)

Stage = Callable[[PipelineContext], dict[str, float]]
STAGE_ORDER = ("tokenizer", "generator")
STAGES: dict[str, Stage] = {"tokenizer": tokenizer_stage, "generator": generator_stage}
# what ``irgen.rebuild=true`` (and every debug=fast run) removes before a selected stage runs
CLEARERS: dict[str, Callable[[Path], None]] = {"tokenizer": clear_tokenizer_outputs,
                                                "generator": clear_generator_outputs}


def train_pipeline(cfg: DictConfig, datamodule: RetrievalDataModule) -> RunReport:
    """Run ``irgen.stage`` (or every stage in order for ``all``)."""
    from irgen.generator import RANKING_ROWS

    stage = cfg.irgen.stage
    if stage != "all" and stage not in STAGE_ORDER:
        raise ValueError(f"irgen.stage must be 'all' or one of {STAGE_ORDER}, got {stage!r}")
    artifact_dir = expand_path(cfg.irgen.artifact_dir)
    if cfg.debug_run:  # a smoke test never leaves an artifact that a real run would meet
        artifact_dir = artifact_dir.with_name(artifact_dir.name + "_debug")
    ctx = PipelineContext(cfg, datamodule, artifact_dir)
    selected = list(STAGE_ORDER) if stage == "all" else [stage]
    if (cfg.irgen.rebuild or cfg.debug_run) and rank_zero_only.rank == 0:
        why = "irgen.rebuild=true" if cfg.irgen.rebuild else "debug=fast (smoke tests always rebuild)"
        for name in selected:
            log.warning(f"{why}: removing the previous {name} outputs in {ctx.artifact_dir}")
            CLEARERS[name](ctx.artifact_dir)
    for name in selected:
        log.info(f"IRGen stage: {name}")
        ctx.metrics.update(STAGES[name](ctx))
    return RunReport(ctx.metrics, f"IRGen ({stage})", {"artifact_dir": str(ctx.artifact_dir)},
                     RANKING_ROWS if "generator" in selected else None)


IRGEN = Method("irgen", train=train_pipeline, evaluate=evaluate_generator, load=load_trained_generator)
