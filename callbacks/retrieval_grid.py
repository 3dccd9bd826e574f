"""A few fixed queries and their top-k neighbours after every evaluation: the quickest sanity check of a model.

The queries are spread evenly over the evaluated query set and do not change between epochs, so successive
grids show the same queries improving. Images come from ``trainer.datamodule.eval_dataset(stage)`` (what the
model saw, after the eval transform) and are denormalised with the datamodule's ``mean``/``std``.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from callbacks.base import EvalResultCallback
from callbacks.media import figure_path, log_image
from irlab.retrieval import plot_retrieval_grid


@dataclass
class GridRow:
    query: int  # eval-set position of the query
    neighbors: np.ndarray  # eval-set positions of its top-k neighbours (padding dropped)
    correct: np.ndarray  # bool, same label as the query
    scores: np.ndarray


def grid_rows(result, labels: np.ndarray, num_queries: int, top_k: int) -> list[GridRow]:
    """Rows of the grid for `result` (an `EvalResult`); `labels` are the labels of the *full* eval set."""
    row_pos = result.positions if result.positions is not None else np.arange(result.num_items)
    n_queries = len(result.query_positions)
    if n_queries == 0 or num_queries <= 0:
        return []
    picks = np.unique(np.linspace(0, n_queries - 1, min(num_queries, n_queries)).round().astype(np.int64))
    rows = []
    for qi in picks:
        neighbors = np.asarray(result.report.neighbors[qi, :top_k], dtype=np.int64)
        scores = np.asarray(result.report.scores[qi, :top_k], dtype=np.float64)
        valid = neighbors >= 0  # generative rankings pad with -1
        query = int(row_pos[result.query_positions[qi]])
        gallery = row_pos[result.gallery_positions[neighbors[valid]]]
        rows.append(GridRow(query, gallery, labels[gallery] == labels[query], scores[valid]))
    return rows


class RetrievalGrid(EvalResultCallback):
    def __init__(self, num_queries: int = 6, top_k: int = 8, stages: tuple[str, ...] = ("val", "test"),
                 val_every: int = 1) -> None:
        super().__init__(val_every)
        if num_queries < 1 or top_k < 1:
            raise ValueError(f"RetrievalGrid needs num_queries >= 1 and top_k >= 1, got {num_queries}, {top_k}")
        self.num_queries, self.top_k, self.stages = num_queries, top_k, tuple(stages)

    def on_eval(self, trainer: L.Trainer, pl_module: L.LightningModule, result) -> None:
        dm = trainer.datamodule
        if result.stage not in self.stages or dm is None or not hasattr(dm, "eval_dataset"):
            return
        rows = grid_rows(result, dm.eval_set(result.stage).labels, self.num_queries, self.top_k)
        if not rows:
            return
        dataset = dm.eval_dataset(result.stage)
        image = lambda pos: denormalize(dataset[int(pos)]["image"], getattr(dm, "mean", None), getattr(dm, "std", None))
        path = plot_retrieval_grid(
            [image(r.query) for r in rows],
            [[image(p) for p in r.neighbors] for r in rows],
            [r.correct.tolist() for r in rows],
            [r.scores.tolist() for r in rows],
            figure_path(trainer, result.stage, "retrieval_grid"),
            score_name=result.report.score_name,
        )
        log_image(trainer, f"{result.stage}/retrieval_grid", path, caption="green: same class, red: other class")


def denormalize(image: torch.Tensor, mean, std) -> np.ndarray:
    """CHW normalised tensor -> HWC float image in [0, 1] (min-max scaled when mean/std are unknown)."""
    x = image.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()
