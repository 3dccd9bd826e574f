"""The generator LightningModule on the embedded digits: targets, a few training steps, evaluation, checkpoints.

Until the tokenizer artifact exists, identifiers come from a tiny residual k-means over raw pixels (class-aware
enough for digits), built here.
"""

import json
import logging

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from datamodules.digits import DigitsDataModule, load_digit_pixels
from irgen.generator import IRGenGenerator, draw_same_class
from irgen.trie import IdentifierTrie
from irlab.checkpoints import CheckpointError
from irlab.optim import preset
from irlab.runner import run as run_app
from tests.helpers import compose_config

DEPTH, K = 3, 8


def pixel_rq_codes(depth: int = DEPTH, k: int = K) -> np.ndarray:
    """Residual k-means identifiers [N_records, D] of the digits' raw pixels (a stand-in tokenizer artifact)."""
    pixels, _ = load_digit_pixels()
    residual = pixels.reshape(len(pixels), -1).astype(np.float64) / 255.0
    codes = []
    for d in range(depth):
        km = KMeans(k, n_init=1, max_iter=20, random_state=d).fit(residual)
        codes.append(km.labels_)
        residual = residual - km.cluster_centers_[km.labels_]
    return np.stack(codes, 1).astype(np.int64)


@pytest.fixture(scope="module")
def codes() -> np.ndarray:
    return pixel_rq_codes()


def small_generator(**kw) -> IRGenGenerator:
    args = dict(code_depth=DEPTH, codebook_size=K, encoder={"arch": "vit_tiny", "image_size": 32}, width=32, layers=1,
                heads=2, optimizer=preset("optimizer", "adamw", lr=1e-3), encoder_lr_scale=0.01, beam_size=6,
                eval_ks=(1, 2, 4), max_rank=20, seed=0)
    args.update(kw)
    return IRGenGenerator(**args)


def trainer(**kw) -> L.Trainer:
    args = dict(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    args.update(kw)
    return L.Trainer(**args)


def test_targets_are_same_class_and_redrawn_per_epoch():
    labels = np.repeat(np.arange(5), [1, 2, 3, 10, 40])
    a, b, a2 = draw_same_class(labels, 0, 0), draw_same_class(labels, 0, 1), draw_same_class(labels, 0, 0)
    assert np.array_equal(labels[a], labels) and np.array_equal(labels[b], labels)
    assert np.array_equal(a, a2) and not np.array_equal(a, b)  # deterministic given (seed, epoch)
    assert a[0] == 0  # a singleton class can only draw itself
    # every member of the large class is drawn now and then (uniform over the class)
    drawn = np.concatenate([draw_same_class(labels, 0, e)[labels == 4] for e in range(20)])
    assert len(np.unique(drawn)) == 40


def test_targets_come_from_the_database_pool():
    inputs = np.array([0, 0, 1, 2])
    pool = np.array([2, 1, 1, 0, 0, 0])
    for epoch in range(5):
        drawn = draw_same_class(inputs, 0, epoch, pool)
        assert np.array_equal(pool[drawn], inputs)
    with pytest.raises(ValueError, match="target pool"):
        draw_same_class(np.array([3]), 0, 0, pool)


def test_training_steps_and_validation_report_beam_and_knn_metrics(codes, tmp_path):
    dm = DigitsDataModule(protocol="closed_set", batch_size=32, eval_batch_size=512, seed=0)
    model = small_generator()
    model.set_identifiers(codes)
    before = [p.detach().clone() for p in model.decoder.parameters()]
    t = trainer(limit_train_batches=3)
    t.fit(model, datamodule=dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.decoder.parameters(), strict=True))
    m = {k: float(v) for k, v in t.callback_metrics.items()}
    # during fit (validation_rows=generative) only the beam-search row; trainer.validate reports all three
    assert "train/loss" in m and "val/R@1" in m and not any(k.startswith(("val/knn/", "val/rerank/")) for k in m)
    t.validate(model, datamodule=dm, verbose=False)
    m = {k: float(v) for k, v in t.callback_metrics.items()}
    for key in ("val/R@1", "val/knn/R@1", "val/rerank/R@1", "val/P@4_irgen", "val/P@4", "val/knn/mAP",
                "val/rerank/MAP@R"):
        assert key in m, sorted(m)
    assert 0 <= m["val/R@1"] <= 1 and 0 <= m["val/knn/R@1"] <= 1 and 0 <= m["val/rerank/R@1"] <= 1
    assert m["val/P@1_irgen"] == pytest.approx(m["val/R@1"])

    # the ranked neighbours are gallery images whose identifiers are in the gallery's trie, ranked per the rule
    dm.setup()
    eval_set = dm.eval_set("val")
    report = model.last_eval.report
    assert report.neighbors.shape[0] == eval_set.query_mask.sum()
    gallery_codes = codes[eval_set.record_ids[eval_set.gallery_mask]]
    trie = IdentifierTrie.build(gallery_codes, K)
    found = report.neighbors[report.neighbors >= 0]
    assert len(found) > 0 and trie.contains(gallery_codes[found]).all()
    per_query = (report.neighbors >= 0).sum(1)
    # the paper's list: as long as the beam (reference: anss[:k]), images of one identifier in database order
    assert report.neighbors.shape[1] == 6 and (per_query >= 1).all()
    for row in report.neighbors:
        row = row[row >= 0]
        ids = [tuple(c) for c in gallery_codes[row].tolist()]
        for a in range(1, len(row)):  # within a run of one identifier, ascending database position
            if ids[a] == ids[a - 1]:
                assert row[a] > row[a - 1]

    # checkpoint: identifiers travel with the weights; a fresh module evaluates without the artifact
    path = tmp_path / "gen.ckpt"
    t.save_checkpoint(path)
    fresh = small_generator()
    state = torch.load(path, map_location="cpu", weights_only=True)
    fresh.load_state_dict(state["state_dict"])
    assert torch.equal(fresh.codes, torch.from_numpy(codes))


