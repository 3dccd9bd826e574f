"""Training-memory accounting that works on any device (CPU included): what autograd keeps for backward, and
what the parameters and their optimizer state take. `bench/memory_estimate.py` predicts a GPU run's peak from
these; `bench/areir_members.py` prints the saved activations of each member formulation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

# fp32 weight + fp32 gradient + Adam's two fp32 moments (bf16-mixed keeps fp32 master weights)
STATE_BYTES_PER_PARAM = 16
# bf16 autocast caches a bf16 copy of each weight it casts, for the whole forward
AUTOCAST_COPY_BYTES_PER_PARAM = 2


def saved_activation_bytes(forward: Callable[[], torch.Tensor], model: nn.Module, bf16: bool,
                           device_type: str = "cpu") -> int:
    """Bytes of the distinct storages autograd keeps for backward after ``forward()`` (a training forward of
    `model`), parameters and autocast's low-precision copies of them excluded (those scale with the model, not
    the batch: `AUTOCAST_COPY_BYTES_PER_PARAM`): the activation memory of a step. Under
    ``torch.utils.checkpoint`` only the checkpointed segments' inputs are kept, which is what this then counts."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not _is_parameter_cast(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        forward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def parameter_count(build: Callable[[], nn.Module]) -> tuple[int, int]:
    """(all, trainable) parameters of the module `build()` makes, built on the meta device: exact counts of
    billion-parameter models without allocating them."""
    with torch.device("meta"):
        module = build()
    return (sum(p.numel() for p in module.parameters()),
            sum(p.numel() for p in module.parameters() if p.requires_grad))


# autograd nodes that only re-type or re-view their single input
_VIEW_OR_CAST = {"ToCopyBackward0", "UnbindBackward0", "SelectBackward0", "ViewBackward0", "SliceBackward0",
                 "ExpandBackward0", "AliasBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0",
                 "SqueezeBackward0", "SqueezeBackward1", "UnsqueezeBackward0", "UnsafeViewBackward0",
                 "ReshapeAliasBackward0"}


def _is_parameter_cast(t: torch.Tensor) -> bool:
    """A dtype cast of (a view of) a leaf parameter: what autocast saves for a layer's backward instead of the
    weight (AREIR's stacked member weights are unbound per member before the cast)."""
    fn, cast = t.grad_fn, False
    while fn is not None and type(fn).__name__ in _VIEW_OR_CAST:
        cast |= type(fn).__name__ == "ToCopyBackward0"
        inputs = [nxt for nxt, _ in fn.next_functions if nxt is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
    return cast and fn is not None and type(fn).__name__ == "AccumulateGrad"
