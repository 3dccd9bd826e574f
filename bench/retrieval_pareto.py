"""Retrieval quality against cost: IRGen's constrained beam search next to the indexes users would deploy.

    python bench/retrieval_pareto.py                          # 100k and 1M items (~15 min on 2 cores)
    python bench/retrieval_pareto.py --sizes 20000 --queries 50 --train-steps 100   # quick look

A structured synthetic database, as the paper's comparison with linear scan and ANN indexes needs: N items of
dimension d drawn around C cluster centres (``--clusters``, unit-norm, Gaussian spread), L2-normalised; queries
are held-out perturbations of random items. Ground truth: exact inner-product top-10 (faiss flat).

* IRGen: the items' identifiers come from irlab's residual quantizer (`irgen.quantizer.ResidualQuantizer`, D x K
  = 4 x 256, k-means on a sample), a decoder (`irgen.decoder.IdentifierDecoder`, query feature as its memory) is
  trained briefly to emit a query's nearest item's identifier, and retrieval is trie-constrained beam search
  (beams 10 / 30 / 100). "paper order": the beams' items in beam order, an identifier's items in database order;
  "+ rerank": the beams' items re-ordered by exact inner product (what a user would add).
* faiss: flat (exact), IVF-Flat and IVF-PQ (nlist ~ 4 sqrt(N), several nprobe), HNSW (M=32, several efSearch).

Per method: recall@10 against the exact top-10, and per-query latency at batch 1 (one query at a time) and
batched (all queries at once), min over ``--repeats`` interleaved rounds, threads as set. A table (markdown) and
a PNG of recall vs latency go to ``--out`` (default bench/results/retrieval_pareto.{md,png}).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from beam_search_scaling import load_note  # noqa: E402

from irgen.beam_search import beam_search  # noqa: E402
from irgen.decoder import DecoderConfig, IdentifierDecoder  # noqa: E402
from irgen.quantizer import ResidualQuantizer  # noqa: E402
from irgen.ranking import expand_identifiers  # noqa: E402
from irgen.trie import IdentifierTrie  # noqa: E402

TOP = 10


def clustered(n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim), dtype=np.float32) * (spread / dim**0.5)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def perturbed(items: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    x = items + rng.standard_normal(items.shape, dtype=np.float32) * (noise / items.shape[1] ** 0.5)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found[:10] & truth[:10]| / 10 (-1 padding never matches)."""
    hits = [len(np.intersect1d(f[f >= 0][:TOP], t[:TOP])) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / TOP


def train_decoder(db: np.ndarray, codes: np.ndarray, args, rng: np.random.Generator) -> IdentifierDecoder:
    """A decoder that maps a (perturbed) item feature to the item's identifier: the query's memory is its
    feature as one token. A few hundred AdamW steps: beams become meaningful, not state of the art."""
    cfg = DecoderConfig(4, 256, args.width, args.layers, args.heads, memory_dim=db.shape[1])
    decoder = IdentifierDecoder(cfg)
    opt = torch.optim.AdamW(decoder.parameters(), lr=args.lr, weight_decay=0.01)
    decoder.train()
    for step in range(args.train_steps):
        pick = rng.integers(0, len(db), args.batch)
        feats = torch.from_numpy(perturbed(db[pick], args.noise, rng))[:, None]
        target = torch.from_numpy(codes[pick])
        logits = decoder(decoder.input_tokens(target).unsqueeze(1), decoder.memory_kv(feats)).squeeze(1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.train_steps // 4) == 0 or step == args.train_steps - 1:
            print(f"    decoder step {step}: loss {loss.item():.3f}", flush=True)
    return decoder.eval()


def irgen_methods(db: np.ndarray, queries: np.ndarray, args, rng: np.random.Generator) -> dict:
    """{name: (search(queries) -> [Q, >=10] item ids)} for each beam width, paper order and reranked."""
    rq = ResidualQuantizer(num_levels=4, num_codes=256, dim=db.shape[1])
    sample = torch.from_numpy(db[rng.choice(len(db), min(len(db), args.kmeans_sample), replace=False)])
    rq.fit(sample, niter=10, seed=0)
    codes = torch.cat([rq.encode(torch.from_numpy(db[lo:lo + 100_000])) for lo in range(0, len(db), 100_000)])
    codes = codes.numpy()
    trie = IdentifierTrie.build(codes, 256)
    print(f"    identifiers: {len(np.unique(codes, axis=0)):,} distinct for {len(db):,} items", flush=True)
    decoder = train_decoder(db, codes, args, rng)
    db_t = torch.from_numpy(db)
    methods = {}
    for beam in args.beams:
        def search(q: np.ndarray, beam=beam, rerank=False) -> np.ndarray:
            with torch.no_grad():
                leaves, scores = beam_search(decoder, torch.from_numpy(q)[:, None], trie, beam)
            depth = TOP if not rerank else args.rerank_depth
            items, _ = expand_identifiers(leaves.numpy(), scores.float().numpy(), trie, depth)
            if not rerank:
                return items
            sims = torch.einsum("qd,qcd->qc", torch.from_numpy(q), db_t[torch.from_numpy(np.maximum(items, 0))])
            sims[torch.from_numpy(items < 0)] = -math.inf
            order = sims.argsort(dim=1, descending=True).numpy()
            return np.take_along_axis(items, order, axis=1)

        methods[f"IRGen beam {beam}, paper order"] = search
        methods[f"IRGen beam {beam}, + rerank"] = lambda q, beam=beam: search(q, beam, rerank=True)
    return methods


def faiss_methods(db: np.ndarray, args) -> dict:
    import faiss

    n, dim = db.shape
    methods = {}
    flat = faiss.IndexFlatIP(dim)
    flat.add(db)
    methods["faiss flat (exact)"] = lambda q: flat.search(q, TOP)[1]
    nlist = int(4 * math.sqrt(n))
    train = db[np.random.default_rng(1).choice(n, min(n, 40 * nlist), replace=False)]
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(train)
    ivf.add(db)
    pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, args.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(train)
    pq.add(db)
    for nprobe in (1, 8, 32):
        methods[f"IVF-Flat{nlist} nprobe {nprobe}"] = lambda q, p=nprobe: _set(ivf, "nprobe", p).search(q, TOP)[1]
        methods[f"IVF-PQ{args.pq_m} nprobe {nprobe}"] = lambda q, p=nprobe: _set(pq, "nprobe", p).search(q, TOP)[1]
    start = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 40
    hnsw.add(db)
    print(f"    HNSW build {time.perf_counter() - start:.0f} s", flush=True)
    for ef in (16, 64, 256):
        methods[f"HNSW32 efSearch {ef}"] = lambda q, e=ef: _set(hnsw.hnsw, "efSearch", e, hnsw).search(q, TOP)[1]
    return methods


def _set(obj, name: str, value, ret=None):
    setattr(obj, name, value)
    return obj if ret is None else ret


def measure(methods: dict, queries: np.ndarray, truth: np.ndarray, repeats: int, single: int) -> dict:
    """{name: (recall@10, ms/query at batch 1 (min), ms/query batched (min))}, rounds interleaved."""
    best: dict[str, list[float]] = {name: [math.inf, math.inf] for name in methods}
    found = {}
    for _ in range(repeats):
        for name, search in methods.items():
            start = time.perf_counter()
            found[name] = search(queries)
            best[name][1] = min(best[name][1], 1000 * (time.perf_counter() - start) / len(queries))
            start = time.perf_counter()
            for i in range(single):
                search(queries[i:i + 1])
            best[name][0] = min(best[name][0], 1000 * (time.perf_counter() - start) / single)
    return {name: (recall_at(found[name], truth), *best[name]) for name in methods}


def plot(results: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    families = {"IRGen paper order": "o", "IRGen + rerank": "o", "IVF-Flat": "s", "IVF-PQ": "^", "HNSW": "D",
                "faiss flat": "*"}
    for ax, (n, rows) in zip(axes[0], results.items(), strict=True):
        for family, marker in families.items():
            head, _, variant = family.partition(" ") if family.startswith("IRGen") else (family, "", "")
            pts = sorted((v[2], v[0]) for name, v in rows.items() if name.startswith(head) and variant in name)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, linestyle="--" if "paper" in family else "-",
                        label=family)
        ax.set_xscale("log")
        ax.set_xlabel("ms per query (batched)")
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title(f"{n:,} items")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.8, help="within-cluster noise (norm)")
    p.add_argument("--noise", type=float, default=0.25, help="query perturbation (norm)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--single", type=int, default=20, help="queries timed one at a time")
    p.add_argument("--beams", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--rerank-depth", type=int, default=100, help="beam items re-ordered by exact score")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kmeans-sample", type=int, default=50_000)
    p.add_argument("--pq-m", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch and faiss threads (0: the defaults)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "retrieval_pareto"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import faiss

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(load_note("at start"))
    results: dict[int, dict] = {}
    lines = [f"d={args.dim}, {args.clusters} clusters, {args.queries} queries (batched), {args.single} one at a "
             f"time, {torch.get_num_threads()} threads, min of {args.repeats} interleaved rounds", ""]
    for n in args.sizes:
        rng = np.random.default_rng(args.seed)
        print(f"{n:,} items", flush=True)
        db = clustered(n, args.dim, args.clusters, args.spread, rng)
        queries = perturbed(db[rng.choice(n, args.queries, replace=False)], args.noise, rng)
        methods = faiss_methods(db, args)
        truth = methods["faiss flat (exact)"](queries)
        methods.update(irgen_methods(db, queries, args, rng))
        results[n] = measure(methods, queries, truth, args.repeats, args.single)
        lines += [f"### {n:,} items", "", "| method | recall@10 | ms/query, batch 1 | ms/query, batched |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {r:.3f} | {b1:.3f} | {bb:.3f} |" for name, (r, b1, bb) in results[n].items()]
        lines.append("")
        print("\n".join(lines[-len(results[n]) - 4:]), flush=True)
    lines.append(load_note("at end"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, out.with_suffix(".png"))
    print(load_note("at end"))
    print(f"written: {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
