"""torchvision trunks with an honest pretrained-weights story.

Weights never download implicitly: ``pretrained`` is ``false`` (random init), ``true`` (torchvision's default
weights, which needs network or a warm torch hub cache) or a local file path. A failed download says which
file to fetch and where to point ``pretrained`` instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d")


def load_local_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from a local file safely (tensors only); accepts raw state dicts and Lightning checkpoints."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def build_torchvision(arch: str, pretrained: bool | str = False, **kwargs) -> nn.Module:
    """A torchvision classification model, randomly initialised or with weights from torchvision/a file."""
    if not hasattr(torchvision.models, arch):
        raise ValueError(f"unknown torchvision architecture {arch!r}")
    builder = getattr(torchvision.models, arch)
    if pretrained is True or pretrained == "true":
        try:
            return builder(weights="DEFAULT", **kwargs)
        except Exception as exc:  # noqa: BLE001 - network, hash and cache errors all mean the same thing here
            raise RuntimeError(
                f"could not download torchvision weights for {arch} ({exc}). Download them on a machine with "
                f"network (torchvision.models.get_model_weights('{arch}').DEFAULT.url) and set "
                f"model.pretrained=/path/to/file.pth"
            ) from exc
    model = builder(weights=None, **kwargs)
    if pretrained:
        state = load_local_state_dict(pretrained)
        missing, unexpected = model.load_state_dict(state, strict=False)
        loaded = len(model.state_dict()) - len(missing)
        if loaded == 0:
            raise ValueError(f"{pretrained} holds no weights matching {arch} (unexpected keys: {unexpected[:5]})")
    return model


def resnet_trunk(arch: str = "resnet18", pretrained: bool | str = False) -> tuple[nn.Module, int]:
    """ResNet without its classifier: images -> pooled features [B, C]. Returns (trunk, C)."""
    if arch not in RESNETS:
        raise ValueError(f"arch must be one of {RESNETS}, got {arch!r}")
    model = build_torchvision(arch, pretrained)
    width = model.fc.in_features
    model.fc = nn.Identity()
    return model, width
