"""Work split across DDP ranks and its results put back together by position.

Passes over a dataset outside Lightning's loops (identifiers, codebook re-fits) give each rank a strided shard of
the positions (`shard_positions`); evaluation gives each rank what its DistributedSampler drew, padding
duplicates included. `gather_rows` assembles the rows of every rank into one ``[total, ...]`` CPU tensor, in
position order, on one rank (``dst``) or on all of them.

Why not ``all_gather``: it needs equal shapes on every rank (a rank that skipped unreadable images hangs it) and
leaves the whole result on every rank's device and host. At SOP size with AREIR's 24,000-d embedding (60,502 x
24,000 float32 = 5.8 GB) an all_gather costs every rank 5.8 GB of host memory plus 5.8 GB of device memory on
top of the model; here the rows travel one rank at a time (point-to-point) in pieces of at most 256 MB, so the
receiving rank holds the result once plus one piece, and the other ranks keep only their own rows. Sizes are
exchanged first, so ranks may hold different numbers of rows (zero included).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

PIECE_BYTES = 256 * 2**20  # largest message: bounds the receiving side's buffer


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def shard_positions(total: int, rank: int | None = None, world: int | None = None) -> np.ndarray:
    """This rank's positions of ``range(total)``: every world-th one from its rank (shards differ by at most one
    position in size, and neighbouring positions -- often the same class or folder -- spread over ranks)."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    return np.arange(rank, total, world, dtype=np.int64)


def communication_device() -> torch.device:
    """Where collectives take their tensors: the current CUDA device for NCCL, the CPU otherwise (gloo)."""
    if distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(rows: torch.Tensor, positions: np.ndarray | torch.Tensor, total: int, dst: int | None = 0,
                fill: float | int = 0) -> torch.Tensor | None:
    """Every rank's `rows` ``[n_rank, ...]`` written at their `positions` (``[n_rank]``, ints in ``[0, total)``)
    of one ``[total, ...]`` CPU tensor (``fill`` where no rank wrote), on rank `dst`, or on every rank with
    ``dst=None``; other ranks get None. Positions seen twice must carry identical rows (the sampler's padding).
    Every rank must call it (a collective), with rows of one dtype and trailing shape."""
    positions = torch.as_tensor(np.asarray(positions), dtype=torch.int64).reshape(-1)
    if len(positions) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(positions)} positions")
    rank, world = rank_and_world()
    receives = dst is None or rank == dst
    out = torch.full((total, *rows.shape[1:]), fill, dtype=rows.dtype) if receives else None
    if world == 1:
        out[positions] = rows.cpu()
        return out
    device = communication_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(rows)], dtype=torch.int64, device=device))
    sizes = [int(s.item()) for s in sizes]
    # from the shape alone: every rank must cut the same pieces, also one that holds no rows
    per_piece = max(1, PIECE_BYTES // (math.prod(rows.shape[1:]) * rows.element_size() or 1))
    for src in range(world):
        for lo in range(0, sizes[src], per_piece):  # pieces: the receiver's buffer stays <= PIECE_BYTES
            n = min(per_piece, sizes[src] - lo)
            if src == rank:
                chunk, where = rows[lo:lo + n].to(device), positions[lo:lo + n].to(device)
            elif receives:
                chunk = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype, device=device)
                where = torch.empty(n, dtype=torch.int64, device=device)
            else:
                chunk = where = None
            if dst is None:  # everyone receives: one broadcast per source rank and piece
                dist.broadcast(chunk, src=src)
                dist.broadcast(where, src=src)
            elif src != dst and rank == src:
                dist.send(chunk.contiguous(), dst=dst)
                dist.send(where.contiguous(), dst=dst)
            elif src != dst and rank == dst:
                dist.recv(chunk, src=src)
                dist.recv(where, src=src)
            if receives:
                out[where.cpu()] = chunk.cpu()
    return out
