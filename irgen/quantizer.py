"""Residual quantization: a feature becomes D code ids, level d quantizing what levels < d left unexplained.

Codebooks are buffers, never gradient-trained. They are set by k-means on the features (level by level, on the
residuals) and then either re-fitted by k-means once per epoch (the IRGen reference recipe, `fit`) or tracked
with exponential moving averages of the assigned residuals (VQ-VAE style, `ema_update`). Both guard against
dead codes by moving them onto the worst-reconstructed residuals. Because level d+1 refines level d, the
partial reconstructions (sum of the first d codewords) approximate the feature better and better: this is
what makes an identifier *prefix* meaningful for IRGen's autoregressive decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from irgen.kmeans import assign, check_enough_points, kmeans, reseed_dead_codes


@dataclass
class Quantized:
    codes: torch.Tensor  # int64 [B, D]
    partials: torch.Tensor  # [B, D, dim]: partials[:, d] = sum of the first d+1 codewords


def nearest_code(residual: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(code id [B], squared L2 error [B]) of the nearest codeword; ties go to the lowest id (deterministic)."""
    d2 = (residual.pow(2).sum(1, keepdim=True) - 2.0 * residual @ codebook.T + codebook.pow(2).sum(1)[None])
    error, idx = d2.min(dim=1)
    return idx, error.clamp_min(0.0)


class ResidualQuantizer(nn.Module):
    def __init__(self, num_levels: int = 4, num_codes: int = 256, dim: int = 768, ema_decay: float = 0.9,
                 eps: float = 1e-5) -> None:
        super().__init__()
        if num_levels < 1 or num_codes < 2:
            raise ValueError(f"need num_levels >= 1 and num_codes >= 2, got {num_levels} x {num_codes}")
        self.num_levels, self.num_codes, self.dim = num_levels, num_codes, dim
        self.ema_decay, self.eps = ema_decay, eps
        self.register_buffer("codebooks", torch.zeros(num_levels, num_codes, dim))
        # EMA statistics as per-sample frequencies (independent of batch size): codebook = ema_sum / ema_freq.
        self.register_buffer("ema_freq", torch.full((num_levels, num_codes), 1.0 / num_codes))
        self.register_buffer("ema_sum", torch.zeros(num_levels, num_codes, dim))
        self.register_buffer("initialized", torch.tensor(False))

    # ---- encode / decode ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Identifiers int64 [B, D] of features [B, dim]."""
        return self.forward(x).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Partial reconstructions [B, D, dim] of identifiers [B, D] (cumulative sums of the codewords)."""
        levels = torch.arange(self.num_levels, device=codes.device)
        return self.codebooks[levels[None, :], codes].cumsum(dim=1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Quantized:
        if not bool(self.initialized):
            raise RuntimeError("codebooks are not initialised: call fit() on features first (the tokenizer does "
                               "this at the start of training)")
        residual = x.float()
        codes = []
        # float32 distances even inside bf16 autocast: rounded distances assign 0.1-0.2% of codes differently
        with torch.autocast(residual.device.type, enabled=False):
            for d in range(self.num_levels):
                idx, _ = nearest_code(residual, self.codebooks[d].float())
                residual = residual - self.codebooks[d][idx]
                codes.append(idx)
        codes = torch.stack(codes, dim=1)
        return Quantized(codes, self.decode(codes).to(x.dtype))

    # ---- k-means (initialisation and per-epoch re-fit) ------------------------------------------------
    @torch.no_grad()
    def fit(self, x: torch.Tensor, *, niter: int = 20, seed: int = 0, warm_start: bool = True,
            min_points_per_code: int = 1) -> dict[str, float]:
        """Fit every level by k-means on the residuals of `x` [N, dim]; re-seed codes left without points.

        ``warm_start`` starts from the current codebooks (keeps code ids stable across re-fits).
        Returns per-level usage counts of dead codes that were re-seeded.
        """
        points = x.detach().float().cpu().numpy()
        check_enough_points(len(points), self.num_codes, min_points_per_code)
        residual = points.copy()
        books, freqs, info = [], [], {}
        for d in range(self.num_levels):
            init = self.codebooks[d].cpu().numpy() if warm_start and bool(self.initialized) else None
            centroids = kmeans(residual, self.num_codes, niter=niter, seed=seed + d, init=init)
            idx, err = assign_chunked(residual, centroids)
            counts = np.bincount(idx, minlength=self.num_codes)
            centroids, dead = reseed_dead_codes(centroids, residual, counts, err)
            if len(dead):
                idx, _ = assign_chunked(residual, centroids)
                counts = np.bincount(idx, minlength=self.num_codes)
            info[f"reseeded_l{d}"] = float(len(dead))
            residual = residual - centroids[idx]
            books.append(centroids)
            freqs.append(counts / max(1, len(points)))
        device = self.codebooks.device
        self.codebooks.copy_(torch.from_numpy(np.stack(books)).to(device))
        self.ema_freq.copy_(torch.from_numpy(np.stack(freqs)).float().to(device))
        self.ema_sum.copy_(self.codebooks * self.ema_freq[..., None])
        self.initialized.fill_(True)
        return info

    # ---- EMA updates ----------------------------------------------------------------------------------
    @torch.no_grad()
    def ema_update(self, x: torch.Tensor, codes: torch.Tensor, dead_threshold: float = 0.1) -> int:
        """One EMA step from features `x` [B, dim] and their codes; returns the number of re-seeded codes.

        A code is dead when its EMA frequency falls below ``dead_threshold / K`` (that fraction of uniform
        usage). Statistics are summed over DDP ranks, so every rank takes the same decisions; re-seeded
        values (drawn from each rank's own batch) are then broadcast from rank 0.
        """
        residual = x.detach().float()
        batch = torch.tensor(float(len(residual)), device=residual.device)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(batch)
        reseeded = 0
        for d in range(self.num_levels):
            idx = codes[:, d]
            counts = torch.bincount(idx, minlength=self.num_codes).float()
            sums = torch.zeros_like(self.codebooks[d]).index_add_(0, idx, residual)
            if distributed:
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            decay = self.ema_decay
            self.ema_freq[d].mul_(decay).add_(counts / batch, alpha=1 - decay)
            self.ema_sum[d].mul_(decay).add_(sums / batch, alpha=1 - decay)
            total = self.ema_freq[d].sum()
            smoothed = (self.ema_freq[d] + self.eps) / (total + self.num_codes * self.eps) * total
            old = self.codebooks[d][idx]
            self.codebooks[d].copy_(self.ema_sum[d] / smoothed[:, None])
            dead = torch.nonzero(self.ema_freq[d] < dead_threshold / self.num_codes).flatten()
            if len(dead):
                error = (residual - old).pow(2).sum(1)
                worst = torch.argsort(error, descending=True, stable=True)[: len(dead)]
                dead = dead[: len(worst)]
                self.codebooks[d][dead] = residual[worst]
                self.ema_freq[d][dead] = 1.0 / self.num_codes
                self.ema_sum[d][dead] = residual[worst] / self.num_codes
                reseeded += len(dead)
            residual = residual - old
        if distributed and reseeded:
            for buf in (self.codebooks, self.ema_freq, self.ema_sum):
                dist.broadcast(buf, src=0)
        return reseeded


def assign_chunked(points: np.ndarray, centroids: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """`kmeans.assign` in row blocks (bounded memory for large training sets)."""
    out = [assign(points[i : i + chunk], centroids) for i in range(0, len(points), chunk)]
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])
