"""Does the ensemble help? AREIR with E members vs a single member (E=1), same epochs, on the embedded digits (CPU).

    python bench/areir_ensemble_vs_single.py                 # E=4 vs E=1, M=3, 3 epochs, seeds 0 1 2
    python bench/areir_ensemble_vs_single.py --members 8 --meta-classes 3 --epochs 4

Zero-shot digits: train on 0-4 (C=5 classes), retrieve among 5-9 (test R@1, query excluded). No model selection
(a fixed number of epochs, the last model is evaluated), so the test set is looked at once per run. Rows:

* ensemble       -- E members, each classifying M random meta-classes;
* single member  -- E=1 with the same M (one member of the ensemble, trained alone for the same epochs);
* single, M=C    -- E=1 classifying all C classes (a plain classifier, the strongest one-member variant).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from areir.module import AREIRModule  # noqa: E402
from datamodules.digits import DigitsDataModule  # noqa: E402
from irlab.optim import preset  # noqa: E402


def train_and_test(members: int, meta_classes: int, seed: int, args: argparse.Namespace) -> tuple[float, int, float]:
    """(test R@1, colliding class pairs, seconds) of one run."""
    start = time.perf_counter()
    L.seed_everything(seed, workers=True)
    dm = DigitsDataModule(data_dir="data", batch_size=args.batch, eval_batch_size=256, max_per_class=300, seed=seed)
    dm.setup()
    model = AREIRModule(dm.num_classes, arch=args.arch, with_se=True, members=members, meta_classes=meta_classes,
                        assignment=args.assignment, assignment_seed=seed,
                        optimizer=preset("optimizer", "adam", lr=args.lr), scheduler=preset("scheduler", "multistep"))
    collisions = model.log_assignment("bench")
    trainer = L.Trainer(accelerator="cpu", max_epochs=args.epochs, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.test(model, datamodule=dm, verbose=False)[0]
    return float(metrics["test/R@1"]), collisions, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--meta-classes", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--assignment", default="random", choices=["random", "collision_free"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-full", action="store_true", help="skip the E=1, M=C row")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    num_classes = 5  # zero-shot digits trains on 0-4
    rows = [(f"ensemble E={args.members}, M={args.meta_classes}", args.members, args.meta_classes),
            (f"single member E=1, M={args.meta_classes}", 1, args.meta_classes)]
    if not args.no_full:
        rows.append((f"single, M=C: E=1, M={num_classes}", 1, num_classes))
    print(f"digits zero-shot, {args.arch}+SE, {args.epochs} epochs, lr {args.lr}, batch {args.batch}, "
          f"assignment={args.assignment}, seeds {args.seeds}")
    results = {}
    for name, members, meta in rows:
        runs = [train_and_test(members, meta, seed, args) for seed in args.seeds]
        results[name] = runs
        r1 = [r[0] for r in runs]
        print(f"  {name:<28} R@1 per seed {' '.join(f'{v:.4f}' for v in r1)}  mean {np.mean(r1):.4f} "
              f"± {np.std(r1):.4f}  collisions {[r[1] for r in runs]}  {sum(r[2] for r in runs):.0f}s", flush=True)
    ens, single = (np.mean([r[0] for r in results[rows[i][0]]]) for i in (0, 1))
    verdict = "beats" if ens > single else "does NOT beat"
    print(f"ensemble mean R@1 {ens:.4f} {verdict} single member {single:.4f} (diff {ens - single:+.4f})")


if __name__ == "__main__":
    main()
