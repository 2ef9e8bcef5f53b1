"""One cost model: MACs and parameters per layer and per prunable weight.

The counts come from tracing one forward pass (``cost_trace``): module hooks give the scope
and the element-wise ops of norms and pools, a ``TorchDispatchMode`` sees every aten operation
(also functional calls and the insides of ``nn.MultiheadAttention``), and a
``TorchFunctionMode`` sees residual adds. No hand-made table of layer types.

Conventions (the ones the papers use, so our figures compare with theirs):

* ``macs`` of a model = multiply-accumulates of its matrix products and convolutions for
  **one example**: the forward pass is traced on the first example of ``example_input`` alone
  (the inputs that carry the batch keep row 0: see ``batched_inputs``), so work that does not
  depend on the batch (a learned positional table through a Linear, learned queries projected
  before they are expanded over the batch) is charged in full, once, not divided by B. For a
  model whose work is B-independent plus proportional to B this is the per-example slope plus
  the intercept; a model that mixes the examples of a batch is counted on one example.
  A weight element costs the number of times it is multiplied: a conv weight once per output
  position (any stride, padding, dilation, groups), a linear weight (also a functional
  ``F.linear``/``x @ W``, the packed ``in_proj_weight`` and ``out_proj`` of
  ``nn.MultiheadAttention``, a recurrent layer's ``weight_ih``/``weight_hh``, an ``nn.Bilinear``
  weight) once per token; a weight tiled by ``repeat`` once per copy. A parameter multiplied
  element-wise into an activation that is broadcast against it (``(x.unsqueeze(-2) * w).sum(-1)``,
  a linear layer written element-wise) costs one MAC per element of the product, i.e. each
  weight element once per broadcast copy. A parameter whose element-wise product has the
  activation's own shape is a scale (a norm's affine, LayerScale, a per-channel gate): an
  element-wise op, not MACs, unless that product is then summed or averaged along a dimension
  of the weight (``(h * self.v).sum(-1)``, additive attention's learned vector, also through a
  view or copy of the product: a dot product, one MAC per summed product). A product of two
  parameters (a weight made in forward, ``U @ V``) is batch-independent work, charged in full;
  each of its MACs ``U[i, l] V[l, j]`` is charged to ``U`` if i + j is even, else to ``V``: both
  prunable, and a pruned count is never below the sparse product's MACs. The product of an
  activation with the made weight is activation MACs. Learned queries or latents fed to a layer
  are its input: the layer's own weight is priced. An embedding table's weights
  are prunable and cost 0 MACs. Biases are not counted.
* Products of two activations (attention's QKᵀ and AV) are real MACs but tied to no weight:
  a layer's ``activation_macs``, part of ``macs``, never prunable.
* Everything else (BatchNorm: one op per element; pooling: one per window element; residual
  adds: one per element) is ``other_ops``, not inside ``macs``. ResNet-50 is then the familiar
  4.09 GMACs and MobileNetV1 569 MMACs, equal to thop's count for every zoo model.
* Parameters outside any product (a class token, a positional embedding, norm scales) are
  counted as parameters. A parameter used by an operation without a cost rule makes
  ``CostModel`` refuse the model, naming it and the fix (``register_cost``); nothing is
  reported from a partial count. Leaf module types with no element-wise rule are listed in
  ``unknown`` (their MACs are counted anyway, from their operations).

A masked model is counted by ``count``: a weight that is exactly zero costs nothing. A shrunk
model (channels removed) is traced again by the same code, so every figure is counted one way.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .cost_cut import CutCheck, Observed, check_cut, observing, rng_devices
from .cost_inputs import batched_inputs, cut_to_one_example, inputs_of, refuse_lazy, refuse_scripted
from .cost_params import ParamIndex
from .cost_trace import (_AddCounter, _OpCounter, ModuleCost, get_mha_fastpath,  # noqa: F401
                         register_cost, registered_cost, set_mha_fastpath, unregister_cost)
from .errors import PrunekitError, input_fix, worded_warning
from .errors import warn as warn_ours

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_POOL_WINDOW = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOL_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                  nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_FREE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
         nn.Hardsigmoid, nn.Softmax, nn.LogSoftmax, nn.Identity, nn.Flatten, nn.Unflatten,
         nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ZeroPad2d, nn.ConstantPad2d)
# Leaf modules whose arithmetic is all in their traced products (no element-wise rule needed).
_PRICED_BY_OPS = (*WEIGHT_LAYERS, nn.Embedding, nn.EmbeddingBag, nn.modules.rnn.RNNBase,
                  nn.modules.rnn.RNNCellBase, nn.Bilinear)


@dataclass
class LayerCost:
    """Costs of one entry for one example: a leaf module, a prunable weight tensor, a module's
    loose parameters or activation products, or a residual add.

    A *weight layer* (``weight_shape`` set) is one parameter tensor multiplied by the network:
    ``param_name`` is its name in ``model.named_parameters()``; the entry's ``name`` is the
    module's name for a module's ``weight`` ("fc1", "blocks.0.attn.out_proj") and the parameter's
    name otherwise ("blocks.0.attn.in_proj_weight"). ``macs_per_weight`` is what each element
    costs, or None when elements cost different amounts (then ``element_macs``, (numel,) int64).
    ``macs = weight MACs + activation_macs``; ``params`` counts every parameter of the entry.
    """

    name: str
    kind: str
    params: int
    macs: int = 0
    other_ops: int = 0
    weight_shape: tuple[int, ...] | None = None
    macs_per_weight: int | None = 0
    output_shape: tuple[int, ...] = ()
    param_name: str | None = None
    element_macs: torch.Tensor | None = None
    activation_macs: int = 0

    @property
    def is_weight_layer(self) -> bool:
        return self.weight_shape is not None

    @property
    def weight_macs(self) -> int:
        return self.macs - self.activation_macs

    def weight_costs(self, device=None) -> torch.Tensor:
        """MACs of each weight element, (numel,) int64, in ``weight.reshape(-1)`` order."""
        if self.element_macs is not None:
            return self.element_macs.to(device)
        return torch.full((math.prod(self.weight_shape),), self.macs_per_weight, dtype=torch.int64, device=device)

    def macs_of(self, weight: torch.Tensor) -> int:
        """Weight MACs of this layer with ``weight``'s zeros removed."""
        if self.element_macs is None:
            return int(torch.count_nonzero(weight)) * self.macs_per_weight
        return int(self.element_macs[(weight.detach().reshape(-1) != 0).cpu()].sum())


