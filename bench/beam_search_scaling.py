"""Per-query search time as the database grows: constrained beam search (KV cache / re-decoding) vs exact kNN.

    python bench/beam_search_scaling.py                      # 10k, 100k, 1M identifiers; ~2-3 min on 2 cores
    python bench/beam_search_scaling.py --width 768 --layers 12 --heads 12 --beam 30   # the paper's decoder

Synthetic and timing-only: uniformly random identifiers (D x K), a randomly initialised decoder, random encoder
tokens as memory, random d=768 features for faiss ``IndexFlatIP`` (exact inner product). Beam search must stay
flat as the database grows (the trie is a per-level transition table: one gather per step, whatever the size);
exact kNN grows linearly. Trie construction is reported separately (a one-off per database). Each timing is the
fastest of ``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from irgen.beam_search import beam_search  # noqa: E402
from irgen.decoder import DecoderConfig, IdentifierDecoder  # noqa: E402
from irgen.trie import IdentifierTrie  # noqa: E402


def best_seconds(repeats: int, fn, *args, **kwargs) -> float:
    """Fastest of `repeats` runs after a warm-up: on a shared machine the minimum is the least noisy estimate."""
    fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


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
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads (1: stable on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    cfg = DecoderConfig(args.levels, args.codes, args.width, args.layers, args.heads, memory_dim=args.dim)
    decoder = IdentifierDecoder(cfg).eval()
    memory = torch.randn(args.queries, args.memory_tokens, args.dim)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    if not args.no_knn:
        import faiss

        faiss.omp_set_num_threads(args.threads)

    print(f"decoder {args.width}w x {args.layers}L x {args.heads}H, identifiers {args.levels}x{args.codes}, "
          f"beam {args.beam}, {args.queries} queries per batch, {args.memory_tokens} memory tokens, "
          f"{args.threads} thread(s), best of {args.repeats}")
    header = (f"{'identifiers':>11} | {'trie build s':>12} | {'trie MB':>7} | {'beam+cache ms/q':>15} | "
              f"{'re-decode ms/q':>14} | {'re-decode/cache':>15} | {'kNN ms/q':>8} | {'kNN/beam':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for n in args.sizes:
        codes = rng.integers(0, args.codes, (n, args.levels))
        start = time.perf_counter()
        trie = IdentifierTrie.build(codes, args.codes)
        build = time.perf_counter() - start
        cached_out = beam_search(decoder, memory, trie, args.beam)
        uncached_out = beam_search(decoder, memory, trie, args.beam, use_cache=False)
        if not torch.equal(cached_out[0], uncached_out[0]):
            raise AssertionError("cached and re-decoding beam search disagree")
        cached = best_seconds(args.repeats, beam_search, decoder, memory, trie, args.beam)
        uncached = best_seconds(args.repeats, beam_search, decoder, memory, trie, args.beam, use_cache=False)
        knn = float("nan")
        if not args.no_knn:
            index = knn_index(n, args.dim, rng)
            knn = best_seconds(args.repeats, index.search, queries, args.knn_k)
            del index
        per_q = lambda s: 1000 * s / args.queries
        rows.append((n, build, trie_megabytes(trie), per_q(cached), per_q(uncached), per_q(knn)))
        print(f"{n:>11,} | {build:>12.2f} | {trie_megabytes(trie):>7.1f} | {per_q(cached):>15.3f} | "
              f"{per_q(uncached):>14.3f} | {uncached / cached:>15.2f} | {per_q(knn):>8.3f} | {knn / cached:>8.2f}",
              flush=True)
    if len({r[0] for r in rows}) > 1:
        first, last = min(rows), max(rows)
        print(f"\n{last[0] / first[0]:.0f}x more identifiers: beam search (cache) x{last[3] / first[3]:.2f}, "
              f"re-decoding x{last[4] / first[4]:.2f}, exact kNN x{last[5] / first[5]:.2f} per query")


if __name__ == "__main__":
    main()
