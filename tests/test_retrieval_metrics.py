"""Retrieval metrics against hand-computed numbers and an independent brute-force reference.

The reference below builds the full similarity matrix, ranks every gallery item with a plain Python sort on
(-score, index), and computes each metric with straightforward loops. Embeddings live on a dyadic grid
(multiples of 1/64 or of 1, small dimension) so every dot product is exact in float32 whatever the summation
order: reference and implementation see bitwise-identical scores, and ties are real ties.
"""

from __future__ import annotations

import numpy as np
import pytest

import irlab.retrieval.evaluate as evaluate_mod
from irlab.retrieval import (
    average_precision_full,
    count_relevant,
    evaluate_embeddings,
    evaluate_rankings,
    plot_pr_curve,
    plot_retrieval_grid,
    retrieval_metrics,
)

KS = (1, 2, 4, 8)


# ---------------------------------------------------------------------------------------------------------
# Independent reference
# ---------------------------------------------------------------------------------------------------------
def ref_full_rankings(q, g, exclude):
    """Full ranking per query: all gallery indices but the excluded one, by (-score, index)."""
    sims = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
    rankings = []
    for i in range(len(q)):
        cand = [j for j in range(len(g)) if exclude is None or j != exclude[i]]
        rankings.append(sorted(cand, key=lambda j: (-sims[i, j], j)))
    return rankings, sims


def ref_counts(q_labels, g_labels, exclude):
    out = []
    for i, lab in enumerate(q_labels):
        kept = [j for j in range(len(g_labels)) if exclude is None or j != exclude[i]]
        out.append(sum(1 for j in kept if g_labels[j] == lab))
    return out


def old_numpy_ne_empty_is_true(pos) -> bool:
    """``bool(np.array(pos) != np.array([]))`` as NumPy < 1.25 evaluated it (the reference's environment).

    0 or 1 elements broadcast against the empty array to an empty result, which is falsy; 2 or more cannot be
    broadcast, the elementwise comparison fails and ``!=`` falls back to the scalar ``True``.
    """
    return len(pos) >= 2


def ref_metrics(rankings, q_labels, g_labels, counts, ks, with_ap=True):
    """Loops over queries; rankings are lists of gallery indices (-1 = padding)."""
    per = {f"R@{k}": [] for k in ks}
    per.update({f"P@{k}": [] for k in ks})
    per.update({f"P@{k}_irgen": [] for k in ks})
    per.update({"R-precision": [], "MAP@R": [], "mAP": []})
    skipped = 0
    for i, ranking in enumerate(rankings):
        R = counts[i]
        if R == 0:
            skipped += 1
            continue
        rel = [j >= 0 and g_labels[j] == q_labels[i] for j in ranking]

        def hits(n, rel=rel):
            return sum(rel[:n])

        for k in ks:
            per[f"R@{k}"].append(1.0 if hits(k) > 0 else 0.0)
            per[f"P@{k}"].append(hits(k) / k)
        per["R-precision"].append(hits(R) / R)
        map_r = 0.0
        for n in range(1, min(R, len(rel)) + 1):
            if rel[n - 1]:
                map_r += hits(n) / n
        per["MAP@R"].append(map_r / R)
        ap, found = 0.0, 0
        for n, r in enumerate(rel, start=1):
            if r:
                found += 1
                ap += found / n
        per["mAP"].append(ap / R)
        # IRGen utils/evaluate.py::compute_map, transcribed with NumPy < 1.25's `pos != np.array([])`.
        pos = [n for n, r in enumerate(rel, start=1) if r]
        for k in ks:
            kq = pos[-1] if (old_numpy_ne_empty_is_true(pos) and len(pos) == R and pos[-1] < k) else k
            per[f"P@{k}_irgen"].append(sum(1 for p in pos if p <= kq) / kq)
    out = {key: (float(np.mean(v)) if v else float("nan")) for key, v in per.items()}
    if not with_ap:
        out.pop("mAP")
    out["queries_without_relevant"] = float(skipped)
    out["queries_evaluated"] = float(len(rankings) - skipped)
    return out


