"""End-to-end retrieval evaluation: embeddings (or ready-made rankings) in, a ``RetrievalReport`` out.

``evaluate_embeddings`` with ``with_map=True`` makes *one* pass over the query x gallery score matrix, a block
of query rows at a time (a block is ~128 MB of float32, two alive at once, never the full matrix), and from
each block derives

* the top-k neighbours (same tie rule as ``knn_search``), and
* the exact 1-based rank of every relevant gallery item in the *full* ranking, for mAP:
  ``rank(j) = #{g : s_g > s_j} + #{g < j : s_g == s_j} + 1`` (descending score, ties -> lower gallery index).

Both come from the same float32 numbers, so neighbours, MAP@R and mAP can never disagree about an order,
and the matrix product -- the dominant cost on CPU -- is paid once instead of twice (faiss for kNN plus a
second pass for mAP). Without mAP the search goes through ``knn_search`` (faiss, GPU when available).

Usually both come from one sort of a few candidates per row: the gallery items scoring at least as high as
the row's lowest relevant item or a bound on its k-th score, packed into int64 keys that order them by the
tie rule. Blocks where candidates are a large share fall back to comparison passes (and ``topk_exact``),
blocks whose largest class exceeds ``_SORT_THRESHOLD`` to a stable argsort per row. Queries are processed in
order of their number of relevant items so that one large class does not dictate a block's work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from irlab.retrieval.knn import knn_search, kth_lower_bound, prepare_embeddings, prepare_exclude, topk_exact
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
#: rows per rank-counting sub-block, and what extracting and sorting one candidate costs in entries of a
#: comparison pass (~58 ns vs ~0.9 ns measured): candidates are used while cheaper than two passes per
#: relevant item.
_RANK_ROWS = 128
_CANDIDATE_COST = 64
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


def _order_keys(values: np.ndarray) -> np.ndarray:
    """Non-negative int64 keys in [0, 2**32) ordered like the float32 ``values`` (-0.0 equal to 0.0; no NaN):
    the IEEE bits as a signed integer with the magnitude bits of negative numbers flipped, shifted by 2**31."""
    bits = (values.astype(np.float32, copy=False) + np.float32(0)).view(np.int32)  # -0.0 + 0 = +0.0
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64) + (1 << 31)


def _tie_rule_keys(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, col_bits: int) -> np.ndarray:
    """``row | order_key(score) | ~col`` packed in an int64: within a row, a larger key ranks earlier under the
    tie rule (higher score, then lower gallery index), and rows never overlap."""
    col_mask = (1 << col_bits) - 1
    return (rows << (32 + col_bits)) | (_order_keys(values) << col_bits) | (col_mask - cols)


def _ranks_and_topk_by_keys(
    sub: np.ndarray, rel: np.ndarray, thr: np.ndarray, flat: np.ndarray, k: int, col_bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of the relevant items and the top-k, both from the candidates ``flat`` sorted once.

    The candidates (row-major flat indices into ``sub``) are every entry at or above the lower of the lowest
    relevant score and a bound on the k-th largest, so they hold each row's top-k and everything that can
    precede a relevant item. Sorted as ``_tie_rule_keys``, a relevant item's rank is the number of its row's
    keys above its own plus one (the tie rule exactly, no special case), and the top-k are the last k keys of
    its row.
    """
    n_rows, n_cols = sub.shape
    rows = flat // n_cols
    cols = flat - rows * n_cols
    keys = _tie_rule_keys(rows, cols, sub.reshape(-1)[flat], col_bits)
    keys.sort()
    ends = np.searchsorted(flat, np.arange(1, n_rows + 1, dtype=np.int64) * n_cols)  # rows stay in place
    ok = rel >= 0
    row_ids = np.broadcast_to(np.arange(n_rows, dtype=np.int64)[:, None], rel.shape)
    rel_keys = _tie_rule_keys(row_ids, np.where(ok, rel, 0), thr, col_bits)
    ranks = np.where(ok, ends[:, None] - np.searchsorted(keys, rel_keys, side="right") + 1, 0)
    top = keys[ends[:, None] - 1 - np.arange(k)[None, :]]
    neighbors = (1 << col_bits) - 1 - (top & ((1 << col_bits) - 1))
    return ranks, np.take_along_axis(sub, neighbors, axis=1), neighbors


