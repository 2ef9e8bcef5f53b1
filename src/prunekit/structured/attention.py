"""Attention heads as channel groups: gating heads of ``nn.MultiheadAttention`` and removing them.

Removing heads replaces the module by ``prunekit.layers.SlimAttention`` (the residual stream
``embed_dim`` unchanged, so the rest of the network is untouched); gating recomputes the
module's output with ``layers.attention_forward`` and a gate per head.

Supported: packed projections (``kdim == vdim == embed_dim``), with or without biases, no
``bias_k``/``add_zero_attn``, ``batch_first`` either way, masks as ``nn.MultiheadAttention``
takes them. Other attention modules are refused by name in ``groups.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import SlimAttention, attention_forward


def head_prunable(module: nn.Module) -> str | None:
    """None if ``module``'s heads can be gated and removed, else why not."""
    if isinstance(module, SlimAttention):
        return None
    if not isinstance(module, nn.MultiheadAttention):
        return f"{type(module).__name__} is not nn.MultiheadAttention"
    if not module._qkv_same_embed_dim:
        return "separate kdim/vdim projections"
    if module.bias_k is not None or module.add_zero_attn:
        return "bias_k/add_zero_attn"
    return None


def gated_forward_hook(get_gates):
    """A forward hook (with kwargs) that recomputes an attention module's output with head gates
    ``get_gates()`` ((heads,) tensor, or None for no gating)."""
    def hook(module, args, kwargs, output):
        gates = get_gates()
        if gates is None:
            return None
        call = _bind(args, kwargs)
        out = attention_forward(module, call["query"], call["key"], call["value"], heads=module.num_heads,
                                head_dim=module.head_dim, key_padding_mask=call.get("key_padding_mask"),
                                attn_mask=call.get("attn_mask"), is_causal=call.get("is_causal", False),
                                head_gates=gates)
        return out, None
    return hook


_NAMES = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
          "average_attn_weights", "is_causal")


def _bind(args, kwargs) -> dict:
    call = dict(zip(_NAMES, args))
    call.update(kwargs)
    return call


@torch.no_grad()
def slim_copy(module: nn.Module, keep: torch.Tensor) -> SlimAttention:
    """A ``SlimAttention`` holding the heads of ``module`` where ``keep`` ((heads,) bool) is True."""
    heads, d, E = module.num_heads, module.head_dim, module.embed_dim
    kept = torch.nonzero(keep).flatten()
    cols = (kept.view(-1, 1) * d + torch.arange(d)).flatten()            # inner channels kept
    rows = torch.cat([cols + i * heads * d for i in range(3)])             # in q, k and v
    bias = module.in_proj_bias is not None
    slim = SlimAttention(E, kept.numel(), d, bias=bias, batch_first=getattr(module, "batch_first", False),
                         dropout=module.dropout).to(module.in_proj_weight)
    slim.in_proj_weight.copy_(module.in_proj_weight[rows])
    if bias:
        slim.in_proj_bias.copy_(module.in_proj_bias[rows])
        slim.out_proj.bias.copy_(module.out_proj.bias)
    slim.out_proj.weight.copy_(module.out_proj.weight[:, cols])
    slim.train(module.training)
    return slim
