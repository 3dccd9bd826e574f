"""How good are the identifiers? Codebook usage, collisions, and retrieval with the quantized features.

Two failure modes make IRGen's generator hopeless whatever its quality: identifiers shared by images of
different classes (a collision can never be resolved by decoding), and quantized features that lost the
class structure of the raw ones. Both are measured here, on every record and on the evaluation split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from irlab.code_usage import codes_perplexity
from irlab.retrieval import evaluate_embeddings, evaluate_rankings


def identifier_stats(codes: np.ndarray, labels: np.ndarray, num_codes: int) -> dict[str, float]:
    """Usage/perplexity per level, prefix class purity, distinct identifiers, images per identifier,
    cross-class collision rate."""
    codes, labels = np.asarray(codes), np.asarray(labels)
    stats: dict[str, float] = {"images": float(len(codes)), "levels": float(codes.shape[1]),
                               "codes_per_level": float(num_codes)}
    for d in range(codes.shape[1]):
        stats[f"usage_l{d}"] = float(len(np.unique(codes[:, d])) / num_codes)
        stats[f"perplexity_l{d}"] = codes_perplexity(codes[:, d], num_codes)
        stats[f"prefix_purity_l{d}"] = prefix_purity(codes[:, : d + 1], labels)
    ids, inverse, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    stats["distinct_identifiers"] = float(len(ids))
    stats["images_per_identifier_max"] = float(sizes.max(initial=0))
    stats["images_per_identifier_mean"] = float(sizes.mean()) if len(sizes) else 0.0
    # An image collides when its identifier is also carried by an image of another class.
    pairs = np.unique(np.stack([inverse, labels]), axis=1)
    classes_per_id = np.bincount(pairs[0], minlength=len(ids))
    stats["collision_rate"] = float((classes_per_id[inverse] > 1).mean()) if len(codes) else 0.0
    return stats


def prefix_rankings(q_codes: np.ndarray, g_codes: np.ndarray, q_recon: np.ndarray, g_recon: np.ndarray, k: int,
                    exclude: np.ndarray | None = None, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Rank the gallery by shared identifier-prefix length, ties broken by reconstruction cosine.

    This is what a perfect generator that emits the query's own identifier would retrieve through the
    prefix trie. score = prefix_length + 0.49 * cosine keeps prefix length the primary key.
    """
    qc, gc = torch.as_tensor(q_codes), torch.as_tensor(g_codes)
    qr = torch.nn.functional.normalize(torch.as_tensor(q_recon, dtype=torch.float32), dim=-1)
    gr = torch.nn.functional.normalize(torch.as_tensor(g_recon, dtype=torch.float32), dim=-1)
    k = min(k, len(gc) - (1 if exclude is not None else 0))
    neighbors, scores = [], []
    for lo in range(0, len(qc), chunk):
        same = (qc[lo : lo + chunk, None, :] == gc[None, :, :]).int().cumprod(dim=-1).sum(-1).float()
        score = same + 0.49 * (qr[lo : lo + chunk] @ gr.T)
        if exclude is not None:
            ex = torch.as_tensor(exclude[lo : lo + chunk])
            rows = torch.nonzero(ex >= 0).flatten()
            score[rows, ex[rows]] = -float("inf")
        s, i = torch.topk(score, k, dim=1)
        neighbors.append(i.numpy())
        scores.append(s.numpy())
    return np.concatenate(neighbors), np.concatenate(scores)


def quantized_retrieval(raw: np.ndarray, recon: np.ndarray, codes: np.ndarray, eval_set,
                        ks: Sequence[int] = (1, 2, 4, 8)) -> dict[str, float]:
    """R@K of the raw features, of the reconstructions, and of prefix ranking, on `eval_set`'s queries/gallery.

    `raw`, `recon`, `codes` are indexed by ``eval_set.record_ids`` (record ids, or rows of a subset of the records
    given in that numbering).
    """
    ids, labels = eval_set.record_ids, eval_set.labels
    q, g = ids[eval_set.query_mask], ids[eval_set.gallery_mask]
    ql, gl = labels[eval_set.query_mask], labels[eval_set.gallery_mask]
    exclude = eval_set.self_exclusion()
    exclude = exclude if (exclude >= 0).any() else None
    out: dict[str, float] = {}
    for name, feats in (("raw", raw), ("quantized", recon)):
        report = evaluate_embeddings(feats[q], feats[g], ql, gl, exclude=exclude, ks=ks, with_map=False,
                                     normalize=True)
        out.update({f"{name}_{m}": float(v) for m, v in report.metrics.items() if m.startswith("R@")})
    nb, sc = prefix_rankings(codes[q], codes[g], recon[q], recon[g], max(ks), exclude)
    report = evaluate_rankings(nb, sc, ql, gl, exclude=exclude, ks=ks)
    out.update({f"prefix_{m}": float(v) for m, v in report.metrics.items() if m.startswith("R@")})
    return out


def prefix_purity(prefixes: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose prefix (codes of the first levels) is mostly carried by their own class: how
    semantic the codes are. 1.0 when every prefix holds one class; near the largest class share when the codes
    ignore the classes. With fewer codes than classes at level 0 it is bounded by codes/classes there."""
    if len(prefixes) == 0:
        return 0.0
    _, groups = np.unique(prefixes, axis=0, return_inverse=True)
    pairs, counts = np.unique(np.stack([groups.reshape(-1), labels]), axis=1, return_counts=True)
    majority = np.zeros(groups.max() + 1, dtype=np.int64)
    np.maximum.at(majority, pairs[0], counts)
    return float(majority.sum() / len(prefixes))
