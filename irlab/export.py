"""`python export.py ckpt_path=<ckpt> format=onnx|torchscript [out=<file>]`: the embedding model outside PyTorch.

What is exported is images -> L2-normalised embedding (``RetrievalModule.unit_embedding``: the baseline's and
AREIR's embedding; for the IRGen generator, its encoder's global feature, the kNN row's), with a dynamic batch.
IRGen's beam search is not exported: it is a data-dependent loop over a trie of the gallery's identifiers, with
a key-value cache, that neither ONNX nor TorchScript tracing captures; search with the saved index instead
(`irlab.saved_index`).

Beside the model, ``<out>.preprocess.json`` says what input it expects (RGB, size, resize mode, interpolation,
mean/std, NCHW float32) and which checkpoint it came from. The export is verified before it is kept: on sample
images onnxruntime's (or the loaded TorchScript module's) output must equal PyTorch's within ``tolerance``
(max absolute difference on unit-length embeddings), or the export fails and leaves no file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from datamodules.base import RetrievalDataModule
from datamodules.errors import UserInputError
from datamodules.paths import expand_path
from irlab.atomic_files import write_text_atomically
from irlab.saved_index import file_sha256, transform_settings

log = logging.getLogger(__name__)
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


class UnitEmbedding(nn.Module):
    """images [B, 3, H, W] (normalised as ``preprocess.json`` says) -> L2-normalised embeddings [B, d]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.unit_embedding(images)


class ExportMismatchError(RuntimeError):
    """The exported model does not compute what the PyTorch model computes."""


def export_model(cfg: DictConfig, dm: RetrievalDataModule, model: nn.Module, ckpt: str) -> Path:
    if cfg.format not in FORMATS:
        raise UserInputError(f"format must be one of {sorted(FORMATS)}, got {cfg.format!r}")
    out = expand_path(str(cfg.out)) if cfg.out else Path(ckpt).with_suffix(FORMATS[cfg.format])
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = UnitEmbedding(model.cpu().eval()).eval()
    samples = sample_images(dm, int(cfg.verify_images))
    with torch.no_grad():
        expected = wrapper(samples).numpy()
    tmp = out.with_name(out.name + ".tmp")
    try:
        got = export_onnx(wrapper, samples, tmp) if cfg.format == "onnx" else export_torchscript(wrapper, samples, tmp)
        difference = float(np.abs(got - expected).max())
        if not difference <= float(cfg.tolerance):
            raise ExportMismatchError(f"the {cfg.format} export differs from PyTorch by {difference:.2e} (max "
                                      f"absolute, unit-length embeddings) > tolerance {cfg.tolerance}: not written")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    preprocess = {"input": "RGB image, NCHW float32, values (pixel / 255 - mean) / std", **transform_settings(dm),
                  "output": f"L2-normalised embedding, {expected.shape[1]} floats; compare by inner product",
                  "input_name": "images", "output_name": "embedding", "dynamic_batch": True,
                  "checkpoint": str(Path(ckpt).resolve()), "checkpoint_sha256": file_sha256(ckpt),
                  "model_class": type(model).__name__, "verified_max_abs_difference": difference,
                  "verified_on_images": len(samples)}
    write_text_atomically(out.with_name(out.stem + ".preprocess.json"), json.dumps(preprocess, indent=2))
    log.info(f"exported {type(model).__name__} to {out} (max difference to PyTorch {difference:.1e} on "
             f"{len(samples)} images)")
    return out


def sample_images(dm: RetrievalDataModule, n: int) -> torch.Tensor:
    """`n` test images of the dataset with the evaluation transform (what the export is verified on)."""
    dataset = dm.eval_dataset("test")
    return torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))]).float()


def export_onnx(wrapper: nn.Module, samples: torch.Tensor, path: Path) -> np.ndarray:
    import onnxruntime

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(wrapper, (samples[:2],), str(path), input_names=["images"], output_names=["embedding"],
                      dynamic_shapes=({0: batch},), external_data=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": samples.numpy()})[0]


def export_torchscript(wrapper: nn.Module, samples: torch.Tensor, path: Path) -> np.ndarray:
    def embed(images: torch.Tensor) -> torch.Tensor:  # a function: tracing a LightningModule reads its trainer
        return wrapper(images)

    wrapper.requires_grad_(False)  # the weights become the traced function's constants

    with torch.no_grad():
        traced = torch.jit.trace(embed, samples[:2])
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return loaded(samples).numpy()
