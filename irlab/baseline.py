"""The reference row: a trunk (torchvision, timm or the embedded `cnn_small`), a linear embedding and a
metric-learning loss (``model.loss``: normalized softmax by default, or any PML loss of conf/model/loss/).

Normalized softmax (Zhai & Wu, 2019) is the strong, simple classification baseline of deep metric learning:
embeddings and class weights are L2-normalized and the logits are their cosine divided by a temperature.
IRGen and AREIR results are only meaningful next to this row, trained on the same split.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from irlab.backbones import build_trunk
from irlab.losses import class_logits, has_class_logits, head_accuracy
from irlab.metric_losses import build_metric_loss
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
        loss: Mapping | None = None,
        trunk_lr_scale: float = 1.0,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
    ) -> None:
        super().__init__()
        # plain data: weights_only checkpoints
        optimizer, scheduler, loss = to_plain(optimizer), to_plain(scheduler), to_plain(loss)
        self.save_hyperparameters()
        self.trunk, width = build_trunk(arch, pretrained)
        self.embedding = nn.Linear(width, embedding_dim)
        self._metric_loss = build_metric_loss(loss, num_classes, embedding_dim)
        self.loss = self._metric_loss.criterion  # its parameters (proxies, class weights) under loss.* in checkpoints
        # classification losses: the head's training accuracy per epoch (torchmetrics, DDP-synchronised)
        self.train_accuracy = head_accuracy(num_classes) if has_class_logits(self.loss) else None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.trunk(images))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        embeddings = self.embed(batch["image"])
        loss = self._metric_loss(embeddings, batch["label"])
        self.log("train/loss", loss, prog_bar=True)
        if self.train_accuracy is not None:
            with torch.no_grad():
                self.train_accuracy(class_logits(self.loss, embeddings.detach()), batch["label"])
            self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        groups = [{"params": self.trunk.parameters(), "lr_scale": self.hparams.trunk_lr_scale}]
        lr_scale = self._metric_loss.lr_scale
        if lr_scale == 1.0:
            groups.append({"params": list(self.embedding.parameters()) + list(self.loss.parameters())})
        else:  # proxies / class weights at their own rate (ProxyAnchor: 100x)
            groups += [{"params": list(self.embedding.parameters())},
                       {"params": list(self.loss.parameters()), "lr_scale": lr_scale}]
        return module_optimization(self, [g for g in groups if g["params"]])
