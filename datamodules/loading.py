"""Loader settings that depend on the machine a job runs on: ``"auto"`` values resolved where the loader is made.

* workers: the CPUs this process may use (its affinity mask, or SLURM's ``cpus-per-task`` when SLURM placed
  one task per GPU), shared by the loaders of the ranks on this node, one core left to each rank's main process;
* page-locked (pinned) batches and normalisation on the device: on when a CUDA device is present.

Why: one ViT-B/16 GPU step takes ~2,500 images/s; decoding plus the train transform costs 1-6 ms per image and
core (`bench/data_loading.py`), so a GPU needs 3-15 busy cores, and a fixed 4 workers starves it.
"""

from __future__ import annotations

import os

import torch

AUTO = "auto"


def available_cpus() -> int:
    """CPUs this job may use: SLURM's per-task count where set, else this process's affinity mask."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers(processes_per_node: int = 1) -> int:
    """Loader workers for each of `processes_per_node` ranks (SLURM's per-task count is already per rank)."""
    per_task = bool(os.environ.get("SLURM_CPUS_PER_TASK"))
    share = available_cpus() if per_task else available_cpus() // max(1, processes_per_node)
    return max(0, share - 1)


def resolve_flag(value: bool | str, name: str) -> bool:
    """``true`` / ``false`` / ``"auto"`` (on with a CUDA device)."""
    if value == AUTO:
        return torch.cuda.is_available()
    if isinstance(value, bool):
        return value
    raise ValueError(f"dataset.{name} must be true, false or auto, got {value!r}")
