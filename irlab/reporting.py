"""Final metrics: one JSON file per run (what sweeps summarise) and one table on the terminal.

Metric keys are ``<stage>/<name>`` for a model's own ranking and ``<stage>/<row>/<name>`` for another ranking
of the same queries (IRGen logs ``test/R@1`` for generative retrieval as the paper ranks it, ``test/rerank/R@1``
and ``test/knn/R@1``). `metric_rows` groups them so that the rows of one evaluation can be read side by side:
``metrics.json`` holds the grouped view under ``"rows"`` and the terminal shows one column per row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from rich.console import Console
from rich.table import Table

from irlab.atomic_files import write_text_atomically

STAGES = ("val", "test")
# the rank-based metrics a row is read by, in display order (P@k_irgen after P@k)
_HEADLINE = re.compile(r"^(R@\d+|P@\d+|P@\d+_irgen|R-precision|MAP@R|mAP)$")
_ORDER = {"R@": 0, "P@": 1, "R-": 3, "MA": 4, "mA": 5}


def _headline_order(name: str) -> tuple[int, int]:
    group = _ORDER[name[:2]] + (1 if name.endswith("_irgen") else 0)
    digits = re.findall(r"\d+", name)
    return group, int(digits[0]) if digits else 0


def _row_metric(key: str) -> tuple[str, str, str] | None:
    """``test/knn/R@1`` -> ("test", "knn", "R@1"), ``val/R@1`` -> ("val", "", "R@1"); None for anything that
    is not a ranking metric of an evaluation row."""
    parts = key.split("/")
    if parts[0] not in STAGES or len(parts) not in (2, 3) or not _HEADLINE.match(parts[-1]):
        return None
    return parts[0], parts[1] if len(parts) == 3 else "", parts[-1]


def metric_rows(metrics: Mapping[str, float], row_names: Mapping[str, str] | None = None
                ) -> dict[str, dict[str, dict[str, float]]]:
    """``{stage: {row label: {metric: value}}}`` for the headline metrics of every ranking row.

    ``row_names`` maps a row key ("" = the model's own ranking, "knn", "rerank", ...) to its label; rows not
    named keep their key ("" becomes "model").
    """
    names = {"": "model", **(row_names or {})}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for key, value in metrics.items():
        parsed = _row_metric(key)
        if parsed is None:
            continue
        stage, row, name = parsed
        rows.setdefault(stage, {}).setdefault(names.get(row, row), {})[name] = float(value)
    order = {label: i for i, label in enumerate(names.values())}
    return {stage: {label: dict(sorted(m.items(), key=lambda kv: _headline_order(kv[0])))
                    for label, m in sorted(rows[stage].items(), key=lambda kv: order.get(kv[0], len(order)))}
            for stage in STAGES if stage in rows}


def write_metrics(path: str | Path, metrics: dict[str, float], data: dict,
                  row_names: Mapping[str, str] | None = None, provenance: dict | None = None) -> Path:
    """Write metrics with the split they were measured on (and, for a run, its `irlab.provenance`), atomically
    (no half-written file after a kill)."""
    content = {"metrics": metrics, "data": data, "rows": metric_rows(metrics, row_names)}
    if provenance is not None:
        content["provenance"] = provenance
    return write_text_atomically(Path(path), json.dumps(content, indent=2, sort_keys=True))


def print_metrics(metrics: dict[str, float], title: str, row_names: Mapping[str, str] | None = None) -> None:
    """The ranking rows side by side (one column each), then every other metric, then greppable headlines."""
    console = Console()
    rows = metric_rows(metrics, row_names)
    for stage, by_row in rows.items():  # one column per ranking row: a few columns fit any terminal
        names = sorted({name for m in by_row.values() for name in m}, key=_headline_order)
        table = Table(title=f"{title} -- {stage}")
        table.add_column("metric")
        for label in by_row:
            table.add_column(label, justify="right")
        for name in names:
            table.add_row(name, *(f"{m[name]:.4f}" if name in m else "-" for m in by_row.values()))
        console.print(table)
    others = sorted(k for k in metrics if _row_metric(k) is None)
    if others:
        table = Table(title=f"{title} -- other metrics")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in others:
            table.add_row(key, f"{metrics[key]:.4f}")
        console.print(table)
    headline = [k for k in ("test/R@1", "val/R@1") if k in metrics]
    for key in headline:  # one plain, greppable line per headline metric
        console.print(f"{key.split('/')[0]} R@1 = {metrics[key]:.4f}", highlight=False)
