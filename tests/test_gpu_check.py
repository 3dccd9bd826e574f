"""`bench/gpu_check.sh --dry-run` runs every step of the GPU check at toy size on the CPU, so that the script is not
broken on the day a GPU is available (a GPU is lent for minutes at a time: no time to debug it then)."""

import os
import re
import subprocess

import pytest

from tests.helpers import REPO

STEPS = ["environment", "GPU-marked tests", "DDP, one process", "baseline,", "AREIR,", "IRGen pipeline,",
         "AREIR members: loop vs grouped", "AREIR members, activation checkpointing", "IRGen generator training step",
         "IRGen generator training step, torch.compile", "baseline ResNet-50 training step",
         "beam search vs exact kNN", "faiss on the GPU", "isc_irgen stages at reduced size"]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_step(tmp_path):
    results = tmp_path / "gpu.md"
    env = {**os.environ, "IRLAB_GPU_RESULTS": str(results), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    text = results.read_text()
    assert proc.returncode == 0, text[-6000:]
    titles = re.findall(r"^## (.+)$", text, flags=re.M)
    assert len(titles) == len(STEPS) and all(t.startswith(s) for t, s in zip(titles, STEPS, strict=True)), titles
    assert text.count("- exit code 0,") == len(STEPS)
    assert "dry run" in text.splitlines()[0]
