"""Approximate-search rows: the evaluated embeddings searched again with faiss ANN indexes, the way a deployed
system would search them, beside the exact row (``evaluation.indexes=[ivfpq,hnsw]``; conf/evaluation/).

Each index gives its own row of the usual metrics (``test/<index>/R@1``, MAP@R, ...), its recall against exact
search (``recall@K_vs_exact``: the share of each query's exact top-K that the index returns in its top-K,
K = the largest of ``eval_ks``), its build time and its query time per query. This is the IRGen paper's table
shape: generative retrieval, linear scan and Faiss IVF-PQ over the same features.

Indexes and their parameters (every one can be set under ``evaluation.<index>``):

* ``ivfflat`` -- inverted lists over ``nlist`` k-means cells, exact inner products inside the ``nprobe`` cells
  searched (``nprobe = nlist`` is exact search);
* ``ivfpq``   -- the same cells, vectors compressed by product quantization into ``m`` sub-vectors of ``nbits``
  bits each (inner products approximated);
* ``hnsw``    -- a graph of ``m`` neighbours per node, built with ``ef_construction`` and searched with
  ``ef_search`` candidates (raised to the number of neighbours asked for).

``auto``: ``nlist = min(4 sqrt(N), N / 39)`` (faiss's rule of thumb and its 39-points-per-cell minimum for
k-means), ``m`` = the largest divisor of the dimension that is at most d/4 (>= 4-dimensional sub-vectors),
``nbits = min(8, log2(N / 39))`` (PQ codebooks need >= 39 points per code as well).

Cost at full size (rank 0, after the exact search; SOP test: 60,502 vectors): IVF training is k-means on the
gallery (seconds), HNSW construction ~N log N graph insertions (tens of seconds for 512-d on a few cores); the
other ranks wait for the metrics as they do for the exact row. Memory: one index beside the embeddings
(IVF-Flat and HNSW: a copy of the gallery; IVF-PQ: m x nbits/8 bytes per vector).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import faiss
import numpy as np

from datamodules.errors import UserInputError
from irlab.retrieval.evaluate import evaluate_rankings
from irlab.retrieval.knn import knn_search, prepare_embeddings, prepare_exclude
from irlab.retrieval.metrics import count_relevant

log = logging.getLogger(__name__)
INDEXES = ("ivfflat", "ivfpq", "hnsw")
# how the rows are labelled next to IRGen's (beside a kNN row: the same features, searched approximately)
ROW_LABELS = {"ivfflat": "kNN, Faiss IVF-Flat", "ivfpq": "kNN, Faiss IVF-PQ", "hnsw": "kNN, Faiss HNSW"}
AUTO = "auto"
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per k-means centroid


def auto_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


def auto_subquantizers(d: int) -> int:
    return max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)


def auto_nbits(n: int) -> int:
    return int(min(8, max(1, math.floor(math.log2(max(2, n / MIN_POINTS_PER_CENTROID))))))


def _setting(settings: Mapping, key: str, auto: int) -> int:
    value = settings.get(key, AUTO)
    return auto if value == AUTO else int(value)


def build_index(name: str, settings: Mapping, gallery: np.ndarray, train_points: int | None = None,
                seed: int = 0) -> tuple[faiss.Index, dict[str, int]]:
    """The trained, filled index `name` over the gallery rows, and the parameters it was built with. IVF indexes
    train on at most `train_points` rows (a seeded sample; all rows when None)."""
    n, d = gallery.shape
    if name == "hnsw":
        m = _setting(settings, "m", 32)
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = _setting(settings, "ef_construction", 40)
        index.add(gallery)
        return index, {"m": m, "ef_construction": index.hnsw.efConstruction,
                       "ef_search": _setting(settings, "ef_search", 64)}
    if name not in ("ivfflat", "ivfpq"):
        raise UserInputError(f"evaluation.indexes: unknown index {name!r}; choose from {INDEXES}")
    nlist = min(_setting(settings, "nlist", auto_nlist(n)), n)
    quantizer = faiss.IndexFlatIP(d)
    used = {"nlist": nlist, "nprobe": min(_setting(settings, "nprobe", 8), nlist)}
    if name == "ivfflat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        m, nbits = _setting(settings, "m", auto_subquantizers(d)), _setting(settings, "nbits", auto_nbits(n))
        if d % m:
            raise UserInputError(f"evaluation.ivfpq.m={m} must divide the embedding dimension {d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        used.update(m=m, nbits=nbits)
    sample = gallery
    if train_points is not None and n > train_points:
        sample = gallery[np.sort(np.random.default_rng(seed).choice(n, train_points, replace=False))]
    index.train(sample)
    index.add(gallery)
    index.nprobe = used["nprobe"]
    return index, used


def approximate_rows(indexes: Mapping[str, Mapping], queries, gallery, query_labels, gallery_labels, *,
                     exclude=None, ks: Sequence[int] = (1, 2, 4, 8),
                     exact_neighbors: np.ndarray | None = None) -> dict[str, float]:
    """``{"<index>/<metric>": value}`` for every index of `indexes` (name -> settings).

    ``exact_neighbors`` (the exact search's ranking, [Q, >= K], excluded item already removed) saves one exact
    search for the recall column; without it the exact top-K is searched here."""
    q, g = prepare_embeddings(queries, "queries"), prepare_embeddings(gallery, "gallery")
    excl = prepare_exclude(exclude, len(q), len(g))
    counts = count_relevant(query_labels, gallery_labels, excl)
    available = len(g) - (1 if excl is not None else 0)
    depth = max(1, min(max(max(ks), int(counts.max(initial=0))), available))
    top = min(max(ks), available)
    if exact_neighbors is None:
        _, exact_neighbors = knn_search(q, g, top, exclude=excl)
    exact_top = exact_neighbors[:, :top]
    rows: dict[str, float] = {}
    for name, settings in indexes.items():
        start = time.perf_counter()
        index, used = build_index(name, settings or {}, g)
        built = time.perf_counter() - start
        if name == "hnsw":
            index.hnsw.efSearch = max(used["ef_search"], depth + 1)
        start = time.perf_counter()
        scores, neighbors = index.search(q, min(depth + (excl is not None), len(g)))
        searched = time.perf_counter() - start
        report = evaluate_rankings(neighbors, np.where(neighbors >= 0, scores, np.nan), query_labels,
                                   gallery_labels, exclude=excl, ks=ks, depth=depth)
        # the share of each query's exact top-K the index returned in its top-K (no repeats in either list)
        found = report.neighbors[:, :top]
        returned = ((found[:, :, None] == exact_top[:, None, :]) & (exact_top[:, None, :] >= 0)).any(axis=1)
        recall = np.mean(returned.sum(axis=1) / np.maximum(1, (exact_top >= 0).sum(axis=1)))
        metrics = {k: v for k, v in report.metrics.items() if k != "repeated_neighbors_removed"}
        metrics.update({f"recall@{top}_vs_exact": float(recall), "build_seconds": built,
                        "query_ms": 1000 * searched / max(1, len(q))})
        log.info(f"{name}: {', '.join(f'{k}={v}' for k, v in used.items())} over {len(g)} gallery vectors")
        rows.update({f"{name}/{k}": float(v) for k, v in metrics.items()})
    return rows
