"""AREIR network: a shared ResNet stem and E member branches (layer2 [+SE], layer3, layer4, pool, classifier).

Every member tensor is stored *stacked*: a conv of member e is rows ``[e*out, (e+1)*out)`` of one weight of shape
``[E*out, in/groups, k, k]``, a BatchNorm is one ``BatchNorm2d(E*C)``, the SE and classifier weights are
``[E*rows, cols]``. That single layout serves three interchangeable formulations (``member_impl``):

* ``loop``    -- a Python loop over members, each running ordinary convs on its own weights (the reference;
  the stacked weights are unbound once per forward, so gradients are gathered with one stack per tensor);
* ``grouped`` -- members stacked along channels: the stem output is tiled E times and every conv becomes one
  grouped conv (``groups = E * groups``); BatchNorm over E*C channels is exactly E separate BatchNorms;
* ``vmap``    -- ``torch.func.vmap`` of the single-member forward over the stacked weights;
* ``auto``    -- grouped on CUDA, loop otherwise. On CPU (oneDNN, 2 cores) the three cost the same or the loop
  wins (bench/areir_members.py: grouped 0.7-1.0x the loop's speed): convolutions are compute-bound there. On a
  GPU the loop issues E times more, E times smaller kernels (~3k launches per forward for E=48), so stacking the
  members into one grouped conv per layer is the formulation that keeps the GPU busy.

Checkpoints are therefore identical across formulations, the numerical equivalence test needs no weight copying,
and ``SyncBatchNorm`` conversion (DDP) sees ordinary BatchNorm modules. Member weights are initialised from one
torchvision model per member (random init, or the same pretrained weights for all), so every member starts
exactly like a torchvision ResNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from areir.layers import EnsembleMembers, checkpoint_once, default_linear_init, out_channels, split_members
from areir.small_members import MEMBER_WIDTH, STEM_WIDTHS, SmallCNNMembers, small_stem
from irlab.backbones import build_torchvision

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")
ARCHS = (*RESNET_ARCHS, "cnn_small")
MEMBER_IMPLS = ("loop", "grouped", "vmap")
AUTO_IMPL = {"cuda": "grouped"}  # `auto`: grouped on GPU, the loop elsewhere (measured fastest on CPU)


def build_template(arch: str, pretrained: bool | str = False) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}")
    return build_torchvision(arch, pretrained)


@dataclass(frozen=True)
class AREIRNetConfig:
    """The network's settings; these defaults are the only ones (`AREIRModule` takes each with this default)."""

    arch: str = "resnet18"
    members: int = 48
    meta_classes: int = 12
    with_se: bool = True
    pretrained: bool | str = False
    member_impl: str = "auto"
    random_weighting: bool = False
    checkpoint_members: bool = False
    pool_grid: int = 1
    member_width: int | None = None  # cnn_small members' channels (None: the baseline trunk's 128)


