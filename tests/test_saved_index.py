"""Saved indexes (`index.py`, `eval.py index=`): search equals the in-memory path for every method; builds resume
after a kill and grow with a folder; an index of another checkpoint is refused; unreadable images are listed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import irlab.saved_index as saved_index
from datamodules.errors import UserInputError
from irlab.builders import build_datamodule
from irlab.runner import run
from tests.helpers import compose_config
from tests.test_query import EXPERIMENTS, untrained_checkpoint


def build(tmp: Path, common: list[str], ckpt: Path, out: Path, *extra: str) -> dict:
    overrides = [*common, f"ckpt_path={ckpt}", f"out={out}", *extra]
    folder = tmp / f"index_run{len(list(tmp.glob('index_run*')))}"
    run(compose_config(overrides, config_name="index", output_dir=folder), "index")
    return json.loads((out / "manifest.json").read_text())


def query(tmp: Path, overrides: list[str]) -> dict:
    out = tmp / f"eval{len(list(tmp.glob('eval*')))}"
    run(compose_config(overrides, config_name="eval", output_dir=out), "evaluate")
    return json.loads((out / "query_results.json").read_text())


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_search_against_a_saved_index_equals_the_in_memory_path(experiment, tmp_path):
    ckpt, common = untrained_checkpoint(experiment, tmp_path)
    manifest = build(tmp_path, common, ckpt, tmp_path / "index", "dtype=float32")
    dm = build_datamodule(compose_config(common, config_name="eval", output_dir=tmp_path / "probe"))
    test = dm.eval_set("test")
    assert manifest["rows"] == int(test.gallery_mask.sum())
    assert manifest["kind"] == ("identifiers" if experiment == "digits_irgen" else "embedding")
    records = test.record_ids[test.query_mask][:3]
    folder = tmp_path / "queries"
    folder.mkdir()
    for i in records:  # queries from outside the index: files
        dm.load_image(int(i)).save(folder / f"{i}.png")
    in_memory = query(tmp_path, [*common, f"ckpt_path={ckpt}", f"query={folder}", "top_k=6"])
    from_index = query(tmp_path, [*common, f"index={tmp_path / 'index'}", f"query={folder}", "top_k=6"])
    for a, b in zip(in_memory["results"], from_index["results"], strict=True):
        assert a["neighbors"] == b["neighbors"]
        np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-5)
    # a dataset record as the query still never retrieves itself
    record = str(dm.records[int(test.record_ids[test.gallery_mask][0])].path)
    result = query(tmp_path, [*common, f"index={tmp_path / 'index'}", f"query={record}", "top_k=4"])["results"][0]
    assert record not in result["neighbors"] and len(result["neighbors"]) == 4


def test_a_build_resumes_after_a_kill_and_grows_with_its_folder(tmp_path, monkeypatch):
    ckpt, common = untrained_checkpoint("digits_baseline", tmp_path)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(gallery / f"{i:02d}.png")
    (gallery / "broken.png").write_bytes(b"not a png")
    embedded, real = [], saved_index.embed_items

    def counting(model, dm, items, device):
        if len(embedded) == 2 and killed:
            raise KeyboardInterrupt  # a kill after two finished chunks
        embedded.append(len(items))
        return real(model, dm, items, device)

    monkeypatch.setattr(saved_index, "embed_items", counting)
    out, args = tmp_path / "index", (f"gallery={gallery}", "chunk_size=3")
    killed = True
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, common, ckpt, out, *args)
    assert embedded == [3, 3] and not (out / "manifest.json").exists()
    killed = False
    manifest = build(tmp_path, common, ckpt, out, *args)
    assert embedded == [3, 3, 3, 2]  # only the chunks the kill left
    assert manifest["rows"] == 10 and manifest["unreadable"] == 1
    assert (out / "unreadable.txt").read_text().strip().endswith("broken.png")
    first = np.load(out / "embeddings.npy")

    fresh = tmp_path / "fresh"
    build(tmp_path, common, ckpt, fresh, *args)
    np.testing.assert_array_equal(np.load(fresh / "embeddings.npy"), first)  # resuming changed nothing

    for i in range(10, 13):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(gallery / f"{i:02d}.png")
    embedded.clear()
    manifest = build(tmp_path, common, ckpt, out, *args)
    assert sum(embedded) == 3 + 1  # the new files, and the unreadable one tried again
    assert manifest["rows"] == 13
    np.testing.assert_array_equal(np.load(out / "embeddings.npy")[:10], first)
    rows = [json.loads(line)["name"] for line in (out / "rows.jsonl").read_text().splitlines()]
    assert rows[10:] == [str((gallery / f"{i}.png").resolve()) for i in range(10, 13)]
    # embedded now instead (eval.py gallery=<folder>), an unreadable file is one message naming it: skipping it
    # would shift every later row onto another file's name
    with pytest.raises(UserInputError, match="broken.png"):
        query(tmp_path, [*common, f"ckpt_path={ckpt}", f"gallery={gallery}", f"query={gallery / '00.png'}"])


def test_an_index_of_another_checkpoint_is_refused_with_both_hashes(tmp_path):
    ckpt, common = untrained_checkpoint("digits_baseline", tmp_path)
    build(tmp_path, common, ckpt, tmp_path / "index")
    other = tmp_path / "other.ckpt"
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    torch.save(state, other)
    sha = saved_index.file_sha256
    with pytest.raises(UserInputError, match=f"{sha(ckpt)}.*{sha(other)}"):
        query(tmp_path, [*common, f"index={tmp_path / 'index'}", f"ckpt_path={other}", "query=digit_pairs://1"])
    with pytest.raises(UserInputError, match="build a new index"):
        build(tmp_path, common, other, tmp_path / "index")
    with pytest.raises(UserInputError, match="transform"):
        query(tmp_path, [*common, f"index={tmp_path / 'index'}", f"ckpt_path={ckpt}", "query=digit_pairs://1",
                         "dataset.image_size=24"])