@dataclass
class Counts:
    """Nonzero-aware counts of a (possibly masked or shrunk) model, for one example.

    ``params`` is the parameters the model keeps: ``sum(p.numel())`` over its parameters (a tied
    tensor once) less the exact zeros of its prunable weights (a zeroed weight is removed), an
    embedding's padding row (``padding_idx``) excepted: it is zero in the dense model too, so it
    is never counted as removed. For a shrunk model with no zero weights that is its
    ``sum(p.numel())``. ``dense_params`` is the dense model's ``sum(p.numel())``, so
    ``params_kept`` compares like with like (a dense model keeps 1.0). ``nonzero_params`` counts
    the nonzero values of every parameter (each zero alike, a zero bias or padding row too; None
    where not counted). ``params_by_layer``: per weight layer, its ``params`` counted that way.
    """

    macs: int
    dense_macs: int
    params: int
    dense_params: int
    nonzeros_by_layer: dict[str, int] = field(default_factory=dict)
    macs_by_layer: dict[str, int] = field(default_factory=dict)
    nonzero_params: int | None = None
    params_by_layer: dict[str, int] = field(default_factory=dict)

    @property
    def flops_kept(self) -> float:
        """Share of the dense model's MACs this model keeps."""
        return self.macs / self.dense_macs if self.dense_macs else 1.0

    @property
    def params_kept(self) -> float:
        return self.params / self.dense_params if self.dense_params else 1.0


