"""Hydra multirun support: a summary table at the end of a sweep, per-job cleanup, W&B runs grouped by sweep.

* `MultirunSummary` (a Hydra callback, ``hydra.callbacks.multirun_summary``) reads every job's
  ``metrics.json`` (written by the runner) and ``.hydra/overrides.yaml`` once the sweep is over, and writes
  ``<sweep dir>/summary.csv`` plus a table on the terminal: the optimized metric (and ``test/R@1``) per job
  with the overrides that vary between jobs. It reads files rather than in-memory job returns, so it works
  with any launcher (local, submitit/SLURM) and for jobs that crashed (status ``missing``). Then the
  leaderboard (`irlab.leaderboard`): jobs that differ only in ``seed`` averaged, ``leaderboard.csv`` / ``.png``.
* `JobTeardown` (``hydra.callbacks.job_teardown``) ends each job cleanly: finishes the W&B run (otherwise the
  next job of a sweep in the same process would keep logging into it) and the DDP process group.
* `wandb_logger` builds a WandbLogger whose run is grouped by sweep (group = sweep folder name) and named after
  the job's overrides in multirun jobs.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from datamodules.errors import MissingFileError
from irlab.distributed import ddp_env_snapshot, end_ddp_job
from irlab.leaderboard import leaderboard_rows, print_leaderboard, write_leaderboard

log = logging.getLogger(__name__)


# ---- summary --------------------------------------------------------------------------------------------
def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job folders under a sweep: those holding ``.hydra/overrides.yaml`` or ``metrics.json`` (outermost only)."""
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    found |= {p.parent for p in sweep_dir.rglob("metrics.json")}
    found.discard(sweep_dir)
    jobs = [d for d in found if not any(parent in found for parent in d.parents)]
    return sorted(jobs, key=_natural_key)


def read_job(job_dir: Path) -> dict[str, Any]:
    """{"job", "overrides" (list of "key=value"), "metrics" (dict), "status"} of one job folder."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    metrics_file = job_dir / "metrics.json"
    metrics, provenance, status = {}, {}, "missing"
    if metrics_file.is_file():
        try:
            content = json.loads(metrics_file.read_text())
            metrics, provenance, status = content.get("metrics", {}), content.get("provenance", {}), "ok"
        except json.JSONDecodeError:
            status = "unreadable"
    return {"job": str(job_dir.relative_to(job_dir.parent)), "dir": job_dir, "overrides": overrides,
            "metrics": metrics, "provenance": provenance, "status": status}


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def summarize(sweep_dir: str | Path, metrics: list[str], filename: str = "summary.csv",
              mode: str = "max") -> tuple[Path, list[dict[str, Any]]]:
    """Write ``<sweep_dir>/<filename>``: one row per job (job, status, one column per override key, metrics)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise MissingFileError(f"sweep folder {sweep_dir} does not exist: nothing to summarise")
    jobs = [read_job(d) for d in find_job_dirs(sweep_dir)]
    keys: list[str] = []
    for job in jobs:
        job["params"] = dict(_split_override(o) for o in job["overrides"])
        keys += [k for k in job["params"] if k not in keys]
    values = [job["metrics"].get(metrics[0]) for job in jobs] if metrics else []
    scored = [v for v in values if v is not None]
    best = (max if mode == "max" else min)(scored) if scored else None
    path = sweep_dir / filename
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "status", "best", *keys, *metrics, "overrides"])
        for job, value in zip(jobs, values or [None] * len(jobs), strict=True):
            row = [job["job"], job["status"], int(best is not None and value == best)]
            row += [job["params"].get(k, "") for k in keys]
            row += ["" if job["metrics"].get(m) is None else job["metrics"][m] for m in metrics]
            writer.writerow([*row, " ".join(job["overrides"])])
    return path, jobs


