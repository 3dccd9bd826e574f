"""Hydra multirun: one folder per job, a summary CSV/table at the end, one W&B run per job grouped by sweep."""

import csv
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from irlab.sweep import find_job_dirs, summarize
from tests.helpers import REPO
from tests.scripts.wandb_records import run_record


def _fake_job(sweep, name, overrides, metrics=None):
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps({"metrics": metrics, "data": {}}))
    (job / "wandb").mkdir()  # nested folders are not jobs


def test_summary_csv_from_job_folders(tmp_path):
    _fake_job(tmp_path, "0", ["lr=0.1", "seed=1"], {"val/R@1": 0.5, "test/R@1": 0.4})
    _fake_job(tmp_path, "2", ["lr=0.2", "seed=1"], {"val/R@1": 0.7})
    _fake_job(tmp_path, "10", ["lr=0.3", "seed=1"])  # crashed: no metrics.json
    assert [d.name for d in find_job_dirs(tmp_path)] == ["0", "2", "10"]
    path, jobs = summarize(tmp_path, ["val/R@1", "test/R@1"])
    rows = list(csv.DictReader(path.open()))
    assert [r["job"] for r in rows] == ["0", "2", "10"]
    assert [r["lr"] for r in rows] == ["0.1", "0.2", "0.3"] and rows[0]["seed"] == "1"
    assert [r["val/R@1"] for r in rows] == ["0.5", "0.7", ""] and rows[0]["test/R@1"] == "0.4"
    assert [r["best"] for r in rows] == ["0", "1", "0"]
    assert [r["status"] for r in rows] == ["ok", "ok", "missing"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        summarize(tmp_path / "nope", ["val/R@1"])


@pytest.mark.slow
def test_two_job_multirun_with_wandb(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "model.embedding_dim=8,16", "debug=fast", "trainer.accelerator=cpu",
         "dataset.image_size=16", "dataset.resize_size=16", "dataset.batch_size=16", "dataset.eval_batch_size=64",
         "logger=wandb", f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["model.embedding_dim"], r["status"]) for r in rows] == [("0", "8", "ok"), ("1", "16", "ok")]
    for row in rows:
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())["metrics"]
        assert float(row["val/R@1"]) == metrics["val/R@1"] and float(row["test/R@1"]) == metrics["test/R@1"]
    assert "sweep sweep: 2 jobs" in proc.stdout and "model.embedding_dim" in proc.stdout
    # one W&B run per job (the first run was finished, not reused), grouped by sweep, named by overrides
    runs = [run_record(sweep / job) for job in ("0", "1")]
    assert runs[0].run_id != runs[1].run_id
    assert {r.run_group for r in runs} == {"sweep"}
    assert runs[0].display_name.startswith("dataset.batch_size=16") and "model.embedding_dim=8" in runs[0].display_name
    assert "paths.log_dir" not in runs[0].display_name  # where files go is not part of a run's identity


@pytest.mark.parametrize("plugin,override", [("hydra_plugins.hydra_optuna_sweeper", "hparams_search=digits_optuna"),
                                             ("hydra_plugins.hydra_submitit_launcher", "hydra/launcher=slurm")])
def test_optional_sweeper_and_launcher_configs_compose(plugin, override, tmp_path):
    """Only with the `optuna` / `slurm` extras installed (the plugins provide the base configs)."""
    pytest.importorskip(plugin)
    from tests.helpers import compose_config

    cfg = compose_config([override, "trainer=ddp", "trainer.num_nodes=2"], output_dir=tmp_path)
    if "optuna" in override:
        assert cfg.hydra.sweeper.direction == "maximize" and "model.optimizer.lr" in cfg.hydra.sweeper.params
    else:
        assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (2, 8)


def _job_with_split(sweep, name, overrides, metrics, fingerprint="a", wall=10.0):
    _fake_job(sweep, name, overrides, None)
    content = {"metrics": metrics, "data": {}, "provenance": {"split_fingerprint": fingerprint, "wall_seconds": wall}}
    (sweep / name / "metrics.json").write_text(json.dumps(content))


def test_leaderboard_groups_seeds_and_refuses_different_splits(tmp_path):
    from irlab.leaderboard import leaderboard_rows, write_leaderboard

    irgen = {"test/R@1": 0.5, "test/P@8": 0.4, "test/MAP@R": 0.1, "test/knn/R@1": 0.6, "test/rerank/R@1": 0.55}
    _job_with_split(tmp_path, "0", ["experiment=a", "seed=1"], {"test/R@1": 0.2, "test/MAP@R": 0.1}, wall=10)
    _job_with_split(tmp_path, "1", ["experiment=a", "seed=2"], {"test/R@1": 0.4, "test/MAP@R": 0.3}, wall=20)
    _job_with_split(tmp_path, "2", ["experiment=b", "seed=1"], irgen)
    _job_with_split(tmp_path, "3", ["experiment=b", "seed=2"], {**irgen, "test/R@1": 0.7})
    _job_with_split(tmp_path, "4", ["experiment=c", "seed=1"], {"test/R@1": 0.2}, fingerprint="a")
    _job_with_split(tmp_path, "5", ["experiment=c", "seed=2"], {"test/R@1": 0.9}, fingerprint="b")
    _, jobs = summarize(tmp_path, ["test/R@1"])
    rows = {r["name"]: r for r in leaderboard_rows(jobs)}
    assert list(rows) == ["experiment=a", "experiment=b", "experiment=b / rerank", "experiment=b / knn",
                          "experiment=c"]
    a = rows["experiment=a"]
    assert a["seeds"] == 2 and a["wall_seconds"] == 15.0
    assert a["metrics"]["R@1"] == pytest.approx((0.3, 0.1)) and a["metrics"]["MAP@R"] == pytest.approx((0.2, 0.1))
    assert rows["experiment=b"]["metrics"]["R@1"] == pytest.approx((0.6, 0.1))
    assert set(rows["experiment=b"]["metrics"]) == {"R@1", "P@8", "MAP@R"}
    assert rows["experiment=b / knn"]["metrics"] == {"R@1": pytest.approx((0.6, 0.0))}
    assert rows["experiment=c"]["status"] == "different splits: not averaged" and not rows["experiment=c"]["metrics"]
    csv_path, png = write_leaderboard(tmp_path, list(rows.values()))
    table = list(csv.DictReader(csv_path.open()))
    assert table[0]["row"] == "experiment=a" and float(table[0]["R@1_mean"]) == pytest.approx(0.3)
    assert png is not None and png.stat().st_size > 0

