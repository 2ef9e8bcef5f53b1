"""Per-sample weight gradients of one Linear, embedding or convolution layer (Conv1d/2d/3d and
their transposes; also a Linear that stores its weight as (in, out), :func:`transposed_linear`)
from its input and output gradient, and of the projections of nn.MultiheadAttention
and prunekit's SlimAttention (an explicit forward whose projections are Linear layers:
``attention_explicit``; here, which modules it serves).

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

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SlimAttention

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


# --- attention: which modules run an explicit forward (``attention_explicit``) -------------------

def attention_supported(module: nn.Module) -> bool:
    """Whether ``attention_explicit.explicit_forward`` reproduces this module: torch's own nn.MultiheadAttention
    forward (packed or separate q/k/v weights, bias_k/bias_v, zero attention), or prunekit's own
    SlimAttention forward."""
    if not isinstance(module, ATTENTION) or not isinstance(module.out_proj, nn.Linear):
        return False
    if isinstance(module, SlimAttention):
        return type(module).forward is SlimAttention.forward
    packed = module._qkv_same_embed_dim and module.in_proj_weight is not None
    separate = not module._qkv_same_embed_dim and module.q_proj_weight is not None
    return type(module).forward is nn.MultiheadAttention.forward and (packed or separate)


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
