"""knn_search against a brute-force reference: full score matrix + Python sort on (-score, index).

Embeddings sit on a dyadic grid so float32 dot products are exact in any summation order (faiss BLAS, numpy,
float64 reference all agree bit for bit) and ties are genuine.
"""

from __future__ import annotations

import numpy as np
import pytest

import irlab.retrieval.knn as knn_mod
from irlab.retrieval import knn_search
from irlab.retrieval.knn import topk_exact


def ref_knn(q, g, k, exclude=None):
    sims = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
    any_excl = exclude is not None and np.any(np.asarray(exclude) >= 0)
    k_out = min(k, len(g) - (1 if any_excl else 0))
    idx, val = [], []
    for i in range(len(q)):
        cand = [j for j in range(len(g)) if exclude is None or j != exclude[i]]
        order = sorted(cand, key=lambda j: (-sims[i, j], j))[:k_out]
        idx.append(order)
        val.append([sims[i, j] for j in order])
    return np.array(val, dtype=np.float32).reshape(len(q), k_out), np.array(idx, dtype=np.int64).reshape(
        len(q), k_out
    )


def grid(rng, n, d, levels, scale=1.0):
    return (rng.integers(-levels, levels + 1, size=(n, d)) * scale).astype(np.float32)


def check(q, g, k, exclude=None, **kw):
    s, i = knn_search(q, g, k, exclude=exclude, **kw)
    rs, ri = ref_knn(q, g, k, exclude)
    assert s.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(s, rs)
    return s, i


@pytest.mark.parametrize(
    "levels,scale", [(1, 1.0), (2, 0.5), (64, 1 / 64)], ids=["heavy-ties", "ties", "fine"]
)
@pytest.mark.parametrize("chunk_size", [1, 7, 2048])
def test_matches_reference_with_ties_duplicates_and_exclusion(levels, scale, chunk_size):
    rng = np.random.default_rng(levels)
    g = grid(rng, 60, 4, levels, scale)
    top = np.full(4, levels * scale, np.float32)  # strictly the best match for itself
    g[(g == top).all(axis=1)] = 0
    g[2] = g[10] = g[11] = top  # three identical gallery items
    q = grid(rng, 23, 4, levels, scale)
    q[0] = g[2]  # query duplicated in the gallery ...
    exclude = rng.integers(-1, 60, 23)
    exclude[0] = 10  # ... its "self" is the middle copy: 2 and 11 must stay, 10 must go
    for k in (1, 5, 12):
        _, idx = check(q, g, k, exclude=exclude, chunk_size=chunk_size)
        assert 10 not in idx[0] and (k < 2 or idx[0][:2].tolist() == [2, 11])
        check(q, g, k, chunk_size=chunk_size)


