"""Per-sample weight gradients of one Linear, embedding or convolution layer (Conv1d/2d/3d and
their transposes; also a Linear that stores its weight as (in, out), :func:`transposed_linear`)
from its input and output gradient, and of the projections of nn.MultiheadAttention
and prunekit's SlimAttention (an explicit forward whose projections are Linear layers:
:func:`explicit_attention`, at the end).

For a layer y = W a (Linear: a (B, *, in), y (B, *, out); Conv2d: a (B, C_in, H, W)), the
gradient of sample b's loss with respect to W is a sum over the sample's positions t of
outer products of the output gradient g_bt and the input a_bt:

    Linear:  ∂L_b/∂W = Σ_t g_bt a_btᵀ,                          (out, in)
    Conv2d:  ∂L_b/∂W[o] = Σ_t g_b[o, t] · patch_b[group(o), t],  (C_out, C_in/G, kh, kw)

where patch_b (C_in·kh·kw, L) holds every kh×kw window of every input channel at each of the
L output positions and group(o) the input channels of o's group (G = ``groups``; depthwise:
G = C_in); Conv1d and Conv3d alike with windows over one or three dimensions, a transposed
convolution with input and output gradient in each other's places. These are the formulas
autograd uses for the summed gradient, kept per sample (convolutions: torch's own convolution
backward, vmapped over the samples). ``summed=True`` gives Σ_b instead (a mini-batch row).

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

from .layers import SlimAttention, attention_forward

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
ATTENTION = (nn.MultiheadAttention, SlimAttention)
# an attention module's weights its explicit forward projects with (its out_proj is a Linear child)
PROJECTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def supported(module: nn.Module) -> bool:
    """Whether the per-layer path handles this layer: a Linear, nn.Embedding or convolution whose
    forward is torch's own (a subclass that changes the forward may use its weight otherwise), or
    a :func:`transposed_linear` layer, written by :func:`write_weight_grads`, or an attention module
    that :func:`attention_supported` (its projection weights; an nn.MultiheadAttention's
    ``out_proj`` depends on it: :func:`unsupported_layers`)."""
    kind = type(module)
    if isinstance(module, ATTENTION):
        return attention_supported(module)
    if isinstance(module, nn.Linear):
        return kind.forward is nn.Linear.forward
    if isinstance(module, nn.Embedding):     # max_norm rescales rows in place; by-frequency scaling
        return kind.forward is nn.Embedding.forward and module.max_norm is None and not module.scale_grad_by_freq
    for base in CONVOLUTIONS:
        if isinstance(module, base):
            return kind.forward is base.forward and getattr(kind, "_conv_forward", None) is getattr(
                base, "_conv_forward", None)
    return transposed_linear(module)


def transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear layer that stores its weight as (in, out) (GPT-2's Conv1D):
    no children, no buffers (a layer with state may change it when called), parameters ``weight``
    (in, out) and an optional ``bias`` (out,), and its forward gives x W + b on a probe input x
    (2, 3, in) of fixed random values."""
    if (isinstance(module, (nn.Linear, nn.Embedding, *CONVOLUTIONS, *ATTENTION)) or next(module.children(), None)
            or next(module.buffers(recurse=False), None) is not None):
        return False
    params = dict(module.named_parameters(recurse=False))
    weight, bias = params.get("weight"), params.get("bias")
    if (weight is None or weight.dim() != 2 or not weight.is_floating_point() or set(params) - {"weight", "bias"}
            or (bias is not None and tuple(bias.shape) != (weight.shape[1],))):
        return False
    x = torch.randn(2, 3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    with torch.no_grad():
        try:
            y = module.forward(x)
        except Exception:  # noqa: BLE001 - a layer that does not take such an input is not one
            return False
        expected = x @ weight + (bias if bias is not None else 0)
    if not isinstance(y, torch.Tensor) or y.shape != expected.shape:
        return False
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    return float((y - expected).abs().max()) <= tol * float(expected.abs().max())


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
    elif isinstance(module, nn.Embedding):
        write_embedding_grads(module, inputs, grad_output, dest, accumulate, summed)
    elif isinstance(module, CONVOLUTIONS):
        _conv(module, inputs, grad_output, dest, accumulate, summed)
    else:                                   # a transposed_linear layer: ∂L_b/∂W = Σ_t a_bt g_btᵀ, (in, out)
        write_linear_grads(grad_output.movedim(sample_dim, 0), inputs.movedim(sample_dim, 0), dest,
                           accumulate, summed)


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


def write_embedding_grads(embedding: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, dest: torch.Tensor,
                          accumulate: bool, summed: bool = False) -> None:
    """An embedding's rows: ids (B, ...) indices, g (B, ..., D) output gradients, into ``dest``
    ((B, V·D), or (1, V·D) with ``summed``). Sample b's gradient adds g_bt to row ids_bt of a
    (V, D) zero matrix for each position t; the ``padding_idx`` row gets none (as in torch)."""
    batch, width = ids.shape[0], g.shape[-1]
    ids, g = ids.reshape(batch, -1), g.reshape(batch, -1, width)
    if embedding.padding_idx is not None:
        g = g * (ids != embedding.padding_idx).unsqueeze(-1)
    if summed:
        grads = g.new_zeros(embedding.num_embeddings, width).index_add_(0, ids.reshape(-1), g.reshape(-1, width))
        grads = grads.reshape(1, -1)
    else:
        grads = g.new_zeros(batch, embedding.num_embeddings, width).scatter_add_(
            1, ids.unsqueeze(-1).expand(-1, -1, width), g).reshape(batch, -1)
    _store(dest, grads, accumulate)


def _conv(conv: nn.modules.conv._ConvNd, a: torch.Tensor, g: torch.Tensor, dest: torch.Tensor,
          accumulate: bool, summed: bool) -> None:
    """Convolution weight gradients (a (B, C_in, *spatial), g (B, C_out, *spatial'), 1-3 spatial
    dimensions) by torch's own convolution backward (weight part only), vmapped over the samples
    for per-sample gradients: torch turns that into one grouped convolution, 4-8x faster on CPU
    than unfolding the input and multiplying (measured on Conv2d, 2 threads)."""
    dims = a.dim() - 2
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":     # "same"/"valid", reflect, ...
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        a = F.pad(a, conv._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * dims
    if (not conv.transposed and conv.kernel_size == (1,) * dims and conv.groups == 1
            and tuple(padding) == (0,) * dims):
        _pointwise(conv, a, g, dest, accumulate, summed)        # a matrix product: ~3x faster
        return
    weight = conv.weight.detach()
    output_padding = _output_padding(conv, a, g) if conv.transposed else (0,) * dims

    def weight_grad(inputs: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            grad_output, inputs, weight, None, conv.stride, padding, conv.dilation, conv.transposed,
            output_padding, conv.groups, (False, True, False))[1]

    if summed:
        _store(dest, weight_grad(a, g).reshape(1, -1), accumulate)
    else:
        per_sample = torch.vmap(lambda x, y: weight_grad(x.unsqueeze(0), y.unsqueeze(0)))(a, g)
        _store(dest, per_sample.reshape(a.shape[0], -1), accumulate)


def _output_padding(conv: nn.modules.conv._ConvTransposeNd, a: torch.Tensor, g: torch.Tensor) -> tuple:
    """The output padding of this call of a transposed convolution (its ``output_size`` argument
    may have chosen one other than ``conv.output_padding``), from its input and output sizes."""
    return tuple(int(out - ((size - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1))
                 for out, size, stride, pad, dilation, kernel in zip(
                     g.shape[2:], a.shape[2:], conv.stride, conv.padding, conv.dilation, conv.kernel_size))


def _pointwise(conv: nn.modules.conv._ConvNd, a: torch.Tensor, g: torch.Tensor, dest: torch.Tensor,
               accumulate: bool, summed: bool) -> None:
    """A 1×1 convolution (groups 1, no padding; any number of spatial dimensions) is a Linear
    layer over the positions it visits: ∂L_b/∂W = g_b a_bᵀ with a_b (C_in, L) the input there."""
    visited = (slice(None), slice(None)) + tuple(slice(None, size * stride, stride)
                                                 for size, stride in zip(g.shape[2:], conv.stride))
    a = a[visited]
    write_linear_grads(a.flatten(2).transpose(1, 2), g.flatten(2).transpose(1, 2), dest, accumulate, summed)


# --- attention: its projections' weights are used functionally ------------------------------------
#
# nn.MultiheadAttention applies its ``in_proj_weight`` (or ``q/k/v_proj_weight``) and
# ``out_proj.weight`` inside F.multi_head_attention_forward, and SlimAttention its
# ``in_proj_weight`` inside ``layers.attention_forward``, so no module hook sees them. While rows
# are collected, each such module (``attention_supported``) runs an explicit forward instead:
# the same computation with each projection a call of ``project``, which the collector turns
# into F.linear plus a hook on its output. The q, k and v parts of the in-projection are then
# Linear layers of their own inputs (one (B, T, 3E) product for nn.MultiheadAttention's packed
# self-attention), and nn.MultiheadAttention's ``out_proj.weight`` a Linear layer on the heads'
# concatenated outputs: the Linear formula. (SlimAttention calls its ``out_proj`` as a module:
# an ordinary hooked Linear.)

def attention_supported(module: nn.Module) -> bool:
    """Whether :func:`explicit_forward` reproduces this module: torch's own nn.MultiheadAttention
    forward (packed or separate q/k/v weights, bias_k/bias_v, zero attention), or prunekit's own
    SlimAttention forward."""
    if not isinstance(module, ATTENTION) or not isinstance(module.out_proj, nn.Linear):
        return False
    if isinstance(module, SlimAttention):
        return type(module).forward is SlimAttention.forward
    packed = module._qkv_same_embed_dim and module.in_proj_weight is not None
    separate = not module._qkv_same_embed_dim and module.q_proj_weight is not None
    return type(module).forward is nn.MultiheadAttention.forward and (packed or separate)


def explicit_forward(module: nn.Module):
    """The explicit forward of an ``attention_supported`` module (looked up when called)."""
    return explicit_slim_forward if isinstance(module, SlimAttention) else explicit_attention_forward


def attention_parent(model: nn.Module) -> dict[str, str]:
    """{out_proj's module name: its nn.MultiheadAttention's name} for every such module of ``model``."""
    return {f"{name}.out_proj" if name else "out_proj": name
            for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def unsupported_layers(model: nn.Module, space) -> list[str]:
    """The layer names of ``space`` whose per-sample rows the per-layer path cannot write: a
    weight of a module other than a plain Linear/embedding/convolution or a supported attention
    module (its projection weights), a weight also held by another module (tied) that is not
    such a layer, and an nn.MultiheadAttention's ``out_proj.weight`` when the attention is not
    supported (its forward uses the weight functionally)."""
    modules = dict(model.named_modules())
    parents = attention_parent(model)
    users = weight_users(model)
    names = []
    for entry in space.entries:
        module = modules[entry.module]
        if entry.module in parents:
            ok = attention_supported(modules[parents[entry.module]])
        elif isinstance(module, ATTENTION):
            ok = entry.param_name.rsplit(".", 1)[-1] in PROJECTION_WEIGHTS and attention_supported(module)
        else:
            sharing = users.get(id(model.get_parameter(entry.param_name)), [])
            ok = supported(module) and all(supported(m) and name not in parents for name, m in sharing)
        if not ok:
            names.append(entry.module_name)
    return names


class CallUnsupported(Exception):
    """A call of a hooked layer whose per-sample rows the per-layer formulas cannot write
    (:func:`call_mismatch`)."""


def call_mismatch(module: nn.Module, a: torch.Tensor, samples: int | None, sample_dim: int = 0) -> str | None:
    """Why the per-layer formula cannot write the rows of this call of a hooked layer (Linear,
    embedding, convolution, :func:`transposed_linear`), or None when it can: the test the collector
    applies to every call, and the memory plan to the calls of its one probing forward (so that
    both see the same path).

    a:          the layer's input, e.g. (B, C_in, L) for a Conv1d, (B, ..., in) for a Linear.
    samples:    the samples forwarded at once (B); None for mini-batch rows (summed over the batch).
    sample_dim: the dimension of the input that indexes the samples (:func:`sample_dims`).
    A convolution's input must be batched (an unbatched call lacks the batch dimension) and, for
    per-sample rows, its batch must be the samples (not, say, a sample's frames folded into the
    batch); any other layer's input must have the samples along ``sample_dim``, but for an
    embedding's lookup shared by the batch, (1, ...), which the collector expands to the samples."""
    if isinstance(module, CONVOLUTIONS):
        if a.dim() != len(module.kernel_size) + 2 or (samples is not None and a.shape[0] != samples):
            return (f"its input {tuple(a.shape)} is not a batch of the {samples} samples" if samples is not None
                    else f"its input {tuple(a.shape)} is not batched")
        return None
    if isinstance(module, nn.Embedding) and a.dim() > 0 and a.shape[0] == 1:
        return None
    if samples is not None and (a.dim() <= sample_dim or a.shape[sample_dim] != samples):
        return f"dimension {sample_dim} of its input {tuple(a.shape)} is not the {samples} samples"
    return None


def projection_mismatch(a: torch.Tensor, samples: int | None) -> str | None:
    """Why an attention projection's rows cannot be written for batch-first input ``a`` (B, T, in)
    of ``samples`` samples (None: mini-batch rows), or None when they can."""
    if samples is not None and a.shape[0] != samples:
        return f"its batch of {a.shape[0]} is not the {samples} samples"
    return None


def weight_users(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> [(name, module)] of every module that holds it as its ``weight``; a tied
    weight (an output layer sharing the token embedding's table) has several."""
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None and all(m is not module for _, m in users.get(id(weight), [])):
            users.setdefault(id(weight), []).append((name, module))
    return users


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
