"""An error in what the user gave prints one message naming the file and the fix, with no traceback (and no
advice to load untrusted files with ``weights_only=False``); ``HYDRA_FULL_ERROR=1`` still shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from datamodules.errors import MissingFileError, UserInputError
from irlab.checkpoints import CheckpointError, safe_load
from tests.helpers import REPO


def eval_py(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.slow
def test_wrong_and_missing_checkpoints_are_one_message(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for path, message in ((notes, "neither a zip archive nor a pickle"), (tmp_path / "gone.ckpt", "not found")):
        proc = eval_py(f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}")
        assert proc.returncode == 1
        assert "error: " in proc.stderr and message in proc.stderr and str(path) in proc.stderr
        assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    proc = eval_py(f"ckpt_path={notes}", f"hydra.run.dir={tmp_path / 'run'}", HYDRA_FULL_ERROR="1")
    # the traceback (Python's, or a prettier one where a package installs its own hook) down to the raising frame
    assert proc.returncode != 0 and "safe_load" in proc.stderr and "CheckpointError" in proc.stderr


class Custom:
    """A Python object in a file: what ``weights_only=True`` refuses."""


def test_user_errors_share_one_base(tmp_path):
    pickled = tmp_path / "objects.pt"
    torch.save({"x": Custom()}, pickled)
    with pytest.raises(CheckpointError, match=r"Python objects \(.*Custom\)") as info:
        safe_load(pickled)
    assert isinstance(info.value, UserInputError) and "weights_only=False" not in str(info.value)
    with pytest.raises(MissingFileError):
        safe_load(tmp_path / "nothing.pt")
    assert issubclass(MissingFileError, FileNotFoundError)  # callers catching the builtin still do


@pytest.mark.parametrize(("config", "action", "script"), [
    ("eval", "evaluate", "eval.py"), ("export", "export", "export.py"), ("index", "index", "index.py")])
def test_a_missing_checkpoint_option_names_the_key(config, action, script, tmp_path):
    from datamodules.errors import UserInputError
    from irlab.runner import run
    from tests.helpers import compose_config

    with pytest.raises(UserInputError, match=f"ckpt_path is required: python {script} ckpt_path="):
        run(compose_config(["out=x"] if config == "index" else [], config_name=config, output_dir=tmp_path), action)
