"""Explicit forwards of attention modules, for the per-layer gradient collector.

nn.MultiheadAttention applies its ``in_proj_weight`` (or ``q/k/v_proj_weight``) and
``out_proj.weight`` inside F.multi_head_attention_forward, and SlimAttention its
``in_proj_weight`` inside ``layers.attention_forward``, so no module hook sees them. While rows
are collected, each such module (``layer_grads.attention_supported``) runs an explicit forward instead:
the same computation with each projection a call of ``project``, which the collector turns
into F.linear plus a hook on its output. The q, k and v parts of the in-projection are then
Linear layers of their own inputs (one (B, T, 3E) product for nn.MultiheadAttention's packed
self-attention), and nn.MultiheadAttention's ``out_proj.weight`` a Linear layer on the heads'
concatenated outputs: the Linear formula. (SlimAttention calls its ``out_proj`` as a module:
an ordinary hooked Linear.)
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SlimAttention, attention_forward


def explicit_forward(module: nn.Module):
    """The explicit forward of an ``attention_supported`` module (looked up when called)."""
    return explicit_slim_forward if isinstance(module, SlimAttention) else explicit_attention_forward


@contextlib.contextmanager
def explicit_attention(modules: list[nn.Module], project):
    """Within the block each module of ``modules`` (``attention_supported``) runs its
    :func:`explicit_forward` with ``project``, and torch's fused attention fast paths
    are off (a TransformerEncoderLayer must call its attention module); the block's object
    ``.suspended()`` gives the modules their own forward back for a while (the autograd check).
    Every module and the fast-path switch are restored on exit, on error too."""
    patch = _AttentionPatch(modules, project)
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        patch.apply()
        yield patch
    finally:
        patch.restore()
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


class _AttentionPatch:
    def __init__(self, modules, project):
        self.modules = list(modules)
        self.project = project
        self.saved: list[tuple[nn.Module, bool, object]] = []

    def apply(self) -> None:
        for m in self.modules:
            own = "forward" in m.__dict__                    # an instance attribute of the user's
            self.saved.append((m, own, m.__dict__.get("forward")))
            m.forward = functools.partial(explicit_forward(m), m, self.project)

    def restore(self) -> None:
        while self.saved:
            m, own, previous = self.saved.pop()
            if own:
                m.forward = previous
            else:
                m.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def suspended(self):
        self.restore()
        try:
            yield
        finally:
            self.apply()


class AttentionUnsupported(Exception):
    """An attention call the explicit forward does not reproduce (unbatched input)."""


def explicit_slim_forward(module: SlimAttention, project, query, key, value, key_padding_mask=None,
                          need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                          is_causal: bool = False):
    """SlimAttention's forward with each of q, k and v ``project(module, "in_proj_weight", a,
    weight, bias, rows)`` (``rows`` = (first, last) rows of ``in_proj_weight``; ``a`` (B, T, E)
    batch first); it returns F.linear(a, weight, bias)."""
    if query.dim() != 3:
        raise AttentionUnsupported(f"unbatched input of {query.dim()} dimensions")
    linear = lambda a, weight, bias, rows: project(module, "in_proj_weight", a, weight, bias, rows)
    out = attention_forward(module, query, key, value, heads=module.num_heads, head_dim=module.head_dim,
                            key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal,
                            in_projection=linear)
    return out, None


def _in_projections(module: nn.MultiheadAttention, project, query, key, value):
    """q, k and v, each (B, T, E), from the batch-first inputs by ``project``: the thirds of a
    packed ``in_proj_weight`` (one product for self-attention, one for a shared key/value) or the
    separate ``q/k/v_proj_weight``."""
    E = module.embed_dim
    b = module.in_proj_bias
    bias = lambda i: None if b is None else b[i * E:(i + 1) * E]
    if not module._qkv_same_embed_dim:
        return tuple(project(module, f"{name}_proj_weight", a, getattr(module, f"{name}_proj_weight"), bias(i), None)
                     for i, (name, a) in enumerate(zip("qkv", (query, key, value))))
    w = module.in_proj_weight
    part = lambda i, j: (w[i * E:j * E], None if b is None else b[i * E:j * E])
    if key is value and query is key:                                    # self-attention: one product
        return project(module, "in_proj_weight", query, w, b, (0, 3 * E)).split(E, dim=-1)
    q = project(module, "in_proj_weight", query, *part(0, 1), (0, E))
    if key is value:
        return (q, *project(module, "in_proj_weight", key, *part(1, 3), (E, 3 * E)).split(E, dim=-1))
    return (q, project(module, "in_proj_weight", key, *part(1, 2), (E, 2 * E)),
            project(module, "in_proj_weight", value, *part(2, 3), (2 * E, 3 * E)))


def _extra_keys(module: nn.MultiheadAttention, k: torch.Tensor, v: torch.Tensor):
    """k and v (B, S, E) with bias_k/bias_v, then a zero key and value, appended as torch does
    (``add_bias_kv``, ``add_zero_attn``); the number of keys appended."""
    extra = 0
    if module.bias_k is not None:
        k = torch.cat([k, module.bias_k.expand(k.shape[0], 1, -1)], dim=1)
        v = torch.cat([v, module.bias_v.expand(v.shape[0], 1, -1)], dim=1)
        extra += 1
    if module.add_zero_attn:
        k, v = (torch.cat([t, t.new_zeros(t.shape[0], 1, t.shape[2])], dim=1) for t in (k, v))
        extra += 1
    return k, v, extra


def explicit_attention_forward(module: nn.MultiheadAttention, project, query, key, value,
                               key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                               average_attn_weights: bool = True, is_causal: bool = False):
    """nn.MultiheadAttention's forward (its non-fused path, F.multi_head_attention_forward),
    written out with each projection ``project(module, which, a, weight, bias, rows)``:
    ``which`` the in-projection's weight name ("in_proj_weight", ``rows`` = (first, last) of
    its rows; "q_proj_weight", "k_proj_weight", "v_proj_weight", ``rows`` None) or "out"
    (``rows`` None), ``a`` (B, T, in) batch first whatever the module's layout; it returns
    F.linear(a, weight, bias)."""
    if query.dim() != 3:
        raise AttentionUnsupported(f"unbatched input of {query.dim()} dimensions")
    E, heads = module.embed_dim, module.num_heads
    d = E // heads
    first = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
    q_in = first(query)
    k_in = q_in if key is query else first(key)                # the same tensor stays the same one
    v_in = k_in if value is key else (q_in if value is query else first(value))
    q, k, v = _in_projections(module, project, q_in, k_in, v_in)
    k, v, extra = _extra_keys(module, k, v)
    batch, lq, ls = q.shape[0], q.shape[1], k.shape[1]
    q, k, v = (t.reshape(batch, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))   # (B, h, T, d)
    kpm = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                            target_type=q.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                           "module method `generate_square_subsequent_mask` to create this mask.")
    mask = None
    if not (is_causal and kpm is None and not need_weights):
        mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                 target_type=q.dtype, check_other=False)
        if kpm is not None:
            is_causal = False
        if extra:                                      # the appended keys are never masked
            mask = None if mask is None else F.pad(mask, (0, extra))
            kpm = None if kpm is None else F.pad(kpm, (0, extra))
        if mask is not None:
            mask = mask.view(1, 1, lq, ls) if mask.dim() == 2 else mask.view(batch, heads, lq, ls)
        if kpm is not None:
            kpm = kpm.view(batch, 1, 1, ls)
            mask = kpm if mask is None else mask + kpm
    dropout = module.dropout if module.training else 0.0
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        out = weights @ v
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=is_causal and mask is None)
    out = out.transpose(1, 2).reshape(batch, lq, E)
    out = project(module, "out", out, module.out_proj.weight, module.out_proj.bias, None)
    return (out if module.batch_first else out.transpose(0, 1)), weights
