"""The one file that connects IRGen's two stages: every record's identifier plus the codebooks that made them.

The generator is trained to emit identifiers and searches a trie built from them, so it must never run on an
artifact built from other images, another split or another tokenizer: the artifact carries the dataset
fingerprint and tokenizer configuration it was built from, and `load_artifact` compares them with what the
current run expects and refuses (`StaleArtifactError`, with the command that rebuilds it) on any difference.

Format: ``torch.save`` of a dict holding two tensors and the metadata as a JSON string, loaded with
``weights_only=True`` (no pickled objects); written to a temporary name and moved into place atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.errors import MissingFileError, UserInputError
from irlab.atomic_files import save_file_atomically

ARTIFACT_VERSION = 1
DEFAULT_REBUILD = "python train.py experiment=<your irgen experiment> irgen.stage=tokenizer irgen.rebuild=true"


class StaleArtifactError(UserInputError, RuntimeError):
    """The identifier artifact on disk was not built from this dataset/split/config (or was modified)."""


NO_IDENTIFIER = -1  # the code row of a record the pipeline does not need encoded (test queries)


@dataclass
class IdentifierArtifact:
    codes: torch.Tensor  # int64 [N_records, D]: identifier of each record (index = record id); NO_IDENTIFIER rows
    codebooks: torch.Tensor  # float32 [D, K, dim]
    meta: dict[str, Any] = field(default_factory=dict)  # json-able: version, dataset, tokenizer, stats, sha256

    @property
    def num_levels(self) -> int:
        return int(self.codes.shape[1])

    @property
    def num_codes(self) -> int:
        return int(self.codebooks.shape[1])


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def content_hash(codes: torch.Tensor, codebooks: torch.Tensor) -> str:
    """sha256 over shapes and little-endian bytes of codes (int64) and codebooks (float32)."""
    c = np.ascontiguousarray(codes.detach().cpu().numpy().astype("<i8"))
    b = np.ascontiguousarray(codebooks.detach().cpu().float().numpy().astype("<f4"))
    return _sha256(json.dumps([list(c.shape), list(b.shape)]).encode(), c.tobytes(), b.tobytes())


def dataset_fingerprint(datamodule) -> dict[str, Any]:
    """What identifies the data an artifact indexes: records (path under the dataset root, label, official split)
    and protocol split.

    ``train_ids_sha256`` covers the protocol split actually used to train the tokenizer (it changes with the
    protocol, ``val_fraction`` and the carving seed even when the records are the same).
    """
    datamodule.setup()
    records = datamodule.records
    root = str(datamodule.root).rstrip("/") + "/"
    # paths relative to the dataset root: moving the unpacked dataset elsewhere keeps its artifacts valid
    rows = "\n".join(f"{r.path.removeprefix(root)}\t{r.label}\t{r.split}" for r in records).encode()
    train_ids = np.ascontiguousarray(np.asarray(datamodule.split.train_ids, dtype="<i8"))
    return {
        "name": datamodule.name,
        "protocol": datamodule.protocol,
        "n_records": len(records),
        "sha256": _sha256(rows),
        "train_ids_sha256": _sha256(train_ids.tobytes()),
    }


def save_artifact(path: str | Path, artifact: IdentifierArtifact) -> Path:
    """Write atomically; fills ``meta['version']`` and ``meta['sha256']``. Returns the path."""
    codes = artifact.codes.detach().cpu().to(torch.int64).contiguous()
    codebooks = artifact.codebooks.detach().cpu().to(torch.float32).contiguous()
    if codes.ndim != 2 or codebooks.ndim != 3 or codes.shape[1] != codebooks.shape[0]:
        raise ValueError(f"codes must be [N, D] and codebooks [D, K, dim], got {tuple(codes.shape)} and "
                         f"{tuple(codebooks.shape)}")
    encoded = codes[(codes != NO_IDENTIFIER).any(1)]
    if encoded.numel() and (encoded.min() < 0 or encoded.max() >= codebooks.shape[1]):
        raise ValueError(f"code ids must lie in [0, {codebooks.shape[1]}) (or a whole row of {NO_IDENTIFIER})")
    meta = dict(artifact.meta, version=ARTIFACT_VERSION, sha256=content_hash(codes, codebooks))
    meta_json = json.dumps(meta, sort_keys=True)  # raises on anything that is not json-able
    artifact.meta = json.loads(meta_json)
    return save_file_atomically({"codes": codes, "codebooks": codebooks, "meta_json": meta_json}, path)


def differences(expected: Any, found: Any, where: str = "", source: str = "artifact",
                extra_ok: bool = True) -> list[str]:
    """Human-readable list of the leaves where `found` (what `source` recorded) differs from `expected` (what this
    run has), through nested dicts. ``extra_ok``: keys only `found` has (an artifact's stats and hashes) are
    not differences; a stage folder's signature must match key for key (``extra_ok=False``)."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for key in sorted(set(expected) | set(found), key=str):
            sub = f"{where}.{key}" if where else str(key)
            if key not in found:
                out.append(f"{sub}: missing in the {source} (this run has {expected[key]!r})")
            elif key not in expected:
                if not extra_ok:
                    out.append(f"{sub}: the {source} has {found[key]!r}, this run has no such setting")
            else:
                out.extend(differences(expected[key], found[key], sub, source, extra_ok))
        return out
    return [] if expected == found else [f"{where}: the {source} has {found!r}, this run has {expected!r}"]


def load_artifact(path: str | Path, *, expected: dict[str, Any], rebuild_hint: str | None = None
                  ) -> IdentifierArtifact:
    """Load and validate. `expected` holds meta entries that must match exactly (version is always checked).

    Raises FileNotFoundError when there is no artifact and StaleArtifactError when it was built from another
    dataset/split/config or version, or its content does not match its hash; both say how to (re)build it.
    """
    path = Path(path)
    rebuild = rebuild_hint or DEFAULT_REBUILD
    if not path.is_file():
        raise MissingFileError(f"no IRGen identifier artifact at {path}. Build it with the tokenizer stage: "
                                f"{rebuild.replace(' irgen.rebuild=true', '')}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        codes, codebooks, meta = blob["codes"], blob["codebooks"], json.loads(blob["meta_json"])
    except Exception as exc:  # noqa: BLE001 - truncated/foreign file: same remedy
        raise StaleArtifactError(f"{path} is not a readable IRGen identifier artifact ({exc}). "
                                 f"Rebuild it: {rebuild}") from exc
    expected = json.loads(json.dumps({"version": ARTIFACT_VERSION, **expected}, sort_keys=True))  # tuples -> lists
    problems = differences(expected, meta)
    if meta.get("sha256") != content_hash(codes, codebooks):
        problems.append("sha256: codes/codebooks do not match the hash recorded when the artifact was written "
                        "(file modified or corrupted)")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise StaleArtifactError(f"IRGen identifier artifact {path} does not belong to this run:\n{listing}{more}\n"
                                 f"Rebuild it (retrains the tokenizer): {rebuild}")
    return IdentifierArtifact(codes=codes, codebooks=codebooks, meta=meta)
