"""Retrieval metrics computed from ranked neighbour lists (pure numpy, no search here).

Everything is derived from a boolean "relevance" matrix ``rel[i, n]`` (is the n-th ranked gallery item of
query i of the query's label?), so the same code scores embedding kNN and generative rankings (IRGen beam
search).

Conventions shared by every function here:

* ``neighbors`` is int64 ``[Q, k]``; ``-1`` marks padding (a ranking shorter than ``k``). Padding and columns
  beyond ``k`` count as "not relevant", never as an error, so truncated rankings give lower bounds.
* ``relevant_counts[i]`` = R_i, the number of gallery items sharing query i's label *after* self-exclusion. It
  is passed in, not inferred from the ranking, because a truncated ranking cannot tell how many items exist.
* Queries with R_i == 0 have no defined recall/precision; they are left out of every average and counted in
  ``queries_without_relevant`` (silently scoring them 0 or 1 would bias the comparison between methods).
* Gallery indices inside one row must be unique (the kNN search guarantees it; ``evaluate_rankings`` removes
  repeats produced by generative decoders before calling in here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "as_numpy",
    "count_relevant",
    "label_codes",
    "relevance_matrix",
    "retrieval_metrics",
    "average_precision_full",
    "average_precision_from_ranks",
    "pr_curve_from_neighbors",
]


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """numpy view/copy of a numpy array, torch tensor (any device, bf16 included) or sequence.

    Duck-typed on ``detach`` so this module never imports torch (keeps metrics importable without it).
    """
    if hasattr(x, "detach"):  # torch.Tensor
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            t = t.float()
        x = t.cpu().numpy()
    arr = np.asarray(x)
    return arr if dtype is None else arr.astype(dtype, copy=False)


def label_codes(query_labels: Any, gallery_labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Map arbitrary (hashable, sortable) labels of both sides into one shared integer code space."""
    ql = as_numpy(query_labels).reshape(-1)
    gl = as_numpy(gallery_labels).reshape(-1)
    _, inv = np.unique(np.concatenate([ql, gl]), return_inverse=True)
    inv = inv.reshape(-1).astype(np.int64)
    return inv[: len(ql)], inv[len(ql) :]


def count_relevant(query_labels: Any, gallery_labels: Any, exclude: Any = None) -> np.ndarray:
    """R_i: gallery items with query i's label, minus the excluded item when it has that label. int64 [Q]."""
    qc, gc = label_codes(query_labels, gallery_labels)
    per_label = np.bincount(gc, minlength=int(max(qc.max(initial=-1), gc.max(initial=-1)) + 1))
    counts = per_label[qc].astype(np.int64)
    if exclude is not None:
        ex = as_numpy(exclude).astype(np.int64).reshape(-1)
        if ex.shape != counts.shape:
            raise ValueError(f"exclude has shape {ex.shape}, expected ({len(counts)},)")
        has = ex >= 0
        counts[has] -= (gc[ex[has]] == qc[has]).astype(np.int64)
    return counts


def relevance_matrix(neighbors: Any, query_labels: Any, gallery_labels: Any) -> np.ndarray:
    """bool [Q, k]: neighbour n of query i is a real gallery item (not -1 padding) with the query's label."""
    nb = as_numpy(neighbors).astype(np.int64, copy=False)
    if nb.ndim != 2:
        raise ValueError(f"neighbors must be 2-D [Q, k], got shape {nb.shape}")
    qc, gc = label_codes(query_labels, gallery_labels)
    if len(qc) != nb.shape[0]:
        raise ValueError(f"{len(qc)} query labels for {nb.shape[0]} neighbour rows")
    if nb.size and nb.max() >= len(gc):
        raise ValueError(f"neighbour index {int(nb.max())} out of range for a gallery of {len(gc)}")
    valid = nb >= 0
    return valid & (gc[np.where(valid, nb, 0)] == qc[:, None])


