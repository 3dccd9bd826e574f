"""End to end: the runner trains and tests in-process; the CLI apps run as users type them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from irlab.checkpoints import resolve_ckpt_path
from irlab.runner import run
from tests.helpers import REPO, compose_config

FAST = ["debug=fast", "trainer.accelerator=cpu", "model.arch=resnet18", "dataset.batch_size=16"]


def test_baseline_fit_and_test_in_process(tmp_path):
    cfg = compose_config(FAST + ["dataset=digits", "trainer.limit_val_batches=1.0", "trainer.limit_test_batches=1.0"],
                         output_dir=tmp_path)
    metrics = run(cfg)
    for key in ("val/R@1", "test/R@1", "test/MAP@R", "test/mAP"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # a randomly initialised trunk after 2 steps is still far better than chance (0.2 for 5 test digits)
    assert metrics["test/R@1"] > 0.3
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["data"]["protocol"] == "zero_shot" and saved["data"]["dataset"] == "digits"
    # debug=fast keeps the selected model's weights only (no optimizer state, no last.ckpt): 2 x 531 MB per
    # smoke test for a 4-member AREIR was what filled users' disks
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_000.ckpt"]
    # checkpoints hold tensors and plain data only: loadable without unpickling code
    state = torch.load(tmp_path / "checkpoints" / "epoch_000.ckpt", weights_only=True)
    assert "state_dict" in state and "optimizer_states" not in state


def test_resolve_ckpt_path_errors_say_how_to_fix(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="hydra.run.dir"):
        resolve_ckpt_path("last", tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)


@pytest.mark.slow
def test_cli_train_then_eval_from_the_checkpoint_alone(tmp_path):
    """`eval.py ckpt_path=X` with no experiment: the run that wrote X supplies its config, and the test metrics
    are reproduced exactly; debug=fast kept the selected weights and no full training state."""
    run_dir = tmp_path / "run"
    common = [f"paths.log_dir={tmp_path / 'logs'}", "trainer.accelerator=cpu"]
    train = subprocess.run(
        [sys.executable, "train.py", "debug=fast", "model.embedding_dim=48", f"hydra.run.dir={run_dir}", *common],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "R@1 =" in train.stdout
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()  # debug=fast: no optimizer state on disk
    (ckpt,) = (run_dir / "checkpoints").glob("epoch_*.ckpt")
    evaluate = subprocess.run(
        [sys.executable, "eval.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    trained = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    metrics = json.loads(Path(tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["test/R@1"] == trained["test/R@1"] and metrics["test/MAP@R"] == trained["test/MAP@R"]


def test_last_ckpt_is_the_final_epoch_and_the_selected_model_is_weights_only(tmp_path):
    cfg = compose_config(["trainer.accelerator=cpu", "model.arch=resnet18", "dataset.batch_size=16", "dataset=digits",
                          "trainer.max_epochs=3", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
                          "trainer.limit_test_batches=2", "seed=3"], output_dir=tmp_path)
    run(cfg)
    folder = tmp_path / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and "optimizer_states" in last  # full state of the final epoch: resumable
    (best,) = folder.glob("epoch_*.ckpt")
    selected = torch.load(best, weights_only=True)
    assert "optimizer_states" not in selected and "state_dict" in selected
