"""From identifiers to ranked images: beam expansion, reranking and exhaustive (teacher-forced) scoring.

Two ranking rules, both logged by every IRGen evaluation (`irgen.generator`):

* paper (`expand_identifiers`): identifiers in beam order, the images of one identifier -- which all share
  its score -- in database order. This is what the reference code returns (``IRGen.beam_search``: for each
  beam, every database image with that identifier in index order, the list cut to the beam size).
* rerank (`rerank_by_similarity`): the images of the beams' identifiers reordered by cosine similarity of the
  encoder's global features ("generate, then rerank", as in later generative-retrieval work, e.g. GENIUS).

Beam search only returns B identifiers, so its ranking is truncated; the exhaustive mode scores *every*
identifier of the database by teacher forcing (O(identifiers) decoder passes per query, batched; for PR curves
and exact mAP on small and medium databases) and expands them all.
"""

from __future__ import annotations

import numpy as np
import torch

from irgen.decoder import IdentifierDecoder
from irgen.trie import IdentifierTrie

_FLAT_CHUNK = 1 << 22  # floats per row-wise dot-product chunk (16 MB)


def expand_identifiers(
    leaves: np.ndarray, leaf_scores: np.ndarray, trie: IdentifierTrie, depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ranked database positions ``[Q, depth]`` (-1 padded) and their scores (the identifier's score, NaN pad).

    ``leaves`` int64 ``[Q, L]`` leaf ids in rank order (-1 = no identifier), ``leaf_scores`` ``[Q, L]``. Images
    of one identifier come in database order (the trie keeps them sorted); the list stops after ``depth``
    images. Vectorized over all (query, identifier, image) triples.
    """
    leaves = np.asarray(leaves, dtype=np.int64)
    n_q, n_l = leaves.shape
    item_start, items = trie.item_start.cpu().numpy(), trie.items.cpu().numpy()
    valid = leaves >= 0
    safe = np.where(valid, leaves, 0)
    sizes = np.where(valid, item_start[safe + 1] - item_start[safe], 0)
    before = np.cumsum(sizes, axis=1) - sizes
    sizes = np.where(before < depth, sizes, 0).reshape(-1)  # identifiers that cannot reach the top `depth`
    slot = np.repeat(np.arange(n_q * n_l), sizes)  # slot = query * L + beam rank: sorted, so ranks are kept
    offset_in_slot = np.arange(len(slot)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    image = items[np.repeat(item_start[safe.reshape(-1)], sizes) + offset_in_slot]
    query = slot // n_l
    per_query = np.bincount(query, minlength=n_q)
    rank = np.arange(len(slot)) - np.repeat(np.cumsum(per_query) - per_query, per_query)
    keep = rank < depth
    neighbors = np.full((n_q, depth), -1, dtype=np.int64)
    scores = np.full((n_q, depth), np.nan, dtype=np.float32)
    neighbors[query[keep], rank[keep]] = image[keep]
    scores[query[keep], rank[keep]] = np.asarray(leaf_scores, dtype=np.float32).reshape(-1)[slot[keep]]
    return neighbors, scores


def rerank_by_similarity(
    neighbors: np.ndarray, query_features: np.ndarray, gallery_features: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The same candidates per query (``-1`` = padding, kept last) in descending cosine similarity between
    the query's feature and theirs (ties: the given order); returns (neighbours, similarities, NaN pad).

    Features are L2-normalised ``[Q, d]`` and ``[N, d]``.
    """
    neighbors = np.asarray(neighbors, dtype=np.int64)
    valid = neighbors >= 0
    rows, cols = np.nonzero(valid)
    sim = np.full(neighbors.shape, -np.inf, dtype=np.float32)
    step = max(1, _FLAT_CHUNK // max(1, query_features.shape[1]))
    for lo in range(0, len(rows), step):
        r, c = rows[lo : lo + step], cols[lo : lo + step]
        sim[r, c] = np.einsum("nd,nd->n", query_features[r], gallery_features[neighbors[r, c]])
    order = np.argsort(-sim, axis=1, kind="stable")  # padding (-inf) sorts last
    ranked = np.take_along_axis(neighbors, order, axis=1)
    ranked_sim = np.take_along_axis(sim, order, axis=1)
    return ranked, np.where(ranked >= 0, ranked_sim, np.nan).astype(np.float32)


@torch.no_grad()
def score_all_identifiers(
    decoder: IdentifierDecoder, memory: torch.Tensor, leaf_codes: torch.Tensor, *, budget: int = 1 << 24
) -> torch.Tensor:
    """Teacher-forced log p(identifier | query) for every identifier: ``[Q, M]`` float32.

    The query's memory keys/values are computed once and shared by all candidates (candidates are the G axis of
    the decoder); candidates are processed in chunks so that activations stay below ~``budget`` floats.
    """
    cfg = decoder.cfg
    mem_kv = decoder.memory_kv(memory)
    n_q, m = memory.shape[0], leaf_codes.shape[0]
    per_candidate = n_q * cfg.depth_levels * max(int(cfg.mlp_ratio * cfg.width), cfg.codebook_size)
    chunk = max(1, budget // max(1, per_candidate))
    codes = leaf_codes.to(memory.device)
    out = torch.empty(n_q, m, device=memory.device)
    for lo in range(0, m, chunk):
        block = codes[lo : lo + chunk].unsqueeze(0).expand(n_q, -1, -1)  # a view: no copy per query
        out[:, lo : lo + chunk] = decoder.sequence_log_probs(block, mem_kv)
    return out


def rank_identifiers(leaf_scores: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All leaves of each query by descending score (ties: lower leaf id first): (leaves, scores) ``[Q, M]``."""
    s = leaf_scores.detach().float().cpu().numpy() if isinstance(leaf_scores, torch.Tensor) else leaf_scores
    order = np.argsort(-s, axis=1, kind="stable")
    return order.astype(np.int64), np.take_along_axis(s, order, axis=1)
