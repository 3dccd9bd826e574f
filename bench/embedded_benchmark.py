"""Is the embedded benchmark a real test? Raw pixels, an untrained network, one batch and `python train.py`.

    python bench/embedded_benchmark.py                  # seeds 1 2 3, the default config (digit pairs, zero-shot)
    python bench/embedded_benchmark.py --seeds 1 --overrides trainer.max_epochs=3

Rows (test R@1, mean +- std over the seeds; the test set is evaluated once per row and seed, never selected on):

* raw pixels        -- exact kNN over the normalised pixels of the evaluation transform;
* untrained network -- the default model at initialisation (seeded), no training;
* one batch         -- the default config trained for one batch (`trainer.max_steps=1`);
* python train.py   -- the default config as is (checkpoint selected on validation classes), with the epoch
                       of the selected checkpoint and the wall time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing


def compose(overrides: list[str], output_dir: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict, read_write

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    OmegaConf.set_readonly(cfg.hydra, False)
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.runtime.cwd = str(REPO)
        cfg.callbacks.rich_progress_bar = None
        cfg.callbacks.model_summary = None
    HydraConfig().set_config(cfg)
    return cfg


def raw_pixels_r1(cfg) -> float:
    from irlab.builders import build_datamodule
    from irlab.retrieval import evaluate_embeddings

    dm = build_datamodule(cfg)
    dataset = dm.eval_dataset("test")
    x = np.stack([dataset[i]["image"].numpy().reshape(-1) for i in range(len(dataset))])
    s = dm.eval_set("test")
    report = evaluate_embeddings(x[s.query_mask], x[s.gallery_mask], s.labels[s.query_mask], s.labels[s.gallery_mask],
                                 exclude=s.self_exclusion(), ks=(1,), normalize=True, with_map=False)
    return report.metrics["R@1"]


def untrained_r1(cfg) -> float:
    import lightning as L

    from irlab.builders import build_datamodule, build_model, logged_metrics

    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    model = build_model(cfg.model, dm)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=dm, verbose=False)
    return logged_metrics(trainer, "test/")["test/R@1"]


def trained(cfg) -> tuple[float, int, float]:
    from irlab.runner import run

    start = time.perf_counter()
    metrics = run(cfg, "train")
    best = sorted((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    epoch = int(best[-1].stem.split("_")[1]) if best else -1
    return metrics["test/R@1"], epoch, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--overrides", nargs="*", default=[], help="extra config overrides for every row")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows: dict[str, list[float]] = {"raw pixels": [], "untrained network": [], "one batch": [], "python train.py": []}
    epochs, seconds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            base = [f"seed={seed}", *args.overrides]
            out = Path(tmp) / f"s{seed}"
            cfg = compose(base, out / "pixels")
            rows["raw pixels"].append(raw_pixels_r1(cfg))
            rows["untrained network"].append(untrained_r1(compose(base, out / "untrained")))
            rows["one batch"].append(trained(compose(base + ["trainer.max_steps=1"], out / "one"))[0])
            r1, epoch, wall = trained(compose(base, out / "full"))
            rows["python train.py"].append(r1)
            epochs.append(epoch)
            seconds.append(wall)
    print(f"\nembedded benchmark, test R@1 over seeds {args.seeds} (load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} cores); overrides: {args.overrides or 'none'}")
    print(f"{'row':<20} {'mean':>7} {'std':>7}   per seed")
    for name, values in rows.items():
        v = np.asarray(values)
        print(f"{name:<20} {v.mean():7.3f} {v.std():7.3f}   {' '.join(f'{x:.3f}' for x in v)}")
    gain = np.asarray(rows["python train.py"]) - np.asarray(rows["one batch"])
    print(f"train.py - one batch: {gain.mean():+.3f} +- {gain.std():.3f}; selected epoch per seed {epochs}; "
          f"wall time per run {np.mean(seconds):.0f} s (max {np.max(seconds):.0f} s)")


if __name__ == "__main__":
    main()
