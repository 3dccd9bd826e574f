"""IRGen tokenizer: residual quantization, codebook guards, training on digits, identifiers, CLIP and timm encoders."""

from __future__ import annotations

import logging
import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.codebook_usage import usage_summary
from datamodules.digits import DigitsDataModule
from datamodules.errors import MissingFileError, UserInputError
from irgen.clip_weights import spec_from_state
from irgen.encoders import build_encoder
from irgen.kmeans import TooFewPointsError, assign, effective_num_codes, reseed_dead_codes
from irgen.quantizer import ResidualQuantizer
from irgen.tokenizer import IRGenTokenizer, encode_records
from irlab.optim import preset
from tests.fixtures.clip import IMAGE, LAYERS, OUT, PATCH, WIDTH, synthetic_clip_visual


def clustered(n: int = 2000, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Hierarchically clustered points: coarse centres + finer offsets + noise (what RQ is built for)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(8, dim, generator=g) * 3
    fine = torch.randn(8, dim, generator=g)
    a, b = torch.randint(0, 8, (n,), generator=g), torch.randint(0, 8, (n,), generator=g)
    return coarse[a] + fine[b] + 0.3 * torch.randn(n, dim, generator=g)


# ---- residual quantization -------------------------------------------------------------------------------
def test_reconstruction_error_decreases_level_by_level():
    x = clustered()
    rq = ResidualQuantizer(num_levels=4, num_codes=16, dim=16)
    rq.fit(x, niter=15, seed=0)
    q = rq(x)
    errors = [(x - q.partials[:, d]).pow(2).sum(1).mean().item() for d in range(4)]
    variance = (x - x.mean(0)).pow(2).sum(1).mean().item()
    assert all(a > b for a, b in zip([variance] + errors, errors, strict=False)), (variance, errors)
    assert errors[-1] < 0.1 * variance  # 4 x 16 codes capture the two cluster levels
    assert q.codes.dtype == torch.int64 and q.codes.shape == (len(x), 4)
    assert torch.equal(rq.encode(x), q.codes)
    assert torch.allclose(rq.decode(q.codes), q.partials)


def test_codes_are_assigned_in_float32_under_bf16_autocast():
    """Distances in bf16 (autocast's matmul) assign some codes differently; the quantizer must not follow it."""
    x = torch.nn.functional.normalize(torch.randn(4000, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    rq = ResidualQuantizer(num_levels=4, num_codes=64, dim=64)
    rq.fit(x, niter=5, seed=0)
    reference = rq.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = rq.encode(x)
    assert torch.equal(codes, reference)


def test_uninitialised_quantizer_refuses_to_encode():
    with pytest.raises(RuntimeError, match="fit"):
        ResidualQuantizer(2, 4, 8)(torch.randn(3, 8))


def test_ema_updates_track_a_shifted_distribution():
    x = clustered(seed=1)
    rq = ResidualQuantizer(num_levels=2, num_codes=16, dim=16, ema_decay=0.8)
    rq.fit(x, niter=10)
    shifted = x + 2.0
    before = (shifted - rq(shifted).partials[:, -1]).pow(2).sum(1).mean().item()
    for _ in range(30):
        rq.ema_update(shifted, rq(shifted).codes)
    after = (shifted - rq(shifted).partials[:, -1]).pow(2).sum(1).mean().item()
    assert after < 0.5 * before, (before, after)


# ---- dead codes and tiny data ------------------------------------------------------------------------------
def test_dead_codes_are_reseeded_on_the_worst_reconstructed_points():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(200, 4)).astype(np.float32)
    points[7] += 25.0  # one outlier: the worst reconstructed point
    centroids = points[10:18].copy()  # every live code owns at least its own point
    centroids[3] = 1000.0  # never the nearest: dead
    idx, err = assign(points, centroids)
    counts = np.bincount(idx, minlength=8)
    assert counts[3] == 0
    new, dead = reseed_dead_codes(centroids, points, counts, err)
    assert dead.tolist() == [3]
    assert np.allclose(new[3], points[7])
    assert (assign(points, new)[0] == 3).sum() >= 1  # the re-seeded code now has points
    assert np.array_equal(np.delete(new, 3, 0), np.delete(centroids, 3, 0))  # live codes untouched


def test_ema_reseeds_a_code_that_stopped_being_used():
    x = clustered(n=512, seed=2)
    rq = ResidualQuantizer(num_levels=1, num_codes=8, dim=16, ema_decay=0.5)
    rq.fit(x, niter=5)
    rq.codebooks[0, 5] = 1e4  # kill code 5 (its EMA statistics too, else the next update restores it)
    rq.ema_sum[0, 5] = 1e4 * rq.ema_freq[0, 5]
    assert not (rq(x).codes[:, 0] == 5).any()
    reseeded = sum(rq.ema_update(x, rq(x).codes) for _ in range(12))
    assert reseeded >= 1
    assert (rq(x).codes[:, 0] == 5).any()  # code 5 is alive again, on real data


def test_k_reduction_on_tiny_data(caplog):
    with caplog.at_level(logging.WARNING, logger="irgen.kmeans"):
        assert effective_num_codes(256, 40, min_points_per_code=4) == 10
    assert "reducing num_codes to 10" in caplog.text
    assert effective_num_codes(16, 1000, 4) == 16
    with pytest.raises(TooFewPointsError, match="at least 8"):
        effective_num_codes(16, 5, 4)


def test_quantizer_fit_with_fewer_points_than_codes_is_a_clear_error():
    rq = ResidualQuantizer(num_levels=2, num_codes=64, dim=8)
    with pytest.raises(TooFewPointsError, match="irgen.tokenizer.num_codes"):
        rq.fit(torch.randn(30, 8), min_points_per_code=1)


# ---- the LightningModule on the embedded dataset -----------------------------------------------------------
def tiny_digits(**kw) -> DigitsDataModule:
    dm = DigitsDataModule(protocol="closed_set", image_size=16, resize_size=16, batch_size=32, eval_batch_size=512,
                          **kw)
    dm.setup()
    return dm


def tiny_tokenizer(dm, **kw) -> IRGenTokenizer:
    args = dict(encoder={"arch": "vit_tiny", "image_size": 16}, num_levels=3, num_codes=8, kmeans_niter=5,
                kmeans_max_points=300, seed=0, optimizer=preset("optimizer", "adamw", lr=1e-3, weight_decay=1e-4))
    return IRGenTokenizer(dm.num_classes, **{**args, **kw})


def fit_steps(model, dm, steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(max_epochs=1, limit_train_batches=steps, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    return trainer


def test_refit_every_n_epochs_and_after_the_last():
    dm = tiny_digits()
    model = tiny_tokenizer(dm, refit_every=2)
    fits: list[tuple[str, int]] = []
    refit = model._refit
    model._refit = lambda when: (fits.append((when, model.current_epoch)), refit(when))
    trainer = L.Trainer(max_epochs=5, limit_train_batches=1, limit_val_batches=1, check_val_every_n_epoch=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    # initialisation, then after epochs 2 and 4 (before their validation), and after the last (5th) epoch
    assert [e for _, e in fits] == [0, 1, 3, 4] and fits[0][0] == "initialisation"
    assert fits[1][0] == "epoch end" and fits[-1][0] == "epoch end, no validation"
    with pytest.raises(ValueError, match="refit_every"):
        tiny_tokenizer(dm, refit_every=0)


def test_training_steps_then_identifiers_are_deterministic(tmp_path):
    torch.manual_seed(0)
    dm = tiny_digits()
    model = tiny_tokenizer(dm, codebook_update="refit")
    encoder_before = [p.detach().clone() for p in model.encoder.parameters()]
    trainer = fit_steps(model, dm, steps=3)
    assert bool(model.quantizer.initialized)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(encoder_before, model.encoder.parameters(), strict=True))
    for key in ("val/R@1", "val/raw_R@1"):  # quantized (reported) and raw retrieval during training
        assert 0.0 <= float(trainer.callback_metrics[key]) <= 1.0
    # codebook usage for the identifier-statistics callback (W&B histograms): one count per code and level
    stats = model.codebook_usage
    n_val = int(stats["usage"][0].sum())  # the images evaluated (a limited loader may see a subset)
    assert 0 < n_val <= len(dm.eval_set("val"))
    assert len(stats["usage"]) == 3 and all(u.shape == (8,) and u.sum() == n_val for u in stats["usage"])
    assert 1 <= stats["distinct_identifiers"] <= n_val
    assert 1 <= usage_summary(stats["usage"])["ids/level0/perplexity"] <= 8

    codes, feats = encode_records(model, dm)
    assert codes.shape == (len(dm.records), 3) and codes.dtype == torch.int64
    assert int(codes.max()) < 8 and feats.shape[0] == len(dm.records)
    again, _ = encode_records(model, dm)
    assert torch.equal(codes, again)

    ckpt = tmp_path / "tok.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # no pickled objects in hparams either
    reloaded = IRGenTokenizer(**state["hyper_parameters"])
    reloaded.load_state_dict(state["state_dict"])
    assert torch.equal(encode_records(reloaded, dm)[0], codes)


def test_ema_mode_updates_codebooks_during_training():
    torch.manual_seed(0)
    dm = tiny_digits()
    model = tiny_tokenizer(dm, codebook_update="ema", ema_decay=0.5)
    calls = []
    original = model.quantizer.fit
    model.quantizer.fit = lambda *a, **k: calls.append(1) or original(*a, **k)
    fit_steps(model, dm, steps=2)
    assert len(calls) == 1  # k-means initialisation only, no per-epoch re-fit
    init = model.quantizer.codebooks.clone()
    z = model.features(next(iter(dm.train_dataloader()))["image"]).detach()
    model.quantizer.ema_update(z, model.quantizer(z).codes)
    assert not torch.equal(init, model.quantizer.codebooks)


def test_encoder_gets_gradient_through_the_straight_through_estimator():
    dm = tiny_digits()
    model = tiny_tokenizer(dm, loss_weights={"raw": 0.0, "partial": 1.0, "commit": 0.0})
    images = torch.stack([dm.train_dataset()[i]["image"] for i in range(64)])
    labels = torch.as_tensor(dm.train_labels[:64])
    model.quantizer.fit(model.features(images).detach(), niter=3, min_points_per_code=1)
    model.log = model.log_dict = lambda *a, **k: None
    loss = model.training_step({"image": images, "label": labels}, 0)
    loss.backward()
    grad = sum(p.grad.abs().sum() for p in model.encoder.parameters() if p.grad is not None)
    assert float(grad) > 0  # only the partial-reconstruction loss is on, and it still reaches the encoder


def test_bad_settings_are_rejected():
    dm = tiny_digits()
    with pytest.raises(ValueError, match="codebook_update"):
        tiny_tokenizer(dm, codebook_update="sgd")
    with pytest.raises(ValueError, match="loss_weights"):
        tiny_tokenizer(dm, loss_weights={"rwa": 1.0})


# ---- CLIP (timm) and timm encoders ----------------------------------------------------------------------------
def reference_clip_visual(sd: dict[str, torch.Tensor], images: torch.Tensor, projected: bool = True) -> torch.Tensor:
    """CLIP's VisionTransformer.forward written out by hand (OpenAI clip/model.py semantics); ``projected=False``:
    the IRGen reference's modified forward, which returns every token before ``ln_post`` and ``proj``."""
    ln = lambda x, n: F.layer_norm(x, (WIDTH,), sd[n + ".weight"], sd[n + ".bias"], eps=1e-5)  # noqa: E731
    x = F.conv2d(images, sd["conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(len(x), 1, -1), x], dim=1) + sd["positional_embedding"]
    x = ln(x, "ln_pre")
    heads = WIDTH // 64 or 1
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1")
        q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(len(t), -1, heads, WIDTH // heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(WIDTH // heads), dim=-1)
        o = (att @ split(v)).transpose(1, 2).reshape(len(x), -1, WIDTH)
        x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    return ln(x[:, 0], "ln_post") @ sd["proj"] if projected else x


def _torchscript_archive(state: dict[str, torch.Tensor], path) -> None:
    """A TorchScript archive holding `state` as buffers, shaped like OpenAI's released CLIP files."""
    root = nn.Module()
    for key, tensor in state.items():
        *names, leaf = key.split(".")
        module = root
        for name in names:
            if not hasattr(module, name):
                module.add_module(name, nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(root), str(path))


def clip_files(tmp_path, sd: dict[str, torch.Tensor]) -> dict[str, object]:
    """The same synthetic tower in every file layout a user may have."""
    files = {
        "openai_state_dict.pt": {f"visual.{k}": v for k, v in sd.items()} | {"text_projection": torch.zeros(2)},
        "open_clip_training.pt": {"state_dict": {f"module.visual.{k}": v for k, v in sd.items()}},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    _torchscript_archive({f"visual.{k}": v for k, v in sd.items()}, tmp_path / "ViT-tiny.pt")
    return {name: tmp_path / name for name in [*files, "ViT-tiny.pt"]}


def test_timm_clip_computes_clips_forward_from_every_file_layout(tmp_path):
    """timm's QuickGELU CLIP ViT with a file's weights = CLIP's forward written out by hand (so irlab keeps no
    conversion of its own); the reference's transformer tokens (no ln_post, no proj) too."""
    sd = synthetic_clip_visual()
    images = torch.randn(3, 3, IMAGE, IMAGE)
    expected = reference_clip_visual(sd, images)
    spec = spec_from_state(sd)
    assert (spec.width, spec.layers, spec.patch_size, spec.output_dim, spec.grid) == (WIDTH, LAYERS, PATCH, OUT, 4)
    for name, path in clip_files(tmp_path, sd).items():
        # the OpenAI TorchScript release is QuickGELU by itself; a state dict must say which activation it has
        activation = "auto" if name == "ViT-tiny.pt" else "quick_gelu"
        enc = build_encoder("clip", IMAGE, str(path), clip_activation=activation).eval()
        with torch.no_grad():
            assert torch.allclose(enc.global_feature(images), expected, atol=1e-5), name
        assert enc.dim == OUT
    # timm's own weights file (its layout, as the hub has it) gives the same model
    timm_file = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(timm_file))
    again = build_encoder("clip", IMAGE, str(timm_file), clip_activation="quick_gelu").eval()
    with torch.no_grad():
        assert torch.allclose(again.global_feature(images), expected, atol=1e-5)
    tokens = build_encoder("clip", IMAGE, str(tmp_path / "ViT-tiny.pt"), clip_output="transformer").eval()
    assert tokens.dim == WIDTH
    assert not any(n.startswith(("model.norm.", "model.head.")) for n, _ in tokens.named_parameters())
    with torch.no_grad():
        assert torch.allclose(tokens(images), reference_clip_visual(sd, images, projected=False), atol=1e-5)


def test_clip_activation_is_known_or_the_file_is_refused(tmp_path):
    sd = synthetic_clip_visual()
    paths = clip_files(tmp_path, sd)
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with pytest.raises(UserInputError, match="irgen.tokenizer.encoder.clip_activation=quick_gelu or gelu"):
        build_encoder("clip", IMAGE, str(paths["openai_state_dict.pt"]))
    gelu = build_encoder("clip", IMAGE, str(paths["openai_state_dict.pt"]), clip_activation="gelu").eval()
    with torch.no_grad():  # GELU weights (open_clip LAION) in a GELU model: another function than QuickGELU's
        assert not torch.allclose(gelu.global_feature(images), reference_clip_visual(sd, images), atol=1e-4)


def test_clip_files_give_clear_errors(tmp_path, monkeypatch):
    import timm

    sd = synthetic_clip_visual()
    torch.save({f"visual.{k}": v for k, v in sd.items()}, tmp_path / "clip.pt")
    with pytest.raises(ValueError, match="arch=clip"):  # a CLIP file given to a torchvision ViT
        build_encoder("vit_tiny", IMAGE, str(tmp_path / "clip.pt"))
    with pytest.raises(ValueError, match="not clip_vit_b_16"):  # a tiny CLIP is not a ViT-B/16
        build_encoder("clip_vit_b_16", IMAGE, str(tmp_path / "clip.pt"), clip_activation="quick_gelu")
    with pytest.raises(FileNotFoundError, match="ViT-B-16.pt"):
        build_encoder("clip_vit_b_16", 224, str(tmp_path / "missing.pt"))
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CLIP ViT checkpoint"):
        build_encoder("clip", IMAGE, str(tmp_path / "other.pt"))

    def offline(name, pretrained=False, **kwargs):
        if pretrained and "pretrained_cfg_overlay" not in kwargs:
            raise OSError("no network")
        return real(name, pretrained=pretrained, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)  # pretrained=true: timm's download, which fails here
    # (timm's QuickGELU and GELU OpenAI models share one weights repository on the hub)
    with pytest.raises(MissingFileError, match=r"vit_base_patch16_clip_quickgelu_224\.openai.*huggingface.co/timm/"
                                               r"vit_base_patch16_clip_224\.openai.*set irgen\.tokenizer\.encoder\."
                                               r"pretrained="):
        build_encoder("clip_vit_b_16", 224, True)


def test_clip_positional_embedding_is_resized_for_other_image_sizes(tmp_path):
    path = clip_files(tmp_path, synthetic_clip_visual())["ViT-tiny.pt"]
    encoder = build_encoder("clip", 2 * IMAGE, str(path))
    assert encoder(torch.randn(1, 3, 2 * IMAGE, 2 * IMAGE)).shape == (1, (2 * IMAGE // PATCH) ** 2 + 1, OUT)


@pytest.mark.parametrize(("arch", "tokens"), [("timm/resnet18", 1 + 1), ("timm/vit_tiny_patch16_224", 1 + 4)])
def test_any_timm_model_is_an_encoder_with_its_global_token_first(arch, tokens):
    encoder = build_encoder(arch, 32).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = encoder(images)
    assert out.shape == (2, tokens, encoder.dim)
    if arch == "timm/resnet18":  # a CNN: the map's mean first, then its cells (one 1x1 cell at 32 px)
        assert torch.allclose(out[:, 0], out[:, 1:].mean(dim=1))


def test_small_cnn_encoder_tokens_and_refuses_pretrained():
    """cnn_small: a global token (the baseline trunk's feature) then the 4x4 cells; images of another size pool
    to the same 16 cells."""
    encoder = build_encoder("cnn_small", image_size=32)
    tokens = encoder(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 17, encoder.dim)
    assert encoder(torch.randn(2, 3, 48, 48)).shape == (2, 17, encoder.dim)
    assert torch.allclose(encoder.global_feature(torch.zeros(1, 3, 32, 32)),
                          encoder.pool(encoder.cells(torch.zeros(1, 3, 32, 32))))
    with pytest.raises(ValueError, match="irgen.tokenizer.encoder.pretrained=false"):
        build_encoder("cnn_small", pretrained="local_weights.pth")  # refused before any file is read
