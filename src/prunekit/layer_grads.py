"""Per-sample weight gradients of one Linear or Conv2d layer from its input and output gradient,
and of nn.MultiheadAttention's projections (an explicit forward whose projections are Linear
layers: :func:`explicit_attention`, at the end).

For a layer y = W a (Linear: a (B, *, in), y (B, *, out); Conv2d: a (B, C_in, H, W)), the
gradient of sample b's loss with respect to W is a sum over the sample's positions t of
outer products of the output gradient g_bt and the input a_bt:

    Linear:  ∂L_b/∂W = Σ_t g_bt a_btᵀ,                          (out, in)
    Conv2d:  ∂L_b/∂W[o] = Σ_t g_b[o, t] · patch_b[group(o), t],  (C_out, C_in/G, kh, kw)

where patch_b (C_in·kh·kw, L) holds every kh×kw window of every input channel at each of the
L output positions and group(o) the input channels of o's group (G = ``groups``; depthwise:
G = C_in). These are the formulas autograd uses for the summed gradient, kept per sample
(Conv2d: torch's own convolution backward, vmapped over the samples). ``summed=True`` gives
Σ_b instead (a mini-batch row).

The functions write into a caller's (rows, layer_p) destination, so no chunk × p tensor is
ever formed: the peak is one layer's per-sample gradients for the chunk.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

def supported(module: nn.Module) -> bool:
    """Whether the per-layer path handles this layer: a Linear or Conv2d whose forward is torch's
    own (a subclass that changes the forward may use its weight otherwise), written by
    :func:`write_weight_grads`, or an nn.MultiheadAttention that :func:`attention_supported`
    (its ``in_proj_weight``; its ``out_proj`` depends on it: :func:`unsupported_layers`)."""
    kind = type(module)
    if isinstance(module, nn.MultiheadAttention):
        return attention_supported(module)
    if isinstance(module, nn.Linear):
        return kind.forward is nn.Linear.forward
    if isinstance(module, nn.Conv2d):
        return kind.forward is nn.Conv2d.forward and kind._conv_forward is nn.Conv2d._conv_forward
    return False


def write_weight_grads(module: nn.Module, inputs: torch.Tensor, grad_output: torch.Tensor,
                       dest: torch.Tensor, accumulate: bool, summed: bool = False, sample_dim: int = 0) -> None:
    """Write the weight gradients of ``module`` into ``dest``.

    inputs:      the layer's input a, (B, ...).
    grad_output: ∂L/∂y, shaped like the layer's output, (B, ...).
    dest:        (B, layer_p) per-sample rows, or (1, layer_p) with ``summed``; any dtype
                 (the gradients are computed in the inputs' dtype and cast on writing).
    accumulate:  add to ``dest`` instead of overwriting it (a layer called twice in a forward).
    sample_dim:  the dimension of a Linear layer's input that indexes the samples (1 for
                 (T, B, in), as in a Transformer layer built with ``batch_first=False``).
    """
    if isinstance(module, nn.Linear):
        write_linear_grads(inputs.movedim(sample_dim, 0), grad_output.movedim(sample_dim, 0), dest,
                           accumulate, summed)
    else:
        _conv2d(module, inputs, grad_output, dest, accumulate, summed)


def _store(dest: torch.Tensor, values: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        dest.add_(values.to(dest.dtype))
    else:
        dest.copy_(values)


def write_linear_grads(a: torch.Tensor, g: torch.Tensor, dest: torch.Tensor, accumulate: bool,
                       summed: bool = False) -> None:
    """The Linear formula: a (B, ..., in) inputs, g (B, ..., out) output gradients, into ``dest``
    ((B, out·in), or (1, out·in) with ``summed``)."""
    batch = a.shape[0]
    a = a.reshape(batch, -1, a.shape[-1])                       # (B, T, in)
    g = g.reshape(batch, -1, g.shape[-1])                       # (B, T, out)
    if summed:
        grads = (g.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])).reshape(1, -1)
    else:
        grads = torch.bmm(g.transpose(1, 2), a).reshape(batch, -1)
    _store(dest, grads, accumulate)


def _conv2d(conv: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, dest: torch.Tensor, accumulate: bool,
            summed: bool) -> None:
    """Conv2d weight gradients by torch's own convolution backward (weight part only), vmapped
    over the samples for per-sample gradients: torch turns that into one grouped convolution,
    4-8x faster on CPU than unfolding the input and multiplying (measured, 2 threads)."""
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":     # "same"/"valid", reflect, ...
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0, 0)
    if conv.kernel_size == (1, 1) and conv.groups == 1 and tuple(padding) == (0, 0):
        _pointwise(conv, a, g, dest, accumulate, summed)        # a matrix product: ~3x faster
        return
    weight = conv.weight.detach()

    def weight_grad(inputs: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            grad_output, inputs, weight, None, conv.stride, padding, conv.dilation, False, (0, 0),
            conv.groups, (False, True, False))[1]

    if summed:
        _store(dest, weight_grad(a, g).reshape(1, -1), accumulate)
    else:
        per_sample = torch.vmap(lambda x, y: weight_grad(x.unsqueeze(0), y.unsqueeze(0)))(a, g)
        _store(dest, per_sample.reshape(a.shape[0], -1), accumulate)


def _pointwise(conv: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, dest: torch.Tensor, accumulate: bool,
               summed: bool) -> None:
    """A 1×1 convolution (groups 1, no padding) is a Linear layer over the positions it visits:
    ∂L_b/∂W = g_b a_bᵀ with a_b (C_in, L) the input at those positions."""
    height, width = g.shape[-2:]
    a = a[:, :, ::conv.stride[0], ::conv.stride[1]][:, :, :height, :width]
    write_linear_grads(a.flatten(2).transpose(1, 2), g.flatten(2).transpose(1, 2), dest, accumulate, summed)


# --- nn.MultiheadAttention: its projections' weights are used functionally -----------------------
#
# nn.MultiheadAttention applies its packed ``in_proj_weight`` and ``out_proj.weight`` inside
# F.multi_head_attention_forward, so no module hook sees them. While rows are collected, each
# such module (the common case, ``attention_supported``) runs ``explicit_attention_forward``
# instead: the same computation with each projection a call of ``project``, which the collector
# turns into F.linear plus a hook on its output. The q, k and v thirds of ``in_proj_weight`` are
# then Linear layers of their own inputs (one (B, T, 3E) product for self-attention), and
# ``out_proj.weight`` a Linear layer on the heads' concatenated outputs: the Linear formula.

def attention_supported(module: nn.Module) -> bool:
    """Whether ``explicit_attention_forward`` reproduces this module: torch's own
    nn.MultiheadAttention forward with a packed in-projection (q, k, v of the embedding
    width), no bias_k/bias_v and no zero attention."""
    return (isinstance(module, nn.MultiheadAttention)
            and type(module).forward is nn.MultiheadAttention.forward
            and module._qkv_same_embed_dim and module.in_proj_weight is not None
            and module.bias_k is None and module.bias_v is None and not module.add_zero_attn
            and isinstance(module.out_proj, nn.Linear))


def attention_parent(model: nn.Module) -> dict[str, str]:
    """{out_proj's module name: its nn.MultiheadAttention's name} for every such module of ``model``."""
    return {f"{name}.out_proj" if name else "out_proj": name
            for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def unsupported_layers(model: nn.Module, space) -> list[str]:
    """The layer names of ``space`` whose per-sample rows the per-layer path cannot write: a
    weight of a module other than a plain Linear/Conv2d or a supported nn.MultiheadAttention
    (its ``in_proj_weight``), and an attention's ``out_proj.weight`` when the attention is not
    supported (its forward uses the weight functionally)."""
    modules = dict(model.named_modules())
    parents = attention_parent(model)
    names = []
    for entry in space.entries:
        module = modules[entry.module]
        if entry.module in parents:
            ok = attention_supported(modules[parents[entry.module]])
        elif isinstance(module, nn.MultiheadAttention):
            ok = entry.param_name.rsplit(".", 1)[-1] == "in_proj_weight" and attention_supported(module)
        else:
            ok = supported(module)
        if not ok:
            names.append(entry.module_name)
    return names


def sample_dims(model: nn.Module) -> dict[str, int]:
    """{module name: the dimension of its input that indexes the samples} where it is not 0: the
    Linear layers of torch's Transformer layers built with ``batch_first=False`` see (T, B, E)."""
    dims = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not m.self_attn.batch_first:
            for child in ("linear1", "linear2"):
                if isinstance(getattr(m, child, None), nn.Linear):
                    dims[f"{name}.{child}" if name else child] = 1
    return dims


