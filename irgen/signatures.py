"""What a stage's outputs must match to be reused: the settings that determine them, recorded beside them.

A finished or interrupted stage is reused (resumed) only by a run whose signature is the same; otherwise the
run stops with the list of differences and the command that rebuilds the stage (`StaleArtifactError`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from datamodules.base import RetrievalDataModule
from irgen.artifact import IdentifierArtifact, StaleArtifactError, dataset_fingerprint, differences
from irgen.stage_trainer import stage_trainer_config
from irlab.atomic_files import write_text_atomically
from irlab.plain import to_plain

SIGNATURE_NAME = "signature.json"
# dataset settings that change what a stage sees (transforms, batches), beyond the records themselves
DATA_KEYS = ("image_size", "resize_size", "resize_mode", "interpolation", "hflip", "crop", "mean", "std", "batch_size",
             "max_per_class", "val_fraction")
# trainer settings that change the trained model (not where it logs or how many devices run it)
TRAINER_KEYS = ("max_epochs", "max_steps", "limit_train_batches", "accumulate_grad_batches", "precision",
                "gradient_clip_val")
# generator settings that only change the evaluation: a finished generator is reused (re-evaluated) across them,
# and `eval.py` takes them from the run's config rather than from the checkpoint
GENERATOR_EVAL_KEYS = ("beam_size", "eval_ks", "max_rank", "exhaustive", "validation_rows")


def as_json(node: Any) -> Any:
    """`node` as it reads back from JSON (tuples -> lists, sorted keys): what signatures are compared as."""
    return json.loads(json.dumps(to_plain(node), sort_keys=True))


def _training_settings(cfg: DictConfig, datamodule: RetrievalDataModule, stage: str) -> dict[str, Any]:
    trainer = stage_trainer_config(cfg, stage)
    return {"trainer": {k: as_json(trainer.get(k)) for k in TRAINER_KEYS},
            "data": {k: as_json(getattr(datamodule, k, None)) for k in DATA_KEYS},
            "seed": int(cfg.seed)}


def tokenizer_signature(cfg: DictConfig, datamodule: RetrievalDataModule) -> dict[str, Any]:
    """Everything that determines the identifiers besides the records: model, training and data settings."""
    return {"model": as_json(cfg.irgen.tokenizer), **_training_settings(cfg, datamodule, "tokenizer")}


def artifact_expectation(cfg: DictConfig, datamodule: RetrievalDataModule) -> dict[str, Any]:
    """The ``expected`` argument of `load_artifact` for this run (and the tokenizer folder's signature)."""
    return {"dataset": dataset_fingerprint(datamodule), "tokenizer": tokenizer_signature(cfg, datamodule)}


def generator_signature(cfg: DictConfig, datamodule: RetrievalDataModule, artifact: IdentifierArtifact) -> dict:
    """What determines the trained generator: the identifiers (artifact hash), its config, training and data."""
    model = {k: v for k, v in as_json(cfg.irgen.generator).items() if k not in GENERATOR_EVAL_KEYS}
    return {"artifact_sha256": artifact.meta.get("sha256"), "dataset": dataset_fingerprint(datamodule),
            "model": model, **_training_settings(cfg, datamodule, "generator")}


def claim_stage_folder(folder: Path, expected: dict[str, Any], protected: tuple[str, ...], what: str,
                       hint: str) -> None:
    """Refuse a stage folder holding outputs (any of `protected`) written under another signature; then record
    this run's signature in it (rank 0)."""
    signature = folder / SIGNATURE_NAME
    if signature.is_file() and any((folder / name).is_file() for name in protected):
        problems = differences(as_json(expected), json.loads(signature.read_text()), source="previous run",
                               extra_ok=False)
        if problems:
            listing = "\n".join(f"  - {p}" for p in problems[:12])
            raise StaleArtifactError(f"{folder} holds {what} with other identifiers, data or config ({signature}):"
                                     f"\n{listing}\nRebuild: {hint}")
    if rank_zero_only.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(signature, json.dumps(expected, indent=2, sort_keys=True))
