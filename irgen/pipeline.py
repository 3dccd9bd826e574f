"""IRGen as a pipeline of stages sharing one artifact folder: `python train.py experiment=<x>_irgen`.

``runner: irgen.pipeline.run`` in the IRGen experiment files selects this. Stages run in `STAGE_ORDER`;
``irgen.stage`` picks one (``tokenizer`` | ``generator``) or ``all``. Every stage writes into
``irgen.artifact_dir`` (shared across runs, keyed by dataset and protocol), so that:

* a finished stage is reused (its outputs are validated against this run's dataset and config, and a mismatch
  stops the run with the command that rebuilds it: ``irgen.rebuild=true``),
* an interrupted stage resumes from the ``last.ckpt`` in its sub-folder.

Adding a stage = writing ``fn(ctx: PipelineContext) -> dict[str, float]`` and registering it in `STAGES`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from callbacks.learning_curve import LearningCurve
from datamodules.base import RetrievalDataModule
from irgen.artifact import IdentifierArtifact, StaleArtifactError, dataset_fingerprint, load_artifact, save_artifact
from irgen.generator import RANKING_ROWS
from irgen.identifier_stats import identifier_stats, quantized_retrieval
from irgen.kmeans import effective_num_codes
from irlab.checkpoints import read_checkpoint
from irlab.paths import expand_path
from irlab.plain import to_plain
from irlab.provenance import run_provenance
from irlab.reporting import print_metrics, write_metrics
from irlab.run_config import write_run_overrides
from irlab.train import (
    build_callbacks,
    build_datamodule,
    build_model,
    build_trainer,
    fit_or_exit,
    log_hyperparameters,
    logged_metrics,
    this_command,
)

log = logging.getLogger(__name__)

ARTIFACT_NAME = "identifiers.pt"
STATS_NAME = "identifier_stats.json"
TOKENIZER_DIR = "tokenizer"
# dataset settings that change what the tokenizer sees (transforms, batches), beyond the records themselves
DATA_KEYS = ("image_size", "resize_size", "resize_mode", "interpolation", "hflip", "crop", "mean", "std", "batch_size",
             "max_per_class", "val_fraction")
# trainer settings that change the trained tokenizer (not where it logs or how many devices run it)
TRAINER_KEYS = ("max_epochs", "max_steps", "limit_train_batches", "accumulate_grad_batches", "precision",
                "gradient_clip_val")


@dataclass
class PipelineContext:
    """What stages share: the config, the set-up datamodule, the artifact folder, results so far."""

    cfg: DictConfig
    datamodule: RetrievalDataModule
    artifact_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    artifact: IdentifierArtifact | None = None  # set by the tokenizer stage (built or reused)

    @property
    def artifact_path(self) -> Path:
        return self.artifact_dir / ARTIFACT_NAME


# ---- what an artifact must match -----------------------------------------------------------------------
def _plain(node: Any) -> Any:
    return json.loads(json.dumps(to_plain(node), sort_keys=True))


def tokenizer_signature(cfg: DictConfig, datamodule: RetrievalDataModule) -> dict[str, Any]:
    """Everything that determines the identifiers besides the records: model, training and data settings."""
    trainer = stage_trainer_config(cfg, "tokenizer")
    return {
        "model": _plain(cfg.irgen.tokenizer),
        "trainer": {k: _plain(trainer.get(k)) for k in TRAINER_KEYS},
        "data": {k: _plain(getattr(datamodule, k, None)) for k in DATA_KEYS},
        "seed": int(cfg.seed),
    }


def artifact_expectation(cfg: DictConfig, datamodule: RetrievalDataModule) -> dict[str, Any]:
    """The ``expected`` argument of `load_artifact` for this run (the generator stage uses it as well)."""
    return {"dataset": dataset_fingerprint(datamodule), "tokenizer": tokenizer_signature(cfg, datamodule)}


def rebuild_command(cfg: DictConfig) -> str:
    """The command line that rebuilds this run's identifier artifact."""
    try:
        experiment = hydra.core.hydra_config.HydraConfig.get().runtime.choices.get("experiment")
    except ValueError:  # no Hydra context (direct API use)
        experiment = None
    return (f"python train.py experiment={experiment or '<your irgen experiment>'} irgen.stage=tokenizer "
            f"irgen.rebuild=true (plus this run's other overrides)")


