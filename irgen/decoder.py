"""Autoregressive identifier decoder: a small GPT that cross-attends to the image encoder's tokens.

Vocabulary (documented choice): one shared embedding table of ``D*K + 1`` tokens -- code c of level d is token
``d*K + c`` and the start token is ``D*K`` -- because the same code value means different things at different
residual-quantization levels. Output: level-specific heads (``head_weight[d]`` is ``[K, width]``), so the
position that predicts level d can only produce level-d codes. Position p (0-based) reads token p (start, c_0,
..., c_{D-2}) and predicts code c_p.

Shapes: sequences are grouped as ``[Q, G, T]`` -- Q queries (images), G sequences per query (beams, candidate
identifiers; 1 in training), T tokens. Self-attention runs over T inside each sequence; cross-attention folds
the G*T tokens of a query into one attention call against that query's memory, so the memory keys/values are
computed once per query and shared by all of its beams/candidates without any copy.

Incremental decoding keeps a self-attention key/value cache (`KVCache`) that beam search reorders by parent
beam; `forward` with a cache only processes the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    depth_levels: int = 4  # D: identifier length
    codebook_size: int = 256  # K: codes per level
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    memory_dim: int = 768  # encoder token dim; projected to `width` when different

    @property
    def vocab_size(self) -> int:
        return self.depth_levels * self.codebook_size + 1

    @property
    def start_token(self) -> int:
        return self.depth_levels * self.codebook_size


@dataclass
class KVCache:
    """Per-layer self-attention keys/values ``[Q*G, H, t, hd]`` of the tokens decoded so far."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else int(self.keys[0].shape[2])

    def reorder(self, index: torch.Tensor) -> None:
        """Keep sequence ``index[i]`` as sequence i (beam search: new beam i continues old beam index[i])."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]


class SelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            while len(cache.keys) <= layer:
                cache.keys.append(None)
                cache.values.append(None)
            if cache.keys[layer] is not None:
                past = cache.keys[layer].shape[2]
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        # causal mask shifted by the cached length: new token i sees past + i + 1 keys
        mask = None if t == 1 else torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class CrossAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[Q, H, S, hd]`` of the (projected) encoder tokens ``[Q, S, width]``."""
        b, s, c = memory.shape
        k, v = self.kv(memory).view(b, s, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, m, c = x.shape  # m = G*T tokens of one query, all attending to the same memory
        q = self.q(x).view(b, m, self.heads, c // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, m, c))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = SelfAttention(cfg)
        self.cross = CrossAttention(cfg)
        hidden = int(cfg.mlp_ratio * cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, kv, cache: KVCache | None, layer: int) -> torch.Tensor:
        qn, g, t, c = x.shape
        x = x + self.attn(self.ln1(x).view(qn * g, t, c), cache, layer).view(qn, g, t, c)
        x = x + self.cross(self.ln2(x).view(qn, g * t, c), kv).view(qn, g, t, c)
        return x + self.mlp(self.ln3(x))


class IdentifierDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"decoder width {cfg.width} must be divisible by heads {cfg.heads}")
        self.cfg = cfg
        self.memory_proj = nn.Identity() if cfg.memory_dim == cfg.width else nn.Linear(cfg.memory_dim, cfg.width)
        self.memory_ln = nn.LayerNorm(cfg.width)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.depth_levels, cfg.width))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head_weight = nn.Parameter(torch.empty(cfg.depth_levels, cfg.codebook_size, cfg.width))
        self.head_bias = nn.Parameter(torch.zeros(cfg.depth_levels, cfg.codebook_size))
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.head_weight, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # ---- inputs ------------------------------------------------------------------------------------
    def input_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing inputs ``[..., D]`` for identifiers ``[..., D]``: start, then codes 0..D-2 as tokens."""
        d, k = self.cfg.depth_levels, self.cfg.codebook_size
        offsets = torch.arange(d - 1, device=codes.device) * k
        start = torch.full((*codes.shape[:-1], 1), self.cfg.start_token, dtype=torch.long, device=codes.device)
        return torch.cat([start, codes[..., : d - 1] + offsets], dim=-1)

    def code_token(self, level: int, codes: torch.Tensor) -> torch.Tensor:
        return codes + level * self.cfg.codebook_size

    # ---- computation -------------------------------------------------------------------------------
    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of every layer for encoder tokens ``[Q, S, memory_dim]`` (once per query)."""
        m = self.memory_ln(self.memory_proj(memory))
        return [block.cross.memory_kv(m) for block in self.blocks]

    def forward(
        self, tokens: torch.Tensor, memory_kv: list, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits ``[Q, G, T, K]`` for tokens ``[Q, G, T]`` at positions ``cache.length ..``; fills the cache."""
        qn, g, t = tokens.shape
        pos = cache.length if cache is not None else 0
        if pos + t > self.cfg.depth_levels:
            raise ValueError(f"{pos + t} positions exceed the identifier length {self.cfg.depth_levels}")
        x = self.drop(self.tok_emb(tokens) + self.pos_emb[pos : pos + t])
        for i, block in enumerate(self.blocks):
            x = block(x, memory_kv[i], cache, i)
        h = self.ln_f(x)
        w, b = self.head_weight[pos : pos + t], self.head_bias[pos : pos + t]
        # float32 logits even inside bf16 autocast: bf16 rounds them by 0.03-0.06 nats, enough to reorder close
        # beams; the head is one small product per step, so this costs little
        with torch.autocast(h.device.type, enabled=False):
            return torch.einsum("qgtc,tkc->qgtk", h.float(), w.float()) + b.float()

    def sequence_log_probs(self, codes: torch.Tensor, memory_kv: list) -> torch.Tensor:
        """Teacher-forced log p(identifier | image) ``[Q, G]`` for identifiers ``[Q, G, D]`` (summed over levels)."""
        logits = self(self.input_tokens(codes), memory_kv).float()
        return logits.log_softmax(-1).gather(-1, codes.unsqueeze(-1)).squeeze(-1).sum(-1)
