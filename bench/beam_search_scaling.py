"""Per-query search time as the database grows: constrained beam search (KV cache / re-decoding) vs exact kNN.

    python bench/beam_search_scaling.py                      # 10k, 100k, 1M identifiers; ~2-3 min on 2 cores
    python bench/beam_search_scaling.py --width 768 --layers 12 --heads 12 --beam 30   # the paper's decoder

Synthetic and timing-only: uniformly random identifiers (D x K), a randomly initialised decoder, random encoder
tokens as memory, random d=768 features for faiss ``IndexFlatIP`` (exact inner product). Beam search must stay
flat as the database grows (the trie is a per-level transition table: one gather per step, whatever the size);
exact kNN grows linearly. Trie construction is reported separately (a one-off per database).

Timing on a shared machine varies several-fold within minutes, so the sizes are interleaved (round r times every
size once, after one warm-up round), each timing is reported as min and median over ``--repeats`` rounds, and the
load average is printed before and after, flagged when other work competes for the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irgen.beam_search import beam_search  # noqa: E402
from irgen.decoder import DecoderConfig, IdentifierDecoder  # noqa: E402
from irgen.trie import IdentifierTrie  # noqa: E402


def timed(fn, *args, device: torch.device, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def load_note(when: str) -> str:
    """The load average, with a warning when other work competes for the cores (timings then vary several-fold)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    busy = load > 0.5 * cores + 0.5
    return f"load average {when}: {load:.2f} on {cores} cores" + (" -- CONTENDED: timings unreliable" if busy else "")


def trie_megabytes(trie: IdentifierTrie) -> float:
    tensors = [*trie.child_start, *trie.node_code, *(t for t in trie.tables if t is not None), trie.leaf_codes,
               trie.item_start, trie.items, trie.item_leaf]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def knn_index(n: int, dim: int, rng: np.random.Generator, chunk: int = 100_000):
    import faiss

    index = faiss.IndexFlatIP(dim)
    for lo in range(0, n, chunk):  # generated in chunks: peak memory = the index itself (n x dim float32)
        index.add(rng.standard_normal((min(chunk, n - lo), dim), dtype=np.float32))
    return index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--levels", type=int, default=4, help="D")
    p.add_argument("--codes", type=int, default=256, help="K")
    p.add_argument("--beam", type=int, default=30)
    p.add_argument("--queries", type=int, default=32, help="queries searched together (one batch)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--memory-tokens", type=int, default=197, help="encoder tokens per query (ViT-B/16 at 224 px)")
    p.add_argument("--dim", type=int, default=768, help="encoder / kNN feature dimension")
    p.add_argument("--knn-k", type=int, default=100)
    p.add_argument("--no-knn", action="store_true", help="skip faiss (it needs sizes x dim x 4 bytes of memory)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch and faiss threads (1: stable on a shared machine; 0: leave the defaults)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the decoder and trie; faiss stays on the CPU)")
    p.add_argument("--no-redecode", action="store_true", help="skip the re-decoding baseline (slow at paper size)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    cfg = DecoderConfig(args.levels, args.codes, args.width, args.layers, args.heads, memory_dim=args.dim)
    decoder = IdentifierDecoder(cfg).eval().to(device)
    memory = torch.randn(args.queries, args.memory_tokens, args.dim, device=device)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    if not args.no_knn:
        import faiss

        if args.threads:
            faiss.omp_set_num_threads(args.threads)
    print(load_note("at start"))
    print(f"decoder {args.width}w x {args.layers}L x {args.heads}H on {device}, "
          f"identifiers {args.levels}x{args.codes}, "
          f"beam {args.beam}, {args.queries} queries per batch, {args.memory_tokens} memory tokens, "
          f"{args.threads or 'default'} thread(s), {args.repeats} interleaved rounds")
    setups = {}
    for n in args.sizes:
        codes = rng.integers(0, args.codes, (n, args.levels))
        start = time.perf_counter()
        trie = IdentifierTrie.build(codes, args.codes).to(device)
        build = time.perf_counter() - start
        with torch.no_grad():
            cached_out = beam_search(decoder, memory, trie, args.beam)
            if not args.no_redecode:
                uncached_out = beam_search(decoder, memory, trie, args.beam, use_cache=False)
                if not torch.equal(cached_out[0], uncached_out[0]):
                    raise AssertionError("cached and re-decoding beam search disagree")
        setups[n] = (trie, build, knn_index(n, args.dim, rng) if not args.no_knn else None)
    variants = {"beam+cache": lambda t, i: beam_search(decoder, memory, t, args.beam)}
    if not args.no_redecode:
        variants["re-decode"] = lambda t, i: beam_search(decoder, memory, t, args.beam, use_cache=False)
    if not args.no_knn:
        variants["kNN"] = lambda t, i: i.search(queries, args.knn_k)
    times: dict[tuple[str, int], list[float]] = {}
    with torch.no_grad():
        for round_ in range(args.repeats + 1):  # round 0 warms up
            for n, (trie, _, index) in setups.items():
                for name, fn in variants.items():
                    seconds = timed(fn, trie, index, device=device)
                    if round_:
                        times.setdefault((name, n), []).append(1000 * seconds / args.queries)
    header = f"{'identifiers':>11} | {'trie build s':>12} | {'trie MB':>7} | " + " | ".join(
        f"{name + ' ms/q min / median':>28}" for name in variants)
    print(header)
    print("-" * len(header))
    for n, (trie, build, _) in setups.items():
        cells = " | ".join(f"{min(times[name, n]):>13.3f} / {statistics.median(times[name, n]):>12.3f}"
                           for name in variants)
        print(f"{n:>11,} | {build:>12.2f} | {trie_megabytes(trie):>7.1f} | {cells}", flush=True)
    if len(setups) > 1:
        first, last = min(setups), max(setups)
        ratios = ", ".join(f"{name} x{statistics.median(times[name, last]) / statistics.median(times[name, first]):.2f}"
                           for name in variants)
        print(f"\n{last / first:.0f}x more identifiers, per-query median time: {ratios}")
    print(load_note("at end"))


if __name__ == "__main__":
    main()
