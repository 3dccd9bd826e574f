"""Exact inner-product k-nearest-neighbour search with a deterministic tie rule.

Tie rule (shared with the mAP computation in ``evaluate.py``): gallery items are ranked by descending score
and items with *bitwise equal* float32 scores are ordered by ascending gallery index -- the order a stable
sort of ``-scores`` gives. Without a fixed rule, metrics on data with duplicate images or quantized/binary
embeddings would change with the BLAS build or the chunk size, and neighbours and mAP could disagree.

faiss does the heavy lifting (``IndexFlatIP``; a GPU index when faiss was built with GPUs; on a GPU machine whose
faiss has no GPU support, `torch_index.TorchFlatIP` on the GPU instead), but its selection
among equal scores is arbitrary, so results are re-sorted by (score desc, index asc) and every row whose k-th
and (k+1)-th candidates tie is recomputed exactly with numpy (rare for real-valued embeddings).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from irlab.retrieval.metrics import as_numpy

# faiss logs at INFO which optimised builds it could not load (avx512_spr, ...) before the one it uses
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

log = logging.getLogger(__name__)

__all__ = ["knn_search", "topk_exact", "kth_lower_bound", "prepare_embeddings", "prepare_exclude"]

#: faiss' GPU brute-force k-selection is limited to this k (GPU_MAX_SELECTION_K); larger k falls back to CPU.
_GPU_MAX_K = 2048
#: rows per block in topk_exact: bounds its temporaries to a few block-sized arrays.
_TOPK_BLOCK_ROWS = 256


def prepare_embeddings(x: Any, name: str) -> np.ndarray:
    """C-contiguous float32 [N, d] (searching in fp16 would create spurious ties); rejects NaN/inf."""
    arr = as_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, d], got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def prepare_exclude(exclude: Any, n_queries: int, n_gallery: int) -> np.ndarray | None:
    """int64 [Q] of gallery indices to drop (-1 = none), or None when nothing is excluded."""
    if exclude is None:
        return None
    ex = as_numpy(exclude).reshape(-1)
    if ex.shape[0] != n_queries:
        raise ValueError(f"exclude has {ex.shape[0]} entries for {n_queries} queries")
    if ex.size and not np.issubdtype(ex.dtype, np.integer):
        raise TypeError(f"exclude must hold integer gallery indices, got dtype {ex.dtype}")
    ex = ex.astype(np.int64)
    if np.any((ex < -1) | (ex >= n_gallery)):
        raise ValueError(f"exclude values must be -1 or in [0, {n_gallery})")
    return ex if np.any(ex >= 0) else None


def kth_lower_bound(block: np.ndarray, k: int) -> np.ndarray:
    """Per row, a value <= the row's k-th largest entry, usually close to it (float32 [B]).

    The k-th largest of the maxima of 64-column groups: those k maxima are k distinct entries, so the k-th
    largest entry is at least as large. One max-reduction plus a selection over G/64 values is ~3x cheaper
    than ``np.partition`` over G, which is used (exact) where the row is too short for groups.
    """
    n_cols = block.shape[1]
    group = 64
    if n_cols >= 4 * group and n_cols // group >= k:
        maxima = np.maximum.reduceat(block, np.arange(0, n_cols, group), axis=1)
        return np.partition(maxima, maxima.shape[1] - k, axis=1)[:, maxima.shape[1] - k]
    return np.partition(block, n_cols - k, axis=1)[:, n_cols - k]


def _candidates(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of entries >= a per-row lower bound of the k-th largest value (so >= k per row).

    With heavy ties the bound (``kth_lower_bound``) can admit too many entries; then the exact k-th value is
    used instead (entries >= it: k plus the ties at position k).
    """
    n_rows, n_cols = block.shape
    mask = block >= kth_lower_bound(block, k)[:, None]
    if np.count_nonzero(mask) <= n_rows * (16 * k + 256):
        return np.nonzero(mask)
    kth = np.partition(block, n_cols - k, axis=1)[:, n_cols - k]
    return np.nonzero(block >= kth[:, None])


