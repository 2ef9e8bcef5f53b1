"""One cost model: MACs and parameters per layer and per prunable weight.

The counts come from tracing one forward pass with hooks on every leaf module (so any model
works, no hand-made tables) plus a ``TorchFunctionMode`` that sees tensor additions written in
``forward`` code (residual adds), which module hooks cannot see.

Conventions (the ones the papers use, so our figures compare with theirs):

* ``macs`` of a model = multiply-accumulates of its weight layers (Conv, Linear) for **one
  example**. A Conv weight element is used once per output position, so a conv costs
  ``weight.numel() * prod(output spatial dims)`` (this is right for any stride, padding,
  dilation and groups, depthwise included); a Linear weight element costs one MAC per token
  (1 for a plain (B, features) input). Biases are not counted.
* Everything else (BatchNorm: one MAC per element; pooling: one op per window element; residual
  adds: one op per element) is reported as ``other_ops``, not inside ``macs``. ResNet-50 is then
  the familiar 4.09 GMACs and MobileNetV1 569 MMACs.
* A leaf module type the model does not know is listed in ``unknown`` and counted as zero, so
  it is reported, never silently skipped. Parameter-free modules that do no arithmetic can say
  so with a class attribute ``zero_macs = True``.

A masked model is counted by ``count``: a weight that is exactly zero costs nothing. A shrunk
model (channels removed) is traced again by the same code, so every figure is counted one way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import PrunekitError

WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_POOL_WINDOW = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_POOL_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                  nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_FREE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
         nn.Hardsigmoid, nn.Softmax, nn.LogSoftmax, nn.Identity, nn.Flatten, nn.Unflatten,
         nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ZeroPad2d, nn.ConstantPad2d)
_ADD_FUNCS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
              torch.Tensor.__iadd__, torch.Tensor.__radd__}


@dataclass
class LayerCost:
    """Costs of one leaf module (or one residual add) for one example.

    ``macs_per_weight`` is what each element of ``weight`` costs (0 for non-weight layers);
    ``macs == macs_per_weight * prod(weight_shape)`` for weight layers.
    """

    name: str
    kind: str
    params: int
    macs: int = 0
    other_ops: int = 0
    weight_shape: tuple[int, ...] | None = None
    macs_per_weight: int = 0
    output_shape: tuple[int, ...] = ()

    @property
    def is_weight_layer(self) -> bool:
        return self.weight_shape is not None


@dataclass
class Counts:
    """Nonzero-aware counts of a (possibly masked) model, for one example."""

    macs: int
    dense_macs: int
    params: int
    dense_params: int
    nonzeros_by_layer: dict[str, int] = field(default_factory=dict)
    macs_by_layer: dict[str, int] = field(default_factory=dict)

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
        example_input: one batch, (B, ...) with B >= 1 (or a tuple of inputs); counts are
            divided by B so they are per example.

    Attributes:
        layers: ``LayerCost`` per leaf module in execution order, then residual adds.
        unknown: names of leaf modules whose type has no counting rule (counted as zero).
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor | tuple):
        self.example_input = example_input
        self.layers, self.unknown = _trace(model, example_input)
        self._by_name = {layer.name: layer for layer in self.layers}

    # --- dense totals -------------------------------------------------------------------
    @property
    def macs(self) -> int:
        """Dense MACs of the weight layers, per example."""
        return sum(layer.macs for layer in self.layers)

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
        modules_of = dict(model.named_modules())
        same_shapes = all(
            tuple(getattr(modules_of.get(layer.name), "weight", torch.empty(0)).shape) == layer.weight_shape
            for layer in self.weight_layers())
        layers = self.layers if same_shapes else _trace(model, self.example_input)[0]
        macs, params = 0, 0
        nonzeros_by_layer, macs_by_layer = {}, {}
        for layer in layers:
            if not layer.is_weight_layer:
                params += layer.params
                continue
            module = modules_of[layer.name]
            nonzeros = int(torch.count_nonzero(module.weight.detach()))
            other_params = sum(p.numel() for n, p in module.named_parameters(recurse=False)
                               if n != "weight")
            nonzeros_by_layer[layer.name] = nonzeros
            macs_by_layer[layer.name] = nonzeros * layer.macs_per_weight
            macs += macs_by_layer[layer.name]
            params += nonzeros + other_params
        return Counts(macs=macs, dense_macs=self.macs, params=params, dense_params=self.params,
                      nonzeros_by_layer=nonzeros_by_layer, macs_by_layer=macs_by_layer)


# --- tracing ---------------------------------------------------------------------------------

def _batch_size(example_input) -> int:
    first = example_input[0] if isinstance(example_input, (tuple, list)) else example_input
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise PrunekitError("example_input must be a batched tensor (B, ...) or a tuple of them")
    return first.shape[0]


def _module_cost(name: str, module: nn.Module, inputs: tuple, output, batch: int) -> LayerCost | None:
    """The cost rule for one leaf module; None if its type is unknown."""
    params = sum(p.numel() for p in module.parameters(recurse=False))
    out = output[0] if isinstance(output, (tuple, list)) else output
    out_shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()
    cost = LayerCost(name=name, kind=type(module).__name__, params=params, output_shape=out_shape)
    if isinstance(module, WEIGHT_LAYERS):
        if isinstance(module, nn.Linear):
            per_weight = out.numel() // (batch * module.out_features)   # tokens per example
        elif isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d)):
            per_weight = math.prod(inputs[0].shape[2:])                # each input position
        else:
            per_weight = math.prod(out.shape[2:])                       # each output position
        cost.weight_shape = tuple(module.weight.shape)
        cost.macs_per_weight = int(per_weight)
        cost.macs = int(per_weight) * module.weight.numel()
    elif isinstance(module, _NORM_LAYERS):
        cost.other_ops = out.numel() // batch
    elif isinstance(module, _POOL_WINDOW):
        kernel = module.kernel_size
        window = math.prod(kernel) if isinstance(kernel, tuple) else kernel ** (out.dim() - 2)
        cost.other_ops = out.numel() // batch * window
    elif isinstance(module, _POOL_ADAPTIVE):
        cost.other_ops = inputs[0].numel() // batch
    elif isinstance(module, _FREE) or getattr(module, "zero_macs", False):
        pass
    else:
        return None
    return cost


class _AddCounter(TorchFunctionMode):
    """Counts elementwise tensor additions made outside leaf modules (residual adds)."""

    def __init__(self, scope: list[str], leaf_depth: list[int], batch: int):
        super().__init__()
        self.scope, self.leaf_depth, self.batch = scope, leaf_depth, batch
        self.ops_by_scope: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if (func in _ADD_FUNCS and self.leaf_depth[0] == 0 and len(args) >= 2
                and all(isinstance(a, torch.Tensor) for a in args[:2])
                and isinstance(result, torch.Tensor)):
            key = self.scope[-1] if self.scope else ""
            self.ops_by_scope[key] = self.ops_by_scope.get(key, 0) + result.numel() // self.batch
        return result


def _trace(model: nn.Module, example_input) -> tuple[list[LayerCost], list[str]]:
    batch = _batch_size(example_input)
    layers: dict[str, LayerCost] = {}   # a module called twice is one layer with both calls' costs
    unknown: list[str] = []
    scope: list[str] = []
    leaf_depth = [0]
    handles = []

    def pre_hook(name, is_leaf):
        def hook(module, inputs):
            scope.append(name)
            leaf_depth[0] += is_leaf
        return hook

    def post_hook(name, is_leaf):
        def hook(module, inputs, output):
            scope.pop()
            leaf_depth[0] -= is_leaf
            if not is_leaf:
                return
            cost = _module_cost(name, module, inputs, output, batch)
            if cost is None:
                if name not in unknown:
                    unknown.append(name)
                cost = LayerCost(name=name, kind=type(module).__name__ + " (unknown: 0 counted)",
                                 params=sum(p.numel() for p in module.parameters(recurse=False)))
            if name in layers:
                layers[name].macs += cost.macs
                layers[name].macs_per_weight += cost.macs_per_weight
                layers[name].other_ops += cost.other_ops
            else:
                layers[name] = cost
        return hook

    for name, module in model.named_modules():
        is_leaf = next(module.children(), None) is None
        handles.append(module.register_forward_pre_hook(pre_hook(name, is_leaf)))
        handles.append(module.register_forward_hook(post_hook(name, is_leaf)))

    was_training = model.training
    model.eval()
    counter = _AddCounter(scope, leaf_depth, batch)
    try:
        with torch.no_grad(), counter:
            inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
            model(*inputs)
    except PrunekitError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the user's model on this input
        raise PrunekitError(f"the model failed on an example input of shape "
                            f"{tuple(inputs[0].shape)}: {str(err).splitlines()[0]}; "
                            "pass an example input the model accepts") from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    # Parameters of modules that never ran (or of non-leaf modules) still count as params.
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own and name not in layers:
            layers[name] = LayerCost(name=name, kind=type(module).__name__ + " (not run)", params=own)
    for scope_name, ops in counter.ops_by_scope.items():
        name = f"{scope_name}.(add)" if scope_name else "(add)"
        layers[name] = LayerCost(name=name, kind="add", params=0, other_ops=ops)
    return list(layers.values()), unknown
