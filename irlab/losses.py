"""Classification losses of the embedding models, in one place: normalized softmax (the baseline's and the
IRGen tokenizer's cosine head) and the IRGen reference tokenizer's plain linear softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormalizedSoftmaxLoss(nn.Module):
    """Cross-entropy over cosine similarities to learnable class proxies, scaled by 1/temperature."""

    def __init__(self, num_classes: int, dim: int, temperature: float = 0.05) -> None:
        super().__init__()
        self.proxies = nn.Parameter(torch.randn(num_classes, dim) / dim**0.5)
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(embeddings, dim=-1) @ F.normalize(self.proxies, dim=-1).T
        return F.cross_entropy(logits / self.temperature, labels)


class LinearSoftmaxLoss(nn.Module):
    """Cross-entropy of a plain linear classifier (the reference tokenizer's ``fc`` / ``fc_rq`` heads)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(features), labels)
