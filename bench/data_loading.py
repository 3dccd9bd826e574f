"""Images per second one loader worker (one core) delivers at 224 px, by JPEG size, and the cores one GPU needs.

    python bench/data_loading.py [--images 60] [--rounds 3]
    python bench/data_loading.py --root data/cub --workers 0 4 8   # a real download: whole loader, by workers

Per image: decode (PIL, optionally `jpeg_draft`) + the training transform of the benchmark presets (resize
256, random crop 224, flip), ending either in normalised float32 (on the loader's core) or in uint8
(``normalize_on_device``: the GPU finishes it). JPEGs are synthetic photo-like content (smooth gradients,
texture and noise, quality 90) at the sizes of the benchmarks: 256x256, 500x375 (CUB/CARS-like) and 1024x683
(SOP-like). Real photos decode at similar or somewhat higher cost. Variants are interleaved over rounds; min and
median per image are printed with the load average (timing is noisy on a shared machine). The last column is
how many busy cores feed one GPU at 2,500 images/s (ViT-B/16 or ResNet-50 training under bf16 on an H100).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.base import RetrievalDataModule, open_rgb  # noqa: E402
from datamodules.cub import CUBDataModule  # noqa: E402

SIZES = [(256, 256), (500, 375), (1024, 683)]
GPU_IMAGES_PER_S = 2500


def photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 0.4 + 0.5
    texture = 0.08 * np.sin(80 * x * (1 + rng.random())) * np.cos(60 * y)
    pixels = np.clip(base + texture[..., None] + rng.normal(0, 0.03, (h, w, 3)), 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


class Transforms(RetrievalDataModule):
    """The base datamodule's transforms at the benchmark presets' sizes (no records needed)."""

    def __init__(self) -> None:
        super().__init__(root="/nonexistent", image_size=224, resize_size=256)


def time_variant(paths: list[Path], transform, min_side: int | None) -> float:
    start = time.perf_counter()
    for path in paths:
        transform(open_rgb(path, min_side=min_side))
    return (time.perf_counter() - start) / len(paths)


def loader_images_per_second(root: Path, workers: int, batch_size: int = 64, batches: int = 20) -> float:
    """The whole training loader of a real CUB download (decode, transform, collate) with `workers` workers."""
    dm = CUBDataModule(root=str(root), image_size=224, resize_size=256, batch_size=batch_size, num_workers=workers,
                       jpeg_draft=True)
    dm.setup()
    loader = iter(dm.train_dataloader())
    next(loader)  # start workers outside the timed region
    count, start = 0, time.perf_counter()
    for _, batch in zip(range(batches), loader, strict=False):
        count += len(batch["image"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=None, help="a real CUB download: compare worker counts")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    if args.root is not None:
        for workers in args.workers:
            print(f"num_workers={workers:<3} {loader_images_per_second(args.root, workers):8.1f} images/s")
        return
    torch.set_num_threads(1)  # a loader worker runs its transform on one thread
    dm = Transforms()
    variants = {"float, full decode": (dm.train_transform(), None),
                "uint8, full decode": (dm.train_transform(uint8=True), None),
                "float, jpeg_draft": (dm.train_transform(), 256),
                "uint8, jpeg_draft": (dm.train_transform(uint8=True), 256)}
    print(f"load average {os.getloadavg()[0]:.2f}; one core; {args.images} images x {args.rounds} rounds")
    print(f"{'JPEG size':>10} {'variant':>20} {'min ms':>7} {'median ms':>9} {'img/s':>6} {'cores/GPU':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            paths = []
            for i in range(args.images):
                path = Path(tmp) / f"{size[0]}_{i}.jpg"
                photo_like(size, i).save(path, quality=90)
                paths.append(path)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, (transform, min_side) in variants.items():
                    times[name].append(time_variant(paths, transform, min_side))
            for name, samples in times.items():
                best, median = min(samples), statistics.median(samples)
                print(f"{size[0]}x{size[1]:<4} {name:>20} {best * 1e3:>7.2f} {median * 1e3:>9.2f} "
                      f"{1 / best:>6.0f} {GPU_IMAGES_PER_S * best:>9.1f}")


if __name__ == "__main__":
    main()
