"""Same seed + same config => same metrics; a run killed mid-epoch resumes to the same final metrics."""

import os
import signal

import lightning as L
import pytest
import torch

from irlab.runner import run
from tests.helpers import compose_config

SMALL = ["trainer.accelerator=cpu", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
         "trainer.limit_val_batches=2", "dataset.batch_size=32", "model.embedding_dim=32", "test=false",
         "callbacks=[model_checkpoint,on_exception_checkpoint]"]


class Killed(RuntimeError):
    pass


class KillMidEpoch(L.Callback):
    """Simulates a crash in the middle of the second epoch (after the first epoch's checkpoint)."""

    def __init__(self, epoch: int = 1, batch: int = 2) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise Killed("simulated kill")


def _val_metrics(metrics):
    return {k: v for k, v in metrics.items() if k.startswith("val/") and "seconds" not in k}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run shared by the tests below."""
    return run(compose_config(SMALL, output_dir=tmp_path_factory.mktemp("reference")))


def test_same_seed_same_metrics(reference, tmp_path):
    again = run(compose_config(SMALL, output_dir=tmp_path / "again"))
    assert _val_metrics(again) == _val_metrics(reference)
    other_seed = run(compose_config(SMALL + ["seed=7"], output_dir=tmp_path / "other"))
    assert _val_metrics(other_seed) != _val_metrics(reference)


def test_killed_run_resumes_to_the_same_metrics(reference, tmp_path):
    run_dir = tmp_path / "killed"
    killer = [f"+callbacks.killer._target_={__name__}.KillMidEpoch"]
    with pytest.raises(Killed):
        run(compose_config(SMALL + killer, output_dir=run_dir))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    resumed = run(compose_config(SMALL + ["ckpt_path=last"], output_dir=run_dir))
    assert _val_metrics(resumed) == _val_metrics(reference)


class SendSigterm(L.Callback):
    """Delivers SIGTERM to this process mid-epoch, as SLURM does before it kills a job."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_and_exits_143_with_the_resume_command(tmp_path, caplog):
    sigterm = [f"+callbacks.sigterm._target_={__name__}.SendSigterm"]
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopped:
            run(compose_config(SMALL + sigterm, output_dir=tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143  # a scheduler records a failure, not a success
    assert f"ckpt_path=on_exception hydra.run.dir={tmp_path}" in caplog.text
    saved = torch.load(tmp_path / "checkpoints" / "on_exception.ckpt", weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == 4 + 2
    resumed = run(compose_config(SMALL + ["ckpt_path=on_exception"], output_dir=tmp_path))
    assert "val/R@1" in resumed
