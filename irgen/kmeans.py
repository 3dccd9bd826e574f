"""k-means helpers for the residual quantizer: faiss clustering, the tiny-data guard and dead-code re-seeding.

Kept apart from the quantizer module so that the numerical policy (how many points a code needs, which points
replace a dead code) is testable on plain arrays, without any model.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from datamodules.errors import UserInputError

log = logging.getLogger(__name__)


class TooFewPointsError(UserInputError, ValueError):
    """k-means was asked for more codes than the data can support."""


def effective_num_codes(requested: int, n_points: int, min_points_per_code: int = 4) -> int:
    """The codebook size actually used for `n_points` training features: `requested`, or fewer on tiny data.

    Every code needs at least `min_points_per_code` points to be estimated at all, so K is reduced to
    ``n_points // min_points_per_code`` (at least 2) with a warning. A dataset too small even for 2 codes is
    an error: residual quantization of a handful of images cannot produce meaningful identifiers.
    """
    if requested < 2:
        raise ValueError(f"num_codes must be >= 2, got {requested}")
    supported = n_points // max(1, min_points_per_code)
    if supported < 2:
        raise TooFewPointsError(
            f"only {n_points} training images: residual quantization needs at least {2 * min_points_per_code} "
            f"(2 codes x min_points_per_code={min_points_per_code}). Use more data or lower "
            f"irgen.tokenizer.min_points_per_code."
        )
    if supported < requested:
        log.warning(f"only {n_points} training images for {requested} codes per level: reducing num_codes to "
                    f"{supported} (min_points_per_code={min_points_per_code})")
        return supported
    return requested


def check_enough_points(n_points: int, num_codes: int, min_points_per_code: int) -> None:
    """Raise a clear error instead of faiss's assertion when K cannot be fitted on `n_points`."""
    if n_points < num_codes * min_points_per_code:
        raise TooFewPointsError(
            f"k-means of {num_codes} codes needs >= {num_codes * min_points_per_code} points "
            f"(min_points_per_code={min_points_per_code}), got {n_points}. Lower irgen.tokenizer.num_codes to "
            f"<= {max(2, n_points // max(1, min_points_per_code))} (the IRGen pipeline does this automatically)."
        )


def kmeans(points: np.ndarray, k: int, *, niter: int = 20, seed: int = 0,
           init: np.ndarray | None = None, max_points_per_code: int = 256) -> np.ndarray:
    """Centroids [k, d] of float32 `points` [n, d] by faiss (Lloyd, empty clusters split by faiss).

    `init` warm-starts from the previous codebook so that a re-fit keeps code ids stable where possible.
    """
    points = np.ascontiguousarray(points, dtype=np.float32)
    if len(points) < k:
        raise TooFewPointsError(f"k-means: {len(points)} points for {k} centroids; lower irgen.tokenizer.num_codes")
    km = faiss.Kmeans(points.shape[1], k, niter=niter, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max_points_per_code)
    init = None if init is None else np.ascontiguousarray(init, dtype=np.float32)
    km.train(points, init_centroids=init)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, -1)


def assign(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid [n], squared distance to it [n]) by brute force (exact, deterministic)."""
    d2 = (points**2).sum(1, keepdims=True) - 2.0 * points @ centroids.T + (centroids**2).sum(1)[None]
    idx = d2.argmin(1)
    return idx.astype(np.int64), np.maximum(d2[np.arange(len(points)), idx], 0.0)


def reseed_dead_codes(centroids: np.ndarray, points: np.ndarray, counts: np.ndarray, errors: np.ndarray,
                      min_count: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Move codes used by fewer than `min_count` points onto the points that are currently worst reconstructed.

    A dead code wastes one identifier value at that level; placing it exactly on a high-error residual makes it
    win at least that point at the next assignment. Returns (new centroids, ids of the re-seeded codes).
    """
    dead = np.flatnonzero(counts < min_count)
    if len(dead) == 0 or len(points) == 0:
        return centroids, dead[:0]
    worst = np.argsort(-errors, kind="stable")[: len(dead)]
    dead = dead[: len(worst)]
    centroids = centroids.copy()
    centroids[dead] = points[worst]
    return centroids, dead
