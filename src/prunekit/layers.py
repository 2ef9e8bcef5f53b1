"""Layers prunekit itself puts into shrunk models.

``SlimAttention``: ``nn.MultiheadAttention`` with some heads removed. ``nn.MultiheadAttention``
cannot hold fewer heads than ``embed_dim / head_dim`` (its projections are square), so removing
heads replaces it by this module: the same computation with ``kept_heads * head_dim`` inner
width on the same ``embed_dim`` residual stream, the same call signature, outputs
``(output, None)``. ``attention_forward`` is that computation written once, with an optional
gate per head (used by structured pruning's gates).

``RemovedBlock``: the identity, standing where depth pruning removed a block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_forward(module: nn.Module, query, key, value, *, heads: int, head_dim: int,
                      key_padding_mask=None, attn_mask=None, is_causal: bool = False,
                      head_gates: torch.Tensor | None = None, in_projection=None) -> torch.Tensor:
    """Multi-head attention with ``module``'s ``in_proj_weight`` ((3·heads·head_dim, E)),
    ``in_proj_bias`` and ``out_proj``; ``head_gates`` (heads,) scales each head's output.
    query (B, Lq, E) if ``module.batch_first`` else (Lq, B, E); returns the same layout.
    ``in_projection(a, weight, bias, rows)``, if given, computes each of q, k and v in place of
    F.linear (a (B, L, E); ``rows`` = (first, last) rows of ``in_proj_weight``): the gradient
    collector hooks them there (``attention_explicit.explicit_attention``)."""
    batch_first = getattr(module, "batch_first", False)
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    inner = heads * head_dim
    w, b = module.in_proj_weight, module.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else b.split(inner)
    wq, wk, wv = w.split(inner)
    linear = in_projection or (lambda a, weight, bias, rows: F.linear(a, weight, bias))
    batch, lq, lk = query.shape[0], query.shape[1], key.shape[1]
    q = linear(query, wq, bq, (0, inner)).view(batch, lq, heads, head_dim).transpose(1, 2)
    k = linear(key, wk, bk, (inner, 2 * inner)).view(batch, lk, heads, head_dim).transpose(1, 2)
    v = linear(value, wv, bv, (2 * inner, 3 * inner)).view(batch, lk, heads, head_dim).transpose(1, 2)
    mask = _merge_masks(attn_mask, key_padding_mask, batch, heads, lq, lk, q.dtype)
    dropout = module.dropout if module.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                         is_causal=is_causal and mask is None)   # (B, h, Lq, d)
    if head_gates is not None:
        out = out * head_gates.to(out.dtype).view(1, heads, 1, 1)
    out = module.out_proj(out.transpose(1, 2).reshape(batch, lq, inner))
    return out if batch_first else out.transpose(0, 1)


def _merge_masks(attn_mask, key_padding_mask, batch, heads, lq, lk, dtype):
    """One additive float mask broadcastable to (B, h, Lq, Lk), or None."""
    parts = []
    if attn_mask is not None:
        shape = (1, 1, lq, lk) if attn_mask.dim() == 2 else (batch, heads, lq, lk)
        parts.append(_additive(attn_mask, dtype).view(shape))
    if key_padding_mask is not None:
        parts.append(_additive(key_padding_mask, dtype).view(batch, 1, 1, lk))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class RemovedBlock(nn.Identity):
    """The identity where depth pruning (``structured.depth``) removed a shape-keeping block;
    its own class so that the saved channel layout can record the removal."""


class SlimAttention(nn.Module):
    """``nn.MultiheadAttention`` with some heads removed: ``heads`` heads of ``head_dim`` on an
    ``embed_dim`` residual stream. Same call signature and outputs ``(output, None)``."""

    def __init__(self, embed_dim: int, heads: int, head_dim: int, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self._qkv_same_embed_dim = False       # keeps TransformerEncoderLayer off its fused fast path
        inner = heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        out = attention_forward(self, query, key, value, heads=self.num_heads, head_dim=self.head_dim,
                                key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal)
        return out, None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, heads={self.num_heads}, head_dim={self.head_dim}"
