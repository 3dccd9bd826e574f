"""`python eval.py experiment=<x>_irgen ckpt_path=<generator checkpoint>`: score exactly that checkpoint.

The generator is rebuilt with the architecture stored in the checkpoint (its hyper-parameters), its weights and
identifiers (the ``codes`` buffer: every record's identifier) loaded from it; nothing trains and no artifact is
read. Only the evaluation settings come from this run's config (``irgen.generator.beam_size``, ``eval_ks``,
``max_rank``, ``exhaustive``), so one checkpoint can be scored at several beam sizes. The identifiers must
belong to this run's dataset (same number of records), else the error says so.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from omegaconf import DictConfig

from irgen.generator import RANKING_ROWS, IRGenGenerator
from irgen.signatures import GENERATOR_EVAL_KEYS
from irlab.checkpoints import CheckpointError, model_class_name, read_checkpoint, resolve_ckpt_path
from irlab.method import RunReport, evaluate_model

log = logging.getLogger(__name__)

WHERE = ("The generator stage writes its checkpoints to <irgen.artifact_dir>/generator-<hash>/ "
         "(default logs/irgen_artifacts/<dataset>_<protocol>_seed<seed>/generator-<hash>/epoch_*.ckpt).")


def load_generator(path: str | Path, cfg: DictConfig) -> IRGenGenerator:
    """An `IRGenGenerator` rebuilt from a checkpoint's hyper-parameters and weights; evaluation settings from
    ``cfg.irgen.generator``. Encoder weights come from the checkpoint, never from ``pretrained`` files."""
    state = read_checkpoint(path, expected_class=model_class_name(IRGenGenerator), hint=WHERE)
    weights, hparams = state["state_dict"], dict(state.get("hyper_parameters") or {})
    if "codes" not in weights or not any(k.startswith("decoder.") for k in weights) or not hparams:
        raise CheckpointError(f"{path} is not an IRGen generator checkpoint (no decoder weights, identifiers or "
                              f"hyper-parameters; a tokenizer checkpoint?). {WHERE}")
    generator_cfg = cfg.irgen.generator
    hparams.update({k: generator_cfg[k] for k in GENERATOR_EVAL_KEYS if k in generator_cfg})
    hparams["encoder"] = {**dict(hparams.get("encoder") or {}), "pretrained": False}
    hparams["encoder_init"] = None
    unknown = set(hparams) - set(inspect.signature(IRGenGenerator.__init__).parameters)
    if unknown:
        raise CheckpointError(f"{path} was written by another irlab version: hyper-parameters {sorted(unknown)} are "
                              f"not IRGenGenerator arguments any more (optimizer settings now live in its "
                              f"'optimizer' node); retrain, or evaluate it with the irlab commit that wrote it")
    model = IRGenGenerator(**hparams)
    model.load_state_dict(weights)
    return model


def load_trained_generator(cfg: DictConfig, datamodule) -> tuple[IRGenGenerator, str]:
    """(the generator of ``ckpt_path``, its path), checked to hold identifiers for this run's dataset."""
    if not cfg.get("ckpt_path"):
        raise ValueError(f"ckpt_path is required: python eval.py experiment=<x>_irgen ckpt_path=<generator .ckpt>. "
                         f"{WHERE}")
    ckpt = resolve_ckpt_path(cfg.ckpt_path, cfg.paths.output_dir)
    model = load_generator(ckpt, cfg)
    if model.codes.shape[0] != datamodule.num_records:
        raise CheckpointError(f"{ckpt} holds identifiers for {model.codes.shape[0]} images but {datamodule.name} "
                              f"has {datamodule.num_records}: it was trained on another dataset; pass the "
                              f"matching experiment= / dataset= overrides")
    return model, ckpt


def evaluate_generator(cfg: DictConfig, datamodule) -> RunReport:
    """Evaluate the generator checkpoint ``ckpt_path`` on ``split`` (test by default)."""
    model, ckpt = load_trained_generator(cfg, datamodule)
    return evaluate_model(cfg, model, datamodule, ckpt, RANKING_ROWS)
