"""End-to-end retrieval evaluation: embeddings (or ready-made rankings) in, a ``RetrievalReport`` out.

``evaluate_embeddings`` with ``with_map=True`` makes *one* pass over the query x gallery score matrix, a block
of query rows at a time (a block is ~128 MB of float32, two alive at once, never the full matrix), and from
each block derives

* the top-k neighbours (``knn.topk_exact``, same tie rule as ``knn_search``), and
* the exact 1-based rank of every relevant gallery item in the *full* ranking, for mAP:
  ``rank(j) = #{g : s_g > s_j} + #{g < j : s_g == s_j} + 1`` (descending score, ties -> lower gallery index).

Both come from the same float32 numbers, so neighbours, MAP@R and mAP can never disagree about an order,
and the matrix product -- the dominant cost on CPU -- is paid once instead of twice (faiss for kNN plus a
second pass for mAP). Without mAP the search goes through ``knn_search`` (faiss, GPU when available).

Ranks are counted on the few gallery items that can precede a query's relevant items (those scoring at
least as high as its lowest relevant item); blocks where that is a large share fall back to comparison
passes, and blocks whose largest class exceeds ``_SORT_THRESHOLD`` to a stable argsort per row. Queries are
processed in order of their number of relevant items so that one large class does not dictate a block's work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from irlab.retrieval.knn import knn_search, prepare_embeddings, prepare_exclude, topk_exact
from irlab.retrieval.metrics import (
    as_numpy,
    average_precision_from_ranks,
    average_precision_full,
    count_relevant,
    label_codes,
    pr_curve_from_neighbors,
    relevance_matrix,
    retrieval_metrics,
)

__all__ = ["RetrievalReport", "evaluate_embeddings", "evaluate_rankings"]

#: target size of one dense float32 score block (rows x gallery) in bytes; two are alive at a time (the next
#: block's product overlaps the rank counting of the previous one).
_BLOCK_BYTES = 128 << 20
#: switch from per-relevant-item comparison passes to a per-row stable argsort above this many relevant items.
_SORT_THRESHOLD = 128
#: rows per stable-argsort sub-block (two int64 [rows, G] temporaries).
_SORT_ROWS = 64
#: rows per rank-counting sub-block, and the share of a sub-block's entries above which counting on extracted
#: candidates (~12 ns per candidate and relevant item) stops beating two comparison passes (~0.8 ns/entry).
_RANK_ROWS = 128
_CANDIDATE_FRACTION = 1 / 16
#: at most this many threads for each block's product slices and rank counting
_MAX_WORKERS = 8


@dataclass
class RetrievalReport:
    """Result of one evaluation.

    metrics:   every key of ``retrieval_metrics`` plus ``'mAP'`` when it could be computed exactly.
    neighbors: int64 [Q, k] ranked gallery indices (-1 = padding in generative rankings).
    scores:    float32 [Q, k] scores of those neighbours (NaN where the method gave none).
    pr_curve:  ``{'rank', 'precision', 'recall'}`` micro-averaged over queries with relevant items at ranks
               1..k of ``neighbors`` (see ``metrics.pr_curve_from_neighbors``); k >= max class size for
               ``evaluate_embeddings``, so the curve reaches each query's R_i.
    """

    metrics: dict[str, float]
    neighbors: np.ndarray
    scores: np.ndarray
    pr_curve: dict[str, np.ndarray] = field(default_factory=dict)
    # other rankings of the same queries (IRGen: "rerank", "knn"), drawn on the same PR plot
    other_curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    curve_label: str = "model"  # the legend entry of `pr_curve` next to `other_curves`
    score_name: str = "cosine similarity"  # what `scores` are (retrieval grids label them)


def _relevant_table(qc: np.ndarray, gc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gallery indices grouped by label: (order, start per label code, size per label code)."""
    n_codes = int(max(qc.max(initial=-1), gc.max(initial=-1)) + 1)
    order = np.argsort(gc, kind="stable").astype(np.int64)
    sizes = np.bincount(gc, minlength=n_codes).astype(np.int64)
    starts = np.cumsum(sizes) - sizes
    return order, starts, sizes