def load_identifiers(ctx: PipelineContext) -> IdentifierArtifact:
    """The validated artifact of this run (what the generator stage starts from)."""
    if ctx.artifact is None:
        ctx.artifact = load_artifact(ctx.artifact_path, expected=artifact_expectation(ctx.cfg, ctx.datamodule),
                                     rebuild_hint=rebuild_command(ctx.cfg))
    return ctx.artifact


# ---- trainers -------------------------------------------------------------------------------------------
DEBUG_KEYS = ("max_epochs", "limit_train_batches", "limit_val_batches", "limit_test_batches", "num_sanity_val_steps")


def stage_trainer_config(cfg: DictConfig, stage: str) -> DictConfig:
    """`trainer` with ``irgen.stage_trainer.<stage>`` merged on top; under ``debug=fast`` the debug limits win
    over the stage's own epochs (a generator preset's 100 epochs must not run in a smoke test)."""
    overrides = (cfg.irgen.get("stage_trainer") or {}).get(stage) or {}
    merged = OmegaConf.merge(cfg.trainer, overrides)
    if cfg.get("debug_run"):
        merged = OmegaConf.merge(merged, {k: cfg.trainer[k] for k in DEBUG_KEYS if k in cfg.trainer},
                                 {"check_val_every_n_epoch": 1})
    return merged


def build_stage_trainer(cfg: DictConfig, stage: str, ckpt_dir: Path, monitor: str = "val/R@1") -> L.Trainer:
    """A trainer whose checkpoints (best by `monitor` and last.ckpt) go to the stage's artifact sub-folder, built
    by the shared `build_trainer` (DDP launch, loggers) with the stage's trainer settings."""
    def adapt(target: type, conf: DictConfig) -> dict:
        if issubclass(target, OnExceptionCheckpoint):  # where this stage's resume looks (`resume_checkpoint`)
            return {"dirpath": str(ckpt_dir)}
        if issubclass(target, ModelCheckpoint):  # the selected model and last.ckpt go to the stage's folder
            extra = {"dirpath": str(ckpt_dir)}
            if conf.get("monitor") is not None:
                extra.update(monitor=monitor, mode="max")
            return extra
        if issubclass(target, LearningCurve):  # one curve per stage in the run folder
            return {"monitor": monitor, "name": f"learning_curve_{stage}"}
        return {}

    callbacks = build_callbacks(cfg, adapt)
    resumable = not cfg.get("debug_run")  # debug=fast writes no full training state (conf/debug/fast.yaml)
    if resumable and not any(isinstance(c, ModelCheckpoint) and c.monitor is None for c in callbacks):
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="last", save_top_k=1,  # resume needs it
                                         enable_version_counter=False, save_on_train_epoch_end=True))
    return build_trainer(cfg, trainer_cfg=stage_trainer_config(cfg, stage), callbacks=callbacks)


# ---- stage 1: tokenizer ---------------------------------------------------------------------------------
def _prefixed(stats: dict[str, float], prefix: str = "tokenizer/") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in stats.items()}


