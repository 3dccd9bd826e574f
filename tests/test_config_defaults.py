"""Python defaults never contradict the YAML: a model built in Python behaves like the configured one."""

from __future__ import annotations

import inspect
import math

import hydra
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from irlab.schedules import cosine_restarts, cosine_restarts_lr
from tests.helpers import CONF, compose_config


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_python_defaults_equal_the_model_yaml(name):
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    params = inspect.signature(hydra.utils.get_class(cfg._target_).__init__).parameters
    for key in cfg.keys():
        if key in ("_target_", "defaults") or OmegaConf.is_interpolation(cfg, key) or cfg[key] is None:
            continue  # filled at run time (num_classes, code_depth, seed, encoder from the tokenizer)
        value = cfg[key]
        assert key in params, f"{name}.yaml: {key} is not an argument of {cfg._target_}"
        default = params[key].default
        plain = OmegaConf.to_container(cfg[key], resolve=False) if OmegaConf.is_config(cfg[key]) else value
        if key in ("optimizer", "scheduler"):  # no Python default: the YAML (conf/optimizer, conf/scheduler) only
            assert default is None, f"{cfg._target_}: {key} must not have a Python default"
            continue
        if default is None and isinstance(plain, dict):  # mapping defaults live in module constants
            continue
        if isinstance(default, tuple):
            default = list(default)
        if isinstance(plain, dict) and isinstance(default, dict):
            assert plain == default, f"{name}.yaml: {key}"
            continue
        assert plain == default, f"{name}.yaml: {key}={plain!r} but the Python default is {default!r}"


@pytest.mark.parametrize("group", ["optimizer", "scheduler"])
def test_every_optimizer_and_scheduler_preset_is_a_partial_node_with_every_setting(group):
    """Settings are written once, in the YAML: every preset names all of its target's keyword arguments."""
    for path in sorted((CONF / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        assert node.pop("_partial_") is True, path
        target = hydra.utils.get_method(node.pop("_target_"))
        params = inspect.signature(target).parameters
        if group == "scheduler":  # (optimizer, trainer, *, settings): every setting given, none unknown
            named = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # cosine_restarts: cosine_restarts_lr's
                named = set(inspect.signature(cosine_restarts_lr).parameters) - {"t", "base_lr"}
            assert set(node) == named, path
        else:
            assert set(node) <= set(params), path


def test_a_module_built_without_an_optimizer_says_what_to_pass():
    from irlab.baseline import EmbeddingBaseline
    from irlab.optim import require_optimizer

    model = EmbeddingBaseline(num_classes=3, embedding_dim=8)
    with pytest.raises(ValueError, match="needs an optimizer node.*irlab.optim.preset"):
        require_optimizer(model.hparams.optimizer, type(model).__name__)


def test_model_presets_build_their_optimizer_and_schedule():
    """conf/model/*.yaml -> the configured optimizer class, group rates and schedule, through irlab.optim."""
    from irlab.optim import configure_optimization

    class Run:  # what the schedules read from a Lightning trainer
        estimated_stepping_batches, max_epochs = 100, 10

    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    for name, cls in (("areir", torch.optim.Adam), ("baseline", torch.optim.AdamW),
                      ("irgen_generator", torch.optim.AdamW)):
        cfg = OmegaConf.to_container(compose_config(["~experiment", f"model={name}"]).model)
        out = configure_optimization(cfg["optimizer"], cfg["scheduler"],
                                     [{"params": params[:1], "lr_scale": 0.5}, {"params": params[1:]}], Run())
        opt = out["optimizer"]
        assert type(opt) is cls
        assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.5 * cfg["optimizer"]["lr"],
                                                                     cfg["optimizer"]["lr"]])
        assert out["lr_scheduler"]["interval"] == {"areir": "epoch", "baseline": "epoch"}.get(name, "step")


def test_cosine_restarts_is_timm_semantics():
    """The reference generator: warm-up 20 epochs from 5e-8, cosine cycles of 100 epochs, 4 cycles, then lr_min."""
    ref = dict(t_initial=100, lr_min=5e-7, warmup_t=20, warmup_lr_init=5e-8, cycle_decay=1.0, cycle_limit=4)
    base = 8e-5
    assert cosine_restarts_lr(0, base, **ref) == 5e-8
    assert cosine_restarts_lr(10, base, **ref) == pytest.approx(5e-8 + 10 * (base - 5e-8) / 20)
    # after the warm-up the cosine is *not* shifted: epoch 20 is 20% into the first cycle
    at_20 = 5e-7 + 0.5 * (base - 5e-7) * (1 + math.cos(0.2 * math.pi))
    assert cosine_restarts_lr(20, base, **ref) == pytest.approx(at_20)
    assert cosine_restarts_lr(100, base, **ref) == pytest.approx(base)  # restart
    assert cosine_restarts_lr(399.99, base, **ref) == pytest.approx(5e-7, rel=1e-3)
    assert cosine_restarts_lr(400, base, **ref) == 5e-7  # past cycle_limit

    # as a LambdaLR over two groups (decoder at lr, encoder at 0.01 lr), stepped at fractional epochs
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": params[:1], "lr": base}, {"params": params[1:], "lr": base * 0.01}])
    class Run:  # 400 epochs of 10 steps
        estimated_stepping_batches, max_epochs = 4000, 400

    sched = cosine_restarts(opt, Run(), **ref)["scheduler"]
    for _ in range(255):  # 25.5 epochs
        opt.step()
        sched.step()
    for group, group_base in zip(opt.param_groups, (base, base * 0.01), strict=True):
        assert group["lr"] == pytest.approx(cosine_restarts_lr(25.5, group_base, **ref))


def dataset_node(name: str) -> DictConfig:
    return compose_config([f"dataset={name}"]).dataset


@pytest.mark.parametrize("name", ["digit_pairs", "digits"])
def test_python_defaults_equal_the_embedded_dataset_yaml(name, tmp_path):
    """The embedded sets built in Python (tests, notebooks) are the configured ones, key by key."""
    cfg = dataset_node(name)
    dm = hydra.utils.get_class(cfg._target_)(data_dir=str(tmp_path))
    for key in cfg.keys():
        if key in ("_target_", "data_dir") or OmegaConf.is_interpolation(cfg, key):
            continue
        value = OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key]
        got = getattr(dm, key) if key != "root" else None if value is None else dm.root
        assert (list(got) if isinstance(got, tuple) else got) == value, f"{name}.yaml: {key}={value!r}, Python {got!r}"


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "dataset").glob("*.yaml")))
def test_every_dataset_setting_is_an_argument_and_written_once(name):
    """Every key of a dataset config is an argument of its datamodule, and a dataset's own file holds only what
    differs from conf/dataset/base/photos.yaml (the settings every dataset shares are written there, once)."""
    cfg = dataset_node(name)
    cls = hydra.utils.get_class(cfg._target_)
    accepted = set().union(*(inspect.signature(c.__init__).parameters for c in cls.__mro__ if "__init__" in vars(c)))
    assert set(cfg.keys()) - {"_target_"} <= accepted, f"{name}.yaml: unknown keys"
    base = OmegaConf.load(CONF / "dataset" / "base" / "photos.yaml")
    own = OmegaConf.load(CONF / "dataset" / f"{name}.yaml")
    repeated = [k for k in own if k in base and own[k] == base[k]]
    assert repeated == [], f"{name}.yaml repeats the base setting(s) {repeated}"
