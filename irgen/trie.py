"""Prefix trie of the identifiers present in a database, as flat tensors (no Python objects per node).

Beam search asks, for every live beam at once, "which codes may follow this prefix, and which node do they lead
to?"; ranking asks "which images carry this identifier?". Both must cost the same for 10k or 1M identifiers, so:

* Nodes of level d are the distinct length-d prefixes, numbered in sorted order (root = node 0 of level 0).
  Because they are sorted by (parent, code), the children of a node are *consecutive* node ids of the next level
  and are listed by ``child_start[d][node] .. child_start[d][node + 1]`` (a CSR over the trie).
* Levels whose dense table ``n_nodes x K`` is small enough (``dense_max_entries``) also keep it:
  ``table[d][node, code] -> child id or -1``, so the transitions of all beams are one gather. Deeper levels of
  huge databases (where that table would take gigabytes) expand the CSR rows of the requested nodes into the same
  ``[beams, K]`` layout with one gather + one scatter: O(beams x K) either way, independent of the database size.
* Leaves (level D nodes) are the distinct identifiers; ``item_start``/``items`` (CSR) list the database
  positions carrying each, in database order.

Everything is built with vectorized numpy (``np.unique`` over integer keys), O(N log N), no per-item Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_DENSE_MAX_ENTRIES = 1 << 24  # 16M int32 entries = 64 MB per level


def validate_codes(codes: np.ndarray | torch.Tensor, codebook_size: int | None = None) -> np.ndarray:
    """int64 [N, D] identifiers with entries in [0, K); a clear error otherwise."""
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"identifiers must be a 2-D integer array [N, D] with D >= 1, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"identifiers must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"identifier codes must be >= 0, found {int(arr.min())}")
    if codebook_size is not None and arr.size and arr.max() >= codebook_size:
        raise ValueError(
            f"identifier code {int(arr.max())} does not fit codebook_size={codebook_size}; the generator's K must "
            f"match the tokenizer artifact (set model codebook_size to the artifact's K)"
        )
    return arr


@dataclass
class IdentifierTrie:
    """Trie of identifiers [N, D] over codes 0..K-1. Build with `IdentifierTrie.build`."""

    depth: int
    codebook_size: int
    child_start: list[torch.Tensor]  # per level d < D: int64 [n_nodes_d + 1] first child id (CSR offsets)
    node_code: list[torch.Tensor]  # per level d >= 1 (index d - 1): int64 [n_nodes_d] last code of the prefix
    tables: list[torch.Tensor | None]  # per level d < D: int32 [n_nodes_d, K] child id or -1 (None: CSR only)
    leaf_codes: torch.Tensor  # int64 [n_leaves, D] the distinct identifiers, sorted
    item_start: torch.Tensor  # int64 [n_leaves + 1] CSR offsets into `items`
    items: torch.Tensor  # int64 [N] database positions grouped by leaf, database order inside a leaf
    item_leaf: torch.Tensor  # int64 [N] leaf id of every database position

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        codes: np.ndarray | torch.Tensor,
        codebook_size: int,
        *,
        dense_max_entries: int = DEFAULT_DENSE_MAX_ENTRIES,
    ) -> IdentifierTrie:
        arr = validate_codes(codes, codebook_size)
        n, depth = arr.shape
        if n == 0:
            raise ValueError("cannot build an identifier trie from an empty database")
        k = int(codebook_size)
        parent = np.zeros(n, dtype=np.int64)  # node id of each item's prefix at the current level
        n_parents = 1
        child_start, node_code, tables = [], [], []
        for d in range(depth):
            key = parent * k + arr[:, d]
            uniq, inverse = np.unique(key, return_inverse=True)
            uniq_parent, uniq_code = uniq // k, uniq % k
            starts = np.searchsorted(uniq_parent, np.arange(n_parents + 1), side="left").astype(np.int64)
            child_start.append(torch.from_numpy(starts))
            node_code.append(torch.from_numpy(uniq_code.astype(np.int64)))
            if n_parents * k <= dense_max_entries:
                table = np.full((n_parents, k), -1, dtype=np.int32)
                table[uniq_parent, uniq_code] = np.arange(len(uniq), dtype=np.int32)
                tables.append(torch.from_numpy(table))
            else:
                tables.append(None)
            parent, n_parents = inverse.reshape(-1).astype(np.int64), len(uniq)
        order = np.argsort(parent, kind="stable")
        item_start = np.zeros(n_parents + 1, dtype=np.int64)
        np.cumsum(np.bincount(parent, minlength=n_parents), out=item_start[1:])
        leaf_codes = arr[order[item_start[:-1]]]
        return cls(depth, k, child_start, node_code, tables, torch.from_numpy(np.ascontiguousarray(leaf_codes)),
                   torch.from_numpy(item_start), torch.from_numpy(order.astype(np.int64)), torch.from_numpy(parent))

    def to(self, device: torch.device | str) -> IdentifierTrie:
        move = lambda t: None if t is None else t.to(device)
        return IdentifierTrie(
            self.depth, self.codebook_size, [move(t) for t in self.child_start], [move(t) for t in self.node_code],
            [move(t) for t in self.tables], move(self.leaf_codes), move(self.item_start), move(self.items),
            move(self.item_leaf),
        )

    # ---- queries ---------------------------------------------------------------------------------------
    @property
    def num_leaves(self) -> int:
        return int(self.leaf_codes.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.items.shape[0])

    def num_nodes(self, level: int) -> int:
        return int(self.child_start[level].shape[0] - 1)

    def transitions(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """Child node ids ``[*nodes.shape, K]`` (-1 = code not allowed) of level-``level`` nodes; -1 nodes stay dead."""
        if not 0 <= level < self.depth:
            raise ValueError(f"level must be in [0, {self.depth}), got {level}")
        k = self.codebook_size
        alive = nodes >= 0
        safe = torch.where(alive, nodes, torch.zeros_like(nodes)).long()
        table = self.tables[level]
        if table is not None:
            out = table[safe].long()
        else:  # CSR rows of these nodes scattered into [.., K]: O(beams x K), independent of the database size
            start, end = self.child_start[level][safe], self.child_start[level][safe + 1]
            j = torch.arange(k, device=nodes.device)
            child = start.unsqueeze(-1) + j
            valid = child < end.unsqueeze(-1)
            child = torch.where(valid, child, torch.zeros_like(child))
            code = torch.where(valid, self.node_code[level][child], torch.full_like(child, k))
            out = torch.full((*nodes.shape, k + 1), -1, dtype=torch.long, device=nodes.device)
            out.scatter_(-1, code, torch.where(valid, child, torch.full_like(child, -1)))
            out = out[..., :k]
        return torch.where(alive.unsqueeze(-1), out, torch.full_like(out, -1))

    def lookup(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Leaf id of each identifier ``[M, D]`` (-1 when it is not in the database). Vectorized, D gathers."""
        c = torch.as_tensor(validate_codes(codes), device=self.leaf_codes.device)
        if c.shape[1] != self.depth:
            raise ValueError(f"identifiers have {c.shape[1]} levels, the trie has {self.depth}")
        node = torch.zeros(c.shape[0], dtype=torch.long, device=c.device)
        for d in range(self.depth):
            in_range = c[:, d] < self.codebook_size
            code = torch.where(in_range, c[:, d], torch.zeros_like(c[:, d]))
            child = self.transitions(d, node).gather(1, code.unsqueeze(1)).squeeze(1)
            node = torch.where(in_range, child, torch.full_like(child, -1))
        return node

    def contains(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.lookup(codes) >= 0

    def leaf_items(self, leaf: int) -> torch.Tensor:
        """Database positions of one leaf (for tests and inspection; ranking uses the CSR arrays directly)."""
        return self.items[self.item_start[leaf] : self.item_start[leaf + 1]]
