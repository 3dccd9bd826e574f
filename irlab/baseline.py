"""The reference row: a ResNet trunk, a linear embedding and a normalized-softmax (cosine classifier) loss.

Normalized softmax (Zhai & Wu, 2019) is the strong, simple classification baseline of deep metric learning:
embeddings and class weights are L2-normalized and the logits are their cosine divided by a temperature.
IRGen and AREIR results are only meaningful next to this row, trained on the same split.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from irlab.backbones import resnet_trunk
from irlab.losses import NormalizedSoftmaxLoss
from irlab.module import RetrievalModule
from irlab.optim import module_optimization
from irlab.plain import to_plain


class EmbeddingBaseline(RetrievalModule):
    channels_last = True  # a CNN: NHWC convolutions on GPU (callbacks/gpu_layout.py)

    def __init__(
        self,
        num_classes: int,
        arch: str = "cnn_small",
        pretrained: bool | str = False,
        embedding_dim: int = 128,
        temperature: float = 0.05,
        trunk_lr_scale: float = 1.0,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
    ) -> None:
        super().__init__()
        optimizer, scheduler = to_plain(optimizer), to_plain(scheduler)  # plain data: weights_only checkpoints
        self.save_hyperparameters()
        self.trunk, width = resnet_trunk(arch, pretrained)
        self.embedding = nn.Linear(width, embedding_dim)
        self.loss = NormalizedSoftmaxLoss(num_classes, embedding_dim, temperature)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.trunk(images))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.embed(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        groups = [
            {"params": self.trunk.parameters(), "lr_scale": self.hparams.trunk_lr_scale},
            {"params": list(self.embedding.parameters()) + list(self.loss.parameters())},
        ]
        return module_optimization(self, groups)
