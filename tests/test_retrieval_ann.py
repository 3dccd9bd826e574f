"""ANN rows (``evaluation.indexes``): an index configured to be exact reproduces the exact row's metrics, the
approximate ones report recall against exact search, and a run with indexes prints their rows."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.errors import UserInputError
from irlab.retrieval import evaluate_embeddings
from irlab.retrieval.ann import approximate_rows, auto_nbits, auto_nlist, auto_subquantizers

RANK_METRICS = ("R@1", "R@2", "R@4", "R@8", "P@1", "P@8", "R-precision", "MAP@R")


def clustered(n: int = 600, d: int = 32, classes: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.normal(size=(classes, d))[labels] + 0.8 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("all_vs_all", [True, False])
def test_ivf_flat_searching_every_cell_reproduces_the_exact_row(all_vs_all):
    x, labels = clustered()
    if all_vs_all:  # queries are the gallery, each query excluded from its own results
        q, g, ql, gl, exclude = x, x, labels, labels, np.arange(len(x))
    else:
        q, g, ql, gl, exclude = x[:150], x[150:], labels[:150], labels[150:], None
    exact = evaluate_embeddings(q, g, ql, gl, exclude=exclude)
    rows = approximate_rows({"ivfflat": {"nlist": 8, "nprobe": 8}}, q, g, ql, gl, exclude=exclude,
                            exact_neighbors=exact.neighbors)
    for name in RANK_METRICS:
        assert rows[f"ivfflat/{name}"] == pytest.approx(exact.metrics[name], abs=1e-9), name
    assert rows["ivfflat/recall@8_vs_exact"] == 1.0


def test_approximate_indexes_report_recall_and_time_and_search_exactly_when_not_given_it():
    x, labels = clustered()
    rows = approximate_rows({"ivfpq": {}, "hnsw": {"ef_search": 16}}, x, x, labels, labels, exclude=np.arange(len(x)))
    for name in ("ivfpq", "hnsw"):
        assert 0.0 < rows[f"{name}/recall@8_vs_exact"] <= 1.0
        assert rows[f"{name}/query_ms"] > 0 and rows[f"{name}/build_seconds"] > 0
        assert 0.0 <= rows[f"{name}/R@1"] <= 1.0
    assert rows["hnsw/recall@8_vs_exact"] > 0.9  # a 600-point graph is nearly exact
    # a recall column is the same whether the exact neighbours are passed in or searched here
    exact = evaluate_embeddings(x, x, labels, labels, exclude=np.arange(len(x)))
    again = approximate_rows({"hnsw": {"ef_search": 16}}, x, x, labels, labels, exclude=np.arange(len(x)),
                             exact_neighbors=exact.neighbors)
    assert again["hnsw/recall@8_vs_exact"] == rows["hnsw/recall@8_vs_exact"]


def test_auto_parameters_respect_faiss_minimums():
    assert auto_nlist(60_502) == min(round(4 * 60_502 ** 0.5), 60_502 // 39) == 984
    assert auto_nlist(100) == 2 and auto_nlist(10) == 1
    assert auto_subquantizers(512) == 128 and auto_subquantizers(128) == 32 and auto_subquantizers(30) == 6
    assert auto_nbits(1_000_000) == 8 and auto_nbits(2000) == 5


def test_a_pq_that_cannot_split_the_dimension_says_which_key():
    x, labels = clustered(d=30)
    with pytest.raises(UserInputError, match="evaluation.ivfpq.m=4"):
        approximate_rows({"ivfpq": {"m": 4}}, x, x, labels, labels)


def test_a_run_with_indexes_reports_their_rows_beside_the_exact_one(tmp_path):
    from irlab.runner import run
    from tests.helpers import compose_config

    cfg = compose_config(["debug=fast", "trainer.accelerator=cpu", "evaluation.indexes=[ivfpq,hnsw]"],
                         output_dir=tmp_path)
    metrics = run(cfg)
    for stage in ("val", "test"):
        assert f"{stage}/R@1" in metrics
        for name in ("ivfpq", "hnsw"):
            assert 0.0 <= metrics[f"{stage}/{name}/R@1"] <= 1.0 and f"{stage}/{name}/recall@8_vs_exact" in metrics
    with pytest.raises(UserInputError, match="evaluation.indexes: unknown"):
        run(compose_config(["debug=fast", "evaluation.indexes=[annoy]"], output_dir=tmp_path / "bad"))
