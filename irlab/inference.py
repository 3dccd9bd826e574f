"""Running a model over a loader outside the training loop (codebook fits, identifiers, query galleries).

One loop for every such pass, so each gets the same guarantees: no gradients, the model in eval mode for the
pass and put back in its previous mode afterwards (a pass in the middle of training must not leave dropout or
BatchNorm switched), batches moved to the model's device, outputs gathered on the CPU in loader order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode, without gradients, restored to its previous mode on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def map_images(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
               loader: DataLoader, device: torch.device | str | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``fn(images)`` for every batch of `loader` (``batch["image"]`` on `device`, default: the model's),
    concatenated in loader order on the CPU; ``fn`` may return a tensor or a tuple of tensors. Floating outputs
    come back as float32."""
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    chunks: list[tuple[torch.Tensor, ...]] = []
    with evaluation_mode(model):
        for batch in loader:
            out = fn(batch["image"].to(device))
            out = out if isinstance(out, tuple) else (out,)
            chunks.append(tuple((o.float() if o.is_floating_point() else o).cpu() for o in out))
    if not chunks:
        raise ValueError("the loader yielded no images")
    joined = tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))
    return joined if len(joined) > 1 else joined[0]
