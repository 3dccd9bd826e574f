"""bench/areir_claim.py's bookkeeping, without training: which run comes next, how a row's learning rate is
chosen, that finished runs survive a restart, and how the verdict is judged."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def claim():
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("areir_claim_bench", REPO / "bench" / "areir_claim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_args(**kw) -> Namespace:
    return Namespace(**{"lrs": [5e-4, 1e-3, 2e-3], "seeds": [1, 2, 3], "weight_decay": 1e-4, "extra": [],
                         "select_seeds": [1], **kw})


def finish(claim, cache, table, key, lr, seed, val, test=0.5, args=None):
    overrides = claim.run_overrides(table[key], lr, seed, args or bench_args())
    cache.add({"row": key, "lr": lr, "seed": seed, "overrides": overrides, "val": val, "test": test, "wall": 1.0,
               "jobs": 1, "threads": 2, "commit": "x", "date": "today"})


def test_rows_share_runs_where_a_sweep_point_is_a_main_row(claim):
    table = claim.rows()
    assert table["E=1"] == table["b"] and table["E=16"] == table["a"] == table["M=8"] and table["M=40"] == table["d"]
    # equal member parameters across the E sweep, to within the width step
    budget = claim.member_params(16, 32, 8)
    for members in (1, 4, 8, 16, 32):
        width = int(table[f"E={members}"][3].split("=")[1])
        assert abs(members * claim.member_params(1, width, 8) - budget) / budget < 0.25


def test_selection_runs_first_then_the_seeds_at_the_best_validation_rate(claim, tmp_path):
    table, args = claim.rows(), bench_args()
    cache = claim.RunCache(tmp_path / "runs.jsonl")
    keys = ["a", "a-48", "b"]
    first = claim.next_run(keys, table, cache, set(), args)
    assert first[:3] == ("a", 5e-4, 1)
    busy = {claim.json.dumps(first[3])}
    assert claim.next_run(keys, table, cache, busy, args)[:3] == ("a", 1e-3, 1)

    for lr, val in zip(args.lrs, [0.3, 0.8, 0.1], strict=True):
        finish(claim, cache, table, "a", lr, 1, val)
    assert claim.selected_lr("a", table, cache, args) == 1e-3
    assert claim.selected_lr("a-48", table, cache, args) == 1e-3  # borrowed from (a), no grid of its own
    assert claim.next_run(keys, table, cache, set(), args)[:3] == ("a", 1e-3, 2)

    # a best rate on the grid's edge is not a choice: one step beyond it runs before the seeds
    edge = claim.RunCache(tmp_path / "edge.jsonl")
    for lr, val in zip(args.lrs, [0.3, 0.5, 0.8], strict=True):
        finish(claim, edge, table, "b", lr, 1, val)
    assert claim.lr_grid("b", table, edge, args) == [5e-4, 1e-3, 2e-3, 4e-3]
    assert claim.selected_lr("b", table, edge, args) is None
    assert claim.next_run(["b"], table, edge, set(), args)[:3] == ("b", 4e-3, 1)
    finish(claim, edge, table, "b", 4e-3, 1, 0.6)
    assert claim.selected_lr("b", table, edge, args) == 2e-3  # back inside the grid: no second extension
    assert claim.next_run(["b"], table, edge, set(), args)[:3] == ("b", 2e-3, 2)
    # a new edge that wins extends again, up to MAX_EXTENSIONS steps
    for lr, val in [(5e-4, 0.1), (1e-3, 0.2), (2e-3, 0.3), (4e-3, 0.4), (8e-3, 0.5)]:
        finish(claim, edge, table, "c", lr, 1, val)
    assert claim.lr_grid("c", table, edge, args) == [5e-4, 1e-3, 2e-3, 4e-3, 8e-3][:3 + claim.MAX_EXTENSIONS]
    assert claim.selected_lr("c", table, edge, args) == 2e-3 * 2 ** claim.MAX_EXTENSIONS

    # a restart reads the finished runs back and asks for the same next run
    reloaded = claim.RunCache(tmp_path / "runs.jsonl")
    assert claim.next_run(keys, table, reloaded, set(), args)[:3] == ("a", 1e-3, 2)
    for seed in (2, 3):
        finish(claim, reloaded, table, "a", 1e-3, seed, 0.7)
    assert claim.next_run(keys, table, reloaded, set(), args)[:3] == ("a-48", 1e-3, 1)


def test_an_e48_row_waits_for_its_e16_row(claim, tmp_path):
    table, args = claim.rows(), bench_args()
    cache = claim.RunCache(tmp_path / "runs.jsonl")
    assert claim.next_run(["a-48"], table, cache, set(), args) is None


def test_verdict_needs_every_control_beaten_by_more_than_one_std(claim):
    args = bench_args()
    results = {"a": {"test": [0.60, 0.62, 0.64]}, "b": {"test": [0.1] * 3}, "c": {"test": [0.5] * 3},
               "d": {"test": [0.605] * 3}}
    plain, norm = claim.verdict(results, args)
    assert "does not hold" in plain and norm.startswith("No verdict yet")  # (d) is within (a)'s std
    results["d"] = {"test": [0.55] * 3}
    assert "holds" in claim.verdict(results, args)[0] and "does not" not in claim.verdict(results, args)[0]
    # the same rows under the normalised loss get their own verdict
    results |= {f"{k}-norm": {"test": v["test"]} for k, v in results.items()}
    results["d-norm"] = {"test": [0.7] * 3}
    plain, norm = claim.verdict(results, args)
    assert "the claim holds" in plain and "does not hold" in norm and "(a-norm)" in norm
    # one control within (a)'s std settles it before the others have run; all beaten does not
    del results["b-norm"]
    assert "does not hold" in claim.verdict(results, args)[1] and "(b-norm) not run" in claim.verdict(results, args)[1]
    del results["d"]
    assert claim.verdict(results, args)[0].startswith("No verdict")
    assert claim.verdict(results, bench_args(seeds=[1]))[0].startswith("No verdict")


def test_selection_on_the_mean_over_seeds_discards_a_rate_that_diverges_at_one(claim, tmp_path):
    table, args = claim.rows(), bench_args(select_seeds=[1, 2])
    cache = claim.RunCache(tmp_path / "runs.jsonl")
    for lr, (v1, v2) in zip(args.lrs, [(0.3, 0.3), (0.7, 0.7), (0.8, 0.2)], strict=True):
        assert claim.selected_lr("c", table, cache, args) is None
        finish(claim, cache, table, "c", lr, 1, v1)
        finish(claim, cache, table, "c", lr, 2, v2)
    assert claim.selected_lr("c", table, cache, args) == 1e-3  # seed 1 alone would pick 2e-3
    # seed 1 alone prefers the top rate, so it would extend the grid instead
    assert claim.lr_grid("c", table, cache, bench_args()) == [5e-4, 1e-3, 2e-3, 4e-3]
    assert claim.next_run(["c"], table, cache, set(), args)[:3] == ("c", 1e-3, 3)
