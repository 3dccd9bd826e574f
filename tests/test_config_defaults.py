"""Python defaults never contradict the YAML: a model built in Python behaves like the configured one."""

from __future__ import annotations

import inspect
import math

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from irlab.schedules import build_scheduler, cosine_restarts_lr
from tests.helpers import CONF


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_python_defaults_equal_the_model_yaml(name):
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    params = inspect.signature(hydra.utils.get_class(cfg._target_).__init__).parameters
    for key in cfg.keys():
        if key == "_target_" or OmegaConf.is_interpolation(cfg, key) or cfg[key] is None:
            continue  # filled at run time (num_classes, code_depth, seed, encoder from the tokenizer)
        value = cfg[key]
        assert key in params, f"{name}.yaml: {key} is not an argument of {cfg._target_}"
        default = params[key].default
        plain = OmegaConf.to_container(cfg[key], resolve=False) if OmegaConf.is_config(cfg[key]) else value
        if default is None and isinstance(plain, dict):  # mapping defaults live in module constants
            continue
        if isinstance(default, tuple):
            default = list(default)
        if isinstance(plain, dict) and isinstance(default, dict):
            assert plain == default, f"{name}.yaml: {key}"
            continue
        assert plain == default, f"{name}.yaml: {key}={plain!r} but the Python default is {default!r}"


def test_mapping_defaults_equal_the_yaml():
    from irgen.encoders import ENCODER_DEFAULTS
    from irgen.generator import DEFAULT_SCHEDULE as GEN
    from irgen.tokenizer import DEFAULT_SCHEDULE as TOK

    gen = OmegaConf.load(CONF / "model" / "irgen_generator.yaml")
    tok = OmegaConf.load(CONF / "model" / "irgen_tokenizer.yaml")
    assert OmegaConf.to_container(gen.schedule) == GEN and OmegaConf.to_container(tok.schedule) == TOK
    encoder = {k: tok.encoder[k] for k in tok.encoder.keys() if not OmegaConf.is_interpolation(tok.encoder, k)}
    assert encoder == {k: ENCODER_DEFAULTS[k] for k in encoder}


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
    sched = build_scheduler(opt, {"name": "cosine_restarts", **ref}, total_steps=4000, steps_per_epoch=10,
                            max_epochs=400)["scheduler"]
    for _ in range(255):  # 25.5 epochs
        opt.step()
        sched.step()
    for group, group_base in zip(opt.param_groups, (base, base * 0.01), strict=True):
        assert group["lr"] == pytest.approx(cosine_restarts_lr(25.5, group_base, **ref))
