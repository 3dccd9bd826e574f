"""GPU defaults every trainer gets (a no-op elsewhere): TF32 matrix products and channels-last CNNs.

TF32 (``torch.set_float32_matmul_precision("high")``): float32 products on tensor cores, for what runs outside
bf16 autocast (the tokenizer's k-means features pass, evaluation products). Channels-last: convolutions in
cuDNN's NHWC kernels, the fast path for ResNets under mixed precision; models opt in with ``channels_last = True``
(the baseline and AREIR; transformers gain nothing). cuDNN's autotuner is the trainer's ``benchmark`` setting.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class GpuLayout(Callback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type != "cuda":
            return
        torch.set_float32_matmul_precision("high")
        if getattr(pl_module, "channels_last", False):
            pl_module.to(memory_format=torch.channels_last)
