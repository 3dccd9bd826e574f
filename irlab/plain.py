"""Hydra config nodes -> plain Python containers.

Hyper-parameters saved in checkpoints must be plain dicts/lists (``torch.load(weights_only=True)`` refuses
OmegaConf objects), and signatures compared across runs must not depend on the container type.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(value: Any) -> Any:
    """A resolved plain dict/list for a DictConfig/ListConfig; anything else unchanged."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
