"""AREIR on the embedded benchmark's trunk (``model.arch=cnn_small``): a shared stem and E small conv branches.

The trunk is `irlab.backbones.small_cnn_trunk` (the baseline's), cut after its second pooling: the stem is its
first four conv-BN-ReLU layers (32-32-64-64 channels, 32 -> 8 px), each member its last two (64-128-128 at 8 px)
with the SE gate after the first, the trunk's 4x4 max pooling, flattened into the member's meta-class
classifier. Why not resnet18 at 32 px: measured on the digit pairs (E=4, M=8, 16 epochs), members built from
ResNet blocks memorised the 1,600 training images (train loss 0.003, meta-class accuracy 1.0) and retrieved the
unseen numbers at chance (test R@1 0.04-0.05, also with 2x2 pooled heads), while this trunk's baseline reaches 0.76.
Parameters are stacked member-major like every `areir.model` tensor, so the loop, grouped and vmap formulations
all apply unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from areir.layers import (
    EnsembleConv,
    EnsembleLinear,
    EnsembleSE,
    checkpoint_once,
    default_linear_init,
    member_bn,
    member_cells_logits,
    split_members,
)

STEM_WIDTHS = (32, 32, 64, 64)  # small_cnn_trunk's first four layers, a 2x2 max pooling after the 2nd and 4th
MEMBER_WIDTH = 128  # the baseline trunk's last two layers; model.member_width makes members thinner or wider
POOL = 4  # small_cnn_trunk's AdaptiveMaxPool2d(4)


def small_stem() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for i, width in enumerate(STEM_WIDTHS):
        layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if i % 2 == 1:
            layers.append(nn.MaxPool2d(2))
        c_in = width
    return nn.Sequential(*layers)


class EnsembleConvBN(nn.Module):
    """conv3x3 - BatchNorm - ReLU, replicated over E members."""

    def __init__(self, c_in: int, c_out: int, members: int) -> None:
        super().__init__()
        self.conv = EnsembleConv(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), members)
        self.bn = nn.BatchNorm2d(c_out * members)

    def forward(self, x: torch.Tensor, stacked: bool) -> torch.Tensor:
        return F.relu(member_bn(self.bn, self.conv(x, stacked), stacked))


class SmallCNNMembers(nn.Module):
    """The E branches: two conv-BN-ReLU layers (SE after the first), 4x4 max pooling, meta-class classifier."""

    def __init__(self, members: int, meta_classes: int, with_se: bool, width: int = MEMBER_WIDTH) -> None:
        super().__init__()
        self.members = members
        self.block1 = EnsembleConvBN(STEM_WIDTHS[-1], width, members)
        self.se = EnsembleSE(width, members) if with_se else None
        self.block2 = EnsembleConvBN(width, width, members)
        self.fc = EnsembleLinear(width * POOL * POOL, meta_classes, members)

    def blocks(self) -> Iterator[tuple[str, nn.Module]]:
        yield "block1", self.block1
        if self.se is not None:
            yield "se", self.se
        yield "block2", self.block2

    def forward(self, x: torch.Tensor, stacked: bool, ckpt: bool = False) -> torch.Tensor:
        for _, block in self.blocks():
            x = checkpoint_once(self, block, x, stacked) if ckpt else block(x, stacked)
        return member_cells_logits(self.fc, F.adaptive_max_pool2d(x, POOL), self.members, stacked)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every member like a fresh PyTorch layer: convs and linear layers with their default initialisation."""
        for name, t in self.named_parameters():  # in parameter order (the seeded initialisation depends on it)
            if name.endswith("conv.weight"):
                for chunk in split_members(t, self.members):
                    nn.init.kaiming_uniform_(chunk, a=math.sqrt(5))
            elif not name.startswith("block"):  # SE and classifier (weights and biases)
                default_linear_init(t, self.members, self.fc.in_features)