def tokenizer_stage(ctx: PipelineContext) -> dict[str, float]:
    """Train the tokenizer (or reuse/resume it), encode every record, save the artifact and its statistics."""
    cfg, dm = ctx.cfg, ctx.datamodule
    expected = artifact_expectation(cfg, dm)
    hint = rebuild_command(cfg)
    if ctx.artifact_path.exists():
        ctx.artifact = load_artifact(ctx.artifact_path, expected=expected, rebuild_hint=hint)
        log.info(f"tokenizer: reusing identifier artifact {ctx.artifact_path} (irgen.rebuild=true to rebuild)")
        return _prefixed(ctx.artifact.meta.get("stats", {}))

    tok_dir = ctx.artifact_dir / TOKENIZER_DIR
    model_cfg = cfg.irgen.tokenizer
    n_train = len(dm.split.train_ids)
    if model_cfg.get("kmeans_max_points"):
        n_train = min(n_train, int(model_cfg.kmeans_max_points))
    num_codes = effective_num_codes(int(model_cfg.num_codes), n_train, int(model_cfg.get("min_points_per_code", 4)))
    model = build_model(model_cfg, dm, num_codes=num_codes)
    _check_resumable(tok_dir, expected, hint)
    trainer = build_stage_trainer(cfg, "tokenizer", tok_dir)
    log_hyperparameters(trainer, cfg, model, dm)
    last = tok_dir / "last.ckpt"
    resume = resume_checkpoint(tok_dir)
    if resume:
        log.info(f"tokenizer: resuming the interrupted stage from {resume}")
    fit_or_exit(trainer, f"{this_command()}   (the tokenizer stage resumes from {tok_dir})", model, datamodule=dm,
                ckpt_path=resume, weights_only=True)
    metrics = logged_metrics(trainer, "val/")

    selected, selection = select_checkpoint(trainer, last)
    log.info(f"tokenizer: encoding identifiers with the {selection} checkpoint ({selected})")
    load_weights(model, selected)
    codes, features = encode_records(model, dm)
    recon = model.quantizer.decode(codes.to(model.device))[:, -1].cpu()
    labels = dm.record_labels()
    stats = identifier_stats(codes.numpy(), labels, model.quantizer.num_codes)
    stats.update(quantized_retrieval(features.numpy(), recon.numpy(), codes.numpy(), dm.eval_set("test")))
    meta = {**expected, "num_levels": model.quantizer.num_levels, "num_codes": model.quantizer.num_codes,
            "num_codes_requested": int(model_cfg.num_codes), "stats": stats,
            "checkpoint": str(selected), "checkpoint_selection": selection, "eval_split": "test"}
    ctx.artifact = IdentifierArtifact(codes=codes, codebooks=model.quantizer.codebooks.detach().cpu(), meta=meta)
    if trainer.is_global_zero:
        save_artifact(ctx.artifact_path, ctx.artifact)
        write_stats(ctx.artifact_dir / STATS_NAME, stats, meta)
        for logger in trainer.loggers:
            logger.log_metrics(_prefixed(stats), step=trainer.global_step)
            logger.save()
        log.info(f"tokenizer: wrote {ctx.artifact_path} ({len(codes)} identifiers, "
                 f"{int(stats['distinct_identifiers'])} distinct, collision rate {stats['collision_rate']:.3f})")
    trainer.strategy.barrier()
    return {**metrics, **_prefixed(stats)}


def resume_checkpoint(stage_dir: Path) -> str | None:
    """The newest of the stage's ``on_exception.ckpt`` (SIGTERM or a crash, mid-epoch) and ``last.ckpt``."""
    found = [p for p in (stage_dir / "on_exception.ckpt", stage_dir / "last.ckpt") if p.is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime_ns)) if found else None


def select_checkpoint(trainer: L.Trainer, last: Path) -> tuple[Path | None, str]:
    """The checkpoint model selection picked (best validation metric), else ``last.ckpt``, else None (the model
    as training left it); and a note saying which, recorded in the artifact."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and Path(best).is_file():
        return Path(best), f"best {trainer.checkpoint_callback.monitor}"
    if last.is_file():
        return last, "last (no validation metric was monitored)"
    return None, "final in-memory model (no checkpoint was written)"


def load_weights(model: L.LightningModule, path: Path | None) -> None:
    """Load a Lightning checkpoint's weights (buffers included: codebooks, identifiers) safely into `model`."""
    if path is not None:
        model.load_state_dict(read_checkpoint(path)["state_dict"])


