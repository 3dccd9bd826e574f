"""The stacked-member layers shared by AREIR's ResNet members (`areir.model`) and its small-CNN members
(`areir.small_members`): every member tensor stored stacked (``[E*out, ...]``), run as a loop over members or as
one grouped operation (the layout is described in `areir.model`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def split_members(t: torch.Tensor, members: int) -> torch.Tensor:
    """View a stacked tensor [E*a, ...] as [E, a, ...] (member e first)."""
    return t.view(members, t.shape[0] // members, *t.shape[1:])


class EnsembleConv(nn.Module):
    """E bias-free convolutions with identical geometry, stored as one grouped-conv weight."""

    def __init__(self, conv: nn.Conv2d, members: int) -> None:
        super().__init__()
        assert conv.bias is None and conv.dilation == (1, 1), "torchvision ResNet convs have no bias or dilation"
        self.members, self.out_channels, self.groups = members, conv.out_channels, conv.groups
        self.stride, self.padding = conv.stride, conv.padding
        self.weight = nn.Parameter(torch.empty(members * conv.out_channels, *conv.weight.shape[1:]))

    def forward(self, x: torch.Tensor, stacked: bool) -> torch.Tensor:
        groups = self.groups * self.members if stacked else self.groups
        return F.conv2d(x, self.weight, None, self.stride, self.padding, 1, groups)


def member_bn(bn: nn.BatchNorm2d, x: torch.Tensor, stacked: bool) -> torch.Tensor:
    """BatchNorm over all E*C channels (a module call, so SyncBatchNorm works) or, with one member's tensors
    swapped in by `functional_call`, over that member's C channels (the step counter is then counted by the caller)."""
    if stacked:
        return bn(x)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)


class EnsembleBlock(nn.Module):
    """A torchvision BasicBlock or Bottleneck, replicated over E members (same parameter names)."""

    def __init__(self, block: nn.Module, members: int) -> None:
        super().__init__()
        self.members, self.bottleneck = members, hasattr(block, "conv3")
        for name in ("conv1", "conv2", "conv3"):
            if hasattr(block, name):
                setattr(self, name, EnsembleConv(getattr(block, name), members))
        for name in ("bn1", "bn2", "bn3"):
            if hasattr(block, name):
                setattr(self, name, nn.BatchNorm2d(getattr(block, name).num_features * members))
        self.downsample = None
        if block.downsample is not None:
            conv, bn = block.downsample
            self.downsample = nn.Sequential(EnsembleConv(conv, members), nn.BatchNorm2d(bn.num_features * members))

    def forward(self, x: torch.Tensor, stacked: bool) -> torch.Tensor:
        out = F.relu(member_bn(self.bn1, self.conv1(x, stacked), stacked))
        out = member_bn(self.bn2, self.conv2(out, stacked), stacked)
        if self.bottleneck:
            out = member_bn(self.bn3, self.conv3(F.relu(out), stacked), stacked)
        identity = x
        if self.downsample is not None:
            identity = member_bn(self.downsample[1], self.downsample[0](x, stacked), stacked)
        return F.relu(out + identity)


class EnsembleSE(nn.Module):
    """Squeeze-excitation after layer2, bias-free (as in the reference: 2*C*C/r weights per member)."""

    def __init__(self, channels: int, members: int, reduction: int = 8) -> None:
        super().__init__()
        self.members, self.channels, self.hidden = members, channels, channels // reduction
        self.fc1 = nn.Parameter(torch.empty(members * self.hidden, channels))
        self.fc2 = nn.Parameter(torch.empty(members * channels, self.hidden))

    def forward(self, x: torch.Tensor, stacked: bool) -> torch.Tensor:
        pooled = x.mean((2, 3))
        if stacked:  # x: [B, E*C, H, W]
            e = self.members
            h = F.relu(torch.einsum("bec,ehc->beh", pooled.view(-1, e, self.channels), split_members(self.fc1, e)))
            gate = torch.sigmoid(torch.einsum("beh,ech->bec", h, split_members(self.fc2, e))).flatten(1)
        else:
            gate = torch.sigmoid(F.linear(F.relu(F.linear(pooled, self.fc1)), self.fc2))
        return x * gate[:, :, None, None]


