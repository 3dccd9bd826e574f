"""AREIR inference demo: dataset queries get green/red frames and exclude themselves; any image file works."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from areir.demo import CORRECT, NEUTRAL, WRONG, main, parse_argv
from areir.module import AREIRModule


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step AREIR checkpoint on the default digits config (zero-shot, 5 training classes)."""
    from datamodules.digits import DigitsDataModule

    tmp = tmp_path_factory.mktemp("demo")
    dm = DigitsDataModule(data_dir=str(tmp / "data"), batch_size=4, seed=0)
    torch.manual_seed(0)
    model = AREIRModule(dm.num_classes, members=2, meta_classes=2, with_se=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp / "areir.ckpt")
    return tmp / "areir.ckpt", tmp


def frame_color(png: Path, tile: int) -> tuple[int, int, int]:
    """Colour of the left border of tile `tile` (0 = query) in a grid written by `save_grid`."""
    img = np.asarray(Image.open(png).convert("RGB"))
    tile_w, gap = 128 + 12, 8
    x = gap + tile * (tile_w + gap) + 2  # inside the 6-px frame
    return tuple(int(v) for v in img[img.shape[0] // 2, x])


def test_dataset_query_and_arbitrary_image(checkpoint: tuple[Path, Path]) -> None:
    ckpt, tmp = checkpoint
    common = [f"ckpt_path={ckpt}", "top_k=4", "dataset=digits", f"paths.data_dir={tmp / 'data'}", "device=cpu"]

    # record 1005 is a "6": a zero-shot test image, so correctness is known and the query is excluded
    res = main(["query=digits://1005", f"output={tmp / 'ds.png'}", *common])
    assert len(res.record_ids) == 4 and 1005 not in res.record_ids
    assert res.correct is not None and len(res.correct) == 4
    assert res.scores == sorted(res.scores, reverse=True)
    for k, ok in enumerate(res.correct, 1):
        assert frame_color(res.path, k) == (CORRECT if ok else WRONG)

    # any image file: grayscale PNG of an odd size -> neutral frames
    query = tmp / "gray.png"
    Image.fromarray((np.random.default_rng(0).random((37, 50)) * 255).astype(np.uint8), "L").save(query)
    res = main([f"query={query}", f"output={tmp / 'ext.png'}", *common])
    assert res.correct is None and len(res.record_ids) == 4
    assert all(frame_color(res.path, k) == NEUTRAL for k in range(1, 5))


def test_bad_arguments(checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="missing ckpt_path"):
        parse_argv(["query=x.png"])
    with pytest.raises(SystemExit, match="key=value"):
        parse_argv(["x.png"])
    ckpt, tmp = checkpoint
    with pytest.raises(FileNotFoundError, match="query image not found"):
        main([f"query={tmp_path / 'missing.jpg'}", f"ckpt_path={ckpt}", f"paths.data_dir={tmp / 'data'}"])


def test_grid_goes_into_a_run_folder_not_the_current_directory(checkpoint, tmp_path, monkeypatch):
    ckpt, tmp = checkpoint
    monkeypatch.chdir(tmp_path)
    res = main([f"ckpt_path={ckpt}", "top_k=2", "dataset=digits", f"paths.data_dir={tmp / 'data'}", "device=cpu",
                "query=digits://1005"])
    assert res.path.is_file() and res.path.parent.parent == tmp_path / "logs" / "demo" / "runs"
    assert not list(tmp_path.glob("*.png"))
