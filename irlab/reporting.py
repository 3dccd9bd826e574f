"""Final metrics: one JSON file per run (what sweeps summarise) and one table on the terminal."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table


def write_metrics(path: str | Path, metrics: dict[str, float], data: dict) -> Path:
    """Write metrics with the split they were measured on, atomically (no half-written file after a kill)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"metrics": metrics, "data": data}, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def print_metrics(metrics: dict[str, float], title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, f"{metrics[key]:.4f}")
    console = Console()
    console.print(table)
    headline = [k for k in ("test/R@1", "val/R@1") if k in metrics]
    for key in headline:  # one plain, greppable line per headline metric
        console.print(f"{key.split('/')[0]} R@1 = {metrics[key]:.4f}", highlight=False)
