"""Does IRGen's claim hold on the embedded benchmark? The preset as users run it, over seeds.

    python bench/method_claims.py                        # seeds 1 2 3
    python bench/method_claims.py --seeds 1
    python bench/method_claims.py --seeds 1 --overrides debug=fast    # smoke test of the script itself

Test metrics, mean +- std over the seeds; every checkpoint is selected on validation data, the test split is
evaluated once per run and never selected on.

* IRGen (``experiment=digits_irgen``, closed set, the paper's protocol): P@K at every K of ``eval_ks`` for the
  paper's generative ranking, generative + rerank, and kNN over the same (frozen, tokenizer-trained) encoder. The
  paper's claim: generative >= kNN at every K. Also the tokenizer's prefix class purity per level and level-0
  perplexity (are the codes semantic?), collision rate and quantized-feature R@1.

AREIR's claim has its own bench with equal-budget controls, learning-rate grids and sweeps:
``bench/areir_claim.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing
from bench.embedded_benchmark import compose  # noqa: E402


def run_preset(overrides: list[str], out: Path) -> dict[str, float]:
    from irlab.runner import run

    cfg = compose(overrides, out)
    return run(cfg, "train")


def summary(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} +- {v.std():.3f}"


def irgen_rows(seeds: list[int], tmp: Path, extra: list[str]) -> None:
    rows: dict[str, dict[str, list[float]]] = {"generative (paper)": {}, "generative + rerank": {}, "kNN": {}}
    stats: dict[str, list[float]] = {"wall s": []}
    ks: list[int] = []
    for seed in seeds:
        art = tmp / f"irgen_s{seed}"
        m = run_preset(["experiment=digits_irgen", f"seed={seed}", f"irgen.artifact_dir={art}", *extra],
                       tmp / f"irg{seed}")
        ks = sorted(int(k.split("@")[1]) for k in m if k.startswith("test/knn/P@") and "_" not in k)
        for name, prefix in zip(rows, ("test/", "test/rerank/", "test/knn/"), strict=True):
            for k in ks:
                rows[name].setdefault(f"P@{k}", []).append(m[f"{prefix}P@{k}"])
            rows[name].setdefault("MAP@R", []).append(m[f"{prefix}MAP@R"])
        for key in ("perplexity_l0", *(f"prefix_purity_l{d}" for d in range(4)), "collision_rate", "quantized_R@1"):
            stats.setdefault(f"tokenizer {key}", []).append(m[f"tokenizer/{key}"])
        stats["wall s"].append(json.loads((tmp / f"irg{seed}" / "metrics.json").read_text())
                               ["provenance"]["wall_seconds"])
    print(f"\nIRGen, digits_irgen (closed set), test, seeds {seeds}")
    columns = [f"P@{k}" for k in ks] + ["MAP@R"]
    print(f"{'row':<22}" + "".join(f"{c:>16}" for c in columns))
    for name, values in rows.items():
        print(f"{name:<22}" + "".join(f"{summary(values[c]):>16}" for c in columns))
    holds = all(np.mean(rows["generative (paper)"][c]) >= np.mean(rows["kNN"][c]) for c in columns[:-1])
    print(f"claim 'generative >= kNN at every K': {'holds' if holds else 'does NOT hold'} (means)")
    for name, values in stats.items():
        print(f"{name}: {summary(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--overrides", nargs="*", default=[], help="extra config overrides for every run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"load average at start {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        irgen_rows(args.seeds, Path(tmp), args.overrides)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