class CostModel:
    """MACs and parameters of ``model`` on inputs shaped like ``example_input``.

    Args:
        model: any ``nn.Module``; put in eval mode for the trace, then restored.
        example_input: one batch, (B, ...) with B >= 1 (or a tuple of inputs); the model is
            traced on its first example (the inputs that carry the batch keep row 0), so counts
            are per example and batch-independent work is charged once.
        batched: positions in ``example_input`` of the inputs that carry the batch; by default
            input 0 and each other input with first dimension B that the model cannot take whole
            beside one example (an input it takes either way, at B > 1, is refused as ambiguous).
            Attribute ``batched`` holds the positions used.
        _check: ``prune``'s (``cost_cut.CutCheck``): the rows the cut is checked on, and the
            example's name in messages; the path warning is then left to it.

    Attributes:
        layers: ``LayerCost`` entries in order of first use (leaf modules, weight tensors,
            modules' activation products), then modules' unused parameters, then residual adds.
        unknown: leaf modules with no element-wise rule (their products are counted anyway).
        path_warning: the warning given (its Python and command-line wordings) when the model runs
            other modules on one example than on two, each side some the other does not (a forward
            that branches on the batch size: the count is of one example's path); else None.

    Raises PrunekitError if a parameter is used by an operation with no cost rule; if a torch
    sequence layer (``nn.LSTM``, ``nn.MultiheadAttention``, ...) has its time dimension in
    ``example_input``'s first dimension (a time-first model fed (T, B, ...): cutting to one
    example would count one time step; ``cost_cut``); if the model holds a TorchScript module (no hooks run in
    it); if ``example_input`` is or holds a dict (wrap the model in one taking positional tensors).
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor | tuple, *, batched=None,
                 _check: CutCheck | None = None):
        if not isinstance(model, nn.Module):
            raise PrunekitError(f"CostModel(model, example_input): model must be a torch.nn.Module, "
                                f"got {type(model).__name__}")
        self.example_input = example_input
        refuse_scripted(model)
        refuse_lazy(model)
        self.batched = batched_inputs(model, example_input, batched)
        with observing(model, Observed()) as one:
            self.layers, self.unknown = _trace(model, example_input, self.batched)
        inputs = inputs_of(example_input)
        rows = None if _check is None or _check.rows is None else inputs_of(_check.rows)
        # a forward that takes another path on one example than on two: said here, or by prune
        self.path_warning = check_cut(model, inputs, self.batched, one, rows=rows,
                                      source="example_input" if _check is None else _check.source)
        if self.path_warning is not None and _check is None:
            warn_ours(worded_warning(*self.path_warning))
        self._by_name = {layer.name: layer for layer in self.layers}
        # the channel-group search on this trace's model and input (``structured.pipeline.found_groups``),
        # per residual mode: a sweep's runs plan copies of one model with this trace, and search once
        self.channel_groups: dict = {}

    # --- dense totals -------------------------------------------------------------------
    @property
    def macs(self) -> int:
        """Dense MACs per example: weight products and activation products."""
        return sum(layer.macs for layer in self.layers)

    @property
    def activation_macs(self) -> int:
        """The part of ``macs`` no weight pays for (attention products): never prunable."""
        return sum(layer.activation_macs for layer in self.layers)

    @property
    def other_ops(self) -> int:
        return sum(layer.other_ops for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def layer(self, name: str) -> LayerCost:
        try:
            return self._by_name[name]
        except KeyError:
            raise PrunekitError(f"no layer named {name!r} in the cost model; "
                                f"layers are e.g. {list(self._by_name)[:5]}") from None

    def has_layer(self, name: str) -> bool:
        return name in self._by_name

    def weight_layers(self) -> list[LayerCost]:
        return [layer for layer in self.layers if layer.is_weight_layer]

    # --- counting a masked or shrunk model ----------------------------------------------
    def count(self, model: nn.Module) -> Counts:
        """Count ``model``: a weight that is exactly zero costs no MAC and no parameter.

        If ``model`` has the traced architecture (same weight shapes: a masked model) the
        stored per-weight costs are used; otherwise (a shrunk model) it is traced again on an
        input of the same shape. Either way ``dense_macs``/``dense_params`` are this cost
        model's, so ``flops_kept`` is relative to the model it was built from.
        """
        params_of = dict(model.named_parameters())
        same_shapes = all(layer.param_name in params_of
                          and tuple(params_of[layer.param_name].shape) == layer.weight_shape
                          for layer in self.weight_layers())
        layers = self.layers if same_shapes else _trace(model, self.example_input, self.batched)[0]
        macs, params = 0, 0
        nonzeros_by_layer, macs_by_layer, params_by_layer = {}, {}, {}
        padding = padding_zeros(model)
        rows = padding_rows(model)
        for layer in layers:
            macs += layer.activation_macs
            if not layer.is_weight_layer:
                params += layer.params
                continue
            weight = params_of[layer.param_name].detach()
            nonzeros = int(torch.count_nonzero(weight))
            nonzeros_by_layer[layer.name] = nonzeros
            computed = _padding_as_kept(weight, rows.get(layer.param_name))     # computed though zero
            macs_by_layer[layer.name] = layer.macs_of(computed) + layer.activation_macs
            macs += macs_by_layer[layer.name] - layer.activation_macs
            removed = weight.numel() - nonzeros - padding.get(layer.param_name, 0)
            params_by_layer[layer.name] = layer.params - removed
            params += params_by_layer[layer.name]
        nonzero_params = sum(int(torch.count_nonzero(p.detach())) for p in params_of.values())
        return Counts(macs=macs, dense_macs=self.macs, params=params, dense_params=self.params,
                      nonzeros_by_layer=nonzeros_by_layer, macs_by_layer=macs_by_layer,
                      nonzero_params=nonzero_params, params_by_layer=params_by_layer)


def padding_rows(model: nn.Module) -> dict[str, int]:
    """The padding row (``padding_idx``, as a row index >= 0) of each of ``model``'s embedding
    tables (``nn.Embedding`` / ``nn.EmbeddingBag``), by parameter name (``model.named_parameters()``,
    a tied table once: an output head sharing it too)."""
    rows = {}
    for module in model.modules():
        index = getattr(module, "padding_idx", None)
        weight = getattr(module, "weight", None)
        if (isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and index is not None
                and isinstance(weight, torch.Tensor) and weight.dim() == 2
                and -weight.shape[0] <= index < weight.shape[0]):
            rows[id(weight)] = index % weight.shape[0]
    return {name: rows[id(p)] for name, p in model.named_parameters() if id(p) in rows}


def padding_zeros(model: nn.Module) -> dict[str, int]:
    """Exact zeros in the padding rows of ``model``'s embeddings (``padding_rows``), by parameter
    name: structural zeros, zero in the dense model too, never counted as removed."""
    params = dict(model.named_parameters())
    return {name: int((params[name].detach()[row] == 0).sum()) for name, row in padding_rows(model).items()}


def _padding_as_kept(weight: torch.Tensor, row: int | None) -> torch.Tensor:
    """``weight`` with the zeros of its padding row ``row`` (None: none) made nonzero, for counting
    MACs: an output head tied to an embedding table computes that row's outputs as any other's (a
    zero logit, one MAC a weight), so a dense model keeps all its MACs and a pruned one is charged
    for the compute it still does."""
    if row is None or weight.dim() != 2 or not 0 <= row < weight.shape[0]:
        return weight
    computed = weight.detach().clone()
    computed[row] = torch.where(computed[row] == 0, torch.ones_like(computed[row]), computed[row])
    return computed


# --- tracing ---------------------------------------------------------------------------------

def is_conv1d_style(module: nn.Module) -> bool:
    """Whether ``module`` is a Conv1D-style layer as HuggingFace's (``transformers.pytorch_utils.
    Conv1D``, GPT-2's projections): named Conv1D, a 2-D ``weight`` (in, out) and ``nf`` = out,
    computing y = x @ W + b (a Linear, its weight stored transposed)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def _elementwise_ops(module: nn.Module, inputs: tuple, out) -> int | None:
    """Element-wise ops of a leaf module (in a trace of one example); None if its type has no rule."""
    if isinstance(module, _NORM_LAYERS):
        return out.numel()
    if isinstance(module, _POOL_WINDOW):
        kernel = module.kernel_size
        window = math.prod(kernel) if isinstance(kernel, tuple) else kernel ** (out.dim() - 2)
        return out.numel() * window
    if isinstance(module, _POOL_ADAPTIVE):
        return inputs[0].numel()
    if isinstance(module, (*_FREE, *_PRICED_BY_OPS)) or getattr(module, "zero_macs", False) or _empty(module) \
            or is_conv1d_style(module):     # a Linear: its product (addmm) is all it computes
        return 0
    return None


