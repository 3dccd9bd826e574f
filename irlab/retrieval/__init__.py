"""Shared retrieval evaluation: exact kNN (faiss), rank metrics, full-ranking mAP, plots.

Tie rule everywhere: descending score, equal scores ordered by ascending gallery index (see ``knn``).
"""

from irlab.retrieval.evaluate import RetrievalReport, evaluate_embeddings, evaluate_rankings
from irlab.retrieval.knn import knn_search
from irlab.retrieval.metrics import (
    as_numpy,
    average_precision_full,
    count_relevant,
    pr_curve_from_neighbors,
    retrieval_metrics,
)
from irlab.retrieval.plots import plot_pr_curve, plot_retrieval_grid

__all__ = [
    "RetrievalReport",
    "as_numpy",
    "average_precision_full",
    "count_relevant",
    "evaluate_embeddings",
    "evaluate_rankings",
    "knn_search",
    "plot_pr_curve",
    "plot_retrieval_grid",
    "pr_curve_from_neighbors",
    "retrieval_metrics",
]
