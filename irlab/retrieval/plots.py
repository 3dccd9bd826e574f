"""PNG figures for retrieval reports (precision-recall curve, query/neighbour grid).

Figures are built with ``matplotlib.figure.Figure`` + the Agg canvas directly instead of ``pyplot``: no global
backend switch, no figure registry to leak, safe inside training processes and on headless machines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from irlab.retrieval.metrics import as_numpy

__all__ = ["plot_pr_curve", "plot_retrieval_grid"]

_CORRECT, _WRONG, _UNKNOWN = "#1a9850", "#d73027", "#969696"


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def curve_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under a micro-averaged PR curve from recall 0 (step interpolation: precision at each rank times the
    recall it adds) -- AP over the ranks the curve reaches, so a curve that stops early has a smaller area."""
    keep = np.isfinite(recall) & np.isfinite(precision)
    r, p = recall[keep], precision[keep]
    return float(np.sum(np.diff(np.concatenate([[0.0], r])) * p)) if len(r) else float("nan")


def plot_pr_curve(pr_curve: dict[str, Any], path: str | Path, title: str = "",
                  others: dict[str, dict[str, Any]] | None = None, label: str = "model") -> Path:
    """Precision (y) against recall (x) from ``RetrievalReport.pr_curve``, one marker per rank, with the area
    under each curve in the legend; ``others`` (name -> curve) are drawn on the same axes (IRGen's rerank and
    kNN rows). A curve that stops before recall 1 (a truncated ranking) is marked and said in a note."""
    curves = {label: pr_curve, **(others or {})}
    fig = Figure(figsize=(5.0, 4.2))
    ax = fig.add_subplot()
    notes = []
    for name, curve in curves.items():
        recall = as_numpy(curve["recall"], np.float64).reshape(-1)
        precision = as_numpy(curve["precision"], np.float64).reshape(-1)
        if recall.shape != precision.shape:
            raise ValueError(f"recall {recall.shape} and precision {precision.shape} differ in length")
        area = curve_area(recall, precision)
        line, = ax.plot(recall, precision, marker="o", markersize=3, linewidth=1.5,
                        label=f"{name} (area {area:.3f})")
        reached = float(np.nanmax(recall)) if len(recall) else 0.0
        if reached < 0.999:
            ax.axvline(reached, color=line.get_color(), linestyle=":", linewidth=1)
            notes.append(f"{name}: ranking ends at recall {reached:.2f} ({len(recall)} ranks)")
    ax.set_xlabel("recall" + ("\n" + "; ".join(notes) if notes else ""), fontsize=9)
    ax.set_ylabel("precision")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def _as_image(img: Any) -> np.ndarray:
    arr = as_numpy(img)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # CHW tensor -> HWC
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an HxWx3 (or HxW) image, got shape {arr.shape}")
    return arr


def plot_retrieval_grid(
    query_images: Sequence[Any],
    neighbor_images: Sequence[Sequence[Any]],
    correct: Sequence[Sequence[bool] | None],
    scores: Sequence[Sequence[float]],
    path: str | Path,
    *,
    thumb_inches: float = 1.3,
    score_name: str = "score",
) -> Path:
    """One PNG, a row per query: the query, then its top-K neighbours framed green (correct) or red (wrong)
    with the score above each (what it is, ``score_name``, is said on top). Rows may have different K (shorter
    rows are left blank). A row whose ``correct`` is None (labels unknown: a query from outside the dataset)
    is framed grey."""
    n_rows = len(query_images)
    if not (len(neighbor_images) == len(correct) == len(scores) == n_rows):
        raise ValueError("query_images, neighbor_images, correct and scores need one entry per query")
    if n_rows == 0:
        raise ValueError("nothing to plot: no queries")
    n_cols = 1 + max((len(r) for r in neighbor_images), default=0)
    title_inches = 0.3  # room for the legend line above the rows
    height = thumb_inches * 1.15 * n_rows + title_inches
    fig = Figure(figsize=(thumb_inches * n_cols, height))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r in range(n_rows):
        row_correct = [None] * len(scores[r]) if correct[r] is None else correct[r]
        if not (len(neighbor_images[r]) == len(row_correct) == len(scores[r])):
            raise ValueError(f"row {r}: neighbor_images, correct and scores differ in length")
        cells: list[tuple[Any, str, str | None]] = [(query_images[r], "query", "#333333")]
        cells += [
            (img, f"{float(s):.3f}", _UNKNOWN if ok is None else (_CORRECT if ok else _WRONG))
            for img, ok, s in zip(neighbor_images[r], row_correct, scores[r], strict=True)
        ]
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.set_axis_off()
                continue
            img, text, color = cells[c]
            arr = _as_image(img)
            ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
            ax.set_title(text, fontsize=8, color=color)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3 if c else 1.5)
    legend = "green = same class, red = other class" + ("; grey = labels unknown" if None in correct else "")
    fig.suptitle(f"number above each image: {score_name}; {legend}", fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - title_inches / height))
    return _save(fig, path, dpi=100)