def _empty(module: nn.Module) -> bool:
    """An empty ``nn.Sequential()`` (an identity shortcut): it computes nothing."""
    return isinstance(module, nn.Sequential) and not any(True for _ in module.children()) \
        and not any(True for _ in module.parameters())


_COST_FN_FORM = ("return {parameter name: times each element is multiplied in the call} (a plain dict) "
                 "or a prunekit.ModuleCost")


def _registered_uses(module: nn.Module, fn, inputs, output, name: str) -> ModuleCost:
    """What ``fn`` (registered for ``module``'s type) returns for this call, checked: an exception
    inside it, a return of another type, or uses that are not whole numbers >= 0 are refused in
    one line naming the cost function (not the data, which ran through the model fine)."""
    kind = type(module).__name__
    try:
        cost = fn(module, inputs, output)
    except PrunekitError:
        raise
    except Exception as err:  # noqa: BLE001 - a bug in the user's cost function
        message = str(err).splitlines()[0] if str(err) else ""
        raise PrunekitError(
            f"the cost function registered for {kind} raised {type(err).__name__}"
            + (f": {message}" if message else "") + f" (on module {name!r}); fix it (it is called as "
            f"fn(module, inputs, output), inputs the tuple of the module's inputs, for one example) and "
            f"{_COST_FN_FORM}") from None
    if isinstance(cost, dict):
        cost = ModuleCost(uses=dict(cost))
    if not isinstance(cost, ModuleCost) or not isinstance(cost.uses, dict):
        got = "None" if cost is None else f"{reprlib.repr(cost)} (type {type(cost).__name__})"
        raise PrunekitError(f"the cost function registered for {kind} returned {got} (on module {name!r}); "
                            f"it must {_COST_FN_FORM}")
    for local, uses in [*cost.uses.items(), ("activation_macs", cost.activation_macs)]:
        if not _whole(uses):
            raise PrunekitError(
                f"the cost function registered for {kind} gave {local!r} {uses!r} (on module {name!r}): "
                "each figure must be a whole number >= 0 (times each element is multiplied; 0 if it costs nothing)")
    own = dict(module.named_parameters(recurse=False, remove_duplicate=False))   # both names of one tied twice
    unknown = set(cost.uses) - set(own)
    if unknown:
        children = sorted(unknown & {n for n, _ in module.named_parameters()})
        if children:
            raise PrunekitError(
                f"the cost function registered for {type(module).__name__} names {children}, parameters of "
                f"its child layers: those are counted by their own operations; name only the module's own "
                f"parameters ({sorted(own) or 'it has none'}) in the cost function")
        raise PrunekitError(f"the cost function registered for {type(module).__name__} names parameters "
                            f"{sorted(unknown)} that module {name!r} does not have; it has {sorted(own)}")
    return cost


