"""DDP: evaluation gathered across 2 CPU processes equals single-process evaluation; extra ranks re-run the job.

The 2-process run is a subprocess (Lightning re-executes the command line for rank 1, which must not be pytest).
The evaluated set (closed-set digits test split, 1797 images) has an odd size, so the DistributedSampler pads
rank 1 with a duplicate: the gather must de-duplicate by dataset index for the numbers to match.
"""

import json
import subprocess
import sys

import pytest
import torch

from datamodules.digits import DigitsDataModule
from irlab.baseline import EmbeddingBaseline
from irlab.distributed import child_command, ddp_env_snapshot, end_ddp_job
from irlab.runner import run
from tests.helpers import REPO, compose_config

EVAL = ["dataset=digits", "model.arch=resnet18", "protocol=closed_set", "model.embedding_dim=32",
        "dataset.eval_batch_size=300", "split=test",
        "dataset.image_size=16", "dataset.resize_size=16"]  # 16 px: same code paths, a quarter of the compute


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised baseline (weights only): evaluation must not depend on how many ranks ran it."""
    dm = DigitsDataModule(protocol="closed_set")
    dm.setup()
    assert len(dm.eval_set("test")) % 2 == 1, "the test needs an odd-sized set so that the sampler pads"
    torch.manual_seed(0)
    model = EmbeddingBaseline(num_classes=dm.num_classes, arch="resnet18", embedding_dim=32)
    path = tmp_path_factory.mktemp("ckpt") / "random.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.mark.slow
def test_two_process_ddp_metrics_equal_single_process(checkpoint, tmp_path):
    single = run(compose_config([*EVAL, "trainer=cpu", f"ckpt_path={checkpoint}"], config_name="eval",
                                output_dir=tmp_path / "single"), "evaluate")
    ddp_dir = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "tests/scripts/ddp_eval.py", *EVAL, "trainer=ddp_cpu", f"ckpt_path={checkpoint}",
         f"hydra.run.dir={ddp_dir}", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "limited loader" not in proc.stdout + proc.stderr  # every image was evaluated
    ranks = [json.loads((ddp_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    # only rank 0 ran the search, over the whole de-duplicated set; rank 1 waited for the broadcast
    assert ranks[0]["searched"] == [1797] and ranks[1]["searched"] == []
    written = json.loads((ddp_dir / "metrics.json").read_text())["metrics"]
    for key, value in single.items():
        if key.endswith("search_seconds"):
            continue
        for got in (written[key], ranks[0]["metrics"][key], ranks[1]["metrics"][key]):
            assert got == pytest.approx(value, abs=1e-6), key
    assert single["test/queries_evaluated"] == 355


def test_child_command_reruns_the_job_not_the_sweep():
    argv = ["train.py", "-m", "--config-dir", "/extra/conf", "model.embedding_dim=16,32", "trainer=ddp"]
    cmd = child_command(
        argv, ["python", "/repo/train.py"], "train",
        task_overrides=["model.embedding_dim=32", "trainer=ddp"],
        hydra_overrides=["hydra.mode=MULTIRUN", "hydra.sweep.dir=/s", "hydra/launcher=slurm", "hydra.job.chdir=true"],
        output_dir="/s/1", local_rank=1,
    )
    assert "-m" not in cmd and "model.embedding_dim=16,32" not in cmd
    assert cmd[:4] == ["python", "/repo/train.py", "--config-dir", "/extra/conf"]
    assert "--config-name=train" in cmd and "model.embedding_dim=32" in cmd and "hydra.job.chdir=true" in cmd
    assert not any(c.startswith(("hydra.mode", "hydra.sweep", "hydra/launcher")) for c in cmd)
    assert 'hydra.run.dir="/s/1"' in cmd and "hydra.output_subdir=null" in cmd


def test_end_ddp_job_restores_launcher_environment(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "node7")
    snapshot = ddp_env_snapshot()
    monkeypatch.setenv("LOCAL_RANK", "0")  # what Lightning's launcher leaves behind in the launching process
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    end_ddp_job(snapshot)
    import os

    assert "LOCAL_RANK" not in os.environ and os.environ["MASTER_ADDR"] == "node7"


@pytest.mark.slow
def test_irgen_two_job_multirun_under_ddp(tmp_path):
    """Every IRGen stage's trainer goes through `build_trainer`: under ``-m``, the extra DDP rank re-runs its own
    job (both stages), not the sweep, and each job ends with a generator result."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "experiment=digits_irgen", "dataset=digits",
         "irgen.tokenizer.encoder.arch=vit_tiny", "trainer=ddp_cpu", "debug=fast", "seed=1,2",
         "dataset.image_size=16", "dataset.resize_size=16", "irgen.tokenizer.kmeans_max_points=256",
         "irgen.generator.width=32", "irgen.generator.layers=1", "irgen.generator.heads=2", "torch_threads=1",
         f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path / 'logs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1"]
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())["metrics"]
        assert 0 <= metrics["test/R@1"] <= 1 and 0 <= metrics["test/knn/R@1"] <= 1
    assert "sweep sweep: 2 jobs" in proc.stdout


@pytest.mark.slow
def test_unreadable_images_skipped_on_one_rank_do_not_hang_the_gather(tmp_path):
    """``dataset.skip_corrupt=true`` under DDP: the rank holding an unreadable query evaluates one image fewer; the
    gather takes unequal counts (an all_gather of equal shapes would hang) and the set is evaluated without it."""
    from tests.fixtures.fake_datasets import make_fake_inshop

    data = tmp_path / "data"
    make_fake_inshop(data / "isc", n_items=12, per_item=6, size=40)
    partition = (data / "isc" / "In-shop Clothes Retrieval Benchmark" / "Eval" / "list_eval_partition.txt")
    query = next(line.split()[0] for line in partition.read_text().splitlines()[2:] if line.endswith("query"))
    (data / "isc" / "In-shop Clothes Retrieval Benchmark" / "Img" / query).write_bytes(b"not a jpeg")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=isc_baseline", "trainer=ddp_cpu", "debug=fast",
         f"paths.data_dir={data}", "model.arch=cnn_small", "model.pretrained=false", "dataset.image_size=32",
         "dataset.resize_size=32", "dataset.batch_size=4", "dataset.num_workers=0", "dataset.skip_corrupt=true",
         "trainer.limit_test_batches=1.0", "torch_threads=1", f"paths.log_dir={tmp_path / 'logs'}",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (run_dir / "train.log").read_text()
    assert "test: evaluating 35 of 36 images" in log, log[-3000:]
    assert "a global batch of 8" in log  # the DDP batch-size warning
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics["test/queries_evaluated"] == 5
