"""Attention heads as channel groups: gating heads of ``nn.MultiheadAttention`` and removing them.

Removing heads replaces the module by ``prunekit.layers.SlimAttention`` (the residual stream
``embed_dim`` unchanged, so the rest of the network is untouched); gating recomputes the
module's output with ``layers.attention_forward`` and a gate per head.

Supported: packed projections (``kdim == vdim == embed_dim``), with or without biases, no
``bias_k``/``add_zero_attn``, ``batch_first`` either way, masks as ``nn.MultiheadAttention``
takes them. Other attention modules are refused by name in ``groups.py``.

HuggingFace-style self-attention (BERT's ``BertSelfAttention``, ViT's and Llama-style
``q_proj``/``k_proj``/``v_proj``, DistilBERT's ``q_lin``/``k_lin``/``v_lin``) is recognised by
duck typing (``hf_heads``; transformers is never imported): three separate ``nn.Linear``
projections, a head count attribute and a head size attribute. Its heads are channel groups of
kind "qkv_heads" (``groups.py``): a head is its ``head_size`` rows of q, k and v and columns of
the output projection, cut by the ordinary Linear surgery; ``set_heads`` then writes the kept
head count into the module (its forward reshapes by them), and ``checked_groups`` verifies that
the shrunk module computes what the gated one does (a version whose forward reads the head count
elsewhere, e.g. from its config, is left dense, named).
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


# (q, k, v) attribute names, head count names, head size names, in the order tried
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
_HEADS_NAMES = ("num_attention_heads", "num_heads", "n_heads")
_SIZE_NAMES = ("attention_head_size", "head_dim", "dim_per_head")


def hf_heads(module: nn.Module) -> tuple[tuple[str, str, str], str, str] | None:
    """((q, k, v) attribute names, head count attribute, head size attribute) of a HuggingFace-style
    self-attention module (separate q/k/v ``nn.Linear`` projections of ``heads x head_size``
    outputs each, integer head count and head size attributes), else None. Grouped-query attention
    (``num_key_value_heads`` below the head count: k and v narrower than q) is not one."""
    spec = hf_heads_attrs(module)
    if spec is None:
        return None
    qkv, heads, size = spec
    width = getattr(module, heads) * getattr(module, size)
    if width <= 0 or any(getattr(module, n).out_features != width for n in qkv):
        return None
    return qkv, heads, size


def set_heads(module: nn.Module, kept: int) -> None:
    """Write ``kept`` heads into a HuggingFace-style attention module whose q/k/v rows were cut to
    them: its head count, and ``all_head_size`` (kept x head size) where it has one."""
    _, heads, size = hf_heads_attrs(module)
    setattr(module, heads, kept)
    if type(getattr(module, "all_head_size", None)) is int:
        module.all_head_size = kept * getattr(module, size)


def hf_heads_attrs(module: nn.Module) -> tuple[tuple[str, str, str], str, str] | None:
    """``hf_heads``' names without its width check (a module already cut to fewer heads, or
    one a saved layout is about to resize), or None if ``module`` does not look like one."""
    qkv = next((names for names in _QKV_NAMES
                if all(isinstance(getattr(module, n, None), nn.Linear) for n in names)), None)
    heads = next((n for n in _HEADS_NAMES if type(getattr(module, n, None)) is int), None)
    size = next((n for n in _SIZE_NAMES if type(getattr(module, n, None)) is int), None)
    return None if qkv is None or heads is None or size is None else (qkv, heads, size)


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
    from ..zoo.layout import keep_out_proj_dense      # (zoo.layout imports this module)
    keep_out_proj_dense(slim, module)
    slim.train(module.training)
    return slim