def _whole(value) -> bool:
    """A whole number >= 0 (an int, a Python or 0-dim tensor number with no fraction); not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return False
        value = value.item()
    try:
        return int(value) == value and value >= 0
    except (TypeError, ValueError, OverflowError):
        return False


def _check_all_priced(module: nn.Module, cost: ModuleCost, own: dict, seen: dict[str, str], canonical: dict,
                      name: str) -> None:
    """Refuse a cost function that leaves out an own parameter of ``module`` which an operation of
    the module's own code multiplies (``seen``: {canonical parameter name: that op}, from
    ``_OpCounter._observe``): it would cost 0 MACs and a budget be met on an undercount."""
    priced = {canonical[id(own[local])] for local in cost.uses}
    missing = [full for full in seen if full not in priced]
    if not missing:
        return
    local_of = {canonical[id(p)]: local for local, p in own.items()}
    locals_ = [local_of.get(full, full) for full in missing]
    first = locals_[0]
    kind = type(module).__name__
    others = f" (and {', '.join(repr(n) for n in locals_[1:])})" if len(locals_) > 1 else ""
    raise PrunekitError(
        f"the cost function registered for {kind} returns no entry for its parameter {first!r}{others} (module "
        f"{name!r}), which its forward uses in aten.{seen[missing[0]]}: return its uses "
        f"({{{first!r}: times each element is multiplied in the call}}), or {{{first!r}: 0}} if it truly costs "
        "no MACs (it is then kept dense, not pruned)")


def _trace(model: nn.Module, example_input, batched: tuple[int, ...]) -> tuple[list[LayerCost], list[str]]:
    refuse_scripted(model)
    inputs = cut_to_one_example(inputs_of(example_input), batched)
    modules = dict(model.named_modules())
    index = ParamIndex(model)
    scope: list[str] = []
    leaf_depth = [0]
    opaque: list = []                  # per running module: its own parameter names if it has a cost function
    ops = _OpCounter(index, scope, opaque)
    leaves: dict[str, dict] = {}       # leaf module name -> {"other_ops", "output_shape", "kind"}
    unknown: list[str] = []
    ran: set[str] = set()
    handles = []

    def pre_hook(name, is_leaf, own):
        def hook(module, inputs):
            ran.add(name)
            scope.append(name)
            leaf_depth[0] += is_leaf
            opaque.append(own)
            ops.seen.append({})
        return hook

    def post_hook(name, is_leaf, fn):
        def hook(module, inputs, output):
            scope.pop()
            leaf_depth[0] -= is_leaf
            opaque.pop()
            seen = ops.seen.pop()
            if fn is not None:
                _charge_registered(module, fn, inputs, output, name, seen)
            if not is_leaf:
                return
            out = output[0] if isinstance(output, (tuple, list)) else output
            entry = leaves.setdefault(name, {"other_ops": 0, "kind": type(module).__name__,
                                             "output_shape": tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()})
            if name not in ops.order:
                ops.order.append(name)
            other = 0 if fn is not None else _elementwise_ops(module, inputs, out)
            if other is None:
                if name not in unknown:
                    unknown.append(name)
                entry["kind"] = type(module).__name__ + " (unknown: element-wise ops not counted)"
            else:
                entry["other_ops"] += other
        return hook

    def _charge_registered(module, fn, inputs, output, name, seen):
        cost = _registered_uses(module, fn, inputs, output, name)
        own = dict(module.named_parameters(recurse=False, remove_duplicate=False))
        _check_all_priced(module, cost, own, seen, canonical, name)
        for local, uses in cost.uses.items():
            if not int(uses):
                # 0: it costs no MACs here (a table read by index, a gain): not a prunable weight
                # for that, so kept dense (pruning it would save nothing and may zero it all)
                continue
            full = canonical[id(own[local])]
            ops.uses.mark(full)
            ops.uses.uniform[full] += int(uses)
            if full not in ops.order:
                ops.order.append(full)
        if cost.activation_macs:
            scope.append(name)
            ops._activation(cost.activation_macs)
            scope.pop()

    # a parameter tied to another module's (an output head sharing the embedding's table) is named
    # once, where model.named_parameters() first meets it: the trace (``ParamIndex``) knows it by that
    # name, so a registered module's own parameter is named so too, whichever module holds it first
    canonical = {id(p): n for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        fn = registered_cost(module)
        is_leaf = fn is not None or next(module.children(), None) is None
        own = None if fn is None else frozenset(canonical[id(p)] for _, p in module.named_parameters(recurse=False))
        handles.append(module.register_forward_pre_hook(pre_hook(name, is_leaf, own)))
        handles.append(module.register_forward_hook(post_hook(name, is_leaf, fn)))

    was_training = model.training
    fastpath = get_mha_fastpath()
    model.eval()
    adds = _AddCounter(scope, leaf_depth)
    try:
        # The fused fast path of nn.MultiheadAttention / TransformerEncoderLayer is one opaque
        # op; the ordinary path is the same arithmetic, op by op.
        set_mha_fastpath(False)
        # a model that draws (noise in eval) leaves the caller's RNG as it was: prune promises it
        with torch.random.fork_rng(devices=rng_devices(model)), torch.no_grad(), adds, ops:
            model(*inputs)
    except PrunekitError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the user's model on this input
        raise PrunekitError(f"the model failed on one example of its input (shape "
                            f"{tuple(inputs[0].shape)}): {str(err).splitlines()[0]}; "
                            + input_fix(inputs[0], model, "pass data (or an example input) shaped as the model takes it")
                            ) from None
    finally:
        set_mha_fastpath(fastpath)
        for handle in handles:
            handle.remove()
        model.train(was_training)
    _refuse_unpriced(ops.unpriced, modules)
    return _build_layers(model, modules, ops, leaves, adds, ran), unknown


def _refuse_unpriced(unpriced, modules) -> None:
    if not unpriced:
        return
    first = unpriced[0]
    owner = first.param.rpartition(".")[0]
    # a parameter's name is that of a module in named_modules() (the root: "") and its own
    kind = type(modules[owner]).__name__
    names = sorted({u.param for u in unpriced})
    if "weight_norm" in first.op:          # the weight is made from g and v in a hook: no cost rule can see it
        layer = owner.removesuffix(".parametrizations.weight") or "(root)"
        raise PrunekitError(
            f"module {layer!r} has weight normalization (its weight is made from {', '.join(names[:2])} before "
            "each call), which prunekit cannot count or prune: fold it into a plain weight first with "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight') (or "
            "torch.nn.utils.remove_weight_norm(module) for the old form), then prune")
    if ".parametrizations." in f".{first.param}":     # a torch parametrization's original, e.g. orthogonal's
        layer, _, rest = f".{first.param}".partition(".parametrizations.")
        local = rest.partition(".")[0]
        raise PrunekitError(
            f"{(layer[1:] + '.') if layer else ''}{local} is under a torch parametrization, made anew before each "
            f"call from {first.param} by aten.{first.op}, which prunekit cannot count or prune: fold it into a plain "
            f"weight first with torch.nn.utils.parametrize.remove_parametrizations(module, {local!r}), then prune")
    raise PrunekitError(
        f"cannot count the MACs of parameter {first.param!r} (module {owner or '(root)'!r}, {kind}): "
        f"it is used by the operation aten.{first.op}, which has no cost rule"
        + (f" ({len(names)} parameters in all: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
           if len(names) > 1 else "")
        + f"; register a cost for it with prunekit.register_cost({kind}, fn) (fn(module, inputs, output) "
        "returns {parameter name: times each element is multiplied in the call}; 0 for one that costs no MACs). "
        "exclude= would only leave its weights dense: the MACs must still be counted")


def _key_of(name: str, weights: set[str]) -> tuple[str, str]:
    """(entry name, owner module name) of parameter ``name``."""
    owner, _, local = name.rpartition(".")
    if name in weights and local != "weight":
        return name, owner
    return owner, owner


def _build_layers(model, modules, ops: _OpCounter, leaves, adds, ran: set[str]) -> list[LayerCost]:
    weights = set(ops.uses.weights)
    params = dict(model.named_parameters())
    weight_keys = {_key_of(name, weights)[0] for name in weights}
    _is_weight_key = weight_keys.__contains__
    entries: dict[str, LayerCost] = {}

    def entry(key: str, owner: str) -> LayerCost:
        if key not in entries:
            module = modules.get(owner)
            kind = type(module).__name__ if module is not None else "?"
            if key != owner:
                kind = f"{kind}.{key.rpartition('.')[2]}"
            elif key not in leaves and key not in ops.activation_macs and not _is_weight_key(key):
                kind += " (parameters)" if owner in ran else " (not run)"
            leaf = leaves.get(key, {})
            entries[key] = LayerCost(name=key, kind=leaf.get("kind", kind), params=0,
                                     other_ops=leaf.get("other_ops", 0), output_shape=leaf.get("output_shape", ()))
        return entries[key]

    for item in ops.order:           # execution order: leaves, weights, activation scopes
        if item in params:
            entry(*_key_of(item, weights))
        else:
            entry(item, item)
    for name, p in params.items():
        key, owner = _key_of(name, weights)
        layer = entry(key, owner)
        layer.params += p.numel()
        if name in weights:
            per_weight, per_element = ops.uses.per_element(name, p.numel())
            layer.param_name, layer.weight_shape = name, tuple(p.shape)
            layer.macs_per_weight, layer.element_macs = per_weight, per_element
            layer.macs += per_weight * p.numel() if per_element is None else int(per_element.sum())
            if ops.elsewhere.get(name):         # a tied weight: its other uses' MACs are on this row
                layer.kind += f" (+ tied use in {', '.join(ops.elsewhere[name])}, its MACs counted here)"
    for name, users in ops.elsewhere.items():      # the tied weight's users: their rows say where its MACs are
        for user in users:
            if user in entries and name in weights:
                entries[user].kind += f" (weight tied to {_key_of(name, weights)[0]}: its MACs on that row)"
    for scope_name, macs in ops.activation_macs.items():
        layer = entry(scope_name, scope_name)
        layer.activation_macs += macs
        layer.macs += macs
    ordered = [e for e in entries.values() if e.params or e.macs or e.other_ops or e.name in leaves]
    for scope_name, n in adds.ops_by_scope.items():
        name = f"{scope_name}.(add)" if scope_name else "(add)"
        ordered.append(LayerCost(name=name, kind="add", params=0, other_ops=n))
    return ordered
