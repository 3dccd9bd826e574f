"""`eval.py ckpt_path=... query=...`: the top-K of any query for every method's checkpoint, with its grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irlab.builders import build_datamodule, build_model
from irlab.checkpoints import MODEL_KEY, model_class_name
from irlab.runner import run
from tests.helpers import compose_config

EXPERIMENTS = ("digits_baseline", "digits_areir", "digits_irgen")


def untrained_checkpoint(experiment: str, tmp: Path) -> tuple[Path, list[str]]:
    """A checkpoint of the experiment's (untrained) model in the format Lightning writes, and the overrides that
    compose its config; IRGen's generator gets random identifiers for every record."""
    common = [f"experiment={experiment}", f"paths.data_dir={tmp / 'data'}"]
    cfg = compose_config(common, output_dir=tmp / "train")
    dm = build_datamodule(cfg)
    torch.manual_seed(0)
    if experiment == "digits_irgen":
        model = build_model(cfg.irgen.generator, dm, code_depth=4, codebook_size=16, encoder_init=None)
        model.set_identifiers(torch.randint(0, 16, (dm.num_records, 4)))
    else:
        model = build_model(cfg.model, dm)
    path = tmp / f"{experiment}.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                MODEL_KEY: model_class_name(model)}, path)
    return path, common


def query_run(tmp: Path, overrides: list[str]) -> tuple[dict, dict]:
    out = tmp / f"eval{len(list(tmp.glob('eval*')))}"
    metrics = run(compose_config(overrides, config_name="eval", output_dir=out), "evaluate")
    return metrics, json.loads((out / "query_results.json").read_text())


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_query_grid_for_every_method(experiment, tmp_path):
    ckpt, common = untrained_checkpoint(experiment, tmp_path)
    cfg = compose_config(common, config_name="eval", output_dir=tmp_path / "probe", )
    dm = build_datamodule(cfg)
    test = dm.eval_set("test")
    record = int(test.record_ids[test.query_mask][0])  # a test query: labels known, must not retrieve itself
    query = str(dm.records[record].path)
    metrics, saved = query_run(tmp_path, [*common, f"ckpt_path={ckpt}", f"query={query}", "top_k=5"])
    (result,) = saved["results"]
    assert len(result["neighbors"]) == 5 and query not in result["neighbors"]
    assert result["scores"] == sorted(result["scores"], reverse=True)
    gallery = {str(dm.records[i].path): int(dm.records[i].label) for i in test.record_ids[test.gallery_mask]}
    label = int(dm.records[record].label)
    assert result["correct"] == [gallery[n] == label for n in result["neighbors"]]
    assert metrics["query/P@5"] == pytest.approx(np.mean(result["correct"]))
    assert (tmp_path / "eval0" / "query_grid.png").stat().st_size > 0
    assert ("log-probability" in saved["score"]) == (experiment == "digits_irgen")


@pytest.mark.parametrize("experiment", ["digits_baseline", "digits_areir"])
def test_folder_gallery_finds_the_copy_of_the_query(experiment, tmp_path):
    """Any images: a folder of 6 gallery images and an outside query file equal to one of them: that copy
    comes first with cosine 1, and frames are grey (labels unknown)."""
    ckpt, common = untrained_checkpoint(experiment, tmp_path)
    dm = build_datamodule(compose_config(common, config_name="eval", output_dir=tmp_path / "probe"))
    folder = tmp_path / "gallery"
    folder.mkdir()
    for i in range(6):
        dm.load_image(3 * i).save(folder / f"img{i}.png")
    query = tmp_path / "query.png"
    Image.open(folder / "img4.png").save(query)
    _, saved = query_run(tmp_path, [*common, f"ckpt_path={ckpt}", f"query={query}", f"gallery={folder}", "top_k=3"])
    (result,) = saved["results"]
    assert Path(result["neighbors"][0]).name == "img4.png" and result["scores"][0] == pytest.approx(1.0, abs=1e-5)
    assert result["correct"] is None and len(result["neighbors"]) == 3


def test_query_errors_say_what_to_do(tmp_path):
    ckpt, common = untrained_checkpoint("digits_irgen", tmp_path)
    folder = tmp_path / "gallery"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    with pytest.raises(ValueError, match="drop gallery="):
        query_run(tmp_path, [*common, f"ckpt_path={ckpt}", f"query={folder / 'a.png'}", f"gallery={folder}"])
    with pytest.raises(FileNotFoundError, match="no such image, folder or record"):
        query_run(tmp_path, [*common, f"ckpt_path={ckpt}", f"query={tmp_path / 'missing.jpg'}"])
