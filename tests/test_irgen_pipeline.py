"""The IRGen pipeline as users run it: tokenizer stage from the CLI, then reuse / refusal in-process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from omegaconf import open_dict

from irgen.artifact import StaleArtifactError, load_artifact
from irgen.kmeans import TooFewPointsError
from irgen.pipeline import IRGEN, STAGE_ORDER, STAGES
from irgen.signatures import artifact_expectation
from irgen.stage_trainer import load_weights
from irgen.tokenizer import encode_records
from irlab.builders import build_datamodule, build_model
from irlab.methods import method_named
from irlab.runner import run
from tests.helpers import REPO, compose_config

# 16 px digits and a capped k-means pass keep the whole CLI run to a few seconds of compute
FAST = ["experiment=digits_irgen", "dataset=digits", "irgen.tokenizer.encoder.arch=vit_tiny",
        "irgen.stage=tokenizer", "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.accelerator=cpu",
        "dataset.image_size=16", "dataset.resize_size=16", "irgen.tokenizer.kmeans_max_points=256"]


@pytest.mark.slow
def test_tokenizer_stage_cli_then_reuse_then_refuse_stale(tmp_path, caplog):
    logs = tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", *FAST, f"paths.log_dir={logs}",
                           f"hydra.run.dir={tmp_path / 'run1'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    art_dir = logs / "irgen_artifacts" / "digits_closed_set_seed42"
    art_path, last = art_dir / "identifiers.pt", art_dir / "tokenizer" / "last.ckpt"
    assert art_path.is_file() and last.is_file()
    stats = json.loads((art_dir / "identifier_stats.json").read_text())["metrics"]
    for key in ("collision_rate", "distinct_identifiers", "perplexity_l0", "usage_l3", "raw_R@1",
                "quantized_R@1", "prefix_R@1", "images_per_identifier_max"):
        assert key in stats, key
    assert 1 <= stats["distinct_identifiers"] <= 1797 and 0 <= stats["collision_rate"] <= 1
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())["metrics"]
    assert metrics["tokenizer/quantized_R@1"] == stats["quantized_R@1"] and "val/R@1" in metrics

    # second call, same config (in-process to save a start-up): the artifact is reused, nothing retrains
    cfg = compose_config(FAST, output_dir=tmp_path)
    assert cfg.irgen.artifact_dir == str(art_dir)
    stamp = (art_path.stat().st_mtime_ns, last.stat().st_mtime_ns)
    with caplog.at_level(logging.INFO, logger="irgen.pipeline"):
        again = run(cfg)
    assert "reusing identifier artifact" in caplog.text
    assert (art_path.stat().st_mtime_ns, last.stat().st_mtime_ns) == stamp
    assert again["tokenizer/quantized_R@1"] == stats["quantized_R@1"]

    dm = build_datamodule(cfg)
    artifact = load_artifact(art_path, expected=artifact_expectation(cfg, dm))
    assert artifact.codes.shape == (len(dm.records), 4) and artifact.codebooks.shape == (4, 16, 128)
    assert artifact.meta["dataset"]["protocol"] == "closed_set"

    # another tokenizer config must not silently use these identifiers
    stale = compose_config(FAST + ["irgen.tokenizer.num_codes=8"], output_dir=tmp_path)
    with pytest.raises(StaleArtifactError, match="num_codes") as err:
        run(stale)
    # the command that rebuilds is this run's own command line (its overrides kept), not a template
    assert "python train.py experiment=digits_irgen" in str(err.value)
    assert "irgen.tokenizer.num_codes=8 irgen.stage=tokenizer irgen.rebuild=true" in str(err.value)
    assert torch.equal(load_artifact(art_path, expected=artifact_expectation(cfg, dm)).codes, artifact.codes)


def test_stage_registry_and_unknown_stage(tmp_path):
    assert STAGE_ORDER[0] == "tokenizer" and "tokenizer" in STAGES
    cfg = compose_config(FAST[:1] + ["irgen.stage=decoder"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="irgen.stage"):
        run(cfg)


def test_irgen_experiments_use_the_paper_protocol_and_share_the_tokenizer_config(tmp_path):
    cfg = compose_config(["experiment=digits_irgen"], output_dir=tmp_path)
    assert method_named(cfg.method.name) is IRGEN
    assert cfg.protocol.name == "closed_set"
    assert cfg.irgen.tokenizer._target_ == "irgen.tokenizer.IRGenTokenizer"
    assert cfg.irgen.stage == "all" and cfg.irgen.rebuild is False
    assert cfg.irgen.artifact_dir.endswith("irgen_artifacts/digit_pairs_closed_set_seed42")
    zero = compose_config(["experiment=digits_irgen", "protocol=zero_shot"], output_dir=tmp_path)
    assert zero.irgen.artifact_dir.endswith("irgen_artifacts/digit_pairs_zero_shot_seed42")


def test_tiny_dataset_reduces_codes_or_says_what_to_change(fake_data_dir, tmp_path, caplog):
    """Fake In-shop, closed-set (trainval): 6 train + 4 gallery images train the tokenizer, for 256 codes."""
    tiny = ["experiment=isc_irgen", "irgen.stage=tokenizer", f"paths.data_dir={fake_data_dir}",
            "irgen.tokenizer.encoder.arch=vit_tiny", "irgen.tokenizer.encoder.pretrained=false",
            "dataset.image_size=16", "dataset.resize_size=16", "dataset.num_workers=0", "trainer.max_epochs=1",
            "trainer.accelerator=cpu", "dataset.val_fraction=0"]  # all 10 training images train the tokenizer
    with pytest.raises(TooFewPointsError, match="irgen.tokenizer.min_points_per_code"):
        run(compose_config(tiny + ["irgen.tokenizer.min_points_per_code=6"], output_dir=tmp_path))
    with caplog.at_level(logging.WARNING, logger="irgen.kmeans"):
        metrics = run(compose_config(tiny + ["irgen.tokenizer.min_points_per_code=1"], output_dir=tmp_path))
    assert "reducing num_codes to 10" in caplog.text
    assert metrics["tokenizer/codes_per_level"] == 10 and metrics["tokenizer/images"] == 12
    artifact = torch.load(tmp_path / "logs" / "irgen_artifacts" / "isc_closed_set_seed42" / "identifiers.pt",
                          weights_only=True)
    assert artifact["codebooks"].shape[:2] == (4, 10) and artifact["codes"].shape == (12, 4)

    # interrupted after training (artifact never written): the next run resumes from last.ckpt, no retraining,
    # and encodes the same identifiers; another config may not resume it
    art_dir = tmp_path / "logs" / "irgen_artifacts" / "isc_closed_set_seed42"
    (art_dir / "identifiers.pt").unlink()
    stamp = (art_dir / "tokenizer" / "last.ckpt").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="irgen.pipeline"):
        run(compose_config(tiny + ["irgen.tokenizer.min_points_per_code=1"], output_dir=tmp_path))
    assert "resuming the interrupted stage" in caplog.text
    assert (art_dir / "tokenizer" / "last.ckpt").stat().st_mtime_ns == stamp  # finished training: not redone
    assert torch.equal(torch.load(art_dir / "identifiers.pt", weights_only=True)["codes"], artifact["codes"])
    (art_dir / "identifiers.pt").unlink()
    with pytest.raises(StaleArtifactError, match="interrupted tokenizer run"):
        run(compose_config(tiny + ["irgen.tokenizer.min_points_per_code=1", "irgen.tokenizer.kmeans_niter=7"],
                           output_dir=tmp_path))


class ScrambleEncoderAtTrainEnd(L.Callback):
    """Changes the in-memory encoder after the last checkpoint was written: the artifact must not see it."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            for p in pl_module.encoder.parameters():
                p.add_(torch.randn_like(p))


