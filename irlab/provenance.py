"""What a result was measured on, written into every ``metrics.json`` (``"provenance"``).

Two numbers are comparable only if they come from the same split, the same metric definitions and a known
config and code. So each run records: a fingerprint of the exact split (train inputs, generator targets,
validation and test queries/gallery, as record ids of the named dataset), the git commit and whether the tree
was dirty, a hash of the resolved config (without Hydra's own node and without where files go), the seed, the
versions of torch / lightning / faiss, the metric-definition version and the wall time. The leaderboard
(`irlab.leaderboard`) refuses to average jobs whose split fingerprints differ.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

# bump when a metric's definition changes (v2: P@K_irgen reproduces the reference's NumPy < 1.25 behaviour)
METRICS_VERSION = "irlab-metrics-2"
REPO = Path(__file__).resolve().parents[1]
_CLOCK: dict[str, float] = {}


def start_clock() -> None:
    """Mark the start of this run (`irlab.runner.run` calls it); `wall_seconds` counts from here."""
    _CLOCK["start"] = time.perf_counter()


def _sha(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def split_fingerprint(datamodule) -> str:
    """sha256 of the dataset name, protocol and every record-id set of the split (order-independent)."""
    split = datamodule.split
    sets = {"train": split.train_ids, "targets": split.target_ids}
    for stage in ("val", "test"):
        s = getattr(split, stage)
        sets[f"{stage}_query"] = s.record_ids[s.query_mask]
        sets[f"{stage}_gallery"] = s.record_ids[s.gallery_mask]
    ids = {k: np.sort(np.asarray(v, dtype=np.int64)).tolist() for k, v in sets.items()}
    return _sha({"dataset": datamodule.name, "records": len(datamodule.records), "protocol": split.protocol,
                 "ids": ids})


def git_state() -> dict[str, Any]:
    """{"commit", "dirty"} of the checkout this code runs from (None when it is not a git checkout)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config without ``hydra`` and ``paths`` (where files go is not what was run)."""
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    plain.pop("paths", None)
    for node in plain.values():  # resolved paths inside other nodes (dataset.data_dir, irgen.artifact_dir)
        if isinstance(node, dict):
            for key in ("data_dir", "root", "artifact_dir", "default_root_dir"):
                node.pop(key, None)
    return _sha(plain)


def versions() -> dict[str, str | None]:
    out = {}
    for name, dist in (("torch", "torch"), ("lightning", "lightning"), ("faiss", "faiss-cpu"), ("irlab", "irlab")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["faiss"] is None:
        try:
            import faiss

            out["faiss"] = getattr(faiss, "__version__", None)
        except ImportError:
            pass
    return out


def run_provenance(cfg: DictConfig, datamodule) -> dict[str, Any]:
    """The ``provenance`` block of this run's ``metrics.json``."""
    start = _CLOCK.get("start")
    return {
        "split_fingerprint": split_fingerprint(datamodule),
        "git": git_state(),
        "config_sha256": config_hash(cfg),
        "seed": int(cfg.seed) if cfg.get("seed") is not None else None,
        "versions": versions(),
        "metrics_version": METRICS_VERSION,
        "wall_seconds": None if start is None else round(time.perf_counter() - start, 2),
    }