@contextlib.contextmanager
def explicit_attention(modules: list[nn.Module], project):
    """Within the block each module of ``modules`` (nn.MultiheadAttention, ``attention_supported``)
    runs ``explicit_attention_forward`` with ``project``, and torch's fused attention fast paths
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
            m.forward = functools.partial(explicit_attention_forward, m, self.project)

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
    """An nn.MultiheadAttention call the explicit forward does not reproduce (unbatched input)."""


def explicit_attention_forward(module: nn.MultiheadAttention, project, query, key, value,
                               key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                               average_attn_weights: bool = True, is_causal: bool = False):
    """nn.MultiheadAttention's forward (its non-fused path, F.multi_head_attention_forward),
    written out with each projection ``project(module, which, a, weight, bias, rows)``:
    ``which`` "in" (``rows`` = (first, last) rows of ``in_proj_weight``) or "out" (``rows``
    None), ``a`` (B, T, in) batch first whatever the module's layout; it returns
    F.linear(a, weight, bias)."""
    if query.dim() != 3:
        raise AttentionUnsupported(f"unbatched input of {query.dim()} dimensions")
    E, heads = module.embed_dim, module.num_heads
    d = E // heads
    w, b = module.in_proj_weight, module.in_proj_bias
    part = lambda i, j: (w[i * E:j * E], None if b is None else b[i * E:j * E])
    first = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
    if key is value and query is key:                                    # self-attention: one product
        q, k, v = project(module, "in", first(query), w, b, (0, 3 * E)).split(E, dim=-1)
    elif key is value:
        q = project(module, "in", first(query), *part(0, 1), (0, E))
        k, v = project(module, "in", first(key), *part(1, 3), (E, 3 * E)).split(E, dim=-1)
    else:
        q = project(module, "in", first(query), *part(0, 1), (0, E))
        k = project(module, "in", first(key), *part(1, 2), (E, 2 * E))
        v = project(module, "in", first(value), *part(2, 3), (2 * E, 3 * E))
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
