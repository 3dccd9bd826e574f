"""How evenly a codebook is used: the one definition of code perplexity (tokenizer training logs, identifier
statistics, the W&B histograms callback), from counts per code or from the codes themselves."""

from __future__ import annotations

import numpy as np
import torch


def counts_perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of a usage distribution given as counts per code: K when K codes are used uniformly, 1 when
    one code takes all (or nothing was counted)."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    total = counts.sum()
    if total <= 0:
        return 1.0
    p = counts[counts > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def codes_perplexity(codes: torch.Tensor | np.ndarray, num_codes: int) -> float:
    """`counts_perplexity` of a level's codes (ids in ``[0, num_codes)``)."""
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes).reshape(-1)
    return counts_perplexity(np.bincount(codes, minlength=num_codes))
