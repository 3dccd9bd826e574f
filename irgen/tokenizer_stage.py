"""IRGen stage 1: train the tokenizer (or reuse / resume it), encode every record, save the identifier artifact
and its statistics (`irgen.pipeline` runs it)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from irgen.artifact import NO_IDENTIFIER, IdentifierArtifact, load_artifact, save_artifact
from irgen.identifier_stats import identifier_stats, quantized_retrieval
from irgen.kmeans import effective_num_codes
from irgen.signatures import artifact_expectation, claim_stage_folder
from irgen.stage_context import ARTIFACT_NAME, PipelineContext, rebuild_command
from irgen.stage_trainer import LAST_CHECKPOINT, build_stage_trainer, fit_stage, load_weights
from irlab.builders import build_model, logged_metrics
from irlab.folder_lock import folder_lock
from irlab.reporting import write_metrics

log = logging.getLogger("irgen.pipeline")  # one logger for every stage of the pipeline
STATS_NAME = "identifier_stats.json"
TOKENIZER_DIR = "tokenizer"


def prefixed(stats: dict[str, float], prefix: str = "tokenizer/") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in stats.items()}


def tokenizer_stage(ctx: PipelineContext) -> dict[str, float]:
    """Train the tokenizer (or reuse/resume it), encode the records, save the artifact and its statistics; one
    job at a time per artifact folder (`irlab.folder_lock`): a parallel job waits, then reuses the artifact."""
    with folder_lock(ctx.artifact_dir / TOKENIZER_DIR, "tokenizer", enabled=rank_zero_only.rank == 0):
        return build_or_reuse_tokenizer(ctx)


def build_or_reuse_tokenizer(ctx: PipelineContext) -> dict[str, float]:
    cfg, dm = ctx.cfg, ctx.datamodule
    expected = artifact_expectation(cfg, dm)
    hint = rebuild_command("tokenizer")
    if ctx.artifact_path.exists():
        ctx.artifact = load_artifact(ctx.artifact_path, expected=expected, rebuild_hint=hint)
        log.info(f"tokenizer: reusing identifier artifact {ctx.artifact_path} (irgen.rebuild=true to rebuild)")
        return prefixed(ctx.artifact.meta.get("stats", {}))

    tok_dir = ctx.artifact_dir / TOKENIZER_DIR
    model_cfg = cfg.irgen.tokenizer
    n_train = len(dm.split.train_ids)
    if model_cfg.kmeans_max_points:
        n_train = min(n_train, int(model_cfg.kmeans_max_points))
    num_codes = effective_num_codes(int(model_cfg.num_codes), n_train, int(model_cfg.min_points_per_code))
    model = build_model(model_cfg, dm, num_codes=num_codes)
    claim_stage_folder(tok_dir, expected, (LAST_CHECKPOINT,), "an interrupted tokenizer run (it cannot be resumed)",
                       hint)
    trainer = build_stage_trainer(cfg, "tokenizer", tok_dir)
    selected, selection = fit_stage(trainer, cfg, "tokenizer", model, dm, tok_dir)
    metrics = logged_metrics(trainer, "val/")
    log.info(f"tokenizer: encoding identifiers with the {selection} checkpoint ({selected})")
    load_weights(model, selected)
    ctx.artifact, stats = encode_artifact(model, dm, trainer, meta={
        **expected, "num_codes_requested": int(model_cfg.num_codes), "checkpoint": str(selected),
        "checkpoint_selection": selection})
    if trainer.is_global_zero:
        save_artifact(ctx.artifact_path, ctx.artifact)
        write_stats(ctx.artifact_dir / STATS_NAME, stats, ctx.artifact.meta)
        for logger in trainer.loggers:
            logger.log_metrics(prefixed(stats), step=trainer.global_step)
            logger.save()
        log.info(f"tokenizer: wrote {ctx.artifact_path} ({int(stats['images'])} identifiers, "
                 f"{int(stats['distinct_identifiers'])} distinct, collision rate {stats['collision_rate']:.3f})")
    stats = trainer.strategy.broadcast(stats, src=0)
    trainer.strategy.barrier()
    return {**metrics, **prefixed(stats)}


def encode_artifact(model, dm, trainer, meta: dict[str, Any]) -> tuple[IdentifierArtifact, dict[str, float]]:
    """The identifier artifact of the records that need one (`identifier_record_ids`; the others hold
    `NO_IDENTIFIER`) and, on global rank 0, its statistics (empty elsewhere).

    Lightning leaves the model on the CPU after ``fit``: it goes back to the trainer's device, and every rank
    encodes its shard (`encode_records`). The statistics are measured on the validation set, whose images are
    encoded anyway (the test queries are not)."""
    from irgen.tokenizer import encode_records, identifier_record_ids  # lazy: `import irgen.pipeline` stays light

    model.to(trainer.strategy.root_device)
    ids = identifier_record_ids(dm)
    codes, features = encode_records(model, dm, ids, trainer)
    full = torch.full((dm.num_records, codes.shape[1]), NO_IDENTIFIER, dtype=torch.int64)
    full[ids] = codes
    stats: dict[str, float] = {}
    if trainer.is_global_zero:
        recon = model.quantizer.decode(codes.to(model.device))[:, -1].float().cpu()
        stats = identifier_stats(codes.numpy(), dm.record_labels(ids), model.quantizer.num_codes)
        # the validation set by rows of `ids` (sorted, and holding every validation image), not by record id
        val = dm.eval_set("val")
        val = dataclasses.replace(val, record_ids=np.searchsorted(ids, val.record_ids))
        stats.update(quantized_retrieval(features.numpy(), recon.numpy(), codes.numpy(), val))
    meta = {**meta, "num_levels": model.quantizer.num_levels, "num_codes": model.quantizer.num_codes,
            "stats": stats, "eval_split": "val", "encoded_records": len(ids)}
    return IdentifierArtifact(codes=full, codebooks=model.quantizer.codebooks.detach().cpu(), meta=meta), stats


def write_stats(path: Path, stats: dict[str, float], meta: dict[str, Any]) -> Path:
    """Identifier statistics with what they were measured on, next to the artifact (human-readable)."""
    return write_metrics(path, stats, {"dataset": meta["dataset"], "num_levels": meta["num_levels"],
                                       "num_codes": meta["num_codes"], "eval_split": meta["eval_split"]})


def clear_tokenizer_outputs(artifact_dir: Path) -> None:
    """``irgen.rebuild=true``: remove the identifier artifact, its statistics and the tokenizer's checkpoints."""
    for name in (ARTIFACT_NAME, STATS_NAME):
        (artifact_dir / name).unlink(missing_ok=True)
    shutil.rmtree(artifact_dir / TOKENIZER_DIR, ignore_errors=True)
