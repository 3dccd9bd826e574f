"""Exact inner-product search in torch: the kNN path on a GPU when the installed faiss has no GPU support.

faiss GPU wheels bring their own CUDA runtime, which may not coexist with the pinned torch's (see the README's
``gpu`` extra). Brute force on the GPU is a matrix product and a top-k, so `knn_search` uses this index there
instead: same ``search(queries, k) -> (scores, ids)`` contract as ``faiss.IndexFlatIP``, the gallery resident on
the device, processed in blocks so that a query chunk x block score matrix stays bounded. Ties are re-resolved by
`knn_search` exactly as for faiss.
"""

from __future__ import annotations

import numpy as np
import torch


class TorchFlatIP:
    def __init__(self, gallery: np.ndarray, device: str | torch.device, block_rows: int = 1 << 16) -> None:
        self.device = torch.device(device)
        self.gallery = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float32)).to(self.device)
        self.block_rows = block_rows
        self.ntotal = len(gallery)

    @torch.no_grad()
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        k = min(int(k), self.ntotal)
        best_s = torch.full((len(q), 0), -torch.inf, device=self.device)
        best_i = torch.zeros((len(q), 0), dtype=torch.long, device=self.device)
        for lo in range(0, self.ntotal, self.block_rows):
            scores = q @ self.gallery[lo: lo + self.block_rows].T
            s, i = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_s, merged_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i + lo], dim=1)
            best_s, pick = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
            best_i = merged_i.gather(1, pick)
        return best_s.cpu().numpy(), best_i.cpu().numpy()
