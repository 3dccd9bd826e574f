"""Identifier artifact: safe round trip, refusal of stale/tampered artifacts, fingerprints, identifier stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.digits import DigitsDataModule
from datamodules.protocol import EvalSet
from irgen.artifact import (
    ARTIFACT_VERSION,
    IdentifierArtifact,
    StaleArtifactError,
    dataset_fingerprint,
    load_artifact,
    save_artifact,
)
from irgen.identifier_stats import identifier_stats, prefix_rankings, quantized_retrieval

REBUILD = "python train.py experiment=digits_irgen irgen.stage=tokenizer irgen.rebuild=true"


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(protocol="closed_set")
    dm.setup()
    return dm


def make_artifact(n: int = 50, levels: int = 3, codes: int = 8, dim: int = 4, seed: int = 0) -> IdentifierArtifact:
    g = torch.Generator().manual_seed(seed)
    return IdentifierArtifact(codes=torch.randint(0, codes, (n, levels), generator=g),
                              codebooks=torch.randn(levels, codes, dim, generator=g),
                              meta={"dataset": {"name": "digits", "sha256": "abc"},
                                    "tokenizer": {"model": {"num_codes": codes, "lr": 1e-3, "dims": (1, 2)}},
                                    "stats": {"collision_rate": 0.0}})


def expected_of(artifact: IdentifierArtifact) -> dict:
    return {"dataset": {"name": "digits", "sha256": "abc"},
            "tokenizer": {"model": {"num_codes": artifact.num_codes, "lr": 1e-3, "dims": (1, 2)}}}


def test_round_trip_is_exact_and_safe(tmp_path):
    art = make_artifact()
    path = save_artifact(tmp_path / "a" / "identifiers.pt", art)
    assert [p.name for p in path.parent.iterdir()] == ["identifiers.pt"]  # no temporary file left behind
    torch.load(path, weights_only=True)  # loadable without unpickling any object
    loaded = load_artifact(path, expected=expected_of(art))
    assert torch.equal(loaded.codes, art.codes) and loaded.codes.dtype == torch.int64
    assert torch.equal(loaded.codebooks, art.codebooks) and loaded.codebooks.dtype == torch.float32
    assert loaded.meta["version"] == ARTIFACT_VERSION and len(loaded.meta["sha256"]) == 64
    assert loaded.meta["stats"] == {"collision_rate": 0.0}


def test_a_write_killed_halfway_leaves_the_previous_artifact_intact(tmp_path, monkeypatch):
    """The stage is killed while writing: no truncated file may ever sit under the artifact's name."""
    old, new = make_artifact(seed=0), make_artifact(seed=1)
    path = save_artifact(tmp_path / "identifiers.pt", old)
    real_save = torch.save

    def killed_mid_write(obj, f):  # `f`: the open temporary file the artifact is streamed into
        real_save(obj, f)
        f.truncate(100)  # truncate what was written, then die
        raise KeyboardInterrupt

    monkeypatch.setattr("irgen.artifact.torch.save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(path, new)
    loaded = load_artifact(path, expected=expected_of(old))
    assert torch.equal(loaded.codes, old.codes)


@pytest.mark.parametrize("change,what", [
    (lambda e: e["dataset"].update(sha256="other"), "dataset.sha256"),
    (lambda e: e["tokenizer"]["model"].update(num_codes=256), "tokenizer.model.num_codes"),
    (lambda e: e.update(version=ARTIFACT_VERSION + 1), "version"),
    (lambda e: e.update(protocol="zero_shot"), "protocol: missing"),
])
def test_mismatch_is_refused_with_the_rebuild_command(tmp_path, change, what):
    art = make_artifact()
    path = save_artifact(tmp_path / "identifiers.pt", art)
    expected = expected_of(art)
    change(expected)
    with pytest.raises(StaleArtifactError) as err:
        load_artifact(path, expected=expected, rebuild_hint=REBUILD)
    assert what in str(err.value) and REBUILD in str(err.value)


def test_tampered_content_is_refused(tmp_path):
    art = make_artifact()
    path = save_artifact(tmp_path / "identifiers.pt", art)
    blob = torch.load(path, weights_only=True)
    blob["codes"][0, 0] = (blob["codes"][0, 0] + 1) % art.num_codes
    torch.save(blob, path)
    with pytest.raises(StaleArtifactError, match="sha256.*modified") as err:
        load_artifact(path, expected=expected_of(art))
    assert "irgen.rebuild=true" in str(err.value)


def test_missing_or_foreign_file_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="irgen.stage=tokenizer"):
        load_artifact(tmp_path / "nope.pt", expected={})
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(StaleArtifactError, match="not a readable"):
        load_artifact(tmp_path / "junk.pt", expected={})