def test_zero_shot_limited_validation_and_exhaustive_scoring(codes):
    dm = DigitsDataModule(protocol="zero_shot", batch_size=32, eval_batch_size=128, seed=0)
    torch.manual_seed(0)  # an untrained model: whether its beams reach the subset must not depend on test order
    model = small_generator(exhaustive=True, beam_size=4)
    model.set_identifiers(codes)
    t = trainer(limit_val_batches=2)  # a subset of the eval set: rankings must drop images outside it
    t.validate(model, datamodule=dm)
    m = {k: float(v) for k, v in t.callback_metrics.items()}
    for key in ("val/R@1", "val/knn/R@1", "val/exhaustive/R@1", "val/exhaustive/mAP"):
        assert 0 <= m[key] <= 1, key
    assert m["val/queries_evaluated"] == 256
    report = model.last_eval.report
    assert report.neighbors.max() < 256 and (report.neighbors >= 0).any()


def test_bad_identifiers_are_clear_errors(codes):
    model = small_generator()
    with pytest.raises(ValueError, match="code_depth=3"):
        model.set_identifiers(codes[:, :2])
    with pytest.raises(ValueError, match="codebook_size=8"):
        model.set_identifiers(codes + 8)
    dm = DigitsDataModule(protocol="closed_set", batch_size=32, seed=0)
    with pytest.raises(RuntimeError, match="set_identifiers"):
        trainer(limit_val_batches=1).validate(model, datamodule=dm)


PIPELINE_FAST = [
    "experiment=digits_irgen", "dataset=digits", "irgen.tokenizer.encoder.arch=vit_tiny", "trainer.accelerator=cpu",
    "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1", "++trainer.limit_train_batches=2",
    "callbacks.model_summary=null", "irgen.tokenizer.num_codes=8", "irgen.tokenizer.kmeans_niter=5",
    "irgen.generator.width=32", "irgen.generator.layers=1", "irgen.generator.heads=2",
    "irgen.stage_trainer.generator.max_epochs=1", "irgen.stage_trainer.generator.check_val_every_n_epoch=1",
]


def test_pipeline_generator_stage_trains_reuses_and_refuses_stale_outputs(tmp_path, caplog):
    metrics = run_app(compose_config(PIPELINE_FAST, output_dir=tmp_path / "a"))
    for key in ("test/R@1", "test/knn/R@1", "test/P@8_irgen", "val/R@1", "tokenizer/val/R@1"):
        assert 0 <= metrics[key] <= 1, key
    # validation_rows=generative: validation during training ranks by beam search only (gallery not encoded)
    assert "val/knn/R@1" not in metrics and "val/rerank/R@1" not in metrics
    (gen_dir,) = (tmp_path / "a" / "logs" / "irgen_artifacts" / "digits_closed_set_seed42").glob("generator-*")
    assert (gen_dir / "done.json").is_file() and (gen_dir / "last.ckpt").is_file()

    # eval.py scores exactly the given generator checkpoint: same numbers as the pipeline's test, no training
    best = json.loads((gen_dir / "done.json").read_text())["checkpoint"]
    eval_overrides = PIPELINE_FAST[:2] + ["irgen.generator.width=999"]  # architecture comes from the checkpoint
    cfg = compose_config(eval_overrides + [f"ckpt_path={best}"], config_name="eval", output_dir=tmp_path / "e")
    evaluated = run_app(cfg, "evaluate")
    assert "train/loss" not in evaluated
    for key in ("test/R@1", "test/rerank/R@1", "test/knn/R@1", "test/MAP@R"):
        assert evaluated[key] == pytest.approx(metrics[key]), key
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert set(saved["rows"]["test"]) == {"generative (paper)", "generative + rerank", "kNN, same encoder"}
    # ... and refuses what is not a generator checkpoint, saying what it is
    not_torch = tmp_path / "notes.txt"
    not_torch.write_text("hello")
    tokenizer_ckpt = gen_dir.parent / "tokenizer" / "last.ckpt"
    for path, error, match in ((tmp_path / "missing.ckpt", FileNotFoundError, "not found"),
                               (not_torch, CheckpointError, "not a PyTorch checkpoint"),
                               (tokenizer_ckpt, CheckpointError, "IRGenTokenizer, not by")):
        cfg = compose_config(eval_overrides + [f"ckpt_path={path}"], config_name="eval", output_dir=tmp_path / "f")
        with pytest.raises(error, match=match):
            run_app(cfg, "evaluate")

    # a second run reuses the trained generator: no training, evaluation with the new beam size
    caplog.clear()
    caplog.set_level(logging.INFO, logger="irgen.pipeline")
    cfg = compose_config(PIPELINE_FAST + ["irgen.stage=generator", "irgen.generator.beam_size=2"],
                         output_dir=tmp_path / "b")
    cfg.paths.log_dir = str(tmp_path / "a" / "logs")
    again = run_app(cfg)
    assert "reusing the trained generator" in caplog.text
    assert "train/loss" not in again and 0 <= again["test/R@1"] <= 1

    # another generator config trains in a folder of its own, next to the first (a sweep over generator settings)
    cfg = compose_config(PIPELINE_FAST + ["irgen.stage=generator", "irgen.generator.layers=2"],
                         output_dir=tmp_path / "c")
    cfg.paths.log_dir = str(tmp_path / "a" / "logs")
    assert "train/loss" in run_app(cfg)
    assert len(list(gen_dir.parent.glob("generator-*"))) == 2 and (gen_dir / "done.json").is_file()


