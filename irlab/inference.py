"""Running a model over a loader outside the training loop (codebook fits, identifiers, query galleries).

One loop for every such pass, so each gets the same guarantees: no gradients, the model in eval mode for the
pass and put back in its previous mode afterwards (a pass in the middle of training must not leave dropout or
BatchNorm switched), batches moved to the model's device, outputs gathered on the CPU in loader order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from irlab.sharding import gather_rows, rank_and_world, shard_positions

log = logging.getLogger(__name__)


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


class NoImagesError(ValueError):
    """A loader that yielded no readable image."""


def map_images(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
               loader: DataLoader, device: torch.device | str | None = None, with_index: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``fn(images)`` for every batch of `loader` (``batch["image"]`` on `device`, default: the model's),
    concatenated in loader order on the CPU; ``fn`` may return a tensor or a tuple of tensors. Floating outputs
    come back as float32. ``with_index``: the batches' ``index`` (dataset positions; unreadable images skipped
    under ``dataset.skip_corrupt`` are missing) comes last. A batch the loader's collation returns as None (no
    readable image in it) is skipped; `NoImagesError` when no batch had one."""
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    chunks: list[tuple[torch.Tensor, ...]] = []
    with evaluation_mode(model):
        for batch in loader:
            if batch is None:
                continue
            out = fn(batch["image"].to(device))
            out = out if isinstance(out, tuple) else (out,)
            out = tuple((o.float() if o.is_floating_point() else o).cpu() for o in out)
            chunks.append((*out, batch["index"].cpu()) if with_index else out)
    if not chunks:
        raise NoImagesError("the loader yielded no images")
    joined = tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))
    return joined if len(joined) > 1 else joined[0]


def map_dataset_sharded(model: nn.Module, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], dataset: Dataset,
                        make_loader: Callable[[Dataset], DataLoader], dst: int | None | Sequence[int | None] = 0,
                        fill: float | int = 0, label: str = "images") -> tuple[torch.Tensor | None, ...]:
    """`map_images` of a dataset of `datamodules.base.RecordDataset` kind (its items carry their ``index``) split
    across DDP ranks: each rank runs every world-th image on its own device, and the outputs come back in dataset
    order (`irlab.sharding.gather_rows`) on rank `dst` (None: on every rank; other ranks get None; a sequence: one
    per output). Rows of images that could not be read (``dataset.skip_corrupt``) hold `fill`. Without DDP it is
    `map_images` in order.

    Why: one rank encoding a whole dataset while the others wait (and, after ``fit``, on the CPU where Lightning
    left the model) is what kept GPUs idle for hours at In-shop size; sharded, each of 8 GPUs encodes 1/8."""
    positions = shard_positions(len(dataset))
    rank, world = rank_and_world()
    device = next(iter(model.parameters()), torch.empty(0)).device
    log.info(f"{label}: rank {rank} of {world} encodes {len(positions)} of {len(dataset)} images on {device}")
    if len(positions):
        *outputs, index = map_images(model, fn, make_loader(Subset(dataset, positions.tolist())), with_index=True)
    else:  # fewer images than ranks: shapes and dtypes from one image, no rows
        *outputs, index = map_images(model, fn, make_loader(Subset(dataset, [0])), with_index=True)
        outputs, index = [o[:0] for o in outputs], index[:0]
    targets = list(dst) if isinstance(dst, Sequence) else [dst] * len(outputs)
    return tuple(gather_rows(o, index, len(dataset), dst=d, fill=fill) for o, d in zip(outputs, targets, strict=True))