class AREIRNet(nn.Module):
    """Shared stem + E members. `forward(images) -> raw logits [B, E, M]`."""

    def __init__(self, config: AREIRNetConfig) -> None:
        super().__init__()
        arch, members, meta_classes, with_se = config.arch, config.members, config.meta_classes, config.with_se
        pretrained, member_impl, random_weighting = config.pretrained, config.member_impl, config.random_weighting
        checkpoint_members, pool_grid = config.checkpoint_members, config.pool_grid
        if member_impl not in (*MEMBER_IMPLS, "auto"):
            raise ValueError(f"model.member_impl must be one of {(*MEMBER_IMPLS, 'auto')}, got {member_impl!r}")
        if members < 1 or meta_classes < 1:
            raise ValueError(f"model.members and model.meta_classes must be >= 1, got {members}, {meta_classes}")
        if checkpoint_members and member_impl == "vmap":
            raise ValueError("model.checkpoint_members is not supported with member_impl=vmap; use grouped or loop")
        self.num_members, self.meta_classes = members, meta_classes
        self.member_impl, self.random_weighting = member_impl, random_weighting
        self.checkpoint_members = checkpoint_members
        if arch == "cnn_small":  # the embedded benchmark's trunk (areir/small_members.py)
            if pretrained:
                raise ValueError("cnn_small has no pretrained weights: set model.pretrained=false")
            if pool_grid != 1:
                raise ValueError("model.pool_grid applies to ResNet members; cnn_small members max-pool to 4x4")
            self.stem, self.stem_channels = small_stem(), STEM_WIDTHS[-1]
            self.members = SmallCNNMembers(members, meta_classes, with_se, config.member_width or MEMBER_WIDTH)
            self.members.reset_parameters()
            return
        if config.member_width is not None:
            raise ValueError("model.member_width applies to cnn_small members; ResNet members keep torchvision's")
        template = build_template(arch, pretrained)
        self.stem = nn.Sequential(template.conv1, template.bn1, template.relu, template.maxpool, template.layer1)
        self.stem_channels = out_channels(template.layer1)
        self.members = EnsembleMembers(template, members, meta_classes, with_se, pool_grid)
        self.init_members(arch, pretrained, template)

    # ---- initialisation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_members(self, arch: str, pretrained: bool | str, template: nn.Module) -> None:
        """Member e's layer2-4 from a torchvision model (member 0: the template; later: fresh random models, or
        the template again when pretrained); SE and classifier with PyTorch's default Linear init."""
        if self.stem[0].weight.is_meta:
            return
        tensors = dict(self.members.named_parameters()) | dict(self.members.named_buffers())
        for e in range(self.num_members):
            source = template if (e == 0 or pretrained) else build_template(arch, False)
            state = source.state_dict()
            for name, t in tensors.items():
                if name.startswith(("layer2", "layer3", "layer4")) and not name.endswith("num_batches_tracked"):
                    split_members(t, self.num_members)[e].copy_(state[name])
        for t in [p for n, p in self.members.named_parameters() if n.startswith(("se.", "fc."))]:
            default_linear_init(t, self.num_members, self.members.fc.in_features)

    # ---- forward ----------------------------------------------------------------------------------------
    def branch_weights(self, device: torch.device) -> torch.Tensor | None:
        """The reference's random branch weighting: member e's input is scaled by w_e, w = softmax(U(0,1)^E).

        Drawn per forward in training only. Evaluation uses the expected weight 1/E (softmax of i.i.d. noise is
        exchangeable, so E[w_e] = 1/E): deterministic, and consistent with the BatchNorm running statistics that
        were accumulated on scaled inputs (unscaled inputs would be ~E times off in layer2's first BatchNorms).
        Note that in training, layer2 starts with conv -> BatchNorm on batch statistics, which cancels a
        per-member scale up to BatchNorm's eps, so the weighting mostly acts through those running statistics.
        """
        if not self.random_weighting:
            return None
        if not self.training:
            return torch.full((self.num_members,), 1.0 / self.num_members, device=device)
        return torch.softmax(torch.rand(self.num_members, device=device), dim=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.stem(images)
        weights = self.branch_weights(feats.device)
        impl = self.resolved_impl(feats.device)
        if impl == "grouped":
            x = feats.repeat(1, self.num_members, 1, 1)
            if weights is not None:
                x = x * weights.to(x.dtype).repeat_interleave(self.stem_channels)[None, :, None, None]
            ckpt = self.checkpoint_members and self.training and torch.is_grad_enabled()
            return self.members(x, True, ckpt=ckpt)
        out = self._forward_loop(feats, weights) if impl == "loop" else self._forward_vmap(feats, weights)
        if self.training:  # per-member BatchNorm calls skip the step counter; count this step once, as grouped does
            for bn in self.members.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    bn.num_batches_tracked.add_(1)
        return out

    def resolved_impl(self, device: torch.device) -> str:
        """The formulation used on `device` (``auto`` resolves per device type)."""
        if self.member_impl == "auto":
            return AUTO_IMPL.get(device.type, "loop")
        return self.member_impl

    def member_states(self) -> dict[str, torch.Tensor]:
        """Every member tensor as [E, ...] (views of the stacked storage; the step counters are left out)."""
        e = self.num_members
        state = {n: split_members(t, e) for n, t in self.members.named_parameters()}
        return state | {n: split_members(t, e) for n, t in self.members.named_buffers() if t.dim() > 0}

    def _forward_loop(self, feats: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """E ordinary small forwards. Parameters are unbound once (backward: one stack per tensor, not E scatters);
        buffers are indexed so that BatchNorm updates its running stats in place."""
        param_names = {n for n, _ in self.members.named_parameters()}
        params = {n: t.unbind(0) for n, t in self.member_states().items() if n in param_names}
        buffers = {n: t for n, t in self.member_states().items() if n not in param_names}
        ckpt = self.checkpoint_members and self.training and torch.is_grad_enabled()
        outs = []
        for e in range(self.num_members):
            state = {n: t[e] for n, t in params.items()} | {n: t[e] for n, t in buffers.items()}
            x = feats if weights is None else feats * weights[e].to(feats.dtype)

            def run(x: torch.Tensor, state: dict = state) -> torch.Tensor:
                return torch.func.functional_call(self.members, state, (x, False), strict=False)

            outs.append(checkpoint_once(self, run, x) if ckpt else run(x))
        return torch.stack(outs, dim=1)

    def _forward_vmap(self, feats: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """`torch.func.vmap` of the single-member forward over the stacked tensors (in-place BN stats included)."""
        if self.checkpoint_members and self.training:
            raise ValueError("model.checkpoint_members is not supported with member_impl=vmap; use grouped or loop")

        def one(state: dict, x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.members, state, (x, False), strict=False)

        if weights is None:
            out = torch.func.vmap(one, in_dims=(0, None))(self.member_states(), feats)
        else:
            x = weights.to(feats.dtype)[:, None, None, None, None] * feats
            out = torch.func.vmap(one, in_dims=(0, 0))(self.member_states(), x)
        return out.transpose(0, 1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