def _check_resumable(tok_dir: Path, expected: dict[str, Any], hint: str) -> None:
    """An interrupted tokenizer run may only be resumed by a run with the same data and config."""
    signature = tok_dir / "signature.json"
    if signature.is_file() and (tok_dir / "last.ckpt").is_file():  # only a checkpoint is worth protecting
        found = json.loads(signature.read_text())
        if found != json.loads(json.dumps(expected, sort_keys=True)):
            raise StaleArtifactError(f"{tok_dir} holds an interrupted tokenizer run with another dataset or config "
                                     f"({signature}); it cannot be resumed. Rebuild: {hint}")
    if rank_zero_only.rank == 0:
        tok_dir.mkdir(parents=True, exist_ok=True)
        signature.write_text(json.dumps(expected, indent=2, sort_keys=True))


def write_stats(path: Path, stats: dict[str, float], meta: dict[str, Any]) -> Path:
    """Identifier statistics with what they were measured on, next to the artifact (human-readable)."""
    return write_metrics(path, stats, {"dataset": meta["dataset"], "num_levels": meta["num_levels"],
                                       "num_codes": meta["num_codes"], "eval_split": meta["eval_split"]})


def encode_records(model, datamodule):  # imported lazily: keeps `import irgen.pipeline` light for part 2
    from irgen.tokenizer import encode_records as _encode

    return _encode(model, datamodule)


# ---- stage 2: generator ---------------------------------------------------------------------------------
GENERATOR_DIR = "generator"
GENERATOR_DONE = "done.json"
# generator settings that only change the evaluation: a finished generator is reused (re-evaluated) across them
GENERATOR_EVAL_KEYS = ("beam_size", "eval_ks", "max_rank", "exhaustive")


def generator_signature(cfg: DictConfig, datamodule: RetrievalDataModule, artifact: IdentifierArtifact) -> dict:
    """What determines the trained generator: the identifiers (artifact hash), its config, training and data."""
    trainer = stage_trainer_config(cfg, "generator")
    model = {k: v for k, v in _plain(cfg.irgen.generator).items() if k not in GENERATOR_EVAL_KEYS}
    return {
        "artifact_sha256": artifact.meta.get("sha256"),
        "dataset": dataset_fingerprint(datamodule),
        "model": model,
        "trainer": {k: _plain(trainer.get(k)) for k in TRAINER_KEYS},
        "data": {k: _plain(getattr(datamodule, k, None)) for k in DATA_KEYS},
        "seed": int(cfg.seed),
    }


def _generator_rebuild_command(cfg: DictConfig) -> str:
    return rebuild_command(cfg).replace("irgen.stage=tokenizer", "irgen.stage=generator")


def _check_generator_dir(gen_dir: Path, expected: dict[str, Any], hint: str) -> None:
    """Outputs in `gen_dir` (finished or interrupted) may only be reused by a run with the same signature."""
    signature = gen_dir / "signature.json"
    worth_protecting = (gen_dir / "last.ckpt").is_file() or (gen_dir / GENERATOR_DONE).is_file()
    if signature.is_file() and worth_protecting:
        found = json.loads(signature.read_text())
        problems = _signature_differences(json.loads(json.dumps(expected, sort_keys=True)), found)
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems[:12])
            raise StaleArtifactError(f"{gen_dir} holds a generator trained with other identifiers, data or config:"
                                     f"\n{listing}\nRetrain it: {hint}")
    gen_dir.mkdir(parents=True, exist_ok=True)
    signature.write_text(json.dumps(expected, indent=2, sort_keys=True))


