"""Every config composes, every `_target_` imports, and unknown keys are errors (never silently ignored)."""

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from tests.helpers import compose_config, experiment_names


def _targets(node, path=""):
    if isinstance(node, DictConfig):
        for key in node:
            if key == "hydra":
                continue
            value = node._get_node(key)
            if key == "_target_":
                yield path, node[key]
            else:
                yield from _targets(value, f"{path}.{key}" if path else str(key))


def _resolved(cfg: DictConfig) -> DictConfig:
    """A fully resolved copy (interpolations that point nowhere fail here, as they would at run time)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.create(container), resolve=True))


def _check_targets(cfg):
    for where, target in _targets(cfg):
        assert hydra.utils.get_object(target) is not None, f"{where}: {target}"


def test_default_train_config_is_the_embedded_demo(tmp_path):
    cfg = _resolved(compose_config(output_dir=tmp_path))
    assert cfg.dataset._target_ == "datamodules.digit_pairs.DigitPairsDataModule"
    assert cfg.model.arch == "cnn_small"
    assert cfg.protocol.name == "zero_shot"
    assert cfg.get("logger") is None
    _check_targets(cfg)


@pytest.mark.parametrize("experiment", experiment_names())
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = _resolved(compose_config([f"experiment={experiment}"], output_dir=tmp_path))
    _check_targets(cfg)
    assert cfg.dataset.protocol in ("zero_shot", "closed_set")


@pytest.mark.parametrize("group,option", [("trainer", "cpu"), ("trainer", "gpu"), ("trainer", "ddp"),
                                          ("trainer", "ddp_cpu"), ("logger", "csv"), ("logger", "wandb"),
                                          ("logger", "tensorboard"), ("debug", "fast"),
                                          ("protocol", "closed_set")])
def test_group_options_compose(group, option, tmp_path):
    cfg = _resolved(compose_config([f"{group}={option}"], output_dir=tmp_path))
    _check_targets(cfg)


def test_eval_config_requires_a_checkpoint(tmp_path):
    cfg = compose_config(config_name="eval", output_dir=tmp_path)
    assert OmegaConf.is_missing(cfg, "ckpt_path")


@pytest.mark.parametrize("override", ["model.no_such_key=1", "trainer.max_epochz=3", "datset=digits",
                                      "experiment=no_such_experiment"])
def test_unknown_keys_fail_loudly(override, tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose_config([override], output_dir=tmp_path)