def assert_metrics_equal(got, want, keys=None):
    keys = keys if keys is not None else want.keys()
    for key in keys:
        assert key in got, f"missing metric {key}"
        if np.isnan(want[key]):
            assert np.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], abs=1e-12), f"{key}: {got[key]} != {want[key]}"


def grid_data(rng, n, d, levels, scale):
    """Values on a dyadic grid -> exact float32 dot products. Few levels = many ties."""
    return (rng.integers(-levels, levels + 1, size=(n, d)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Hand-computed examples
# ---------------------------------------------------------------------------------------------------------
def test_hand_computed_rankings():
    # gallery labels: 0:A 1:B 2:A 3:C 4:A 5:B
    g_labels = np.array(["A", "B", "A", "C", "A", "B"])
    q_labels = np.array(["A", "B", "D", "C"])
    neighbors = np.array(
        [
            [1, 0, 3, 2, 5, 4],  # relevant at ranks 2, 4, 6 (R = 3)
            [5, 1, -1, -1, -1, -1],  # relevant at ranks 1, 2 (R = 2), padded
            [0, 1, 2, 3, 4, 5],  # label D: no relevant item
            [0, 2, 4, 1, 5, -1],  # R = 1, never retrieved
        ]
    )
    counts = np.array([3, 2, 0, 1])
    assert count_relevant(q_labels, g_labels).tolist() == counts.tolist()
    m = retrieval_metrics(neighbors, q_labels, g_labels, relevant_counts=counts, ks=KS)
    want = {
        "R@1": 1 / 3, "R@2": 2 / 3, "R@4": 2 / 3, "R@8": 2 / 3,
        "P@1": 1 / 3, "P@2": 0.5, "P@4": 1 / 3, "P@8": 5 / 24,
        "R-precision": 4 / 9, "MAP@R": 7 / 18,
        "P@1_irgen": 1 / 3, "P@2_irgen": 0.5, "P@4_irgen": 0.5, "P@8_irgen": 0.5,
        "queries_without_relevant": 1.0, "queries_evaluated": 3.0,
    }  # fmt: skip
    assert_metrics_equal(m, want)
    ap = average_precision_full(neighbors, q_labels, g_labels, relevant_counts=counts)
    np.testing.assert_allclose(ap, [0.5, 1.0, np.nan, 0.0])
    # Query 3's relevant item is missing from its list -> no (silently truncated) mAP.
    rep = evaluate_rankings(neighbors, None, q_labels, g_labels, ks=KS)
    assert "mAP" not in rep.metrics
    assert_metrics_equal(rep.metrics, want)
    # Dropping query 3 makes every ranking complete -> mAP = mean(0.5, 1.0).
    rep = evaluate_rankings(neighbors[:3], None, q_labels[:3], g_labels, ks=KS)
    assert rep.metrics["mAP"] == pytest.approx(0.75)


def test_irgen_precision_single_relevant_item_is_not_divided_by_its_rank():
    """The reference's quirk: one relevant item at rank 1 scores 1/K, two at ranks 1, 2 score 1."""
    g_labels = np.array(["A", "B", "B"] + ["C"] * 27)
    neighbors = np.arange(30)[None, :].repeat(2, axis=0)
    neighbors[1, :3] = [1, 2, 0]
    m = retrieval_metrics(neighbors, np.array(["A", "B"]), g_labels, relevant_counts=[1, 2], ks=(1, 10, 30))
    assert m["P@30_irgen"] == pytest.approx((1 / 30 + 1.0) / 2)
    assert m["P@10_irgen"] == pytest.approx((1 / 10 + 1.0) / 2)
    assert m["P@1_irgen"] == m["P@1"] == 1.0


def test_hand_computed_embeddings_with_ties_and_self_exclusion():
    # 1-D embeddings, query set == gallery set. Items 0, 1, 3 are identical: ties broken by lower index.
    x = np.array([[1.0], [1.0], [0.5], [1.0], [-1.0]], dtype=np.float32)
    labels = np.array([0, 1, 0, 0, 1])
    rep = evaluate_embeddings(x, x, labels, labels, exclude=np.arange(5), ks=(1, 2, 4))
    assert rep.neighbors.tolist() == [[1, 3, 2, 4], [0, 3, 2, 4], [0, 1, 3, 4], [0, 1, 2, 4], [2, 0, 1, 3]]
    assert rep.scores[4].tolist() == [-0.5, -1.0, -1.0, -1.0]
    want = {
        "R@1": 0.4, "R@2": 0.6, "R@4": 1.0, "P@1": 0.4, "P@2": 0.3, "P@4": 0.4,
        "R-precision": 0.3, "MAP@R": 0.25, "mAP": 17 / 30,  # APs 7/12, 1/4, 5/6, 5/6, 1/3
        # 2/3, 1/4, 2/3, 2/3, 1/4: query 4's single relevant item at rank 3 scores 1/4, as in the reference
        "P@1_irgen": 0.4, "P@2_irgen": 0.3, "P@4_irgen": 0.5,
        "queries_without_relevant": 0.0,
    }  # fmt: skip
    assert_metrics_equal(rep.metrics, want)
    np.testing.assert_allclose(rep.pr_curve["precision"], [2 / 5, 3 / 10, 7 / 15, 8 / 20])
    np.testing.assert_allclose(rep.pr_curve["recall"], [2 / 8, 3 / 8, 7 / 8, 8 / 8])


# ---------------------------------------------------------------------------------------------------------
# Random data vs the reference
# ---------------------------------------------------------------------------------------------------------
def _random_case(seed, coarse, same_set, n_g=40):
    rng = np.random.default_rng(seed)
    d = 4
    g = grid_data(rng, n_g, d, levels=1 if coarse else 64, scale=1.0 if coarse else 1 / 64)
    g[5] = g[3]  # exact duplicate embeddings
    g[17] = g[3]
    n_labels = max(9, n_g // 4)
    g_labels = rng.integers(0, n_labels, n_g)
    if same_set:
        q, q_labels = g, g_labels
        exclude = np.arange(n_g)
        exclude[7] = -1  # one query without self-exclusion
    else:
        q = grid_data(rng, 25, d, levels=1 if coarse else 64, scale=1.0 if coarse else 1 / 64)
        q[0] = g[3]  # query duplicated three times in the gallery; exclude one copy by index
        q_labels = rng.integers(0, n_labels + 2, 25)  # the last two labels never occur in the gallery
        exclude = np.full(25, -1)
        exclude[0] = 5
        exclude[1] = 0
    return q, g, q_labels, g_labels, exclude


@pytest.mark.parametrize("coarse", [True, False], ids=["ties", "fine"])
@pytest.mark.parametrize("same_set", [True, False], ids=["self", "cross"])
@pytest.mark.parametrize("chunk_size", [3, 2048])
def test_evaluate_embeddings_matches_reference(coarse, same_set, chunk_size):
    # A 1024-item gallery with small classes: k <= 1024 / 64, so top-k takes the 64-column-group bound path.
    n_g = 1024 if chunk_size > 3 and not same_set else 40
    q, g, ql, gl, exclude = _random_case(11 * coarse + 3 * same_set, coarse, same_set, n_g)
    rankings, _ = ref_full_rankings(q, g, exclude)
    counts = ref_counts(ql, gl, exclude)
    assert count_relevant(ql, gl, exclude).tolist() == counts
    want = ref_metrics(rankings, ql, gl, counts, KS)

    rep = evaluate_embeddings(q, g, ql, gl, exclude=exclude, ks=KS, chunk_size=chunk_size)
    assert_metrics_equal(rep.metrics, want)
    k = rep.neighbors.shape[1]
    assert k == min(max(max(KS), max(counts)), len(g) - 1)
    assert rep.neighbors.tolist() == [r[:k] for r in rankings]

    fast = evaluate_embeddings(q, g, ql, gl, exclude=exclude, ks=KS, with_map=False, chunk_size=chunk_size)
    assert "mAP" not in fast.metrics
    assert_metrics_equal(fast.metrics, {key: v for key, v in want.items() if key != "mAP"})
    np.testing.assert_array_equal(fast.neighbors, rep.neighbors)
    np.testing.assert_array_equal(fast.scores, rep.scores)


@pytest.mark.parametrize("strategy", ["sort", "passes", "candidates"])
@pytest.mark.parametrize("levels", [1, 64], ids=["ties", "fine"])
def test_map_rank_strategies(monkeypatch, strategy, levels):
    """Each way of ranking relevant items (argsort / comparison passes / candidate extraction) is exact."""
    rng = np.random.default_rng(5)
    g = grid_data(rng, 60, 3, levels=levels, scale=1.0 / levels)  # levels=1: 27 vectors for 60 items
    labels = rng.integers(0, 3, 60)
    exclude = np.arange(60)
    exclude[4] = -1
    rankings, _ = ref_full_rankings(g, g, exclude)
    counts = ref_counts(labels, labels, exclude)
    want = ref_metrics(rankings, labels, labels, counts, KS)
    monkeypatch.setattr(evaluate_mod, "_SORT_THRESHOLD", 0 if strategy == "sort" else 10_000)
    monkeypatch.setattr(evaluate_mod, "_CANDIDATE_COST", float("inf") if strategy == "passes" else 0.0)
    monkeypatch.setattr(evaluate_mod, "_SORT_ROWS", 7)
    monkeypatch.setattr(evaluate_mod, "_RANK_ROWS", 5)
    rep = evaluate_embeddings(g, g, labels, labels, exclude=exclude, ks=KS, chunk_size=9)
    assert_metrics_equal(rep.metrics, want)


def test_k_larger_than_gallery_and_all_queries_without_relevant():
    rng = np.random.default_rng(2)
    g = grid_data(rng, 6, 3, levels=2, scale=0.5)
    gl = np.array([0, 0, 1, 1, 1, 2])
    q = grid_data(rng, 4, 3, levels=2, scale=0.5)
    ql = np.array([0, 1, 2, 7])
    rep = evaluate_embeddings(q, g, ql, gl, ks=(1, 50))
    assert rep.neighbors.shape == (4, 6)
    rankings, _ = ref_full_rankings(q, g, None)
    assert_metrics_equal(rep.metrics, ref_metrics(rankings, ql, gl, ref_counts(ql, gl, None), (1, 50)))
    assert rep.metrics["P@50"] == pytest.approx((2 + 3 + 1) / 50 / 3)  # every relevant item found, / 50
    assert rep.metrics["R@50"] == 1.0

    none = evaluate_embeddings(q, g, np.array([9, 9, 9, 9]), gl, ks=(1,))
    assert none.metrics["queries_without_relevant"] == 4.0
    assert np.isnan(none.metrics["R@1"]) and np.isnan(none.metrics["mAP"])


def test_evaluate_rankings_padding_repeats_and_exclusion():
    rng = np.random.default_rng(9)
    n_q, n_g, k = 30, 50, 12
    gl = rng.integers(0, 6, n_g)
    ql = rng.integers(0, 7, n_q)
    exclude = rng.integers(-1, n_g, n_q)
    nb = np.stack([rng.permutation(n_g)[:k] for _ in range(n_q)])
    nb[:, 3] = exclude  # the method returned the excluded item (or -1 padding)
    nb[::2, 5] = nb[::2, 1]  # a decoder emitting the same id twice
    nb[::3, 8:] = -1  # short beams
    sc = -np.arange(k, dtype=np.float32)[None].repeat(n_q, 0)

    # Reference: clean each list by hand, then score.
    cleaned, seen_repeats = [], 0
    for i in range(n_q):
        row, seen = [], set()
        for j in nb[i]:
            if j < 0 or j == exclude[i]:
                continue
            if j in seen:
                seen_repeats += 1
                continue
            seen.add(j)
            row.append(int(j))
        cleaned.append(row + [-1] * (k - len(row)))
    counts = ref_counts(ql, gl, exclude)
    want = ref_metrics(cleaned, ql, gl, counts, KS, with_ap=False)

    rep = evaluate_rankings(nb, sc, ql, gl, exclude=exclude, ks=KS)
    assert rep.neighbors.tolist() == cleaned
    assert rep.metrics["repeated_neighbors_removed"] == seen_repeats > 0
    assert "mAP" not in rep.metrics  # lists of 12 out of 50 cannot hold every relevant item
    assert_metrics_equal(rep.metrics, want)
    assert np.isnan(rep.scores[rep.neighbors < 0]).all()
    assert rep.scores[0, 0] == sc[0, 0]


def test_evaluate_rankings_complete_matches_embedding_map():
    """A full ranking handed to evaluate_rankings gives the same mAP as the fused embedding pass."""
    rng = np.random.default_rng(4)
    g = grid_data(rng, 30, 3, levels=1, scale=1.0)
    labels = rng.integers(0, 4, 30)
    exclude = np.arange(30)
    emb = evaluate_embeddings(g, g, labels, labels, exclude=exclude, ks=KS)
    rankings, sims = ref_full_rankings(g, g, exclude)
    full = np.array(rankings)
    scores = np.take_along_axis(sims, full, axis=1)
    rep = evaluate_rankings(full, scores, labels, labels, exclude=exclude, ks=KS)
    assert rep.metrics["mAP"] == pytest.approx(emb.metrics["mAP"], abs=1e-12)
    assert_metrics_equal(rep.metrics, emb.metrics, keys=[k for k in emb.metrics if k != "mAP"])


def test_torch_and_float16_inputs_match_numpy():
    torch = pytest.importorskip("torch")
    q, g, ql, gl, exclude = _random_case(1, coarse=False, same_set=False)
    ref = evaluate_embeddings(q, g, ql, gl, exclude=exclude)
    rep = evaluate_embeddings(
        torch.from_numpy(q).half(), torch.from_numpy(g).half(), torch.from_numpy(ql), torch.from_numpy(gl),
        exclude=torch.from_numpy(exclude),
    )  # fmt: skip
    # multiples of 1/64 below 1 are exact in fp16, so the result must be identical
    np.testing.assert_array_equal(rep.neighbors, ref.neighbors)
    assert_metrics_equal(rep.metrics, ref.metrics)


def test_invalid_inputs_raise():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError):
        evaluate_embeddings(x, x, [0, 1, 2], [0, 1])
    with pytest.raises(ValueError):
        evaluate_embeddings(x, x, [0, 1, 2], [0, 1, 2], exclude=[0, 1, 3])
    with pytest.raises(ValueError):
        evaluate_embeddings(np.full((3, 2), np.nan, np.float32), x, [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError):
        retrieval_metrics(np.array([[5]]), [0], [0, 1], relevant_counts=[1])
    with pytest.raises(ValueError, match="relevant_counts"):  # self left in the list, or a repeated index
        retrieval_metrics(np.array([[0, 1, 0]]), [0], [0, 0], relevant_counts=[1])


# ---------------------------------------------------------------------------------------------------------
# Plots (smoke: a real PNG is written)
# ---------------------------------------------------------------------------------------------------------
def test_plots_write_png(tmp_path):
    x = np.array([[1.0], [1.0], [0.5], [1.0], [-1.0]], dtype=np.float32)
    labels = np.array([0, 1, 0, 0, 1])
    rep = evaluate_embeddings(x, x, labels, labels, exclude=np.arange(5), ks=(1, 2))
    p = plot_pr_curve(rep.pr_curve, tmp_path / "sub" / "pr.png", title="toy")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)  # noqa: E731
    grid = plot_retrieval_grid(
        [img(), img()], [[img(), img(), img()], [img()]], [[True, False, True], [False]],
        [[0.9, 0.5, 0.4], [0.1]], tmp_path / "grid.png",
    )  # fmt: skip
    assert grid.stat().st_size > 1000 and grid.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError):
        plot_retrieval_grid([img()], [[img()]], [[True, False]], [[0.1]], tmp_path / "bad.png")


def test_pr_curve_area_and_several_rankings_on_one_plot(tmp_path):
    from irlab.retrieval.plots import curve_area

    # two relevant items found at ranks 1 and 3 of 4 relevant: steps of 1/4 recall at precision 1 and 2/3
    recall, precision = np.array([0.25, 0.25, 0.5]), np.array([1.0, 0.5, 2 / 3])
    assert curve_area(recall, precision) == pytest.approx(0.25 * 1.0 + 0.25 * 2 / 3)
    truncated = {"recall": recall, "precision": precision}
    full = {"recall": np.array([0.5, 1.0]), "precision": np.array([1.0, 1.0])}
    path = plot_pr_curve(truncated, tmp_path / "pr.png", others={"knn": full}, label="generative")
    assert path.is_file() and path.stat().st_size > 0


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_map_equals_a_full_stable_sort_on_tight_clusters_with_ties(quantized):
    """Tight classes send the rank counting down its candidate path (counting on the few items above a row's
    lowest relevant score); quantized scores and duplicate images add ties, which must follow the index tie rule
    exactly."""
    rng = np.random.default_rng(3)
    n, labels = 1500, rng.integers(0, 150, 1500)
    centres = rng.standard_normal((150, 16)).astype(np.float32)
    x = centres[labels] + 0.05 * rng.standard_normal((n, 16)).astype(np.float32)
    if quantized:
        x = np.round(x * 8) / 8
        x[:100] = x[100:200]
        labels[:100] = labels[100:200]
    rep = evaluate_embeddings(x, x, labels, labels, exclude=np.arange(n), ks=KS)
    scores = x @ x.T
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :-1]  # the tie rule: equal scores by lower index
    counts = count_relevant(labels, labels, np.arange(n))
    ap = average_precision_full(order, labels, labels, relevant_counts=counts)
    assert rep.metrics["mAP"] == pytest.approx(float(np.nanmean(ap)), abs=1e-12)
    if quantized:  # dyadic values: every product is exact, so the neighbours must be the sort's too
        np.testing.assert_array_equal(rep.neighbors, order[:, : rep.neighbors.shape[1]])