def _ranks_by_sort(block: np.ndarray, rel_idx: np.ndarray) -> np.ndarray:
    """Strategy for large classes: stable argsort of each row (exactly the tie rule), then look up."""
    ranks = np.zeros(rel_idx.shape, dtype=np.int64)
    arange = np.arange(block.shape[1], dtype=np.int64)
    for lo in range(0, block.shape[0], _SORT_ROWS):
        sub = block[lo : lo + _SORT_ROWS]
        order = np.argsort(-sub, axis=1, kind="stable")
        inverse = np.empty_like(order)
        np.put_along_axis(inverse, order, np.broadcast_to(arange, order.shape), axis=1)
        r = rel_idx[lo : lo + _SORT_ROWS]
        got = np.take_along_axis(inverse, np.where(r >= 0, r, 0), axis=1) + 1
        ranks[lo : lo + _SORT_ROWS] = np.where(r >= 0, got, 0)
    return ranks


def _ranks_by_passes(block: np.ndarray, rel_idx: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Strategy for deep relevant items: two comparison passes over the rows per relevant column."""
    ranks = np.zeros(rel_idx.shape, dtype=np.int64)
    for m in range(rel_idx.shape[1]):
        col, ok, t = rel_idx[:, m], rel_idx[:, m] >= 0, thr[:, m]
        if not ok.any():
            continue
        greater = (block > t[:, None]).sum(axis=1, dtype=np.int64)
        at_least = (block >= t[:, None]).sum(axis=1, dtype=np.int64)
        rank = greater + 1
        for r in np.flatnonzero(ok & (at_least - greater > 1)):  # ties with other items: exact, per row
            rank[r] += int(np.count_nonzero(block[r, : col[r]] == t[r]))
        ranks[:, m] = np.where(ok, rank, 0)
    return ranks


def _relevant_ranks(block: np.ndarray, rel_idx: np.ndarray) -> np.ndarray:
    """1-based full-ranking rank of each relevant item (``rel_idx`` [B, W], -1 = padding -> rank 0).

    Only gallery items scoring at least as high as a row's *lowest* relevant item can precede any of its
    relevant items. When those candidates are a small part of the row (the usual case for a useful model),
    they are extracted once and each relevant item's rank is counted on them:
    ``#{s_g > s_j} + #{s_g == s_j, g < j} + 1`` -- the tie rule, with no special case. Otherwise (deep
    relevant items) the row block is scanned with comparison passes; for very large classes it is sorted.
    """
    n_rows, width = rel_idx.shape
    if width == 0:
        return np.zeros((n_rows, 0), dtype=np.int64)
    if width > _SORT_THRESHOLD:
        return _ranks_by_sort(block, rel_idx)
    ranks = np.zeros((n_rows, width), dtype=np.int64)
    for lo in range(0, n_rows, _RANK_ROWS):
        sub, rel = block[lo : lo + _RANK_ROWS], rel_idx[lo : lo + _RANK_ROWS]
        ok = rel >= 0
        thr = np.where(ok, np.take_along_axis(sub, np.where(ok, rel, 0), axis=1), np.inf)
        mask = sub >= thr.min(axis=1)[:, None]  # rows without relevant items: threshold inf, no candidate
        if np.count_nonzero(mask) > _CANDIDATE_FRACTION * sub.size:
            ranks[lo : lo + _RANK_ROWS] = _ranks_by_passes(sub, rel, thr.astype(sub.dtype))
            continue
        flat = np.flatnonzero(mask)  # row-major: candidates come grouped by row
        rows = flat // sub.shape[1]
        cols = flat - rows * sub.shape[1]
        vals = sub.reshape(-1)[flat]
        per_row = np.bincount(rows, minlength=sub.shape[0])
        ends = np.cumsum(per_row)
        for m in range(width):
            t, j = np.repeat(thr[:, m], per_row), np.repeat(rel[:, m], per_row)
            before = np.concatenate([[0], np.cumsum((vals > t) | ((vals == t) & (cols < j)))])
            count = before[ends] - before[ends - per_row]
            ranks[lo : lo + _RANK_ROWS, m] = np.where(ok[:, m], count + 1, 0)
    return ranks


def _worker_count() -> int:
    """Threads for each block's product slices and rank counting (numpy releases the GIL in both)."""
    try:
        return max(1, min(len(os.sched_getaffinity(0)), _MAX_WORKERS))
    except AttributeError:  # not Linux
        return max(1, min(os.cpu_count() or 1, _MAX_WORKERS))