def _ranks_and_topk(block: np.ndarray, rel_idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ranks [B, W], top-k scores [B, k], top-k indices [B, k]) of a score block.

    ``ranks``: the 1-based full-ranking rank of each relevant item (``rel_idx``, -1 = padding -> rank 0).
    Only gallery items scoring at least as high as a row's *lowest* relevant item can precede any of its
    relevant items. When those candidates (with the row's top-k candidates) are few enough that sorting them
    beats scanning the rows once per relevant item -- the usual case for a useful model -- one sort gives the
    ranks and the top-k (``_ranks_and_topk_by_keys``). Otherwise (deep relevant items, heavy ties) the rows
    are scanned with comparison passes, very large classes are sorted row by row, and the top-k comes from
    ``topk_exact``.
    """
    n_rows, width = rel_idx.shape
    if width > _SORT_THRESHOLD:
        return (_ranks_by_sort(block, rel_idx), *topk_exact(block, k))
    col_bits = max(1, (block.shape[1] - 1).bit_length())
    rows_per_sub = min(_RANK_ROWS, 1 << max(0, 31 - col_bits))  # row | score | column fit in 63 bits
    ranks = np.zeros((n_rows, width), dtype=np.int64)
    scores = np.empty((n_rows, k), dtype=block.dtype)
    neighbors = np.empty((n_rows, k), dtype=np.int64)
    for lo in range(0, n_rows, rows_per_sub):
        part = slice(lo, lo + rows_per_sub)
        sub, rel = block[part], rel_idx[part]
        ok = rel >= 0
        thr = np.where(ok, np.take_along_axis(sub, np.where(ok, rel, 0), axis=1), np.inf).astype(sub.dtype)
        # rows without relevant items: threshold inf, candidates for the top-k only
        bound = np.minimum(thr.min(axis=1, initial=np.inf), kth_lower_bound(sub, k))
        mask = sub >= bound[:, None]
        n_candidates = np.count_nonzero(mask)
        if col_bits <= 31 and n_candidates * _CANDIDATE_COST <= max(2 * width, 1) * sub.size:
            ranks[part], scores[part], neighbors[part] = _ranks_and_topk_by_keys(
                sub, rel, thr, np.flatnonzero(mask), k, col_bits
            )
        else:
            ranks[part] = _ranks_by_passes(sub, rel, thr)
            scores[part], neighbors[part] = topk_exact(sub, k)
    return ranks, scores, neighbors


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
    then the top-k and the rank counting (numpy calls that release the GIL) over row slices on the same
    threads, overlapping the next block's product."""
    n_q, n_g = q.shape[0], g.shape[0]
    order, starts, sizes = _relevant_table(qc, gc)
    scores = np.empty((n_q, k), dtype=np.float32)
    neighbors = np.empty((n_q, k), dtype=np.int64)
    ap = np.full(n_q, np.nan)
    rows_per_block = max(1, min(int(chunk_size), _BLOCK_BYTES // (4 * n_g)))
    perm = np.argsort(counts, kind="stable")  # similar R_i share a block -> fewer wasted passes

    def rank_rows(block: np.ndarray, qi: np.ndarray, ex: np.ndarray | None) -> None:
        # Relevant gallery indices of each query: its label's group, minus the excluded index.
        width = int(sizes[qc[qi]].max(initial=0))
        j = np.arange(width)[None, :]
        size = sizes[qc[qi]][:, None]
        rel = np.where(j < size, order[np.minimum(starts[qc[qi]][:, None] + j, max(len(order) - 1, 0))], -1)
        if ex is not None:
            rel = np.where(rel == ex[:, None], -1, rel)
        ranks, scores[qi], neighbors[qi] = _ranks_and_topk(block, rel, k)
        ap[qi] = average_precision_from_ranks(ranks, counts[qi])

    workers = _worker_count()
    pending: list = []
    # Two score buffers used in turn, allocated once: a fresh 128 MB array per block costs ~15% of its product
    # in page faults. Block b's product writes into one while block b-1's ranking still reads the other.
    n_blocks = -(-n_q // rows_per_block)
    buffers = [np.empty((min(rows_per_block, n_q), n_g), dtype=np.float32) for _ in range(min(2, n_blocks))]
    # BLAS at one thread, the product split over the workers instead: OpenBLAS' own threads spin ~0.1 s after
    # every call, taking a core from the rank counting that runs beside the next product.
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=workers) as pool:
        for b, lo in enumerate(range(0, n_q, rows_per_block)):
            qi = perm[lo : lo + rows_per_block]
            step = -(-len(qi) // workers)
            block = buffers[b % len(buffers)][: len(qi)]
            products = [pool.submit(np.matmul, q[qi[a : a + step]], g.T, out=block[a : a + step])
                        for a in range(0, len(qi), step)]
            for job in [*pending, *products]:
                job.result()  # re-raises a worker's error; the block before finishes first
            ex = excl[qi] if excl is not None else None
            if ex is not None:
                has = np.flatnonzero(ex >= 0)
                block[has, ex[has]] = -np.inf  # never counted above a finite score, never returned
            pending = [pool.submit(rank_rows, block[a : a + step], qi[a : a + step],
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
