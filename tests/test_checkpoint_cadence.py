"""Full-state checkpoints: the cadence setting (epochs and/or minutes, always the last epoch) and the writer that
streams to a temporary file and renames (an interrupted write leaves the previous file intact)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.full_state_checkpoint import FullStateCheckpoint
from irlab.atomic_files import StreamingCheckpointIO, save_file_atomically


class RecordingCheckpoint(FullStateCheckpoint):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.saved_epochs: list[int] = []

    def _save_checkpoint(self, trainer, filepath) -> None:
        self.saved_epochs.append(trainer.current_epoch + 1)
        super()._save_checkpoint(trainer, filepath)


def fit(tmp_path, epochs: int, **cadence) -> tuple[RecordingCheckpoint, L.Trainer]:
    callback = RecordingCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1, enable_version_counter=False,
                                   save_on_train_epoch_end=True, **cadence)
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=2, limit_val_batches=0, callbacks=[callback],
                        plugins=[StreamingCheckpointIO()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(BoringModel())
    return callback, trainer


@pytest.mark.parametrize("cadence,expected", [
    ({"every_n_epochs": 1}, [1, 2, 3, 4, 5]),
    ({"every_n_epochs": 2}, [2, 4, 5]),  # and the last epoch, which 2 does not divide
    ({"every_n_epochs": 0, "every_n_minutes": 60.0}, [5]),  # an hour never passes here: only the end
    ({"every_n_epochs": 0, "every_n_minutes": 1e-9}, [1, 2, 3, 4, 5]),
])
def test_full_state_cadence(tmp_path, cadence, expected):
    callback, _ = fit(tmp_path, 5, **cadence)
    assert callback.saved_epochs == expected
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["epoch"] == 4 and "optimizer_states" in state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_interrupted_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "last.ckpt"
    save_file_atomically({"weights": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")  # stands in for any failure in the middle of writing

    with pytest.raises(RuntimeError, match="disk full"):
        save_file_atomically({"weights": torch.zeros(3), "other": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_bad_cadence_is_refused():
    with pytest.raises(ValueError, match="every_n_minutes"):
        FullStateCheckpoint(every_n_epochs=1, every_n_minutes=0)
