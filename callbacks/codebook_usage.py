"""How a generative-retrieval tokenizer uses its codebooks: per-level usage histograms and summary numbers.

Models with codebooks set `irlab.module.RetrievalModule.codebook_usage` = ``{"usage": [counts per code, one array
per level], ...}`` at each evaluation (IRGen's tokenizer). Collapsed codebooks (few codes used, low perplexity) make
identifiers collide and retrieval fail, so this is worth watching every validation. Models without codebooks leave
it None and get nothing from this callback. Other scalar entries of the dict are logged as ``ids/<key>``.
"""

from __future__ import annotations

import lightning as L
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from callbacks.base import EvalResultCallback
from callbacks.media import figure_path, log_image, log_scalars
from irlab.code_usage import counts_perplexity
from irlab.module import RetrievalModule


def usage_summary(usage: list[np.ndarray]) -> dict[str, float]:
    """Per level: fraction of codes used at least once and perplexity exp(H) of the usage distribution."""
    out = {}
    for level, counts in enumerate(usage):
        counts = np.asarray(counts, dtype=np.float64).reshape(-1)
        if counts.size == 0 or (counts < 0).any():
            raise ValueError(f"codebook_usage['usage'][{level}] must be non-negative counts per code")
        out[f"ids/level{level}/used_fraction"] = float((counts > 0).mean())
        out[f"ids/level{level}/perplexity"] = counts_perplexity(counts)
    return out


def plot_usage(usage: list[np.ndarray], path, title: str = ""):
    """One bar chart per level: how many identifiers use each code, codes sorted by frequency."""
    fig = Figure(figsize=(4.0 * len(usage), 3.0))
    axes = fig.subplots(1, len(usage), squeeze=False)[0]
    for level, (ax, counts) in enumerate(zip(axes, usage, strict=True)):
        counts = np.sort(np.asarray(counts, dtype=np.float64).reshape(-1))[::-1]
        ax.bar(np.arange(len(counts)), counts, width=1.0)
        ax.set_title(f"level {level}: {int((counts > 0).sum())}/{len(counts)} codes used", fontsize=9)
        ax.set_xlabel("code (sorted by use)")
        ax.set_ylabel("images")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


class CodebookUsage(EvalResultCallback):
    def on_eval(self, trainer: L.Trainer, pl_module: RetrievalModule, result) -> None:
        stats = pl_module.codebook_usage
        if not stats:
            return
        metrics = {f"ids/{k}": float(v) for k, v in stats.items() if np.isscalar(v) and not isinstance(v, str)}
        usage = stats.get("usage")
        if usage is not None and len(usage) > 0:
            metrics.update(usage_summary(usage))
            path = plot_usage(usage, figure_path(trainer, result.stage, "identifier_usage"),
                              title=f"identifier usage ({result.stage}, step {trainer.global_step})")
            log_image(trainer, f"{result.stage}/identifier_usage", path)
        log_scalars(trainer, metrics)
