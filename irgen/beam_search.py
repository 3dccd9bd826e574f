"""Batched beam search over identifiers, constrained by the database trie: only valid identifiers come out.

All queries are decoded together, one level per step (D steps, no per-query Python loop). At each step the
allowed codes of every live beam come from one trie gather (`IdentifierTrie.transitions`); disallowed codes get
log-probability -inf. Beam scores are summed log-probabilities of the model (log-softmax over the level's K
codes, *not* renormalised over the allowed ones), so they equal teacher-forced scores (`sequence_log_probs`).

When fewer than B valid continuations exist (tiny database, a prefix with few children), the surplus beams have
score -inf; they are marked dead (node -1) and come out as leaf -1 / score -inf, which ranking drops. A dead beam
can never be revived: its children are all -1.

``use_cache=False`` re-decodes the whole prefix every step (the baseline of `bench/beam_search_scaling.py`);
both modes return the same beams.
"""

from __future__ import annotations

import torch

from irgen.decoder import IdentifierDecoder, KVCache
from irgen.trie import IdentifierTrie


@torch.no_grad()
def beam_search(
    decoder: IdentifierDecoder,
    memory: torch.Tensor,
    trie: IdentifierTrie,
    beam_size: int,
    *,
    use_cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``beam_size`` identifiers of each query: (leaf ids [Q, B] (-1 = none), scores [Q, B] (-inf = none)).

    ``memory``: encoder tokens ``[Q, S, memory_dim]``. Leaves index ``trie.leaf_codes``; rows are sorted by score.
    Ties between equal scores are broken by `torch.topk` (implementation order), as in any beam search.
    """
    cfg = decoder.cfg
    if trie.depth != cfg.depth_levels or trie.codebook_size != cfg.codebook_size:
        raise ValueError(f"trie is {trie.depth}x{trie.codebook_size} but the decoder predicts "
                         f"{cfg.depth_levels}x{cfg.codebook_size} identifiers")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    q, k, device = memory.shape[0], cfg.codebook_size, memory.device
    mem_kv = decoder.memory_kv(memory)
    cache = KVCache() if use_cache else None
    nodes = torch.zeros(q, 1, dtype=torch.long, device=device)  # trie node of each beam (root)
    scores = torch.zeros(q, 1, device=device)
    prefix = torch.full((q, 1, 1), cfg.start_token, dtype=torch.long, device=device)  # input tokens so far
    step_input = prefix
    for level in range(cfg.depth_levels):
        logits = decoder(step_input, mem_kv, cache) if use_cache else decoder(prefix, mem_kv)
        logp = logits[:, :, -1].float().log_softmax(-1)  # [Q, G, K]
        children = trie.transitions(level, nodes)  # [Q, G, K]
        cand = torch.where(children >= 0, scores.unsqueeze(-1) + logp, torch.full_like(logp, -torch.inf))
        g = cand.shape[1]
        width = min(beam_size, g * k)
        scores, flat = cand.view(q, g * k).topk(width, dim=1)  # sorted, descending
        nodes = children.view(q, g * k).gather(1, flat)
        nodes = torch.where(torch.isfinite(scores), nodes, torch.full_like(nodes, -1))
        if level + 1 == cfg.depth_levels:
            break
        parent, code = flat // k, flat % k
        new_tok = decoder.code_token(level, code).unsqueeze(-1)  # [Q, width, 1]
        rows = (torch.arange(q, device=device).unsqueeze(1) * g + parent).reshape(-1)
        if use_cache:
            cache.reorder(rows)
            step_input = new_tok
        else:
            prefix = torch.cat([prefix.reshape(q * g, -1)[rows].view(q, width, -1), new_tok], dim=-1)
    if nodes.shape[1] < beam_size:  # fewer candidates than beams in the whole trie level: pad
        pad = beam_size - nodes.shape[1]
        nodes = torch.cat([nodes, torch.full((q, pad), -1, dtype=torch.long, device=device)], dim=1)
        scores = torch.cat([scores, torch.full((q, pad), -torch.inf, device=device)], dim=1)
    return nodes, scores