class EnsembleLinear(nn.Module):
    """E linear classifiers (with bias) over each member's pooled features."""

    def __init__(self, in_features: int, out_features: int, members: int) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members * out_features))

    def forward(self, x: torch.Tensor, stacked: bool) -> torch.Tensor:
        if not stacked:
            return F.linear(x, self.weight, self.bias)
        e = self.members  # x: [B, E*D] -> [B, E, M]
        w = split_members(self.weight, e)
        return torch.einsum("bed,emd->bem", x.view(-1, e, self.in_features), w) + self.bias.view(e, -1)


class EnsembleMembers(nn.Module):
    """layer2 (+SE), layer3, layer4, pooling and the meta-class classifier of all E members.

    ``pool_grid`` g: layer4's map is average-pooled to g x g cells, flattened (channels, then cells) into the
    classifier. 1 is the reference's global average pooling; 2 keeps where things are (the embedded benchmark's
    "12" and "21" differ only in where each digit is, which a global average cannot tell)."""

    def __init__(self, template: nn.Module, members: int, meta_classes: int, with_se: bool,
                 pool_grid: int = 1) -> None:
        super().__init__()
        if pool_grid < 1:
            raise ValueError(f"model.pool_grid must be >= 1, got {pool_grid}")
        self.members, self.pool_grid = members, pool_grid
        for name in ("layer2", "layer3", "layer4"):
            setattr(self, name, nn.ModuleList(EnsembleBlock(b, members) for b in getattr(template, name)))
        self.se = EnsembleSE(out_channels(template.layer2), members) if with_se else None
        self.fc = EnsembleLinear(template.fc.in_features * pool_grid**2, meta_classes, members)

    def blocks(self) -> Iterator[tuple[str, nn.Module]]:
        """The residual blocks and the SE gate in forward order (units of activation checkpointing)."""
        for i, block in enumerate(self.layer2):
            yield f"layer2.{i}", block
        if self.se is not None:
            yield "se", self.se
        for name in ("layer3", "layer4"):
            for i, block in enumerate(getattr(self, name)):
                yield f"{name}.{i}", block

    def forward(self, x: torch.Tensor, stacked: bool, ckpt: bool = False) -> torch.Tensor:
        """Stacked: stem features tiled E times -> logits [B, E, M]. Otherwise (called through `functional_call`
        with one member's tensors): stem features -> that member's logits [B, M]."""
        for _, block in self.blocks():
            x = checkpoint_once(self, block, x, stacked) if ckpt else block(x, stacked)
        if self.pool_grid == 1:
            return self.fc(x.mean((2, 3)), stacked)
        return member_cells_logits(self.fc, F.adaptive_avg_pool2d(x, self.pool_grid), self.members, stacked)


def member_cells_logits(fc: EnsembleLinear, cells: torch.Tensor, members: int, stacked: bool) -> torch.Tensor:
    """Pooled cells [B, (E*)C, g, g] -> classifier logits. Stacked channels are member-major, so each member's
    cells are flattened (channels, then cells) exactly as in the single-member path."""
    if stacked:
        cells = cells.reshape(len(cells), members, -1)
    return fc(cells.flatten(1), stacked)


@torch.no_grad()
def default_linear_init(t: torch.Tensor, members: int, bias_fan_in: int) -> None:
    """A stacked SE or classifier tensor, member by member, with PyTorch's default Linear initialisation."""
    for chunk in split_members(t, members):
        fan_in = chunk.shape[-1] if t.dim() > 1 else bias_fan_in
        bound = 1.0 / math.sqrt(fan_in)
        chunk.uniform_(-bound, bound)


def out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """Run BatchNorms in train mode without touching running stats (momentum 0, step counter restored)."""
    saved = [(bn, bn.momentum, bn.num_batches_tracked.clone()) for bn in module.modules()
             if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats]
    for bn, _, _ in saved:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum, steps in saved:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(steps)


def checkpoint_once(owner: nn.Module, fn, *args):
    """Activation checkpointing whose backward recomputation does not update BatchNorm running stats twice."""
    calls = [0]

    def run(*inner):
        calls[0] += 1
        if calls[0] == 1:
            return fn(*inner)
        with frozen_bn_stats(owner):
            return fn(*inner)

    return checkpoint(run, *args, use_reentrant=False)
