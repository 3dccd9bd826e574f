"""Constrained beam search: validity, KV cache == re-decoding, rigged logits, exhaustive scores, ranking rule."""

import itertools

import numpy as np
import pytest
import torch

from irgen.beam_search import beam_search
from irgen.decoder import DecoderConfig, IdentifierDecoder, KVCache
from irgen.ranking import expand_identifiers, rank_identifiers, rerank_by_similarity, score_all_identifiers
from irgen.trie import IdentifierTrie


def make_decoder(depth=3, k=6, seed=0, memory_dim=12, scale=1.0) -> IdentifierDecoder:
    torch.manual_seed(seed)
    dec = IdentifierDecoder(DecoderConfig(depth, k, width=32, layers=2, heads=4, memory_dim=memory_dim)).eval()
    with torch.no_grad():  # larger output weights: peaked, clearly non-uniform distributions
        dec.head_weight.mul_(scale)
    return dec


class RiggedDecoder(IdentifierDecoder):
    """Logits fixed by a table: ``table[level, previous code (K = start), code]``; ignores the image."""

    def __init__(self, table: torch.Tensor) -> None:
        depth, _, k = table.shape
        super().__init__(DecoderConfig(depth, k, width=8, layers=1, heads=1, memory_dim=8))
        self.table = table

    def forward(self, tokens, memory_kv, cache: KVCache | None = None):
        q, g, t = tokens.shape
        pos = cache.length if cache is not None else 0
        if cache is not None:  # keep a dummy cache so that `length` and `reorder` behave like the real one
            old = cache.keys[0] if cache.keys else torch.zeros(q * g, 1, 0, 1)
            cache.keys = cache.values = [torch.cat([old, torch.zeros(q * g, 1, t, 1)], dim=2)]
        k = self.cfg.codebook_size
        prev = torch.where(tokens == self.cfg.start_token, torch.full_like(tokens, k), tokens % k)
        level = torch.arange(pos, pos + t).expand_as(prev)
        return self.table[level, prev]


def exact_scores(table: torch.Tensor, identifiers: list[tuple]) -> dict[tuple, float]:
    logp = table.log_softmax(-1)
    k = table.shape[-1]
    return {c: float(sum(logp[d, (c[d - 1] if d else k), c[d]] for d in range(len(c)))) for c in identifiers}


def assert_valid(leaves, scores, trie, valid_codes):
    leaves, scores = leaves.numpy(), scores.numpy()
    live = leaves >= 0
    assert np.all(np.isfinite(scores[live])) and np.all(np.isneginf(scores[~live]))
    found = trie.leaf_codes[torch.from_numpy(leaves[live])].tolist()
    assert set(map(tuple, found)) <= valid_codes
    for row, s in zip(leaves, scores, strict=True):  # each identifier at most once per query, sorted scores
        assert len(set(row[row >= 0].tolist())) == int((row >= 0).sum())
        assert np.all(np.diff(s[np.isfinite(s)]) <= 1e-6)


