"""Reading checkpoints safely, with errors that say what the file is and what was expected.

Every checkpoint irlab writes records the class of the model that wrote it (``irlab_model``, set by
`irlab.module.RetrievalModule.on_save_checkpoint`), so an AREIR checkpoint handed to the baseline, or a
tokenizer's handed to the IRGen evaluation, is named as such instead of failing on hundreds of missing keys.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from datamodules.errors import MissingFileError, UserInputError
from datamodules.paths import expand_path

MODEL_KEY = "irlab_model"


class CheckpointError(UserInputError, ValueError):
    """A file that is not the checkpoint the command needs."""


def model_class_name(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def safe_load(path: str | Path, what: str = "checkpoint", hint: str = "") -> Any:
    """``torch.load(weights_only=True)`` (tensors and plain data only, never code) with errors that name the file
    and say what was expected; ``hint`` is appended to every error (e.g. where the right file lives)."""
    path = Path(path).expanduser()
    tail = f" {hint}" if hint else ""
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}.{tail}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind mean the same thing here
        raise CheckpointError(f"{path} is not a PyTorch {what} that irlab can read safely "
                              f"({load_failure(path, exc)}); irlab never unpickles Python objects from a "
                              f"file.{tail}") from exc


def load_failure(path: Path, exc: Exception) -> str:
    """What `torch.load(weights_only=True)` found wrong, without its advice to retry with ``weights_only=False``
    (the wrong advice for a file that is not a checkpoint at all, and a security risk for one from elsewhere)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):  # neither torch.save's zip nor a pickle
        return "it is neither a zip archive nor a pickle: not a checkpoint at all"
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # a real pickle holding Python objects beyond tensors and plain data
        found = re.search(r"GLOBAL (\S+)", text)
        return f"it holds Python objects ({found.group(1) if found else 'beyond tensors and plain data'})"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first if "weights_only" not in first else type(exc).__name__


def read_state_dict(path: str | Path, what: str = "weights file", hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a weights file: a raw state dict, a Lightning checkpoint (``state_dict``) or a training
    script's ``{"model": state_dict}``, loaded safely."""
    state = safe_load(path, what, hint)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict (name -> tensor).{' ' + hint if hint else ''}")
    return state


def read_checkpoint(path: str | Path, expected_class: str | None = None, hint: str = "") -> dict[str, Any]:
    """A Lightning checkpoint loaded with ``weights_only=True`` (`safe_load`).

    ``expected_class`` (``module.Class``): refuse a checkpoint written by another model class, naming it.
    ``hint`` is appended to every error (e.g. where the right checkpoint lives).
    """
    state = safe_load(path, "checkpoint", hint)
    tail = f" {hint}" if hint else ""
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning checkpoint (no 'state_dict'); "
                              f"pass a .ckpt written by train.py.{tail}")
    found = state.get(MODEL_KEY)
    if expected_class and found and found != expected_class:
        raise CheckpointError(f"{path} was written by {found}, not by {expected_class}: evaluate it with the "
                              f"experiment that trained it (its run folder's .hydra/config.yaml).{tail}")
    return state


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | Path) -> str | None:
    """``last`` / ``on_exception`` name this run folder's checkpoints; anything else must be an existing file.

    ``last`` (end of the last finished epoch) resumes exactly: same final metrics as an uninterrupted run.
    ``on_exception`` (written on SIGTERM or a crash, mid-epoch) loses less work but replays part of an epoch.
    """
    if ckpt_path in (None, ""):
        return None
    if ckpt_path in ("last", "on_exception"):
        candidate = Path(output_dir) / "checkpoints" / f"{ckpt_path}.ckpt"
        if not candidate.is_file():
            raise MissingFileError(
                f"ckpt_path={ckpt_path} but {candidate} does not exist. To resume, run again in the same folder "
                f"(hydra.run.dir=<old run folder>) or pass ckpt_path=/path/to/{ckpt_path}.ckpt"
            )
        return str(candidate)
    path = expand_path(ckpt_path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    return str(path)