@pytest.mark.parametrize("path", ["keys", "passes"])
def test_ranks_and_topk_equal_a_stable_sort_on_signed_zeros_ties_and_excluded(monkeypatch, path):
    """The packed (row | score | ~column) keys order negative scores, -0.0 == 0.0, duplicates and -inf
    (excluded) entries exactly as a stable sort of -scores; so does the comparison-pass fallback."""
    monkeypatch.setattr(evaluate_mod, "_CANDIDATE_COST", 0.0 if path == "keys" else float("inf"))
    monkeypatch.setattr(evaluate_mod, "_RANK_ROWS", 3)  # several sub-blocks
    rng = np.random.default_rng(11)
    block = rng.choice(np.array([-1.5, -0.25, -0.0, 0.0, 0.125, 0.5, 2.0], np.float32), size=(8, 300))
    block[np.arange(8), rng.integers(0, 300, 8)] = -np.inf
    rel = np.stack([rng.choice(300, 5, replace=False) for _ in range(8)])
    rel[block[np.arange(8)[:, None], rel] == -np.inf] = -1  # an excluded item is never relevant
    rel[2, 3:] = -1  # padding
    rel[5] = -1  # a query without relevant items
    ranks, scores, neighbors = evaluate_mod._ranks_and_topk(block, rel, 7)
    order = np.argsort(-block, axis=1, kind="stable")
    position = np.argsort(order, axis=1) + 1
    np.testing.assert_array_equal(ranks, np.where(rel >= 0, np.take_along_axis(position, rel, axis=1), 0))
    np.testing.assert_array_equal(neighbors, order[:, :7])
    np.testing.assert_array_equal(scores, np.take_along_axis(block, order[:, :7], axis=1))
