"""W&B offline: a run logs its config, metrics, figures and (when asked) checkpoints; sweep naming of runs."""

import json

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from irlab.runner import run
from irlab.sweep import wandb_logger
from tests.helpers import compose_config
from tests.scripts.wandb_records import finished_run_log, records

FAST = ["debug=fast", "trainer.accelerator=cpu", "dataset=digits", "dataset.image_size=16", "dataset.resize_size=16",
        "dataset.batch_size=16", "dataset.eval_batch_size=64"]


@pytest.mark.slow
def test_offline_wandb_run_contents(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config([*FAST, "logger=wandb", "logger.wandb.log_model=true"], output_dir=tmp_path)
    try:
        metrics = run(cfg)
    finally:
        wandb.finish()
    log = finished_run_log(tmp_path)
    files = log.parent / "files"
    images = sorted(p.parent.name + "/" + p.name.split("_step")[0].rsplit("_", 2)[0]
                    for p in (files / "media" / "images").rglob("*.png"))
    assert images == ["test/pr_curve_image", "test/retrieval_grid", "val/pr_curve_image", "val/retrieval_grid"]
    assert sorted(p.parent.name for p in (files / "media" / "table").rglob("*.table.json")) == ["test", "val"]

    config, summary, artifacts = {}, {}, []
    for record in records(log):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.config.update})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): item.value_json for item in record.summary.update})
        elif kind == "artifact":
            artifacts.append((record.artifact.type, [m.path for m in record.artifact.manifest.contents]))
    assert config["cfg"]["model"]["embedding_dim"] == cfg.model.embedding_dim
    assert config["model/params_total"] > 500_000 and config["data"]["dataset"] == "digits"
    assert float(summary["val/R@1"]) == pytest.approx(metrics["val/R@1"])
    assert float(summary["test/R@1"]) == pytest.approx(metrics["test/R@1"])
    assert ("model", ["model.ckpt"]) in artifacts  # log_model=true: checkpoint uploaded as an artifact


def test_multirun_jobs_are_grouped_by_sweep(tmp_path):
    cfg = compose_config(["logger=wandb"], output_dir=tmp_path)
    single = wandb_logger(name="train", project="irlab", save_dir=str(tmp_path))
    assert single._wandb_init["name"] == "train" and single._wandb_init.get("group") is None
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "2026-01-01_12-00-00")
        cfg.hydra.job.override_dirname = "model.embedding_dim=32,seed=1"
    HydraConfig().set_config(cfg)
    job = wandb_logger(name="train", project="irlab", save_dir=str(tmp_path))
    assert job._wandb_init["group"] == "2026-01-01_12-00-00"
    assert job._wandb_init["name"] == "model.embedding_dim=32,seed=1"
    explicit = wandb_logger(name="train", group="ablation", project="irlab", save_dir=str(tmp_path))
    assert explicit._wandb_init["group"] == "ablation"


@pytest.mark.slow
def test_irgen_tokenizer_codebook_usage_reaches_wandb(tmp_path, monkeypatch):
    """The identifier-statistics callback's histograms and per-level perplexity land in the offline run."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config(["experiment=digits_irgen", "dataset=digits", "irgen.tokenizer.encoder.arch=vit_tiny",
                          "irgen.stage=tokenizer", *FAST[:2], *FAST[3:], "irgen.tokenizer.kmeans_max_points=256",
                          "logger=wandb"], output_dir=tmp_path)
    try:
        run(cfg)
    finally:
        wandb.finish()
    log = finished_run_log(tmp_path)
    images = {p.parent.name + "/" + p.name.split("_step")[0].rsplit("_", 2)[0]
              for p in (log.parent / "files" / "media" / "images").rglob("*.png")}
    assert "val/identifier_usage" in images
    summary = {}
    for record in records(log):
        if record.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): item.value_json for item in record.summary.update})
    levels = cfg.irgen.tokenizer.num_levels
    for level in range(levels):
        perplexity = float(summary[f"ids/level{level}/perplexity"])
        assert 1.0 <= perplexity <= cfg.irgen.tokenizer.num_codes
        assert 0.0 < float(summary[f"ids/level{level}/used_fraction"]) <= 1.0
