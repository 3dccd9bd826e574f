"""Trunks (torchvision, timm, the embedded `cnn_small`) with an honest pretrained-weights story.

Weights never download implicitly: ``pretrained`` is ``false`` (random init), ``true`` (the library's own
default weights -- torchvision's, or timm's from the Hugging Face hub -- which needs network or a warm cache)
or a local file path (``.pth``, ``.bin``, ``.safetensors``; read without unpickling). A failed download says
which file to fetch and which option to point at it.

``timm/<name>`` is any timm model (`timm.list_models()`), built with ``num_classes=0``: its pooled features.
"""

from __future__ import annotations

import torchvision
from torch import nn

from datamodules.errors import MissingFileError, UserInputError
from datamodules.paths import expand_path
from irlab.checkpoints import read_state_dict

TIMM_PREFIX = "timm/"
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d")


def build_torchvision(arch: str, pretrained: bool | str = False, config_key: str = "model.pretrained",
                      **kwargs) -> nn.Module:
    """A torchvision classification model, randomly initialised or with weights from torchvision/a file.

    ``config_key`` is the option as the user types it in that experiment, named by the download error."""
    if not hasattr(torchvision.models, arch):
        raise ValueError(f"unknown torchvision architecture {arch!r}")
    builder = getattr(torchvision.models, arch)
    if pretrained is True or pretrained == "true":
        try:
            return builder(weights="DEFAULT", **kwargs)
        except Exception as exc:  # noqa: BLE001 - network, hash and cache errors all mean the same thing here
            raise MissingFileError(
                f"could not download torchvision weights for {arch} ({exc}). Download them on a machine with "
                f"network (torchvision.models.get_model_weights('{arch}').DEFAULT.url) and set "
                f"{config_key}=/path/to/file.pth"
            ) from exc
    model = builder(weights=None, **kwargs)
    if pretrained:
        state = read_state_dict(pretrained, "pretrained weights file")
        missing, unexpected = model.load_state_dict(state, strict=False)
        loaded = len(model.state_dict()) - len(missing)
        if loaded == 0:
            raise ValueError(f"{pretrained} holds no weights matching {arch} (unexpected keys: {unexpected[:5]})")
    return model


SMALL_CNNS = ("cnn_small",)


def small_cnn_trunk(width: int = 256) -> tuple[nn.Module, int]:
    """A CPU-sized trunk for 32 px images (the embedded benchmark): six 3x3 conv-BN-ReLU layers (32-64-128
    channels, three 2x2 poolings) and a linear layer over the 4x4 map, ~0.9 M parameters.

    Why not ResNet-18 there: on 32 px inputs its stem and strides pool everything into one 1x1 cell, and on the
    digit pairs it measured 0.02 zero-shot R@1 after 225 steps (it fits the training classes, loss 1.6, but its
    features do not transfer), while this trunk reached 0.16 after as many steps at 2.5x the images/s.
    """
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    layers = [*block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
              *block(64, 128), *block(128, 128), nn.AdaptiveMaxPool2d(4), nn.Flatten(), nn.Linear(128 * 16, width)]
    return nn.Sequential(*layers), width


def build_timm(name: str, pretrained: bool | str = False, config_key: str = "model.pretrained",
               **kwargs) -> nn.Module:
    """A timm model, randomly initialised, with timm's default weights (``true``: timm downloads them) or with
    a local weights file (timm's loader: safetensors or ``torch.load(weights_only=True)``, then the model's own
    checkpoint filter, so original-format files such as OpenAI CLIP's load too)."""
    import timm

    arch_key = config_key.rsplit(".", 1)[0] + ".arch"
    if not timm.is_model(name):
        raise UserInputError(f"{arch_key}={TIMM_PREFIX}{name}: timm has no model {name!r} "
                             f"(timm.list_models('*{name}*') lists the close ones)")
    if pretrained is True or pretrained == "true":
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - network, hub and cache errors all mean the same thing here
            hub = timm.models.get_pretrained_cfg(name)
            where = (f"https://huggingface.co/{hub.hf_hub_id}" if hub and hub.hf_hub_id else
                     (hub.url if hub and hub.url else "its model card"))
            raise MissingFileError(f"could not download timm weights for {name} ({type(exc).__name__}: {exc}). "
                                   f"Download them on a machine with network ({where}: model.safetensors) and set "
                                   f"{config_key}=/path/to/model.safetensors") from exc
    if pretrained and pretrained != "false":
        path = expand_path(str(pretrained))
        if not path.is_file():
            raise MissingFileError(f"{config_key}={pretrained}: no such file")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def build_trunk(arch: str = "resnet18", pretrained: bool | str = False) -> tuple[nn.Module, int]:
    """A trunk without its classifier: images -> pooled features [B, C]. Returns (trunk, C).

    ``cnn_small`` (random init only) is the embedded benchmark's trunk (`small_cnn_trunk`), ``timm/<name>`` any
    timm model (its pooled, pre-logits features), otherwise a torchvision ResNet."""
    if arch.startswith(TIMM_PREFIX):
        model = build_timm(arch.removeprefix(TIMM_PREFIX), pretrained, num_classes=0)
        return model, int(model.num_features)
    if arch in SMALL_CNNS:
        if pretrained:
            raise ValueError(f"{arch} has no pretrained weights: set model.pretrained=false")
        return small_cnn_trunk()
    if arch not in RESNETS:
        raise UserInputError(f"model.arch must be one of {RESNETS + SMALL_CNNS} or timm/<a timm model name>, "
                             f"got {arch!r}")
    model = build_torchvision(arch, pretrained)
    width = model.fc.in_features
    model.fc = nn.Identity()
    return model, width