def test_invalid_artifacts_are_not_written(tmp_path):
    art = make_artifact()
    art.codes[0, 0] = art.num_codes  # out of range
    with pytest.raises(ValueError, match="code ids"):
        save_artifact(tmp_path / "x.pt", art)
    art = make_artifact()
    art.meta["bad"] = object()
    with pytest.raises(TypeError):
        save_artifact(tmp_path / "x.pt", art)
    assert not list(tmp_path.iterdir())


def test_dataset_fingerprint_tracks_records_protocol_and_split(digits):
    fp = dataset_fingerprint(digits)
    assert fp["name"] == "digits" and fp["protocol"] == "closed_set" and fp["n_records"] == 1797
    assert dataset_fingerprint(DigitsDataModule(protocol="closed_set")) == fp  # stable across instances
    zero = dataset_fingerprint(DigitsDataModule(protocol="zero_shot"))
    assert zero["sha256"] == fp["sha256"] and zero["train_ids_sha256"] != fp["train_ids_sha256"]
    carved = dataset_fingerprint(DigitsDataModule(protocol="closed_set", val_fraction=0.2))
    assert carved["train_ids_sha256"] != fp["train_ids_sha256"]


# ---- identifier statistics ---------------------------------------------------------------------------------
def test_identifier_stats_on_a_handmade_example():
    codes = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [1, 1], [1, 1]])
    labels = np.array([5, 5, 6, 7, 8, 8])
    stats = identifier_stats(codes, labels, num_codes=4)
    assert stats["distinct_identifiers"] == 3
    assert stats["images_per_identifier_max"] == 3 and stats["images_per_identifier_mean"] == 2
    # (0,1) is shared by classes 5 and 6 -> its 3 images collide; (1,1) holds class 8 only
    assert stats["collision_rate"] == pytest.approx(3 / 6)
    assert stats["usage_l0"] == 0.5 and stats["perplexity_l0"] == pytest.approx(2.0)
    assert stats["perplexity_l1"] == pytest.approx(np.exp(-(1 / 6 * np.log(1 / 6) + 5 / 6 * np.log(5 / 6))))
    # level 0: code 0 holds 5,5,6 (majority 2 of 3), code 1 holds 7,8,8 (2 of 3); full prefixes: (0,1) 2 of 3,
    # (1,0) 1 of 1, (1,1) 2 of 2
    assert stats["prefix_purity_l0"] == pytest.approx(4 / 6) and stats["prefix_purity_l1"] == pytest.approx(5 / 6)


def test_prefix_ranking_orders_by_shared_prefix_then_similarity():
    q_codes = np.array([[1, 2, 3]])
    g_codes = np.array([[1, 2, 0], [1, 0, 0], [1, 2, 3], [0, 2, 3]])
    recon = np.eye(4)[:, :3].astype(np.float32) + 0.1
    nb, sc = prefix_rankings(q_codes, g_codes, recon[:1] * 0 + 1, recon, k=4)
    assert nb[0].tolist() == [2, 0, 1, 3]  # shared prefix 3, 2, 1, 0
    nb, _ = prefix_rankings(q_codes, g_codes, recon[:1], recon, k=3, exclude=np.array([2]))
    assert 2 not in nb[0].tolist()


def test_quantized_retrieval_reports_raw_quantized_and_prefix():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    centres = rng.normal(size=(4, 8)) * 5
    raw = (centres[labels] + rng.normal(size=(40, 8))).astype(np.float32)
    codes = np.stack([labels, np.zeros(40, int)], 1)
    recon = np.zeros_like(raw)  # a useless reconstruction: all identical
    eval_set = EvalSet("test", np.arange(40), labels, np.ones(40, bool), np.ones(40, bool))
    out = quantized_retrieval(raw, recon, codes, eval_set, ks=(1, 4))
    assert out["raw_R@1"] == 1.0
    assert out["prefix_R@1"] == 1.0  # the first code is the class: prefix ranking is perfect
    assert out["quantized_R@1"] < 0.5  # identical reconstructions carry no information (ties -> index order)


def test_fingerprint_survives_moving_the_dataset_but_not_changing_it(tmp_path):
    from datamodules.cub import CUBDataModule
    from tests.fixtures.fake_datasets import make_fake_cub

    def fingerprint(root):
        return dataset_fingerprint(CUBDataModule(root=str(root), image_size=32))

    here, there = make_fake_cub(tmp_path / "a" / "cub"), make_fake_cub(tmp_path / "elsewhere" / "cub")
    assert fingerprint(here) == fingerprint(there)
    different = make_fake_cub(tmp_path / "b" / "cub", n_classes=6)
    assert fingerprint(different)["sha256"] != fingerprint(here)["sha256"]