def topk_exact(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a dense score block with the tie rule above. Returns (values, indices) [B, k].

    Entries set to -inf (excluded items) sort last; ``k`` must not exceed the number of finite entries per row
    if excluded items must not appear. With torch available, ``torch.topk`` (multi-threaded, ~4x faster than the
    numpy selection here) proposes k + 1 candidates per row, which are ordered by the tie rule; rows whose k-th
    and (k+1)-th candidates tie are redone exactly with numpy, as for faiss' candidates.
    """
    n_rows, n_cols = scores.shape
    k = min(int(k), n_cols)
    if k == 0:
        return np.empty((n_rows, 0), dtype=scores.dtype), np.empty((n_rows, 0), dtype=np.int64)
    try:
        import torch
    except ImportError:  # metrics stay usable without torch
        return _topk_numpy(scores, k)
    if k == n_cols:
        return _topk_numpy(scores, k)
    values, ids = torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k + 1, dim=1)
    vals, idx, redo = _resolve_candidates(values.numpy(), ids.numpy(), None, k, exhaustive=False)
    vals = vals.astype(scores.dtype, copy=False)
    if len(redo):
        vals[redo], idx[redo] = _topk_numpy(scores[redo], k)
    return vals, idx


def _topk_numpy(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`topk_exact` in numpy alone, on row blocks so temporaries stay ~``_TOPK_BLOCK_ROWS`` rows."""
    n_rows, n_cols = scores.shape
    vals = np.empty((n_rows, k), dtype=scores.dtype)
    idx = np.empty((n_rows, k), dtype=np.int64)
    for lo in range(0, n_rows, _TOPK_BLOCK_ROWS):
        block = scores[lo : lo + _TOPK_BLOCK_ROWS]
        b = block.shape[0]
        if k == n_cols:
            order = np.argsort(-block, axis=1, kind="stable")
            idx[lo : lo + b] = order
            vals[lo : lo + b] = np.take_along_axis(block, order, axis=1)
            continue
        rows, cols = _candidates(block, k)  # >= k per row, a superset of the answer
        v = block[rows, cols]
        order = np.lexsort((cols, -v, rows))  # row, then score desc, then index asc
        rows, cols, v = rows[order], cols[order], v[order]
        starts = np.searchsorted(rows, np.arange(b))
        keep = np.arange(len(rows)) - starts[rows] < k
        idx[lo : lo + b] = cols[keep].reshape(b, k)
        vals[lo : lo + b] = v[keep].reshape(b, k)
    return vals, idx


def _faiss_index(gallery: np.ndarray, use_gpu: bool | None, k: int) -> Any:
    import faiss  # local import: metrics/plots stay usable where faiss is missing

    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    device = _torch_gpu() if n_gpus == 0 and use_gpu is not False else None
    if device is not None:  # faiss-cpu on a GPU machine: brute force in torch on the GPU
        from irlab.retrieval.torch_index import TorchFlatIP

        return TorchFlatIP(gallery, device)
    if use_gpu and n_gpus == 0:
        raise RuntimeError("use_gpu=True but neither this faiss build nor torch sees a GPU")
    cpu_index = faiss.IndexFlatIP(gallery.shape[1])
    if use_gpu is not False and n_gpus > 0:
        if k <= _GPU_MAX_K:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, 0, cpu_index)
            index.add(gallery)
            index._irlab_resources = res  # keep the resources alive as long as the index
            return index
        log.warning("knn_search: k=%d exceeds the faiss GPU limit %d, searching on CPU", k, _GPU_MAX_K)
    cpu_index.add(gallery)
    return cpu_index


