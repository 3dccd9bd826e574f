"""IRGen's paper recipe under DDP, as users launch it (`train.py experiment=isc_irgen recipe=irgen_paper`), on 2 gloo
ranks: both stages train more than one step (parameters without gradients stop DDP at its second step), and the
passes outside the training loop (codebook fits, identifiers) are split across the ranks instead of run on one.

CLIP here is a synthetic tower in a file (`tests.fixtures.clip`) read with ``arch=clip``: the recipe's
``clip_output: transformer`` path of the real ViT-B/16, at a size that runs in seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from irgen.artifact import NO_IDENTIFIER
from tests.fixtures.clip import synthetic_clip_visual
from tests.fixtures.fake_datasets import make_fake_inshop
from tests.helpers import REPO


@pytest.mark.slow
def test_paper_recipe_trains_both_stages_on_two_ranks_and_shards_encoding(tmp_path):
    data = tmp_path / "data"
    make_fake_inshop(data / "isc", n_items=12, per_item=6, size=40)  # 36 train, 6 queries, 30 gallery images
    clip = tmp_path / "clip.pt"
    torch.save({f"visual.{k}": v for k, v in synthetic_clip_visual().items()}, clip)
    logs = tmp_path / "logs"
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "experiment=isc_irgen", "recipe=irgen_paper", "trainer=ddp_cpu", "debug=fast",
         f"paths.data_dir={data}", "irgen.tokenizer.encoder.arch=clip", f"irgen.tokenizer.encoder.pretrained={clip}",
         "irgen.tokenizer.encoder.clip_activation=quick_gelu",
         "dataset.image_size=32", "dataset.resize_size=32", "dataset.batch_size=4", "dataset.num_workers=0",
         "irgen.generator.width=32", "irgen.generator.layers=1", "irgen.generator.heads=2",
         "irgen.tokenizer.min_points_per_code=1", "torch_threads=1", f"paths.log_dir={logs}",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "not used in producing the loss" not in proc.stderr

    art_dir = logs / "irgen_artifacts" / "isc_closed_set_seed42_debug"
    for stage in ("tokenizer", "generator"):  # debug=fast: 2 batches per stage, each a DDP step on both ranks
        (ckpt,) = art_dir.glob(f"{stage}*/*.ckpt")
        assert torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"] == 2, stage

    rank_logs = {0: (run_dir / "train.log").read_text(), 1: (run_dir / "rank1.log").read_text()}
    for rank, text in rank_logs.items():
        # the codebook fits (start + epoch end) and the identifiers: each rank encodes its half
        fits = re.findall(rf"codebook fit: rank {rank} of 2 encodes (\d+) of (\d+) images", text)
        assert len(fits) == 2 and all(abs(int(n) * 2 - int(total)) <= 1 for n, total in fits), text[-2000:]
        (ident,) = re.findall(rf"identifiers: rank {rank} of 2 encodes (\d+) of (\d+) images", text)
        assert ident == ("33", "66")  # 72 images less the 6 test queries, which need no identifier

    artifact = torch.load(art_dir / "identifiers.pt", weights_only=True)
    codes = artifact["codes"]
    unencoded = (codes == NO_IDENTIFIER).all(1)
    assert codes.shape[0] == 72 and int(unencoded.sum()) == 6 and (codes[~unencoded] >= 0).all()
