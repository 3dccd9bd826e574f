"""`gather_rows` on 2 gloo ranks: unequal row counts (a rank that skipped unreadable images, a rank with none),
duplicated positions (sampler padding), messages cut into pieces, to one rank or to all."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from irlab import sharding
from irlab.sharding import gather_rows, shard_positions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expected_table(total: int = 23, dim: int = 5) -> torch.Tensor:
    return torch.arange(total * dim, dtype=torch.float32).reshape(total, dim)


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sharding.PIECE_BYTES = 3 * 5 * 4  # three rows a message: several pieces per rank
    table = expected_table()
    results = {}
    # rank 0: positions 0, 2, ..., 22 and a duplicate of 4; rank 1: odd positions but 7 (unreadable)
    mine = np.r_[np.arange(0, 23, 2), 4] if rank == 0 else np.array([p for p in range(1, 23, 2) if p != 7])
    for dst in (0, 1, None):
        got = gather_rows(table[mine], mine, 23, dst=dst, fill=-1.0)
        results[str(dst)] = None if got is None else got.numpy()
    # a rank without rows: shapes come from its own (empty) tensor
    rows = table[:0] if rank == 1 else table[:3]
    results["empty"] = gather_rows(rows, np.arange(len(rows)), 3, dst=None).numpy()
    results["shard"] = shard_positions(7)
    np.save(f"{out}/rank{rank}.npy", results, allow_pickle=True)
    dist.destroy_process_group()


def test_gather_rows_on_two_gloo_ranks(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [np.load(tmp_path / f"rank{r}.npy", allow_pickle=True).item() for r in (0, 1)]
    expected = expected_table().numpy().copy()
    expected[7] = -1.0  # nobody had it: the fill value
    for rank, res in enumerate(ranks):
        for dst in ("0", "1", "None"):
            if dst in (str(rank), "None"):
                np.testing.assert_array_equal(res[dst], expected)
            else:
                assert res[dst] is None
        np.testing.assert_array_equal(res["empty"], expected_table()[:3].numpy())
    assert ranks[0]["shard"].tolist() == [0, 2, 4, 6] and ranks[1]["shard"].tolist() == [1, 3, 5]


def test_without_ddp_it_places_rows():
    out = gather_rows(torch.tensor([[1.0], [2.0]]), np.array([2, 0]), 3, fill=9.0)
    assert out.flatten().tolist() == [2.0, 9.0, 1.0]
