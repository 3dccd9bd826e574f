"""The identifier trie against a plain Python set: membership, transitions, leaf -> images, bad input."""

import itertools

import numpy as np
import pytest
import torch

from irgen.trie import IdentifierTrie


def random_codes(n: int, depth: int, k: int, seed: int) -> np.ndarray:
    """Identifiers with many shared prefixes (small K) and duplicates (n > K^D / 2)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, (n, depth))
    codes[n // 2 :] = codes[rng.integers(0, n // 2, n - n // 2)]  # guaranteed duplicates
    return codes


@pytest.mark.parametrize("dense_max_entries", [1 << 24, 0, 20])  # all dense, all CSR, mixed
@pytest.mark.parametrize("k,depth,n", [(3, 4, 60), (5, 3, 200), (7, 2, 5)])
def test_trie_matches_a_python_set(dense_max_entries, k, depth, n):
    codes = random_codes(n, depth, k, seed=k * depth)
    trie = IdentifierTrie.build(codes, k, dense_max_entries=dense_max_entries)
    valid = set(map(tuple, codes.tolist()))
    assert trie.num_leaves == len(valid) and trie.num_items == n
    assert set(map(tuple, trie.leaf_codes.tolist())) == valid

    # membership of every identifier over an alphabet one larger than K (out-of-range codes are never valid)
    everything = np.array(list(itertools.product(range(k + 1), repeat=depth)))
    got = trie.contains(torch.from_numpy(everything)).numpy()
    assert np.array_equal(got, np.array([tuple(c) in valid for c in everything.tolist()]))

    # transitions from every prefix node equal the set of next codes seen after that prefix
    nodes = {(): 0}
    for level in range(depth):
        prefixes = sorted({c[:level] for c in valid})
        assert trie.num_nodes(level) == len(prefixes)
        ids = torch.tensor([nodes[p] for p in prefixes])
        table = trie.transitions(level, ids)
        for prefix, row in zip(prefixes, table.tolist(), strict=True):
            allowed = {c[level] for c in valid if c[:level] == prefix}
            assert {code for code in range(k) if row[code] >= 0} == allowed
            for code in allowed:
                nodes[prefix + (code,)] = row[code]
    assert (trie.transitions(0, torch.tensor([-1])) == -1).all()  # dead beams stay dead

    # leaf -> database positions: exactly the rows holding that identifier, in database order
    leaf_of = trie.lookup(torch.from_numpy(codes)).numpy()
    assert np.array_equal(leaf_of, trie.item_leaf.numpy())
    for leaf in range(trie.num_leaves):
        rows = trie.leaf_items(leaf).numpy()
        expected = np.flatnonzero((codes == trie.leaf_codes[leaf].numpy()).all(1))
        assert np.array_equal(rows, expected)


def test_trie_rejects_bad_identifiers():
    with pytest.raises(ValueError, match="codebook_size=4"):
        IdentifierTrie.build(np.array([[0, 4]]), 4)
    with pytest.raises(ValueError, match=">= 0"):
        IdentifierTrie.build(np.array([[0, -1]]), 4)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        IdentifierTrie.build(np.array([0, 1]), 4)
    with pytest.raises(ValueError, match="integers"):
        IdentifierTrie.build(np.array([[0.5, 1.0]]), 4)
    with pytest.raises(ValueError, match="empty"):
        IdentifierTrie.build(np.zeros((0, 3), dtype=np.int64), 4)


def test_transition_cost_does_not_depend_on_database_size():
    """The per-beam transition tensor is [beams, K] whatever the number of identifiers (no scan of the database)."""
    small = IdentifierTrie.build(random_codes(100, 3, 16, 0), 16, dense_max_entries=0)
    large = IdentifierTrie.build(random_codes(20000, 3, 16, 1), 16, dense_max_entries=0)
    for trie in (small, large):
        assert trie.transitions(2, torch.zeros(5, 7, dtype=torch.long)).shape == (5, 7, 16)
