"""IRGen stage 2: train the generator on the artifact's identifiers (or reuse / resume it), then test it
(`irgen.pipeline` runs it)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from datamodules.errors import MissingFileError
from datamodules.paths import expand_path
from irgen.signatures import claim_stage_folder, generator_signature
from irgen.stage_context import PipelineContext, rebuild_command
from irgen.stage_trainer import LAST_CHECKPOINT, build_stage_trainer, fit_stage
from irgen.tokenizer_stage import TOKENIZER_DIR
from irlab.atomic_files import write_text_atomically
from irlab.builders import build_model, logged_metrics
from irlab.folder_lock import folder_lock
from irlab.run_config import write_run_overrides

log = logging.getLogger("irgen.pipeline")  # one logger for every stage of the pipeline
GENERATOR_DIR = "generator"
GENERATOR_DONE = "done.json"


def encoder_init_path(ctx: PipelineContext, value: str | None) -> Path | None:
    """``encoder_init``: null (encoder as configured), ``tokenizer`` (the tokenizer stage's trained encoder) or
    a checkpoint path."""
    if value in (None, "", "none", "null"):
        return None
    if value == "tokenizer":  # the checkpoint the identifiers were encoded with (recorded in the artifact)
        recorded = (ctx.artifact.meta.get("checkpoint") if ctx.artifact else None) or ""
        path = Path(recorded) if Path(recorded).is_file() else ctx.artifact_dir / TOKENIZER_DIR / LAST_CHECKPOINT
    else:
        path = expand_path(value)
    if not path.is_file():
        raise MissingFileError(f"generator encoder_init={value!r}: {path} does not exist. Run the tokenizer stage "
                                f"first (irgen.stage=tokenizer) or set irgen.generator.encoder_init=null")
    return path


def generator_stage(ctx: PipelineContext) -> dict[str, float]:
    """Train the generator on the artifact's identifiers (or reuse/resume it), then evaluate on the test split.

    Metrics: ``val/*`` and ``test/*`` are beam-search retrieval (the IRGen headline), ``*/knn/*`` exact kNN
    over the same encoder's global features, optionally ``*/exhaustive/*``. The tokenizer stage's own ``val/*``
    numbers (same run, stage=all) are renamed ``tokenizer/val/*`` so that nothing is silently overwritten.
    """
    signature = generator_signature(ctx.cfg, ctx.datamodule, ctx.identifiers())
    gen_dir = generator_dir(ctx.artifact_dir, signature)
    log.info(f"generator: stage folder {gen_dir}")
    with folder_lock(gen_dir, "generator", enabled=rank_zero_only.rank == 0):
        return train_or_reuse_generator(ctx, gen_dir, signature)


def generator_dir(artifact_dir: Path, signature: dict) -> Path:
    """``generator-<hash>``: one folder per setting that changes the trained generator (identifiers, model,
    training and data settings: `generator_signature`), so that a sweep over generator settings trains each in
    its own folder, in parallel, next to one shared tokenizer."""
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:10]
    return artifact_dir / f"{GENERATOR_DIR}-{digest}"


def train_or_reuse_generator(ctx: PipelineContext, gen_dir: Path, signature: dict) -> dict[str, float]:
    cfg, dm = ctx.cfg, ctx.datamodule
    artifact = ctx.identifiers()
    claim_stage_folder(gen_dir, signature, (LAST_CHECKPOINT, GENERATOR_DONE), "a generator trained",
                       rebuild_command("generator"))
    for key in [k for k in ctx.metrics if k.startswith("val/")]:
        ctx.metrics[f"tokenizer/{key}"] = ctx.metrics.pop(key)

    model = build_model(cfg.irgen.generator, dm, code_depth=artifact.num_levels, codebook_size=artifact.num_codes)
    model.set_identifiers(artifact.codes)
    trainer = build_stage_trainer(cfg, "generator", gen_dir, monitor="val/R@1")
    done, last = gen_dir / GENERATOR_DONE, gen_dir / LAST_CHECKPOINT
    metrics: dict[str, float] = {}
    if done.is_file():
        best = json.loads(done.read_text())["checkpoint"]
        log.info(f"generator: reusing the trained generator {best} (irgen.stage=generator irgen.rebuild=true "
                 f"retrains it); evaluating with the current beam/eval settings")
    else:
        init = encoder_init_path(ctx, cfg.irgen.generator.get("encoder_init"))
        if init is not None and not last.is_file():
            log.info(f"generator: encoder initialised from {init}")
            model.load_encoder_weights(init)
        selected, _ = fit_stage(trainer, cfg, "generator", model, dm, gen_dir)
        metrics.update(logged_metrics(trainer, "val/", "train/"))
        best = str(selected or last)
        if trainer.is_global_zero:
            write_text_atomically(done, json.dumps({"checkpoint": best, "metrics": metrics}, indent=2, sort_keys=True))
            write_run_overrides(gen_dir)  # `eval.py ckpt_path=<this folder's checkpoint>` needs nothing else
        trainer.strategy.barrier()
    if cfg.test:  # conf/train.yaml
        log.info(f"generator: testing {best}")
        trainer.test(model, datamodule=dm, ckpt_path=best, weights_only=True, verbose=False)
        metrics.update(logged_metrics(trainer, "test/"))
    return metrics


def clear_generator_outputs(artifact_dir: Path) -> None:
    """``irgen.rebuild=true`` for the generator: remove every generator folder (checkpoints, signature, completion
    marker) of the artifact folder."""
    for folder in artifact_dir.glob(f"{GENERATOR_DIR}-*"):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(artifact_dir / GENERATOR_DIR, ignore_errors=True)  # the single folder of earlier versions