@pytest.mark.parametrize("experiment,protocol", [("isc_irgen", "zero_shot"), ("cub_irgen", "closed_set")])
def test_pipeline_runs_every_stage_on_fake_benchmarks(experiment, protocol, fake_data_dir, tmp_path):
    """The paper's experiments end to end on tiny fake copies (no CLIP): In-shop query -> gallery, CUB."""
    cfg = compose_config([
        f"experiment={experiment}", f"protocol={protocol}", f"paths.data_dir={fake_data_dir}",
        "irgen.tokenizer.encoder.arch=vit_tiny", "irgen.tokenizer.encoder.pretrained=false",
        "irgen.tokenizer.min_points_per_code=1", "dataset.image_size=16", "dataset.resize_size=16",
        "dataset.num_workers=0", "trainer.max_epochs=1", "trainer.accelerator=cpu", "callbacks.model_summary=null",
        "irgen.generator.width=32", "irgen.generator.layers=1", "irgen.generator.heads=2",
        "irgen.stage_trainer.generator.max_epochs=2",
        # the fake In-shop has 2 training items: too few to hold validation items out of
        *(["dataset.val_fraction=0"] if protocol == "zero_shot" else []),
    ], output_dir=tmp_path)
    metrics = run_app(cfg)
    k = max(cfg.irgen.generator.eval_ks)
    for key in ("test/R@1", f"test/R@{k}", f"test/P@{k}_irgen", "test/knn/R@1", "val/R@1"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["test/queries_evaluated"] == metrics["test/knn/queries_evaluated"] > 0


def test_encoder_token_cache_reuses_verified_tokens_and_turns_itself_off():
    from irgen.encoder_token_cache import EncoderTokenCache

    calls = []

    def encode(images):
        calls.append(len(images))
        return images * 2

    cache, index, images = EncoderTokenCache(), torch.tensor([3, 1]), torch.randn(2, 4, 5)
    assert torch.equal(cache.tokens(index, images, encode), images * 2)  # first epoch: encoded and stored
    assert torch.equal(cache.tokens(index, images, encode), images * 2) and cache.verified  # verified once
    assert torch.equal(cache.tokens(index.flip(0), images.flip(0), encode), images.flip(0) * 2)
    assert calls == [2, 2]  # the third call came from the cache

    augmenting = EncoderTokenCache()
    augmenting.tokens(index, images, encode)
    assert torch.equal(augmenting.tokens(index, images + 1, encode), (images + 1) * 2)  # differs: off
    assert not augmenting.enabled and not augmenting.store
    small = EncoderTokenCache(budget_bytes=8)
    small.tokens(index, images, encode)
    assert not small.enabled  # 2 x 20 floats do not fit in 8 bytes


def test_frozen_encoder_stays_in_eval_mode():
    model = IRGenGenerator(code_depth=2, codebook_size=4, encoder={"arch": "cnn_small", "image_size": 32},
                           encoder_init=None, width=16, layers=1, heads=2, encoder_lr_scale=0.0)
    model.train()
    assert model.decoder.training and not model.encoder.training
    model.encoder.train()  # what Lightning's mode restore after a validation run does to submodules
    model.on_train_batch_start({}, 0)
    assert not model.encoder.training
    tuned = IRGenGenerator(code_depth=2, codebook_size=4, encoder={"arch": "cnn_small", "image_size": 32},
                           encoder_init=None, width=16, layers=1, heads=2, encoder_lr_scale=0.1)
    assert tuned.train().encoder.training