def _fused_scan(
    q: np.ndarray,
    g: np.ndarray,
    excl: np.ndarray | None,
    k: int,
    qc: np.ndarray,
    gc: np.ndarray,
    counts: np.ndarray,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One blocked pass over Q x G: (scores [Q,k], neighbours [Q,k], AP per query).

    Per block: the matrix product split into row slices over one thread per core (single-threaded BLAS each),
    the top-k on torch's threads, and the rank counting (numpy calls that release the GIL) over row slices on
    the same threads, overlapping the next block's product."""
    n_q, n_g = q.shape[0], g.shape[0]
    order, starts, sizes = _relevant_table(qc, gc)
    scores = np.empty((n_q, k), dtype=np.float32)
    neighbors = np.empty((n_q, k), dtype=np.int64)
    ap = np.full(n_q, np.nan)
    rows_per_block = max(1, min(int(chunk_size), _BLOCK_BYTES // (4 * n_g)))
    perm = np.argsort(counts, kind="stable")  # similar R_i share a block -> fewer wasted passes

    def relevant_ap(block: np.ndarray, qi: np.ndarray, ex: np.ndarray | None) -> None:
        # Relevant gallery indices of each query: its label's group, minus the excluded index.
        width = int(sizes[qc[qi]].max(initial=0))
        j = np.arange(width)[None, :]
        size = sizes[qc[qi]][:, None]
        rel = np.where(j < size, order[np.minimum(starts[qc[qi]][:, None] + j, max(len(order) - 1, 0))], -1)
        if ex is not None:
            rel = np.where(rel == ex[:, None], -1, rel)
        ap[qi] = average_precision_from_ranks(_relevant_ranks(block, rel), counts[qi])

    workers = _worker_count()
    pending: list = []
    # BLAS at one thread, the product split over the workers instead: OpenBLAS' own threads spin ~0.1 s after
    # every call, taking a core from the rank counting that runs beside the next product.
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        for lo in range(0, n_q, rows_per_block):
            qi = perm[lo : lo + rows_per_block]
            step = -(-len(qi) // workers)
            block = np.empty((len(qi), n_g), dtype=np.float32)
            products = [pool.submit(np.matmul, q[qi[a : a + step]], g.T, out=block[a : a + step])
                        for a in range(0, len(qi), step)]
            for job in [*pending, *products]:
                job.result()  # re-raises a worker's error; the previous block's ranks finish first
            ex = excl[qi] if excl is not None else None
            if ex is not None:
                has = np.flatnonzero(ex >= 0)
                block[has, ex[has]] = -np.inf  # never counted above a finite score, never returned
            scores[qi], neighbors[qi] = topk_exact(block, k)  # multi-threaded itself (torch.topk)
            pending = [pool.submit(relevant_ap, block[a : a + step], qi[a : a + step],
                                   None if ex is None else ex[a : a + step]) for a in range(0, len(qi), step)]
        for job in pending:
            job.result()
    return scores, neighbors, ap


def evaluate_embeddings(
    query_emb: Any,
    gallery_emb: Any,
    query_labels: Any,
    gallery_labels: Any,
    *,
    exclude: Any = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    with_map: bool = True,
    chunk_size: int = 2048,
    normalize: bool = False,
) -> RetrievalReport:
    """Inner-product retrieval (cosine when the embeddings are L2-normalised, or with ``normalize=True``).

    Searches k = max(max(ks), max R_i) neighbours (capped by the gallery) so R-precision and MAP@R are exact.
    ``exclude`` (int64 [Q], -1 = none) removes one gallery index per query, e.g. the query itself when query
    and gallery are the same set; it is removed from the neighbours *and* from the relevant counts.
    ``with_map`` adds 'mAP' over the full ranking (exact, same tie rule) at the price of a dense blocked pass
    on CPU; peak extra memory is two ~128 MB score blocks plus O(Q * k). ``chunk_size`` caps rows per block.
    """
    q = prepare_embeddings(query_emb, "query_emb")
    g = prepare_embeddings(gallery_emb, "gallery_emb")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"dimension mismatch: queries d={q.shape[1]}, gallery d={g.shape[1]}")
    if len(as_numpy(query_labels).reshape(-1)) != q.shape[0]:
        raise ValueError("query_labels must have one entry per query embedding")
    if len(as_numpy(gallery_labels).reshape(-1)) != g.shape[0]:
        raise ValueError("gallery_labels must have one entry per gallery embedding")
    if g.shape[0] == 0:
        raise ValueError("gallery is empty")
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    excl = prepare_exclude(exclude, q.shape[0], g.shape[0])
    counts = count_relevant(query_labels, gallery_labels, excl)
    n_avail = g.shape[0] - (1 if excl is not None else 0)
    k = max(1, min(max(max(int(x) for x in ks), int(counts.max(initial=0))), n_avail)) if n_avail else 0

    if with_map and k > 0:
        qc, gc = label_codes(query_labels, gallery_labels)
        scores, neighbors, ap = _fused_scan(q, g, excl, k, qc, gc, counts, chunk_size)
    else:
        scores, neighbors = knn_search(q, g, max(k, 1), exclude=excl, chunk_size=chunk_size)
        ap = None
    metrics = retrieval_metrics(neighbors, query_labels, gallery_labels, relevant_counts=counts, ks=ks)
    if ap is not None:
        valid = counts > 0
        metrics["mAP"] = float(np.mean(ap[valid])) if valid.any() else float("nan")
    curve = pr_curve_from_neighbors(neighbors, query_labels, gallery_labels, relevant_counts=counts)
    return RetrievalReport(metrics=metrics, neighbors=neighbors, scores=scores, pr_curve=curve)


def _sanitize_rankings(
    neighbors: np.ndarray, scores: np.ndarray, excl: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop the excluded index and repeated indices (keeping the first), shift left, pad with -1 / NaN."""
    drop = neighbors < 0
    if excl is not None:
        drop |= neighbors == excl[:, None]
    # A repeat is an index equal to an earlier one in the same row (decoders can emit one id twice).
    key = np.where(drop, np.iinfo(np.int64).max, neighbors)
    order = np.argsort(key, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(key, order, axis=1)
    repeat_sorted = np.zeros_like(drop)
    repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    repeat = np.zeros_like(drop)
    np.put_along_axis(repeat, order, repeat_sorted, axis=1)
    n_repeats = int((repeat & ~drop).sum())
    drop |= repeat
    shift = np.argsort(drop, axis=1, kind="stable")  # kept entries first, original order preserved
    kept = np.take_along_axis(~drop, shift, axis=1)
    nb = np.where(kept, np.take_along_axis(neighbors, shift, axis=1), -1)
    sc = np.where(kept, np.take_along_axis(scores, shift, axis=1), np.nan).astype(np.float32)
    return nb, sc, n_repeats


def evaluate_rankings(
    neighbors: Any,
    scores: Any,
    query_labels: Any,
    gallery_labels: Any,
    *,
    exclude: Any = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    depth: int | None = None,
) -> RetrievalReport:
    """Metrics for methods that produce their own ranked lists (IRGen beam search, re-rankers).

    ``neighbors`` int64 [Q, k] (-1 = padding), ``scores`` [Q, k] or None. The excluded index (if the method
    returned it) and repeated indices are removed and the row is shifted left, so they neither count as hits
    nor occupy a rank; the number of repeats removed is reported as ``'repeated_neighbors_removed'``. ``depth``
    then cuts every list to that many entries (a method that returns a fixed-length list: pass a few extra
    candidates so that removing the query itself does not shorten it).
    'mAP' is reported only when every query's ranking contains all of its relevant items (then AP is exact;
    for a truncated ranking it would silently be a lower bound). Relevant counts come from the labels.
    """
    nb = as_numpy(neighbors).astype(np.int64)
    if nb.ndim != 2:
        raise ValueError(f"neighbors must be 2-D [Q, k], got shape {nb.shape}")
    n_gallery = len(as_numpy(gallery_labels).reshape(-1))
    sc = np.full(nb.shape, np.nan, dtype=np.float32) if scores is None else as_numpy(scores, np.float32)
    if sc.shape != nb.shape:
        raise ValueError(f"scores shape {sc.shape} != neighbors shape {nb.shape}")
    if nb.size and (nb.max() >= n_gallery or nb.min() < -1):
        raise ValueError(f"neighbour indices must be -1 or in [0, {n_gallery})")
    excl = prepare_exclude(exclude, nb.shape[0], n_gallery)
    nb, sc, n_repeats = _sanitize_rankings(nb, sc, excl)
    if depth is not None:
        nb, sc = nb[:, :depth], sc[:, :depth]
    counts = count_relevant(query_labels, gallery_labels, excl)
    metrics = retrieval_metrics(nb, query_labels, gallery_labels, relevant_counts=counts, ks=ks)
    metrics["repeated_neighbors_removed"] = float(n_repeats)

    valid = counts > 0
    if np.all(relevance_matrix(nb, query_labels, gallery_labels).sum(axis=1)[valid] == counts[valid]):
        ap = average_precision_full(nb, query_labels, gallery_labels, relevant_counts=counts)
        metrics["mAP"] = float(np.mean(ap[valid])) if valid.any() else float("nan")
    curve = pr_curve_from_neighbors(nb, query_labels, gallery_labels, relevant_counts=counts)
    return RetrievalReport(metrics=metrics, neighbors=nb, scores=sc, pr_curve=curve)
