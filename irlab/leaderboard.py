"""The leaderboard of a multirun: jobs that differ only in ``seed`` averaged into one row, mean +- std.

    python train.py -m experiment=digits_baseline,digits_areir,digits_irgen seed=1,2,3

ends with ``<sweep dir>/leaderboard.csv``, ``leaderboard.png`` (bar chart) and a printed table. A row is one
configuration and one ranking of it (IRGen gives three: the paper's generative ranking, ``rerank``, ``knn``);
its columns are the test metrics' mean and std over the seeds, the wall time and the number of seeds. Jobs whose
split fingerprints (`irlab.provenance`) differ are never averaged: the row says so instead of showing numbers.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SEED_KEYS = ("seed",)
RANKINGS = {"": "", "rerank": "rerank", "knn": "knn"}  # metric infix -> row suffix
_METRIC = re.compile(r"^(R@1|P@\d+|MAP@R)$")


def group_by_seed(jobs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Jobs (as `irlab.sweep.summarize` returns them, with ``params``) keyed by their overrides without the
    seed (``"key=value ..."``, ``"default"`` when none)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        key = " ".join(f"{k}={v}" for k, v in job["params"].items() if k not in SEED_KEYS) or "default"
        groups.setdefault(key, []).append(job)
    return groups


def _metric_names(jobs: list[dict[str, Any]], infix: str) -> list[str]:
    prefix = f"test/{infix}/" if infix else "test/"
    names = set.intersection(*[{k[len(prefix):] for k in j["metrics"] if k.startswith(prefix)
                                and _METRIC.match(k[len(prefix):])} for j in jobs])
    return sorted(names, key=lambda n: (n[0] != "R", n.startswith("MAP"), int(re.sub(r"\D", "", n) or 0)))


def leaderboard_rows(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per (configuration, ranking): name, seeds, status, wall time, {metric: (mean, std)}."""
    rows = []
    for name, group in group_by_seed(jobs).items():
        done = [j for j in group if j["status"] == "ok" and j["metrics"]]
        fingerprints = {(j.get("provenance") or {}).get("split_fingerprint") for j in done}
        status = "ok" if len(done) == len(group) else f"{len(group) - len(done)} of {len(group)} jobs failed"
        if len(fingerprints) > 1:
            log.error(f"leaderboard: the jobs of {name!r} were measured on {len(fingerprints)} different splits "
                      f"(split_fingerprint in metrics.json): not averaged")
            rows.append({"name": name, "seeds": len(done), "status": "different splits: not averaged",
                         "wall_seconds": None, "metrics": {}})
            continue
        walls = [(j.get("provenance") or {}).get("wall_seconds") for j in done]
        walls = [w for w in walls if w is not None]
        for infix, suffix in RANKINGS.items():
            names = _metric_names(done, infix) if done else []
            if not names:
                continue
            prefix = f"test/{infix}/" if infix else "test/"
            values = {n: np.array([j["metrics"][prefix + n] for j in done], dtype=float) for n in names}
            rows.append({"name": f"{name} / {suffix}" if suffix else name, "seeds": len(done), "status": status,
                         "wall_seconds": float(np.mean(walls)) if walls else None,
                         "metrics": {n: (float(v.mean()), float(v.std())) for n, v in values.items()}})
    return rows


def write_leaderboard(sweep_dir: Path, rows: list[dict[str, Any]]) -> tuple[Path, Path | None]:
    """``leaderboard.csv`` (mean and std columns) and ``leaderboard.png``; returns their paths."""
    names = list(dict.fromkeys(n for r in rows for n in r["metrics"]))
    csv_path = Path(sweep_dir) / "leaderboard.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        stats = [f"{n}_{s}" for n in names for s in ("mean", "std")]
        writer.writerow(["row", "seeds", "status", "wall_seconds", *stats])
        for r in rows:
            cells = [x for n in names for x in (r["metrics"].get(n) or ("", ""))]
            writer.writerow([r["name"], r["seeds"], r["status"], r["wall_seconds"] or "", *cells])
    return csv_path, plot_leaderboard(Path(sweep_dir) / "leaderboard.png", rows)


def plot_leaderboard(path: Path, rows: list[dict[str, Any]],
                     metrics: tuple[str, ...] = ("R@1", "MAP@R")) -> Path | None:
    shown = [r for r in rows if r["metrics"]]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(shown) + 2), 3.6), dpi=100)
    width = 0.8 / len(metrics)
    x = np.arange(len(shown))
    for i, metric in enumerate(metrics):
        mean = [r["metrics"].get(metric, (np.nan, 0))[0] for r in shown]
        std = [r["metrics"].get(metric, (np.nan, 0))[1] for r in shown]
        ax.bar(x + i * width, mean, width, yerr=std, capsize=3, label=metric)
    ax.set_xticks(x + width * (len(metrics) - 1) / 2)
    ax.set_xticklabels([r["name"].replace("experiment=", "").replace(" / ", "\n") for r in shown], fontsize=8)
    ax.set_ylabel("test, mean +- std over seeds")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def print_leaderboard(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(dict.fromkeys(n for r in rows for n in r["metrics"]))
    table = Table(title=title)
    table.add_column("row", no_wrap=True)
    for n in names:
        table.add_column(n, justify="right", no_wrap=True)
    table.add_column("wall s", justify="right")
    table.add_column("seeds", justify="right")
    for r in rows:
        cells = [f"{r['metrics'][n][0]:.3f}±{r['metrics'][n][1]:.3f}" if n in r["metrics"] else "-" for n in names]
        wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] is not None else "-"
        seeds = str(r["seeds"]) if r["status"] == "ok" else f"{r['seeds']} ({r['status']})"
        table.add_row(r["name"].replace("experiment=", ""), *cells, wall, seeds)
    # wide enough for every column: a terminal (or a log file) of 80 columns would fold names into 7-letter slices
    Console(width=max(120, 24 + 14 * (len(names) + 2) + max((len(r["name"]) for r in rows), default=0))).print(table)