@pytest.mark.parametrize(
    "n_ids,beam,dense",
    [(40, 5, True), (40, 5, False), (4, 10, True), (3, 50, False), (200, 16, True)],
)
def test_beam_search_only_emits_valid_identifiers(n_ids, beam, dense):
    depth, k = 3, 6
    rng = np.random.default_rng(n_ids)
    codes = rng.integers(0, k, (n_ids, depth))
    codes = np.concatenate([codes, codes[: n_ids // 2 + 1]])  # duplicate identifiers in the database
    trie = IdentifierTrie.build(codes, k, dense_max_entries=1 << 20 if dense else 0)
    valid = set(map(tuple, codes.tolist()))
    dec = make_decoder(depth, k, scale=30.0)
    memory = torch.randn(7, 5, 12)
    leaves, scores = beam_search(dec, memory, trie, beam)
    assert leaves.shape == scores.shape == (7, beam)
    assert_valid(leaves, scores, trie, valid)
    if beam >= len(valid):  # every identifier comes out exactly once, the rest is padding
        assert ((leaves >= 0).sum(1) == len(valid)).all()


def test_rigged_logits_that_prefer_invalid_codes_still_give_valid_identifiers():
    """Fewer valid continuations than beams at every level, and the model's favourite codes are all invalid."""
    depth, k = 3, 5
    table = torch.zeros(depth, k + 1, k)
    table[:, :, 4] = 50.0  # code 4 is never in the database
    codes = np.array([[0, 1, 2], [0, 1, 3], [2, 2, 2]])
    trie = IdentifierTrie.build(codes, k)
    leaves, scores = beam_search(RiggedDecoder(table), torch.zeros(2, 1, 8), trie, beam_size=8)
    assert_valid(leaves, scores, trie, set(map(tuple, codes.tolist())))
    assert ((leaves >= 0).sum(1) == 3).all()


def test_rigged_logits_return_the_known_best_sequences_in_order():
    depth, k = 3, 4
    gen = torch.Generator().manual_seed(0)
    # level-only logits (same for every prefix), all identifiers valid: beam search is exact for any beam size
    level_logits = torch.randn(depth, 1, k, generator=gen).expand(depth, k + 1, k).contiguous()
    everything = list(itertools.product(range(k), repeat=depth))
    trie = IdentifierTrie.build(np.array(everything), k)
    truth = exact_scores(level_logits, everything)
    best = sorted(truth, key=truth.get, reverse=True)[:5]
    leaves, scores = beam_search(RiggedDecoder(level_logits), torch.zeros(1, 1, 8), trie, beam_size=5)
    assert [tuple(c) for c in trie.leaf_codes[leaves[0]].tolist()] == best
    assert torch.allclose(scores[0], torch.tensor([truth[c] for c in best]), atol=1e-5)

    # prefix-dependent logits over a sparse database with beam >= #identifiers: the exact full order
    table = torch.randn(depth, k + 1, k, generator=gen) * 3
    subset = [everything[i] for i in np.random.default_rng(1).choice(len(everything), 20, replace=False)]
    trie = IdentifierTrie.build(np.array(subset), k)
    truth = exact_scores(table, subset)
    leaves, scores = beam_search(RiggedDecoder(table), torch.zeros(1, 1, 8), trie, beam_size=32)
    got = [tuple(c) for c in trie.leaf_codes[leaves[0, :20]].tolist()]
    assert got == sorted(truth, key=truth.get, reverse=True)
    assert (leaves[0, 20:] == -1).all() and torch.isneginf(scores[0, 20:]).all()


def test_cached_decoding_equals_uncached_decoding():
    dec = make_decoder(depth=4, k=7, scale=5.0)
    memory = torch.randn(3, 6, 12)
    codes = torch.randint(0, 7, (3, 5, 4))  # 3 queries x 5 sequences
    mem_kv = dec.memory_kv(memory)
    tokens = dec.input_tokens(codes)
    full = dec(tokens, mem_kv)
    cache = KVCache()
    steps = [dec(tokens[..., t : t + 1], mem_kv, cache) for t in range(4)]
    assert torch.allclose(torch.cat(steps, dim=2), full, atol=1e-5)
    # two tokens at once on top of a cache, too (causal mask offset by the cached length)
    cache = KVCache()
    parts = [dec(tokens[..., a:b], mem_kv, cache) for a, b in ((0, 1), (1, 3), (3, 4))]
    assert torch.allclose(torch.cat(parts, dim=2), full, atol=1e-5)
    # and beam search gives the same beams and scores with and without the cache
    trie = IdentifierTrie.build(np.random.default_rng(0).integers(0, 7, (300, 4)), 7)
    cached = beam_search(dec, memory, trie, 6)
    uncached = beam_search(dec, memory, trie, 6, use_cache=False)
    assert torch.equal(cached[0], uncached[0]) and torch.allclose(cached[1], uncached[1], atol=1e-5)


def test_exhaustive_scores_equal_beam_scores_and_rank_beams_first():
    dec = make_decoder(depth=3, k=6, scale=10.0)
    memory = torch.randn(4, 5, 12)
    trie = IdentifierTrie.build(np.random.default_rng(3).integers(0, 6, (150, 3)), 6)
    leaves, scores = beam_search(dec, memory, trie, 8)
    full = score_all_identifiers(dec, memory, trie.leaf_codes, budget=5000)  # small budget: several chunks
    assert torch.allclose(full.gather(1, leaves), scores, atol=1e-4)
    order, sorted_scores = rank_identifiers(full)
    assert np.all(np.diff(sorted_scores, axis=1) <= 0)
    assert order[:, 0].tolist() == full.argmax(1).tolist()
    # a beam search never beats the exhaustive optimum; its best must be the exact best when beam >= #leaves
    assert (scores[:, 0] <= full.max(1).values + 1e-5).all()
    wide, wide_scores = beam_search(dec, memory, trie, trie.num_leaves)
    assert torch.equal(wide[:, 0], full.argmax(1))


def test_expansion_is_beam_order_then_database_order_and_rerank_is_by_cosine():
    # database: leaf of [0,0] holds positions 0, 2, 3; leaf [1,1] holds 1; leaf [1,0] holds 4
    codes = np.array([[0, 0], [1, 1], [0, 0], [0, 0], [1, 0]])
    trie = IdentifierTrie.build(codes, 2)
    leaf = {tuple(c): i for i, c in enumerate(trie.leaf_codes.tolist())}
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    query = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    leaves = np.array([[leaf[(1, 1)], leaf[(0, 0)], -1], [leaf[(0, 0)], leaf[(1, 0)], leaf[(1, 1)]]])
    scores = np.array([[-0.1, -0.5, -np.inf], [-0.2, -0.3, -0.4]])
    # the paper's ranking: beams in order, each identifier's images in database order, then padding
    nb, sc = expand_identifiers(leaves, scores, trie, depth=6)
    assert nb.tolist() == [[1, 0, 2, 3, -1, -1], [0, 2, 3, 4, 1, -1]]
    assert np.allclose(sc[0, :4], [-0.1, -0.5, -0.5, -0.5]) and np.isnan(sc[0, 4:]).all()
    # the list stops after `depth` images (the reference cuts it to the beam size)
    assert expand_identifiers(leaves, scores, trie, depth=2)[0].tolist() == [[1, 0], [0, 2]]
    # rerank: the same candidates by cosine. Query 0 (along y): 1 and 3 (1.0), 2 (0.8), 0 (0.0)
    ranked, sim = rerank_by_similarity(nb, query, gallery)
    assert ranked.tolist() == [[1, 3, 2, 0, -1, -1], [0, 4, 2, 3, 1, -1]]
    assert np.allclose(sim[0, :4], [1.0, 1.0, 0.8, 0.0]) and np.isnan(sim[0, 4:]).all()


def test_mismatched_trie_and_decoder_is_a_clear_error():
    dec = make_decoder(depth=3, k=6)
    trie = IdentifierTrie.build(np.zeros((2, 2), dtype=np.int64), 6)
    with pytest.raises(ValueError, match="trie is 2x6"):
        beam_search(dec, torch.randn(1, 2, 12), trie, 4)


def test_logits_and_beams_are_float32_under_bf16_autocast():
    """The output head runs in float32 inside autocast: bf16 logits (8 bits of mantissa) move log-probabilities by
    hundredths of a nat and reorder close beams. Without layers the rest of the decoder is float32 anyway, so
    logits and beams must equal the float32 ones exactly."""
    torch.manual_seed(0)
    depth, k = 4, 256
    dec = IdentifierDecoder(DecoderConfig(depth, k, width=64, layers=0, heads=4, memory_dim=64)).eval()
    with torch.no_grad():
        dec.head_weight.mul_(40.0)  # logits of a few nats, as a trained head gives
    codes = torch.randint(0, k, (4000, depth))
    trie = IdentifierTrie.build(codes, k)
    memory = torch.randn(6, 5, 64)
    tokens = dec.input_tokens(codes[:64]).unsqueeze(0)
    with torch.no_grad():
        reference_logits = dec(tokens, dec.memory_kv(memory[:1]))
        reference = beam_search(dec, memory, trie, 30)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = dec(tokens, dec.memory_kv(memory[:1]))
            leaves, scores = beam_search(dec, memory, trie, 30)
    assert logits.dtype == torch.float32 and torch.equal(logits, reference_logits)
    assert torch.equal(leaves, reference[0]) and torch.equal(scores, reference[1])