def retrieval_metrics(
    neighbors: Any,
    query_labels: Any,
    gallery_labels: Any,
    *,
    relevant_counts: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
) -> dict[str, float]:
    """Rank-based metrics from ranked neighbour lists. All values are means over queries with R_i > 0.

    With ``hits_i(n)`` = relevant items among the first n neighbours of query i and ``rel_i(n)`` in {0, 1}:

    * ``R@k``   recall@k as used in metric learning = hit rate: 1 if hits_i(k) > 0.
    * ``P@k``   standard precision@k = hits_i(k) / k (k is never reduced: k > R_i or a short list).
    * ``R-precision`` = hits_i(R_i) / R_i.
    * ``MAP@R`` (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020)
      = (1 / R_i) * sum_{n <= R_i} rel_i(n) * hits_i(n) / n.
      R-precision and MAP@R are exact only when each row holds at least R_i neighbours; otherwise the missing
      positions count as non-relevant (a lower bound).
    * ``P@k_irgen`` -- the Precision@K of the IRGen paper's tables (Zhang et al., arXiv 2303.10126), as the
      reference code computed it: ``utils/evaluate.py::compute_map`` of github.com/yakt00/IRGen (called from
      ``test_ar.py`` on the beam-search ranking), a modification of Radenovic's revisitop ``compute_map``::

          pos = 1-based positions of the relevant items inside the returned ranking
          if pos != np.array([]) and len(pos) == R_i and pos[-1] < K:  kq = pos[-1]   else: kq = K
          P = (#pos <= kq) / kq

      The first test was meant as "pos is non-empty" but is not: under NumPy < 1.25 (the code fails outright
      on newer NumPy) a 1-element ``pos`` broadcasts against the empty array to an *empty*, falsy array, a
      0-element one likewise, and only >= 2 elements (a failed elementwise comparison) give ``True``. So the
      rule "divide by the rank of the last relevant item" applies only to queries with **at least two**
      relevant items, all of them inside the ranking before rank K; every other query scores the standard
      hits_i(K) / K. Example: the single relevant item at rank 1, K = 30: 1/30 (not 1.0). This function
      reproduces the numbers behind the published tables, quirk included; hence P@1_irgen == P@1.
      The reference's other numbers: its printed R@K divides by *all* queries (equal to ``R@k`` here whenever
      every query has a relevant item, as in the paper's closed-set benchmarks); its "mAP" (trapezoids,
      divided by min(R_i, 10)) is not reproduced.
    * ``queries_without_relevant`` -- number of queries with R_i == 0 (excluded from all means);
      ``queries_evaluated`` -- number of queries in the means.

    If no query has a relevant item, every mean is NaN.
    """
    rel = relevance_matrix(neighbors, query_labels, gallery_labels)
    counts = as_numpy(relevant_counts).astype(np.int64).reshape(-1)
    if counts.shape[0] != rel.shape[0]:
        raise ValueError(f"relevant_counts has {counts.shape[0]} entries for {rel.shape[0]} queries")
    if np.any(counts < 0):
        raise ValueError("relevant_counts must be >= 0")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive, got {ks}")

    too_many = rel.sum(axis=1) > counts
    if np.any(too_many):
        i = int(np.argmax(too_many))
        raise ValueError(
            f"query {i}: {int(rel[i].sum())} relevant neighbours but relevant_counts={int(counts[i])} "
            "(repeated neighbour indices, or the excluded item left in the ranking?)"
        )
    keep = counts > 0
    rel, counts = rel[keep], counts[keep]
    n_cols = rel.shape[1]
    hits = np.cumsum(rel, axis=1, dtype=np.int64)  # hits[:, n-1] = hits(n)

    def hits_at(n: np.ndarray | int) -> np.ndarray:
        """hits(n) with n clipped to the available columns (missing positions are non-relevant)."""
        n = np.minimum(np.asarray(n, dtype=np.int64), n_cols)
        if n_cols == 0:
            return np.zeros(len(counts), dtype=np.int64)
        col = np.broadcast_to(np.maximum(n - 1, 0), (len(counts),))
        return np.where(n > 0, hits[np.arange(len(counts)), col], 0)

    def mean(x: np.ndarray) -> float:
        return float(np.mean(x)) if len(x) else float("nan")

    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = mean((hits_at(k) > 0).astype(np.float64))
    for k in ks:
        out[f"P@{k}"] = mean(hits_at(k) / k)
    out["R-precision"] = mean(hits_at(counts) / counts)

    ranks = np.arange(1, n_cols + 1, dtype=np.float64)
    within_r = ranks[None, :] <= counts[:, None]
    out["MAP@R"] = mean((rel * within_r * hits / ranks).sum(axis=1) / counts)

    # IRGen: position of the R_i-th relevant item, if the ranking contains all of them -- and, as the reference
    # ran (see the docstring), only for queries with at least two relevant items in the ranking.
    found = hits_at(n_cols)
    complete = (found >= counts) & (found >= 2)
    last_pos = np.where(complete, np.argmax(hits >= counts[:, None], axis=1) + 1, 0) if n_cols else 0
    for k in ks:
        kq = np.where(complete & (last_pos < k), last_pos, k)
        out[f"P@{k}_irgen"] = mean(hits_at(kq) / kq)

    out["queries_without_relevant"] = float(np.count_nonzero(~keep))
    out["queries_evaluated"] = float(len(counts))
    return out


