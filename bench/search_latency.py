"""Per-query latency of `eval.py index=<dir> query=...` (a saved index) against today's re-embedding path
(`eval.py ckpt_path=... gallery=<folder> query=...`), at 10k gallery images on the CPU.

    python bench/search_latency.py [--gallery 10000] [--rounds 3]

Both paths run in one process with the same model (the embedded baseline's `cnn_small` at 32 px, untrained:
latency does not depend on the weights) and the same folder of synthetic PNGs; process start, config
composition and checkpoint loading are left out of both. Re-embedding: every query embeds the whole gallery
and searches it (what `eval.py ... gallery=<folder> query=<image>` does on each call). Saved index: built once
(`index.py`, timed separately), then each query loads nothing but its own image, embeds it and searches the
faiss index. Rounds are interleaved; min and median are printed with the load average.
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
from omegaconf import OmegaConf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.digit_pairs import DigitPairsDataModule  # noqa: E402
from irlab.baseline import EmbeddingBaseline  # noqa: E402
from irlab.query import folder_gallery, in_memory_search  # noqa: E402
from irlab.saved_index import SavedIndex, build_saved_index  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, rng = tmp / "gallery", np.random.default_rng(0)
        folder.mkdir()
        for i in range(args.gallery):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        query = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        dm = DigitPairsDataModule(data_dir=str(tmp / "data"), eval_batch_size=256)
        model = EmbeddingBaseline(num_classes=40).eval()
        ckpt = tmp / "model.ckpt"
        torch.save({"state_dict": model.state_dict()}, ckpt)
        cfg = OmegaConf.create({"out": str(tmp / "index"), "gallery": str(folder), "index_type": "flat",
                                "dtype": "float16", "chunk_size": 4096, "train_points": 100_000,
                                "method": {"name": "single_stage"}})
        start = time.perf_counter()
        build_saved_index(cfg, dm, model, str(ckpt))
        build_s = time.perf_counter() - start
        images = dm.eval_transform()(query)[None]
        timings: dict[str, list[float]] = {"re-embedding the gallery": [], "saved index": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            in_memory_search(model, folder_gallery(folder, dm))(images, 8)
            timings["re-embedding the gallery"].append(time.perf_counter() - start)
            start = time.perf_counter()
            SavedIndex.load(tmp / "index").searcher(model)(images, 8)
            timings["saved index"].append(time.perf_counter() - start)
    print(f"gallery {args.gallery} images (32 px PNG), {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}; index built once in {build_s:.1f} s")
    print(f"{'path':<26} {'min ms/query':>13} {'median':>10}")
    for name, values in timings.items():
        print(f"{name:<26} {1000 * min(values):>13.1f} {1000 * statistics.median(values):>10.1f}")
    ratio = statistics.median(timings["re-embedding the gallery"]) / statistics.median(timings["saved index"])
    print(f"saved index: {ratio:.0f}x faster per query (medians)")


if __name__ == "__main__":
    main()