def test_self_exclusion_is_by_index_not_by_position():
    # Item 1 has a larger norm, so for query 0 it scores above query 0's own copy (index 0).
    g = np.array([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    s, i = knn_search(g, g, 3, exclude=np.arange(4))
    assert i[0].tolist() == [1, 2, 3]  # self (0) removed even though it was not first; its twin 2 kept
    assert i[2].tolist() == [1, 0, 3]
    assert s[0].tolist() == [2.0, 1.0, 0.0]
    # A naive "drop the first neighbour" would have removed item 1 from query 0's list instead.


def test_k_larger_than_gallery():
    rng = np.random.default_rng(3)
    g = grid(rng, 5, 3, 1)
    q = grid(rng, 4, 3, 1)
    s, i = check(q, g, 100)
    assert i.shape == (4, 5) and all(sorted(r) == list(range(5)) for r in i.tolist())
    s, i = check(q, g, 100, exclude=np.array([0, -1, 4, 2]))
    assert i.shape == (4, 4)  # k' = G - 1 as soon as any row excludes
    assert 0 not in i[0] and 4 not in i[2] and 2 not in i[3]
    s, i = knn_search(q, g, 100, exclude=np.full(4, -1))  # "-1 everywhere" is no exclusion
    assert i.shape == (4, 5)
    s, i = knn_search(g[:1], g[:1], 3, exclude=np.array([0]))  # nothing left to return
    assert i.shape == (1, 0) and s.shape == (1, 0)


def test_all_scores_equal_forces_index_order():
    # A zero query ties with every gallery item: the whole answer is decided by the tie rule.
    rng = np.random.default_rng(0)
    g = rng.standard_normal((50, 8)).astype(np.float32)
    q = np.zeros((3, 8), np.float32)
    _, i = knn_search(q, g, 6, exclude=np.array([2, -1, 0]))
    assert i.tolist() == [[0, 1, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("n_cols", [30, 1000], ids=["partition", "group-bound"])
def test_topk_exact_blocks(monkeypatch, n_cols):
    monkeypatch.setattr(knn_mod, "_TOPK_BLOCK_ROWS", 4)
    rng = np.random.default_rng(1)
    scores = rng.integers(-2, 3, size=(11, n_cols)).astype(np.float32)  # heavy ties
    scores[3, 7] = -np.inf
    scores[4] = rng.integers(-500, 500, n_cols) / 64  # few ties
    scores[5] = 0.0  # all tied: the group bound admits everything -> exact partition fallback
    scores[6, -5:] = 9.0  # the winners sit in the last, partial 64-column group
    for k in (1, 4, 29, 30):
        vals, idx = topk_exact(scores, k)
        for r in range(11):
            order = sorted(range(n_cols), key=lambda j, r=r: (-scores[r, j], j))[:k]
            assert idx[r].tolist() == order
            np.testing.assert_array_equal(vals[r], scores[r, order])


def test_float16_and_torch_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    g = grid(rng, 40, 6, 64, 1 / 64)  # exact in fp16
    q = grid(rng, 9, 6, 64, 1 / 64)
    s_ref, i_ref = knn_search(q, g, 7)
    s, i = knn_search(torch.from_numpy(q).half(), g.astype(np.float16), 7, exclude=torch.full((9,), -1))
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_array_equal(s, s_ref)
    assert s.dtype == np.float32


def test_invalid_arguments():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError):
        knn_search(x, np.ones((4, 2), np.float32), 2)
    with pytest.raises(ValueError):
        knn_search(x, x, 0)
    with pytest.raises(ValueError):
        knn_search(x, x, 2, exclude=np.array([0, 1, 2, 4]))
    with pytest.raises(ValueError):
        knn_search(x, x, 2, exclude=np.array([0, 1]))
    with pytest.raises(TypeError):
        knn_search(x, x, 2, exclude=np.array([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        knn_search(np.full((1, 3), np.inf, np.float32), x, 2)


def test_use_gpu_true_without_gpu_raises():
    faiss = pytest.importorskip("faiss")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is available")
    x = np.ones((2, 3), np.float32)
    with pytest.raises(RuntimeError):
        knn_search(x, x, 1, use_gpu=True)
    knn_search(x, x, 1, use_gpu=False)


def test_torch_index_path_matches_the_reference(monkeypatch):
    """The GPU fallback (faiss without GPU support on a GPU machine), run on the CPU: same results, ties included,
    with gallery blocks smaller than the gallery so that the block merge is exercised."""
    import torch

    from irlab.retrieval import torch_index

    monkeypatch.setattr(knn_mod, "_torch_gpu", lambda: torch.device("cpu"))
    built = []
    original = torch_index.TorchFlatIP.__init__

    def small_blocks(self, gallery, device, block_rows=1 << 16):
        built.append(device)
        original(self, gallery, device, block_rows=7)

    monkeypatch.setattr(torch_index.TorchFlatIP, "__init__", small_blocks)
    rng = np.random.default_rng(3)
    g, q = grid(rng, 40, 4, 2, 0.5), grid(rng, 9, 4, 2, 0.5)
    q[0] = g[5] = g[17]
    for k in (1, 6, 40):
        check(q, g, k, exclude=rng.integers(-1, 40, 9), chunk_size=4)
    assert built and all(d.type == "cpu" for d in built)
    with pytest.raises(RuntimeError, match="sees a GPU"):
        monkeypatch.setattr(knn_mod, "_torch_gpu", lambda: None)
        knn_search(q, g, 3, use_gpu=True)
