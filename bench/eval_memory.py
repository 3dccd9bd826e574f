"""Peak memory and time of ``evaluate_embeddings`` on an SOP-sized synthetic test set vs a naive evaluation.

SOP's test split: 60,502 images of 11,316 products (2-12 images each), evaluated all-vs-all with
self-exclusion. The naive evaluation (full float32 N x N score matrix, full stable argsort, boolean relevance
matrix) needs ~13 N^2 bytes -- 48 GB at N = 60,502 (14.6 GB for the score matrix alone) -- so it is measured
at a smaller N next to ours at the same N, and extrapolated (memory and GEMM time scale with N^2).

Each measurement runs in a fresh subprocess so peaks do not leak between them. Peak RSS comes from the kernel
(VmHWM, reset via /proc/self/clear_refs once the data is generated, so it covers the evaluation; it falls
back to ru_maxrss where that is not allowed); tracemalloc peaks (numpy buffers) are reported alongside.

    python bench/eval_memory.py                       # ours at 60,502 x 512 + both at 15,000
    python bench/eval_memory.py --n 20000 --naive-n 5000 --dim 128
    python bench/eval_memory.py --skip-naive --rounds 3  # evaluation vs faiss flat search alone, interleaved

Evaluation against the search it is built on: ``faiss`` flat inner-product search of the same set with the
evaluation's k (max class size + 1 for the self match) and with k=101, each in a fresh subprocess with the same
threads, interleaved with the evaluation over ``--rounds``; min and median of each, and the ratio of the mins.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synthetic_sop(n: int, dim: int, seed: int = 0, noise: float = 2.4) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised float32 [n, dim] embeddings clustered by class, class sizes uniform in 2..12.

    Each item = random unit-norm class centre + isotropic Gaussian noise of expected norm ``noise``. At 2.4
    neighbours are right often but far from always (R@1 ~ 0.8 at N = 8,000, lower at 60k), so every metric is
    non-trivial and the rankings of relevant items spread deep into the gallery.
    """
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(2, 13)))
    sizes[-1] -= sum(sizes) - n
    if sizes[-1] < 2:  # fold a leftover singleton into the previous class
        sizes[-2] += sizes.pop()
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centres = rng.standard_normal((len(sizes), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    emb = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 8192):  # chunked so generation does not dominate the process peak
        hi = min(lo + 8192, n)
        block = rng.standard_normal((hi - lo, dim), dtype=np.float32) * (noise / np.sqrt(dim))
        block += centres[labels[lo:hi]]
        emb[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
    perm = rng.permutation(n)  # classes not contiguous, like a real dataset
    return emb[perm], labels[perm]


def naive_evaluate(emb: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Textbook version: whole score matrix, whole stable ranking, whole relevance matrix; AP per row."""
    n = len(emb)
    scores = emb @ emb.T
    np.fill_diagonal(scores, -np.inf)
    np.negative(scores, out=scores)
    order = np.argsort(scores, axis=1, kind="stable")[:, :-1]  # self (now +inf) is last
    del scores
    rel = labels[order] == labels[:, None]
    del order
    counts = rel.sum(axis=1)
    valid = counts > 0
    out: dict[str, float] = {}
    for k in ks:
        out[f"R@{k}"] = float(rel[valid, :k].any(axis=1).mean())
    ap = np.zeros(n)
    map_r = np.zeros(n)
    for i in np.flatnonzero(valid):  # row loop: a [n, n] cumsum would add 8 n^2 bytes
        pos = np.flatnonzero(rel[i]) + 1
        prec = np.arange(1, len(pos) + 1) / pos
        ap[i] = prec.mean()
        map_r[i] = prec[pos <= counts[i]].sum() / counts[i]
    out["MAP@R"] = float(map_r[valid].mean())
    out["mAP"] = float(ap[valid].mean())
    return out


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb(reset_ok: bool) -> float:
    if reset_ok:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(method: str, n: int, dim: int, seed: int, noise: float) -> dict:
    import irlab.wait_policy  # noqa: F401  (as train.py / eval.py: before torch loads OpenMP)
    from irlab.retrieval import evaluate_embeddings

    emb, labels = synthetic_sop(n, dim, seed, noise)
    import faiss  # noqa: F401  (import cost outside the measured window)
    import torch  # noqa: F401  (loaded in every training or eval process; topk_exact uses it)

    ks = (1, 2, 4, 8)
    if method.startswith("faiss"):
        k = int(method.split("@")[1]) if "@" in method else int(np.bincount(labels).max()) + 1
        index = faiss.IndexFlatIP(dim)
    base = _rss_mb()
    reset_ok = _reset_peak()
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "ours":
        report = evaluate_embeddings(emb, emb, labels, labels, exclude=np.arange(n), ks=ks)
        metrics = {k: report.metrics[k] for k in ("R@1", "R@8", "MAP@R", "mAP")}
    elif method.startswith("faiss"):
        index.add(emb)
        index.search(emb, k)
        metrics = {"k": float(k)}
    else:
        metrics = naive_evaluate(emb, labels, ks)
        metrics = {k: metrics[k] for k in ("R@1", "R@8", "MAP@R", "mAP")}
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "method": method,
        "n": n,
        "dim": dim,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_before_mb": base,
        "peak_rss_mb": _peak_mb(reset_ok),
        "peak_is_eval_only": reset_ok,
        "traced_peak_mb": traced_peak / 2**20,
        "metrics": metrics,
    }


def run(method: str, n: int, dim: int, seed: int, noise: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--dim", str(dim)]
    cmd += ["--seed", str(seed), "--noise", str(noise)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _fmt(r: dict) -> str:
    m = " ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items())
    return (
        f"{r['method']:>5} N={r['n']:>6}: {r['seconds']:6.1f} s wall ({r['cpu_seconds']:6.1f} s CPU)  "
        f"peak RSS {r['peak_rss_mb']:6.0f} MB (before eval {r['rss_before_mb']:.0f} MB)  "
        f"numpy peak {r['traced_peak_mb']:6.0f} MB | {m}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60502, help="test-set size for our evaluation")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--naive-n", type=int, default=15000, help="size at which both methods are compared")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=2.4, help="within-class spread (see synthetic_sop)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of evaluation vs faiss search")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.dim, args.seed, args.noise)))
        return

    print(f"synthetic SOP-like set, dim={args.dim}, all-vs-all with self-exclusion, R@k + MAP@R + mAP")
    print(f"(CPU time is summed over threads; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})")
    results = []
    if not args.skip_naive:
        small_naive = run("naive", args.naive_n, args.dim, args.seed, args.noise)
        small_ours = run("ours", args.naive_n, args.dim, args.seed, args.noise)
        results += [small_naive, small_ours]
        print(_fmt(small_naive))
        print(_fmt(small_ours))
        diff = max(abs(small_naive["metrics"][k] - small_ours["metrics"][k]) for k in small_ours["metrics"])
        print(
            f"  at N={args.naive_n}: memory naive/ours = "
            f"{small_naive['peak_rss_mb'] / small_ours['peak_rss_mb']:.1f}x, "
            f"time naive/ours = {small_naive['seconds'] / small_ours['seconds']:.2f}x, "
            f"max |metric difference| = {diff:.2e}"
        )
    times: dict[str, list[float]] = {"ours": [], "faiss": [], "faiss@101": []}
    for _ in range(max(1, args.rounds)):
        for method in times:
            result = run(method, args.n, args.dim, args.seed, args.noise)
            times[method].append(result["seconds"])
            if method == "ours":
                full = result
                print(_fmt(full))
            else:
                print(f"  faiss flat search alone, k={int(result['metrics']['k'])}: {result['seconds']:.1f} s wall")
    summary = {m: (min(t), float(np.median(t))) for m, t in times.items()}
    print("  min / median over rounds: " + ", ".join(f"{m} {a:.1f} / {b:.1f} s" for m, (a, b) in summary.items()))
    print(f"  evaluation / search alone (mins): {summary['ours'][0] / summary['faiss'][0]:.2f}x at the "
          f"evaluation's k, {summary['ours'][0] / summary['faiss@101'][0]:.2f}x at k=101 "
          f"(load average {os.getloadavg()[0]:.1f})")
    if not full["peak_is_eval_only"]:
        print("  (peak RSS is the whole-process ru_maxrss: /proc/self/clear_refs was not writable)")
    if not args.skip_naive:
        scale = (args.n / args.naive_n) ** 2
        est_mb = small_naive["peak_rss_mb"] * scale
        print(
            f"  naive extrapolated to N={args.n} (x{scale:.1f}, N^2): ~{est_mb / 1024:.1f} GB, "
            f"~{small_naive['seconds'] * scale:.0f} s  -> ours needs "
            f"{est_mb / full['peak_rss_mb']:.0f}x less memory"
        )


if __name__ == "__main__":
    main()