def average_precision_from_ranks(relevant_ranks: Any, relevant_counts: Any) -> np.ndarray:
    """AP per query from the 1-based ranks of its relevant items. float64 [Q], NaN where R_i == 0.

    ``relevant_ranks`` is ``[Q, W]`` (any order inside a row, entries <= 0 are padding). With the ranks sorted
    ascending r_1 < r_2 < ..., AP_i = (1 / R_i) * sum_m m / r_m: precision at each relevant item, averaged
    over *all* R_i relevant items, so relevant items missing from the ranks (never retrieved) contribute 0.
    Ranks must be distinct within a row; how ties in score were turned into ranks is the caller's rule.
    """
    ranks = as_numpy(relevant_ranks).astype(np.float64)
    counts = as_numpy(relevant_counts).astype(np.int64).reshape(-1)
    if ranks.ndim != 2 or ranks.shape[0] != counts.shape[0]:
        raise ValueError(f"relevant_ranks {ranks.shape} does not match relevant_counts {counts.shape}")
    ranks = np.sort(np.where(ranks > 0, ranks, np.inf), axis=1)
    m = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = np.where(np.isfinite(ranks), m / ranks, 0.0).sum(axis=1) / counts
    return np.where(counts > 0, ap, np.nan)


def average_precision_full(
    neighbors: Any, query_labels: Any, gallery_labels: Any, *, relevant_counts: Any
) -> np.ndarray:
    """AP per query (NaN where R_i == 0) over the given ranking, normalised by *all* R_i relevant items.

    Exact (= AP over the full ranking) when the ranking is complete or at least contains every relevant item;
    relevant items absent from a truncated ranking count as never retrieved (precision 0), giving a lower
    bound. Ties: the ranking is taken as given; ``knn_search`` / ``evaluate_embeddings`` produce it with ties
    in score broken by lower gallery index. mAP = ``np.nanmean`` of the result.
    """
    rel = relevance_matrix(neighbors, query_labels, gallery_labels)
    positions = np.where(rel, np.arange(1, rel.shape[1] + 1)[None, :], 0)
    return average_precision_from_ranks(positions, relevant_counts)


def pr_curve_from_neighbors(
    neighbors: Any, query_labels: Any, gallery_labels: Any, *, relevant_counts: Any
) -> dict[str, np.ndarray]:
    """Micro-averaged precision/recall at ranks n = 1..k (queries with R_i > 0 only).

    precision(n) = sum_i hits_i(n) / (n * #queries); recall(n) = sum_i hits_i(n) / sum_i R_i. Micro averaging
    over relevant items keeps recall meaningful when R_i varies a lot between queries (macro recall would be
    dominated by queries with one relevant item). Returns ``{'rank', 'precision', 'recall'}`` (float64 [k]).
    """
    rel = relevance_matrix(neighbors, query_labels, gallery_labels)
    counts = as_numpy(relevant_counts).astype(np.int64).reshape(-1)
    keep = counts > 0
    hits = np.cumsum(rel[keep], axis=1).sum(axis=0).astype(np.float64)
    rank = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    n_q, n_rel = int(keep.sum()), int(counts[keep].sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = hits / (rank * n_q) if n_q else np.full_like(rank, np.nan)
        recall = hits / n_rel if n_rel else np.full_like(rank, np.nan)
    return {"rank": rank, "precision": precision, "recall": recall}
