"""Data-loading throughput: images/s of the training loader alone (decode + crop + augment + collate).

Compares worker counts side by side on one dataset in one run, so you can see whether loading can keep up
with the model's images/s (bench/lightning_overhead.py). Uses a fake CUB copy (real JPEG decoding) unless
``--root`` points at a real download.

    python bench/data_loading.py                       # fake CUB, 64 px JPEGs
    python bench/data_loading.py --root data/cub --image-size 224 --workers 0 4 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from datamodules.cub import CUBDataModule  # noqa: E402


def images_per_second(root: Path, workers: int, image_size: int, batch_size: int, batches: int) -> float:
    dm = CUBDataModule(root=str(root), image_size=image_size, resize_size=image_size, batch_size=batch_size,
                       num_workers=workers)
    dm.setup()
    loader = iter(dm.train_dataloader())
    next(loader)  # start workers outside the timed region
    count, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), loader, strict=False):
        count += len(batch["image"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from tests.fixtures.fake_datasets import make_fake_cub

            root = make_fake_cub(Path(tmp) / "cub", n_classes=8, per_class=120, size=256)
        rates = {w: images_per_second(root, w, args.image_size, args.batch_size, args.batches) for w in args.workers}
    base = rates[args.workers[0]]
    print(f"\nroot={args.root or 'fake CUB (256 px JPEGs)'} image_size={args.image_size} batch={args.batch_size}")
    for workers, rate in rates.items():
        print(f"  num_workers={workers:<3} {rate:8.1f} images/s   x{rate / base:.2f} vs num_workers={args.workers[0]}")


if __name__ == "__main__":
    main()
