"""Ranking rows grouped for reading side by side: metrics.json and the printed table."""

import json

from irlab.reporting import metric_rows, print_metrics, write_metrics

METRICS = {"test/R@1": 0.3, "test/R@10": 0.6, "test/P@10_irgen": 0.2, "test/P@10": 0.1, "test/knn/R@1": 0.5,
           "test/rerank/R@1": 0.4, "test/knn/MAP@R": 0.2, "test/search_seconds": 1.5, "val/R@1": 0.25,
           "tokenizer/val/R@1": 0.7, "train/loss": 2.0}
ROWS = {"": "generative (paper)", "rerank": "generative + rerank", "knn": "kNN, same encoder"}


def test_rows_group_by_stage_and_ranking_in_a_fixed_order():
    rows = metric_rows(METRICS, ROWS)
    assert list(rows) == ["val", "test"]
    assert list(rows["test"]) == ["generative (paper)", "generative + rerank", "kNN, same encoder"]
    assert list(rows["test"]["generative (paper)"]) == ["R@1", "R@10", "P@10", "P@10_irgen"]
    assert rows["test"]["kNN, same encoder"] == {"R@1": 0.5, "MAP@R": 0.2}
    assert "search_seconds" not in rows["test"]["generative (paper)"]  # not a ranking metric


def test_metrics_json_and_table_show_every_row(tmp_path, capsys):
    saved = json.loads(write_metrics(tmp_path / "metrics.json", METRICS, {"dataset": "x"}, ROWS).read_text())
    assert saved["metrics"] == METRICS and saved["rows"] == metric_rows(METRICS, ROWS)
    print_metrics(METRICS, "run", ROWS)
    out = capsys.readouterr().out
    for text in ("generative (paper)", "kNN, same encoder", "P@10_irgen", "test/search_seconds", "train/loss",
                 "test R@1 = 0.3000"):
        assert text in out, text
