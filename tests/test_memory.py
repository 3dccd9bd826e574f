"""Training-memory accounting (irlab.memory): saved activations without parameters or their autocast copies."""

from __future__ import annotations

import torch
from torch import nn

from irlab.memory import parameter_count, saved_activation_bytes


def test_saved_activations_count_inputs_not_weights_or_their_bf16_copies():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    x = torch.randn(2, 4)
    assert saved_activation_bytes(lambda: model(x), model, bf16=False) == 2 * 4 * 4  # the fp32 input only
    # under bf16 autocast the linear keeps the bf16 input; its bf16 weight copy is a parameter cast, not counted
    assert saved_activation_bytes(lambda: model(x), model, bf16=True) == 2 * 4 * 2
    # a view of a stacked weight, cast (what AREIR's per-member weights are): still not an activation
    stacked = nn.Parameter(torch.randn(2, 3, 4))
    holder = nn.Module()
    holder.w = stacked
    assert saved_activation_bytes(lambda: x @ stacked.unbind(0)[1].T, holder, bf16=True) == 2 * 4 * 2


def test_parameter_count_on_the_meta_device_is_exact():
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 5))

    real = build()
    assert parameter_count(build) == (sum(p.numel() for p in real.parameters()),) * 2