def _torch_gpu() -> Any:
    """This process's CUDA device when torch sees one, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _resolve_candidates(
    dist: np.ndarray, ids: np.ndarray, excl: np.ndarray | None, k: int, exhaustive: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order faiss candidates by the tie rule; return (scores, indices, rows needing an exact redo)."""
    invalid = ids < 0
    if excl is not None:
        invalid |= ids == excl[:, None]
    key_score = np.where(invalid, np.inf, -dist.astype(np.float32))
    key_id = np.where(invalid, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_id, key_score), axis=1)  # per row: score desc, id asc, invalid last
    ids = np.take_along_axis(ids, order, axis=1)
    dist = np.take_along_axis(dist, order, axis=1)
    n_valid = (~invalid).sum(axis=1)
    redo = n_valid < k  # cannot happen with a flat index, but never trust it silently
    if not exhaustive and dist.shape[1] > k:
        # The (k+1)-th candidate ties with the k-th: which tied items faiss kept is arbitrary.
        redo |= (n_valid > k) & (dist[:, k - 1] == dist[:, k])
    return dist[:, :k].astype(np.float32), ids[:, :k].astype(np.int64), np.flatnonzero(redo)


def knn_search(
    queries: Any,
    gallery: Any,
    k: int,
    *,
    exclude: Any = None,
    chunk_size: int = 2048,
    use_gpu: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of each query row against the gallery rows.

    Queries are searched ``chunk_size`` rows at a time, so memory is O(chunk_size * k) on top of the index
    (faiss itself works in bounded blocks); no Q x G matrix is ever built. ``exclude`` (int64 [Q], -1 = none)
    drops one gallery index per query -- self-exclusion *by index*, never by assuming the query is its own
    first neighbour (a duplicate image may tie with it or even come first).

    Returns (scores float32 [Q, k'], indices int64 [Q, k']) with k' = min(k, G - (1 if any exclusion else 0)),
    rows sorted by descending score, ties broken by lower gallery index (see module docstring). Inputs may be
    numpy arrays or torch tensors, fp16/fp32; the search runs in float32. ``use_gpu``: None = GPU if faiss has
    one, True = require it, False = CPU.
    """
    q = prepare_embeddings(queries, "queries")
    g = prepare_embeddings(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"dimension mismatch: queries d={q.shape[1]}, gallery d={g.shape[1]}")
    if g.shape[0] == 0:
        raise ValueError("gallery is empty")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    excl = prepare_exclude(exclude, q.shape[0], g.shape[0])
    n_gallery = g.shape[0]
    k_out = min(int(k), n_gallery - (1 if excl is not None else 0))
    scores = np.empty((q.shape[0], k_out), dtype=np.float32)
    indices = np.empty((q.shape[0], k_out), dtype=np.int64)
    if k_out == 0 or q.shape[0] == 0:
        return scores, indices

    # One spare candidate for the excluded item, one to detect a tie straddling position k.
    k_faiss = min(n_gallery, k_out + (1 if excl is not None else 0) + 1)
    index = _faiss_index(g, use_gpu, k_faiss)
    chunk_size = max(1, int(chunk_size))
    redo_rows: list[np.ndarray] = []
    for lo in range(0, q.shape[0], chunk_size):
        hi = min(lo + chunk_size, q.shape[0])
        dist, ids = index.search(q[lo:hi], k_faiss)
        ex = excl[lo:hi] if excl is not None else None
        s, i, redo = _resolve_candidates(dist, ids, ex, k_out, exhaustive=k_faiss == n_gallery)
        scores[lo:hi], indices[lo:hi] = s, i
        redo_rows.append(redo + lo)
    redo = np.concatenate(redo_rows)
    if len(redo):
        log.debug("knn_search: exact recomputation for %d rows with ties at position k", len(redo))
        # Rows per block such that the dense [rows, G] float32 block stays around 64 MB.
        step = max(1, min(chunk_size, (64 << 20) // (4 * n_gallery)))
        for lo in range(0, len(redo), step):
            rows = redo[lo : lo + step]
            block = q[rows] @ g.T
            if excl is not None:
                has = np.flatnonzero(excl[rows] >= 0)
                block[has, excl[rows][has]] = -np.inf
            scores[rows], indices[rows] = topk_exact(block, k_out)
    return scores, indices