def print_summary(jobs: list[dict[str, Any]], metrics: list[str], title: str, mode: str = "max") -> None:
    """Rich table of the jobs: overrides that differ between jobs, then the metrics; best job starred."""
    from rich.console import Console
    from rich.table import Table

    all_params = [job["params"] for job in jobs]
    keys = list(dict.fromkeys(k for p in all_params for k in p))
    varying = [k for k in keys if len({p.get(k) for p in all_params}) > 1]
    common = [f"{k}={all_params[0][k]}" for k in keys if k not in varying and all_params and k in all_params[0]]
    scored = [job["metrics"][metrics[0]] for job in jobs if metrics and metrics[0] in job["metrics"]]
    best = (max if mode == "max" else min)(scored) if scored else None
    table = Table(title=title, caption=("common: " + " ".join(common)) if common else None)
    table.add_column("job")
    for key in varying:
        table.add_column(key, overflow="fold")  # wrap long values (Optuna floats) instead of cutting them
    for m in metrics:
        table.add_column(m, justify="right", overflow="fold")
    table.add_column("status")
    for job in jobs:
        values = [f"{job['metrics'][m]:.4f}" if m in job["metrics"] else "-" for m in metrics]
        if best is not None and metrics and job["metrics"].get(metrics[0]) == best:
            values[0] = f"[bold]{values[0]} *[/bold]"
        table.add_row(job["job"], *[job["params"].get(k, "") for k in varying], *values, job["status"])
    Console().print(table)


class MultirunSummary(Callback):
    """Hydra callback: at the end of a multirun, `summarize` the sweep folder and print the table."""

    def __init__(self, filename: str = "summary.csv", extra_metrics: list[str] | None = None,
                 mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"MultirunSummary.mode must be 'max' or 'min', got {mode!r}")
        self.filename, self.mode = filename, mode
        self.extra_metrics = list(extra_metrics) if extra_metrics is not None else ["test/R@1"]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        optimized = config.get("optimized_metric")
        metrics = list(dict.fromkeys([m for m in [optimized, *self.extra_metrics] if m]))
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            path, jobs = summarize(sweep_dir, metrics, self.filename, self.mode)
        except FileNotFoundError as exc:
            log.warning(str(exc))
            return
        # keep metric columns that at least one job has (test/R@1 is absent with test=false)
        shown = [m for m in metrics if m == optimized or any(m in j["metrics"] for j in jobs)]
        print_summary(jobs, shown, title=f"sweep {sweep_dir.name}: {len(jobs)} jobs", mode=self.mode)
        log.info(f"sweep summary: {path}")
        rows = leaderboard_rows(jobs)  # jobs differing only in seed -> mean +- std
        if rows:
            csv_path, png = write_leaderboard(sweep_dir, rows)
            print_leaderboard(rows, title=f"leaderboard {sweep_dir.name} (test, mean ± std over seeds)")
            log.info(f"leaderboard: {csv_path}" + (f", {png}" if png else ""))


# ---- per-job cleanup ------------------------------------------------------------------------------------
class JobTeardown(Callback):
    """Hydra callback: after every job, finish its W&B run and DDP process group, restore DDP env variables."""

    def __init__(self) -> None:
        self._env: dict[str, str | None] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._env = ddp_env_snapshot()

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            failed = getattr(getattr(job_return, "status", None), "name", "COMPLETED") == "FAILED"
            wandb.finish(exit_code=1 if failed else 0)
        end_ddp_job(self._env)


# ---- W&B runs grouped by sweep --------------------------------------------------------------------------
def sweep_identity() -> tuple[str | None, str | None]:
    """(sweep folder name, job override string) inside a multirun job; (None, None) otherwise."""
    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None, None
    overrides = hc.job.get("override_dirname") or ",".join(hc.overrides.task) or f"job{hc.job.get('num', '')}"
    return Path(str(hc.sweep.dir)).name, overrides


def wandb_logger(name: str | None = None, group: str | None = None, **kwargs: Any):
    """A `WandbLogger`; in multirun jobs the group defaults to the sweep folder and the name to the overrides."""
    from lightning.pytorch.loggers import WandbLogger

    sweep_group, job_name = sweep_identity()
    return WandbLogger(name=job_name or name, group=group or sweep_group, **kwargs)
