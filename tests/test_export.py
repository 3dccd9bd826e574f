"""`export.py`: ONNX (checked with onnxruntime) and TorchScript exports compute PyTorch's unit embedding for every
method, with a dynamic batch; an export outside the tolerance leaves no file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from irlab.builders import build_datamodule
from irlab.export import ExportMismatchError, sample_images
from irlab.methods import method_named
from irlab.runner import run
from tests.helpers import compose_config
from tests.test_query import EXPERIMENTS, untrained_checkpoint


def export(tmp_path, common, ckpt, *extra):
    cfg = compose_config([*common, f"ckpt_path={ckpt}", *extra], config_name="export", output_dir=tmp_path / "run")
    run(cfg, "export")
    return cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_onnx_export_equals_pytorch_for_every_method(experiment, tmp_path):
    import onnxruntime

    ckpt, common = untrained_checkpoint(experiment, tmp_path)
    out = tmp_path / "model.onnx"
    cfg = export(tmp_path, common, ckpt, f"out={out}")
    preprocess = json.loads((tmp_path / "model.preprocess.json").read_text())
    assert preprocess["image_size"] == 32 and preprocess["verified_max_abs_difference"] <= 1e-4
    dm = build_datamodule(cfg)
    model, _ = method_named(cfg.method.name).load(cfg, dm)
    images = sample_images(dm, 5)  # another batch size than the export was traced with
    with torch.no_grad():
        expected = model.eval().unit_embedding(images).numpy()
    got = onnxruntime.InferenceSession(str(out)).run(None, {"images": images.numpy()})[0]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_torchscript_export_and_a_failed_verification_leaves_nothing(tmp_path):
    ckpt, common = untrained_checkpoint("digits_baseline", tmp_path)
    out = tmp_path / "model.pt"
    export(tmp_path, common, ckpt, "format=torchscript", f"out={out}")
    module = torch.jit.load(str(out))
    assert module(torch.randn(3, 3, 32, 32)).shape == (3, 128)
    bad = tmp_path / "bad.onnx"
    with pytest.raises(ExportMismatchError, match="tolerance"):
        export(tmp_path, common, ckpt, f"out={bad}", "tolerance=-1")
    assert not bad.exists() and not list(tmp_path.glob("bad.onnx*"))
