"""The interface every IRGen image encoder implements (`irgen.encoders` builds them, `irgen.clip_weights` adds
CLIP's): images -> tokens whose first is the global feature."""

from __future__ import annotations

import torch
from torch import nn


class ImageEncoder(nn.Module):
    """Common interface: ``forward(images [B,3,H,W]) -> tokens [B, T, dim]``; ``tokens[:, 0]`` is global."""

    dim: int

    def global_feature(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)[:, 0]