def _signature_differences(expected: Any, found: Any, where: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(found, dict):
        return [p for key in sorted(set(expected) | set(found), key=str)
                for p in _signature_differences(expected.get(key), found.get(key), f"{where}.{key}".lstrip("."))]
    return [] if expected == found else [f"{where}: previous run had {found!r}, this run has {expected!r}"]


def _resolve_encoder_init(ctx: PipelineContext, value: str | None) -> Path | None:
    """``encoder_init``: null (encoder as configured), ``tokenizer`` (the tokenizer stage's trained encoder) or
    a checkpoint path."""
    if value in (None, "", "none", "null"):
        return None
    if value == "tokenizer":  # the checkpoint the identifiers were encoded with (recorded in the artifact)
        recorded = (ctx.artifact.meta.get("checkpoint") if ctx.artifact else None) or ""
        path = Path(recorded) if Path(recorded).is_file() else ctx.artifact_dir / TOKENIZER_DIR / "last.ckpt"
    else:
        path = expand_path(value)
    if not path.is_file():
        raise FileNotFoundError(f"generator encoder_init={value!r}: {path} does not exist. Run the tokenizer stage "
                                f"first (irgen.stage=tokenizer) or set irgen.generator.encoder_init=null")
    return path


def generator_stage(ctx: PipelineContext) -> dict[str, float]:
    """Train the generator on the artifact's identifiers (or reuse/resume it), then evaluate on the test split.

    Metrics: ``val/*`` and ``test/*`` are beam-search retrieval (the IRGen headline), ``*/knn/*`` exact kNN
    over the same encoder's global features, optionally ``*/exhaustive/*``. The tokenizer stage's own ``val/*``
    numbers (same run, stage=all) are renamed ``tokenizer/val/*`` so that nothing is silently overwritten.
    """
    cfg, dm = ctx.cfg, ctx.datamodule
    artifact = load_identifiers(ctx)
    gen_dir = ctx.artifact_dir / GENERATOR_DIR
    hint = _generator_rebuild_command(cfg)
    expected = generator_signature(cfg, dm, artifact)
    if rank_zero_only.rank == 0:
        _check_generator_dir(gen_dir, expected, hint)
    for key in [k for k in ctx.metrics if k.startswith("val/")]:
        ctx.metrics[f"tokenizer/{key}"] = ctx.metrics.pop(key)

    model = build_model(cfg.irgen.generator, dm, code_depth=artifact.num_levels, codebook_size=artifact.num_codes)
    model.set_identifiers(artifact.codes)
    trainer = build_stage_trainer(cfg, "generator", gen_dir, monitor="val/R@1")
    done, last = gen_dir / GENERATOR_DONE, gen_dir / "last.ckpt"
    metrics: dict[str, float] = {}
    if done.is_file():
        best = json.loads(done.read_text())["checkpoint"]
        log.info(f"generator: reusing the trained generator {best} (irgen.stage=generator irgen.rebuild=true "
                 f"retrains it); evaluating with the current beam/eval settings")
    else:
        init = _resolve_encoder_init(ctx, cfg.irgen.generator.get("encoder_init"))
        if init is not None and not last.is_file():
            log.info(f"generator: encoder initialised from {init}")
            model.load_encoder_weights(init)
        log_hyperparameters(trainer, cfg, model, dm)
        if dm.split.val_is_test:
            log.warning("generator: no validation split (dataset.val_fraction=0): checkpoint selection by val/R@1 "
                        "sees the test set")
        resume = resume_checkpoint(gen_dir)
        if resume:
            log.info(f"generator: resuming the interrupted stage from {resume}")
        fit_or_exit(trainer, f"{this_command()}   (the generator stage resumes from {gen_dir})", model,
                    datamodule=dm, ckpt_path=resume, weights_only=True)
        metrics.update(logged_metrics(trainer, "val/", "train/"))
        selected, _ = select_checkpoint(trainer, last)
        best = str(selected or last)
        if trainer.is_global_zero:
            done.write_text(json.dumps({"checkpoint": best, "metrics": metrics}, indent=2, sort_keys=True))
            write_run_overrides(gen_dir)  # `eval.py ckpt_path=<this folder's checkpoint>` needs nothing else
        trainer.strategy.barrier()
    if cfg.get("test", True):
        log.info(f"generator: testing {best}")
        trainer.test(model, datamodule=dm, ckpt_path=best, weights_only=True, verbose=False)
        metrics.update(logged_metrics(trainer, "test/"))
    return metrics


def clear_generator_outputs(artifact_dir: Path) -> None:
    """``irgen.rebuild=true`` for the generator: remove its checkpoints, signature and completion marker."""
    shutil.rmtree(artifact_dir / GENERATOR_DIR, ignore_errors=True)


# ---- registry and runner ----------------------------------------------------------------------------------
Stage = Callable[[PipelineContext], dict[str, float]]
STAGE_ORDER = ("tokenizer", "generator")
STAGES: dict[str, Stage] = {"tokenizer": tokenizer_stage, "generator": generator_stage}


def clear_tokenizer_outputs(artifact_dir: Path) -> None:
    """``irgen.rebuild=true``: remove the identifier artifact, its statistics and the tokenizer's checkpoints."""
    for name in (ARTIFACT_NAME, STATS_NAME):
        (artifact_dir / name).unlink(missing_ok=True)
    shutil.rmtree(artifact_dir / TOKENIZER_DIR, ignore_errors=True)


# what ``irgen.rebuild=true`` removes before a selected stage runs (part 2 registers the generator's)
CLEARERS: dict[str, Callable[[Path], None]] = {"tokenizer": clear_tokenizer_outputs,
                                                "generator": clear_generator_outputs}


def run(cfg: DictConfig) -> dict[str, float]:
    """Run ``irgen.stage`` (or every registered stage in order for ``all``); write and print the metrics."""
    stage = cfg.irgen.stage
    if stage != "all" and stage not in STAGE_ORDER:
        raise ValueError(f"irgen.stage must be 'all' or one of {STAGE_ORDER}, got {stage!r}")
    if stage != "all" and stage not in STAGES:
        raise NotImplementedError(f"IRGen stage {stage!r} is not available in this version; run irgen.stage=tokenizer")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    artifact_dir = expand_path(cfg.irgen.artifact_dir)
    if cfg.get("debug_run"):  # a smoke test never leaves an artifact that a real run would meet
        artifact_dir = artifact_dir.with_name(artifact_dir.name + "_debug")
    ctx = PipelineContext(cfg, datamodule, artifact_dir)
    selected = [s for s in STAGE_ORDER if s in STAGES] if stage == "all" else [stage]
    if (cfg.irgen.get("rebuild") or cfg.get("debug_run")) and rank_zero_only.rank == 0:
        why = "irgen.rebuild=true" if cfg.irgen.get("rebuild") else "debug=fast (smoke tests always rebuild)"
        for name in selected:
            log.warning(f"{why}: removing the previous {name} outputs in {ctx.artifact_dir}")
            CLEARERS.get(name, lambda _: None)(ctx.artifact_dir)
    for skipped in (s for s in STAGE_ORDER if stage == "all" and s not in STAGES):
        log.warning(f"IRGen stage {skipped!r} is not implemented yet: skipped")
    for name in selected:
        log.info(f"IRGen stage: {name}")
        ctx.metrics.update(STAGES[name](ctx))
    if rank_zero_only.rank == 0:
        data = {**datamodule.describe(), "artifact_dir": str(ctx.artifact_dir)}
        rows = RANKING_ROWS if "generator" in selected else None
        write_metrics(Path(cfg.paths.output_dir) / "metrics.json", ctx.metrics, data, rows,
                      provenance=run_provenance(cfg, datamodule))
        print_metrics(ctx.metrics, title=f"IRGen ({stage}): {datamodule.name} / {datamodule.protocol}", row_names=rows)
    return ctx.metrics
