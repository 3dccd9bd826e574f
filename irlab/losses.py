"""Classification losses of the embedding models, in one place: normalized softmax (the baseline's and the
IRGen tokenizer's cosine head) and the IRGen reference tokenizer's plain linear softmax. Both expose their
``logits`` (what `head_accuracy` counts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class NormalizedSoftmaxLoss(nn.Module):
    """Cross-entropy over cosine similarities to learnable class proxies, scaled by 1/temperature."""

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.05) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(num_classes, dim) / dim**0.5)
        self.temperature = temperature

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=-1) @ F.normalize(self.proxies, dim=-1).T / self.temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings), labels)


class LinearSoftmaxLoss(nn.Module):
    """Cross-entropy of a plain linear classifier (the reference tokenizer's ``fc`` / ``fc_rq`` heads)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(features), labels)


def has_class_logits(criterion: nn.Module) -> bool:
    """Whether `class_logits` can score the training classes with this loss (it has class weights or proxies)."""
    return hasattr(criterion, "logits") or hasattr(criterion, "get_logits")


def class_logits(criterion: nn.Module, embeddings: torch.Tensor) -> torch.Tensor | None:
    """Scores of the training classes, higher = more likely (irlab's ``logits``; PML's ``get_logits`` for losses
    with class weights or proxies: NormalizedSoftmax, ArcFace, ProxyAnchor, ProxyNCA, ..., negated where PML's
    distance is a distance rather than a similarity); None for pair losses."""
    if not has_class_logits(criterion):
        return None
    if hasattr(criterion, "logits"):
        return criterion.logits(embeddings)
    scores = criterion.get_logits(embeddings)
    distance = getattr(criterion, "distance", None)
    return scores if distance is None or distance.is_inverted else -scores


def head_accuracy(num_classes: int) -> MulticlassAccuracy:
    """Training accuracy of a classifier head, accumulated over the epoch and synchronised across DDP ranks by
    torchmetrics when logged (``self.log(name, metric, on_epoch=True)``)."""
    return MulticlassAccuracy(num_classes=num_classes, average="micro")
