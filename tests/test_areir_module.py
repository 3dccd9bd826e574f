"""AREIR LightningModule: short training runs per backbone, checkpoint round trip with the assignment, the app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from areir.module import AREIRModule
from datamodules.digits import DigitsDataModule
from irlab.optim import preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> DigitsDataModule:
    dm = DigitsDataModule(data_dir=str(tmp_path_factory.mktemp("data")), batch_size=3, eval_batch_size=16, seed=0)
    dm.setup()
    return dm


def tiny(num_classes: int, arch: str = "resnet18", **kw) -> AREIRModule:
    kw = {"with_se": True, "members": 2, "meta_classes": 2, "optimizer": preset("optimizer", "adam"), **kw}
    return AREIRModule(num_classes, arch=arch, **kw)


def fit_steps(model: AREIRModule, dm: DigitsDataModule, steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=dm)
    return trainer


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnext50_32x4d"])
def test_two_training_steps_per_backbone(arch: str, digits: DigitsDataModule) -> None:
    torch.manual_seed(0)
    model = tiny(digits.num_classes, arch, with_se=arch != "resnet34")
    before = {n: p.detach().clone() for n, p in model.net.members.named_parameters()}
    trainer = fit_steps(model, digits)
    assert trainer.global_step == 2
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss > 0
    changed = [n for n, p in model.net.members.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every member tensor trained (incl. the classifier over M meta-classes)
    batch = next(iter(digits.test_dataloader()))
    model.eval()
    with torch.no_grad():
        emb = model.embed(batch["image"][:4])
    assert emb.shape == (4, 2 * 2)
    torch.testing.assert_close(emb.view(4, 2, 2).norm(dim=-1), torch.ones(4, 2))  # each member unit-norm


def test_loss_is_mean_member_cross_entropy(digits: DigitsDataModule) -> None:
    torch.manual_seed(0)
    model = tiny(digits.num_classes, members=3, meta_classes=2).eval()  # eval: no BN-stat side effects
    batch = next(iter(digits.train_dataloader()))
    model.log = lambda *a, **k: None
    loss = model.training_step(batch, 0)
    logits = model(batch["image"])
    per_member = [
        torch.nn.functional.cross_entropy(logits[:, e], model.meta_labels[e, batch["label"]]) for e in range(3)
    ]
    torch.testing.assert_close(loss, torch.stack(per_member).mean())


def test_normalized_member_loss_is_scaled_unit_logits_against_one_hot(digits: DigitsDataModule) -> None:
    """The randomized-ensembles 2018 loss: cross-entropy of s * normalize(member logits)."""
    torch.manual_seed(0)
    model = tiny(digits.num_classes, members=3, meta_classes=2, member_loss="normalized", loss_scale=8.0).eval()
    batch = next(iter(digits.train_dataloader()))
    model.log = lambda *a, **k: None
    loss = model.training_step(batch, 0)
    logits = 8.0 * torch.nn.functional.normalize(model(batch["image"]), dim=-1)
    per_member = [
        torch.nn.functional.cross_entropy(logits[:, e], model.meta_labels[e, batch["label"]]) for e in range(3)
    ]
    torch.testing.assert_close(loss, torch.stack(per_member).mean())
    with pytest.raises(ValueError, match="member_loss"):
        tiny(digits.num_classes, members=3, meta_classes=2, member_loss="arcface")


def test_checkpoint_round_trip_keeps_the_assignment(digits: DigitsDataModule, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny(digits.num_classes, assignment_seed=1)
    trainer = fit_steps(model, digits)
    path = tmp_path / "areir.ckpt"
    trainer.save_checkpoint(path)
    images = next(iter(digits.test_dataloader()))["image"][:6]
    model.eval()
    with torch.no_grad():
        expected = model.embed(images)

    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickle
    fresh = tiny(digits.num_classes, assignment_seed=2)  # another seed draws another partition...
    assert not torch.equal(fresh.meta_labels, model.meta_labels)
    fresh.load_state_dict(state["state_dict"])
    assert torch.equal(fresh.meta_labels, model.meta_labels)  # ...but the checkpoint's is what gets used
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.embed(images), expected, atol=0, rtol=0)


def test_mismatched_assignment_raises(digits: DigitsDataModule) -> None:
    state = tiny(digits.num_classes).state_dict()
    with pytest.raises(ValueError, match=r"assignment has shape \(2, 5\).*builds \(2, 4\)"):
        tiny(4).load_state_dict(state)  # another split: 4 training classes
    with pytest.raises(ValueError, match="shape"):
        tiny(digits.num_classes, members=3).load_state_dict(state)
    with pytest.raises(ValueError, match="not a balanced partition"):
        tiny(digits.num_classes, meta_classes=3, with_se=True).load_state_dict(
            {**state, "meta_labels": torch.zeros_like(state["meta_labels"])}
        )
    with pytest.raises(ValueError, match="no meta-class assignment"):
        tiny(digits.num_classes).load_state_dict({k: v for k, v in state.items() if k != "meta_labels"})


def test_meta_classes_above_class_count_raise(digits: DigitsDataModule) -> None:
    with pytest.raises(ValueError, match="exceeds"):
        tiny(digits.num_classes, meta_classes=digits.num_classes + 1)


@pytest.mark.slow
def test_train_app_digits_areir_fast(tmp_path: Path) -> None:
    """The real entry point: Hydra config composition, fit, checkpoint, test of the best checkpoint (weights only)."""
    cmd = [
        sys.executable, "train.py", "experiment=digits_areir", "debug=fast", "model.members=2",
        f"hydra.run.dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "test R@1 =" in result.stdout  # the one metrics table irlab prints (Lightning's is off)
    assert (tmp_path / "metrics.json").is_file() and list((tmp_path / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize("name", ["car", "cub", "sop", "isc", "car_crop", "cub_crop", "digits"])
def test_experiment_configs_compose(name: str) -> None:
    """Every AREIR experiment composes with the reference recipe (dataset configs come from the datasets branch)."""
    from hydra import compose, initialize_config_dir

    dataset = name.split("_")[0]
    if not (ROOT / "conf" / "dataset" / f"{dataset}.yaml").is_file():
        pytest.skip(f"conf/dataset/{dataset}.yaml not on this branch yet")
    experiment = f"{dataset}_areir_crop" if name.endswith("_crop") else f"{dataset}_areir"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    assert cfg.model._target_ == "areir.module.AREIRModule" and cfg.protocol.name == "zero_shot"
    assert cfg.dataset.val_fraction > 0
    if dataset == "digits":  # the embedded preset (digit pairs, the baseline's trunk): CPU-sized schedule
        assert cfg.model.arch == "cnn_small" and cfg.model.scheduler.milestones == [0.8]
        return
    assert cfg.model.scheduler.milestones == [0.5, 0.7] and cfg.model.scheduler.gamma == 0.1
    assert cfg.model.optimizer._target_ == "torch.optim.Adam"
    if dataset != "digits":
        assert cfg.dataset.image_size == cfg.dataset.resize_size == 256 and cfg.model.optimizer.lr == 1e-4
        assert cfg.model.members == 48
        assert cfg.model.meta_classes == {"car": 12, "cub": 12, "sop": 500, "isc": 192}[dataset]
        assert cfg.dataset.get("crop", False) == name.endswith("_crop")
