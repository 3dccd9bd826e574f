"""How evenly a codebook is used: the one definition of code perplexity (tokenizer training logs, identifier
statistics, the W&B histograms callback)."""

from __future__ import annotations

import numpy as np


def perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of a usage distribution given as counts per code: K when K codes are used uniformly, 1 when
    one code takes all (or nothing was counted)."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    total = counts.sum()
    if total <= 0:
        return 1.0
    p = counts[counts > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))
