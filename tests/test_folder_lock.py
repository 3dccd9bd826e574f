"""Jobs sharing an IRGen artifact folder: one builds a stage while the other waits and then reuses it; a lock
left by a dead job is broken instead of waited on for ever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from irlab.folder_lock import folder_lock, lock_is_stale
from tests.helpers import REPO
from tests.test_irgen_pipeline import FAST


@pytest.mark.slow
def test_two_jobs_building_the_same_tokenizer_train_it_once(tmp_path):
    logs = tmp_path / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "train.py", *FAST, f"paths.log_dir={logs}",
                              f"hydra.run.dir={tmp_path / f'run{i}'}"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            for i in (0, 1)]
    outputs = [job.communicate(timeout=400)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    metrics = [json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["metrics"] for i in (0, 1)]
    trained = ["val/R@1" in m for m in metrics]  # logged by training; a reused artifact brings only its stats
    assert sorted(trained) == [False, True]  # one trained, the other reused
    waiting = outputs[trained.index(False)]
    assert "waiting for it" in waiting and "reusing identifier artifact" in waiting
    assert metrics[0]["tokenizer/distinct_identifiers"] == metrics[1]["tokenizer/distinct_identifiers"]
    art_dir = logs / "irgen_artifacts" / "digits_closed_set_seed42"
    assert torch.load(art_dir / "identifiers.pt", weights_only=True)["codes"].shape[0] == 1797
    assert not list(art_dir.glob("*.lock")) and not list(art_dir.rglob("*.tmp*"))


def test_lock_of_a_dead_job_is_broken(tmp_path, caplog):
    folder = tmp_path / "tokenizer"
    lock = tmp_path / "tokenizer.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    assert lock_is_stale(lock)
    with folder_lock(folder, "test", poll=0.05):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists() and "stale lock" in caplog.text


def test_live_lock_is_waited_for_and_an_unrefreshed_one_expires(tmp_path):
    folder = tmp_path / "generator-abc"
    order: list[str] = []

    def holder() -> None:
        with folder_lock(folder, "first"):
            order.append("first in")
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=holder)
    thread.start()
    time.sleep(0.1)
    with folder_lock(folder, "second", poll=0.05):
        order.append("second in")
    thread.join()
    assert order == ["first in", "first out", "second in"]

    lock = tmp_path / "other.lock"  # another host's lock (pid unknowable): only its age can tell
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 1}))
    assert not lock_is_stale(lock, stale_after=60)
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert lock_is_stale(lock, stale_after=60)
