"""Does faiss run on this GPU beside the pinned torch? And how fast is the torch fallback? (a `gpu_check.sh` step)

    python bench/faiss_gpu_check.py --device cuda     # the GPU machine
    python bench/faiss_gpu_check.py --device cpu      # dry run: the same code, small, on the CPU

Checks, on random 512-d data (100k gallery, 1k queries; --small: 2k / 50): faiss' version and GPU count; with
GPUs, ``StandardGpuResources`` + a GPU ``IndexFlatIP`` whose exact top-10 must equal the CPU index's; the torch
fallback (`irlab.retrieval.torch_index.TorchFlatIP`, what `knn_search` uses when faiss has no GPU) against the
same CPU result; and the search time of each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from irlab.retrieval.torch_index import TorchFlatIP  # noqa: E402


def timed_search(index, queries: np.ndarray, k: int, device: str) -> tuple[np.ndarray, np.ndarray, float]:
    index.search(queries[:8], k)  # warm-up
    start = time.perf_counter()
    scores, ids = index.search(queries, k)
    if device == "cuda":
        torch.cuda.synchronize()
    return scores, ids, time.perf_counter() - start


def agreement(ids: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of result rows identical to the reference (ties may reorder a few on real hardware)."""
    return float((ids == reference).all(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    import faiss

    small = args.small or args.device == "cpu"
    n, nq, dim = (2000, 50, 64) if small else (100_000, 1000, 512)
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((n, dim), dtype=np.float32)
    queries = rng.standard_normal((nq, dim), dtype=np.float32)
    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    print(f"faiss {faiss.__version__}, GPUs visible to faiss: {gpus}; torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}); {n:,} x {dim} gallery, {nq} queries, k={args.k}")
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(gallery)
    ref_s, ref_i, cpu_s = timed_search(cpu, queries, args.k, "cpu")
    print(f"faiss CPU IndexFlatIP: {1000 * cpu_s / nq:.3f} ms/query")
    ok = True
    if gpus:
        res = faiss.StandardGpuResources()
        gpu = faiss.index_cpu_to_gpu(res, 0, faiss.IndexFlatIP(dim))
        gpu.add(gallery)
        _, gpu_i, gpu_s = timed_search(gpu, queries, args.k, "cuda")
        same = agreement(gpu_i, ref_i)
        ok &= same > 0.99
        print(f"faiss GPU IndexFlatIP: {1000 * gpu_s / nq:.3f} ms/query, rows equal to CPU: {same:.4f}")
    else:
        print("faiss GPU: not available in this faiss build -> knn_search uses the torch index on the GPU")
    index = TorchFlatIP(gallery, args.device)
    t_s, t_i, t_time = timed_search(index, queries, args.k, args.device)
    same = agreement(t_i, ref_i)
    ok &= same > 0.99 and bool(np.allclose(t_s, ref_s, atol=1e-3))
    print(f"torch TorchFlatIP on {args.device}: {1000 * t_time / nq:.3f} ms/query, rows equal to faiss CPU: "
          f"{same:.4f}, speed-up vs faiss CPU x{cpu_s / t_time:.1f}")
    if not ok:
        raise SystemExit("results differ from the exact CPU search")


if __name__ == "__main__":
    main()
