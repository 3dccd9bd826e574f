"""Peak host memory per rank of the evaluation gather at SOP size (60,502 test images, all-vs-all) with AREIR's
E x M = 48 x 500 = 24,000-d embedding, on 2 gloo ranks (CPU, synthetic embeddings).

    python bench/ddp_eval_memory.py     # before vs after at dim 6,000 (a quarter), then both at 24,000
    python bench/ddp_eval_memory.py --dims 24000 --variants after

``before``: the previous evaluation gather (Lightning's all_gather of every output to every rank, then a full
array on every rank and boolean-mask copies of the queries and the gallery on rank 0). ``after``: the current
`RetrievalModule._gathered_outputs` (`irlab.sharding.gather_rows` to rank 0 only, one rank's rows at a time) and
`EvalSet.queries`/`gallery` (views for all-vs-all). Each variant runs in fresh processes; the figure is each
rank's peak resident memory (ru_maxrss) above what it held before making its embeddings, so it includes the
rank's own outputs. The search itself is not run (at 24,000-d it is hours of CPU; its memory is bounded by
`bench/eval_memory.py`). Memory is linear in the dimension: the quarter-size "before" x 4 is its full size,
which does not fit this 24 GiB machine on 2 ranks (that is the point).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irlab.module import RetrievalModule  # noqa: E402

SOP_TEST = 60_502
BATCH = 256


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_outputs(rank: int, world: int, n: int, dim: int) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """What `validation_step` collects on this rank: DistributedSampler's strided share (padded to equal counts
    with duplicates), per batch (index, {"embedding": float32 [B, dim]})."""
    per_rank = -(-n // world)
    positions = np.arange(rank, per_rank * world, world) % n
    g = torch.Generator().manual_seed(rank)
    return [(torch.from_numpy(positions[i:i + BATCH]), {"embedding": torch.randn(len(positions[i:i + BATCH]), dim,
                                                                              generator=g)})
            for i in range(0, len(positions), BATCH)]


def before(chunks, n: int, world: int) -> dict[str, np.ndarray] | None:
    """The previous `_gathered_outputs` + `rank_gallery` slicing (commit 88ca620), with torch.distributed's
    all_gather in the place of Lightning's (the same collective)."""
    index = torch.cat([c[0] for c in chunks])
    out = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(out, index)
    index = torch.stack(out).reshape(-1).numpy()
    value = torch.cat([c[1]["embedding"] for c in chunks])
    out = [torch.empty_like(value) for _ in range(world)]
    dist.all_gather(out, value)
    value = torch.stack(out).flatten(0, 1).numpy()
    full = np.zeros((n, value.shape[1]), dtype=value.dtype)
    full[index] = value
    if dist.get_rank() == 0:
        mask = np.ones(n, dtype=bool)  # all-vs-all: every image is a query and in the gallery
        queries, gallery = full[mask], full[mask]
        return {"embedding": full, "queries": queries, "gallery": gallery}
    return None


def after(chunks, n: int, world: int) -> dict[str, np.ndarray] | None:
    fake = SimpleNamespace(_eval_outputs=chunks)
    gathered = RetrievalModule._gathered_outputs(fake, n)
    if gathered is None:
        return None
    outputs, _ = gathered
    mask = np.ones(n, dtype=bool)
    return {"embedding": outputs["embedding"], "queries": outputs["embedding"] if mask.all() else None}


def worker(rank: int, world: int, variant: str, n: int, dim: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    start = rss_mb()
    chunks = rank_outputs(rank, world, n, dim)
    own = sum(c[1]["embedding"].numel() * 4 for c in chunks) / 2**20
    result = (before if variant == "before" else after)(chunks, n, world)
    del chunks
    dist.barrier()
    Path(out_dir, f"{variant}_{dim}_{rank}.json").write_text(json.dumps(
        {"rank": rank, "peak_mb": peak_mb() - start, "own_outputs_mb": own, "holds_result": result is not None}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=SOP_TEST)
    parser.add_argument("--dims", type=int, nargs="+", default=[6000, 24000])
    parser.add_argument("--variants", nargs="+", default=["before", "after"])
    args = parser.parse_args()
    full_mb = lambda d: args.n * d * 4 / 2**20  # noqa: E731
    print(f"load average {os.getloadavg()[0]:.2f}; {args.n} images, 2 gloo ranks; peak RSS above start (MB)")
    print(f"{'dim':>6} {'variant':>7} {'full array':>11} {'rank 0':>8} {'rank 1':>8}")
    with tempfile.TemporaryDirectory() as out:
        for dim in args.dims:
            for variant in args.variants:
                if variant == "before" and full_mb(dim) * 2.5 * 2 > 20 * 1024:
                    print(f"{dim:>6} {variant:>7}  skipped: needs ~{full_mb(dim) * 5 / 1024:.0f} GB on 2 ranks")
                    continue
                port = 29500 + dim % 1000 + (variant == "after")
                mp.spawn(worker, args=(2, variant, args.n, dim, port, out), nprocs=2)
                ranks = [json.loads(Path(out, f"{variant}_{dim}_{r}.json").read_text()) for r in (0, 1)]
                print(f"{dim:>6} {variant:>7} {full_mb(dim):>11.0f} {ranks[0]['peak_mb']:>8.0f} "
                      f"{ranks[1]['peak_mb']:>8.0f}")


if __name__ == "__main__":
    main()
