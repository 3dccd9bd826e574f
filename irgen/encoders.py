"""Image encoders shared by both IRGen stages: images -> a sequence of tokens whose first is a global feature.

The tokenizer quantizes the global (class-token) feature; the generator's decoder cross-attends to all tokens.
Families: torchvision ``vit_b_16`` (the paper's size), a ``vit_tiny`` built from the same torchvision class for
small images and tests, ResNets (feature-map cells as tokens, their mean prepended as the global token),
``cnn_small`` (the embedded benchmark's trunk, `irlab.backbones.small_cnn_trunk`), CLIP (`irgen.clip_weights`)
and any timm model as ``timm/<name>`` (`irgen.timm_encoder`). Pretrained weights only ever come from the
library's own download (explicit ``pretrained=true``) or a local file.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from irgen.clip_weights import build_clip_encoder
from irgen.encoder_base import ImageEncoder
from irgen.timm_encoder import PRETRAINED_KEY, build_timm_encoder
from irlab.backbones import RESNETS, SMALL_CNNS, TIMM_PREFIX, build_torchvision, small_cnn_trunk
from irlab.checkpoints import read_state_dict


@dataclass(frozen=True)
class ViTSpec:
    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int


VIT_SPECS = {
    "vit_b_16": ViTSpec(16, 12, 12, 768, 3072),
    "vit_s_16": ViTSpec(16, 12, 6, 384, 1536),
    "vit_tiny": ViTSpec(8, 4, 4, 128, 256),  # for 32-64 px images: a few seconds per epoch on CPU
}


class ViTEncoder(ImageEncoder):
    def __init__(self, arch: str, image_size: int, pretrained: bool | str) -> None:
        super().__init__()
        if arch not in VIT_SPECS:
            raise ValueError(f"unknown ViT {arch!r}; choose one of {sorted(VIT_SPECS)}")
        spec = VIT_SPECS[arch]
        if image_size % spec.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of {arch}'s patch size {spec.patch_size}")
        if pretrained and arch == "vit_b_16" and image_size == 224 and not isinstance(pretrained, str):
            self.vit = build_torchvision("vit_b_16", True, config_key=PRETRAINED_KEY)
        else:
            self.vit = VisionTransformer(image_size, spec.patch_size, spec.num_layers, spec.num_heads,
                                         spec.hidden_dim, spec.mlp_dim)
            if isinstance(pretrained, str) and pretrained not in ("true", "false"):
                load_vit_weights(self.vit, pretrained)
            elif pretrained and pretrained != "false":
                raise ValueError(f"torchvision has pretrained weights only for vit_b_16 at 224 px, not {arch} at "
                                 f"{image_size} px; pass a local file path instead")
        self.vit.heads = nn.Identity()
        self.dim = spec.hidden_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit._process_input(images)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        return self.vit.encoder(torch.cat([cls, x], dim=1))


def load_vit_weights(vit: VisionTransformer, path: str) -> None:
    """Load a torchvision-format ViT state dict from a local file (tensors only, strict on the encoder)."""
    state = read_state_dict(path, "pretrained weights file")
    if any(k.removeprefix("module.").removeprefix("visual.") == "conv1.weight" for k in state):
        raise ValueError(f"{path} is a CLIP checkpoint (conv1/ln_pre/QuickGELU/proj layout): use "
                         f"irgen.tokenizer.encoder.arch=clip_vit_b_16 (or arch=clip to read the architecture from the "
                         f"file)")
    state = {k.removeprefix("vit."): v for k, v in state.items() if not k.startswith("heads")}
    missing, _ = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("heads")]
    if missing:
        raise ValueError(f"{path} does not fit this ViT: {len(missing)} missing tensors, e.g. {missing[:3]}")


class ResNetEncoder(ImageEncoder):
    """ResNet feature map as tokens: [global mean token, cell tokens...]."""

    def __init__(self, arch: str, pretrained: bool | str) -> None:
        super().__init__()
        if arch not in RESNETS:
            raise ValueError(f"unknown ResNet {arch!r}; choose one of {RESNETS}")
        model = build_torchvision(arch, pretrained, config_key=PRETRAINED_KEY)
        self.dim = model.fc.in_features
        self.body = nn.Sequential(*list(model.children())[:-2])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cells = self.body(images).flatten(2).transpose(1, 2)  # [B, h*w, C]
        return torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)


class SmallCNNEncoder(ImageEncoder):
    """The embedded benchmark's trunk as tokens: [its pooled linear feature, the 4x4 map's cells projected].

    Why: at 32 px a random-init ViT or ResNet learns the digit pairs far slower on CPU than this trunk (see
    `small_cnn_trunk`); the global token is exactly the baseline's embedding, so the methods share a trunk.
    """

    def __init__(self, image_size: int, pretrained: bool | str) -> None:
        super().__init__()
        if pretrained:
            raise ValueError(f"cnn_small has no pretrained weights: set {PRETRAINED_KEY}=false")
        trunk, self.dim = small_cnn_trunk()
        self.cells = trunk[:-2]  # up to the 4x4 pooling
        self.pool = nn.Sequential(*trunk[-2:])  # flatten + linear: the global feature
        self.cell_proj = nn.Linear(trunk[-1].in_features // 16, self.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cells = self.cells(images)  # [B, C, 4, 4]
        tokens = self.cell_proj(cells.flatten(2).transpose(1, 2))
        return torch.cat([self.pool(cells).unsqueeze(1), tokens], dim=1)


CLIP_OUTPUTS = ("projected", "transformer")


def build_encoder_from_config(encoder: dict) -> ImageEncoder:
    """The encoder of an ``irgen.tokenizer.encoder`` mapping (`build_encoder`'s arguments; unknown keys fail)."""
    known = inspect.signature(build_encoder).parameters
    unknown = set(encoder) - set(known)
    if unknown:
        raise ValueError(f"encoder settings take {sorted(known)}, got unknown {sorted(unknown)}")
    return build_encoder(**encoder)


def build_encoder(arch: str = "vit_b_16", image_size: int = 224, pretrained: bool | str = False,
                  clip_output: str = "projected", clip_activation: str = "auto") -> ImageEncoder:
    """The encoder `arch` (its defaults here are the only ones: the classes above take every argument).

    ``clip_output`` (CLIP; for ``timm/<name>``: with or without the final norm): ``projected`` tokens (after
    CLIP's ``ln_post`` and ``proj``, its embedding space) or ``transformer`` tokens (the last block's output, as
    the IRGen reference uses them). ``clip_activation`` (CLIP only): `irgen.clip_weights`."""
    if clip_output not in CLIP_OUTPUTS:
        raise ValueError(f"clip_output must be one of {CLIP_OUTPUTS}, got {clip_output!r}")
    if arch == "clip" or arch.startswith("clip_"):  # OpenAI/open_clip visual towers (the IRGen paper's encoder)
        return build_clip_encoder(arch, image_size, pretrained, output=clip_output, activation=clip_activation)
    if arch.startswith(TIMM_PREFIX):
        return build_timm_encoder(arch, image_size, pretrained, clip_output)
    if arch in VIT_SPECS:
        return ViTEncoder(arch, image_size, pretrained)
    if arch in RESNETS:
        return ResNetEncoder(arch, pretrained)
    if arch in SMALL_CNNS:
        return SmallCNNEncoder(image_size, pretrained)
    raise ValueError(f"unknown encoder {arch!r}; choose one of {sorted(VIT_SPECS) + list(RESNETS + SMALL_CNNS)}, "
                     f"clip_vit_b_16 / clip or timm/<a timm model name>")
