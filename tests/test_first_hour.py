"""What a new user meets first: clear errors that say what to type instead."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from datamodules.paths import expand_path
from irlab.builders import check_accelerator
from irlab.checkpoints import CheckpointError, read_checkpoint
from irlab.cli import require_plugins


def test_gpu_trainer_without_a_gpu_names_the_trainer_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="trainer=cpu"):
        check_accelerator(OmegaConf.create({"accelerator": "gpu"}))
    check_accelerator(OmegaConf.create({"accelerator": "auto"}))


def test_missing_hydra_plugin_names_the_extra(monkeypatch):
    monkeypatch.setattr("irlab.cli._installed", lambda module: False)
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[optuna\]"'):
        require_plugins(["-m", "hparams_search=digits_optuna"])
    with pytest.raises(SystemExit, match=r"\.\[slurm\]"):
        require_plugins(["-m", "hydra/launcher=slurm"])
    require_plugins(["experiment=digits_baseline"])  # nothing optional asked for


def test_paths_expand_home_and_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("IRLAB_TEST_SUB", "sub")
    assert expand_path("~/data/$IRLAB_TEST_SUB") == tmp_path / "data" / "sub"


def test_wrong_checkpoint_files_say_what_they_are(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(text)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        read_checkpoint(plain)
    other = tmp_path / "areir.ckpt"
    torch.save({"state_dict": {}, "irlab_model": "areir.module.AREIRModule"}, other)
    with pytest.raises(CheckpointError, match="written by areir.module.AREIRModule, not by irlab.baseline"):
        read_checkpoint(other, expected_class="irlab.baseline.EmbeddingBaseline")


def test_failed_weight_download_names_the_key_of_that_method(monkeypatch):
    import torchvision

    from datamodules.errors import MissingFileError
    from irgen.encoders import build_encoder
    from irlab.backbones import build_torchvision

    def offline(*args, **kwargs):
        if kwargs.get("weights"):
            raise OSError("no network")
        return real(*args, **kwargs)

    real = torchvision.models.resnet18
    monkeypatch.setattr(torchvision.models, "resnet18", offline)
    with pytest.raises(MissingFileError, match=r"set irgen\.tokenizer\.encoder\.pretrained=/path/to/file\.pth"):
        build_encoder("resnet18", 32, True)
    with pytest.raises(MissingFileError, match=r"set model\.pretrained=/path/to/file\.pth"):
        build_torchvision("resnet18", True)