def test_tokenizer_encodes_identifiers_with_the_selected_checkpoint(tmp_path):
    cfg = compose_config(FAST, output_dir=tmp_path)
    with open_dict(cfg):
        cfg.callbacks["scramble"] = {"_target_": f"{__name__}.ScrambleEncoderAtTrainEnd"}
    run(cfg)
    dm = build_datamodule(cfg)
    artifact = load_artifact(tmp_path / "logs" / "irgen_artifacts" / "digits_closed_set_seed42" / "identifiers.pt",
                             expected=artifact_expectation(cfg, dm))
    chosen = artifact.meta["checkpoint"]
    assert artifact.meta["checkpoint_selection"] == "best val/R@1" and not chosen.endswith("last.ckpt")
    model = build_model(cfg.irgen.tokenizer, dm, num_codes=artifact.num_codes)
    load_weights(model, chosen)
    codes, _ = encode_records(model, dm)
    assert torch.equal(codes, artifact.codes)


def test_reference_recipe_trains_both_stages(tmp_path):
    """recipe=irgen_paper: reference heads, loss, betas, schedules and transforms run (tiny images here)."""
    from tests.test_irgen_generator import PIPELINE_FAST

    cfg = compose_config(PIPELINE_FAST + ["recipe=irgen_paper", "dataset.image_size=16", "dataset.resize_size=20",
                                          "dataset.batch_size=32"], output_dir=tmp_path)
    tok, gen = cfg.irgen.tokenizer, cfg.irgen.generator
    assert (tok.head, tok.loss_form, tok.scheduler._target_, gen.scheduler._target_) == (
        "linear_separate", "reference", "irlab.schedules.cosine_restarts", "irlab.schedules.cosine_restarts")
    assert tok.scheduler.t_initial == 50 and gen.scheduler.cycle_limit == 4 and gen.optimizer.betas == [0.9, 0.96]
    assert cfg.dataset.resize_mode == "short_side" and cfg.dataset.hflip is False
    metrics = run(cfg)
    for key in ("test/R@1", "test/rerank/R@1", "test/knn/R@1", "tokenizer/quantized_R@1"):
        assert 0 <= metrics[key] <= 1, key


def test_debug_fast_limits_every_stage_and_leaves_no_real_artifact(tmp_path):
    from irgen.stage_trainer import stage_trainer_config

    cfg = compose_config(["experiment=isc_irgen", "debug=fast"], output_dir=tmp_path)
    generator = stage_trainer_config(cfg, "generator")
    assert generator.max_epochs == 1 and generator.limit_train_batches == 2  # not the preset's 100 epochs
    cfg = compose_config(["experiment=digits_irgen", "dataset=digits", "irgen.tokenizer.encoder.arch=vit_tiny",
                          "debug=fast", "trainer.accelerator=cpu",
                          "dataset.image_size=16", "dataset.resize_size=16", "irgen.tokenizer.kmeans_max_points=256",
                          "irgen.generator.width=32", "irgen.generator.layers=1", "irgen.generator.heads=2"],
                         output_dir=tmp_path)
    metrics = run(cfg)
    assert "test/R@1" in metrics
    artifacts = tmp_path / "logs" / "irgen_artifacts"
    assert sorted(p.name for p in artifacts.iterdir()) == ["digits_closed_set_seed42_debug"]
    run(cfg)  # a second smoke test with the same folder rebuilds instead of refusing or reusing
