"""torch-pruning's dependency trace of a model: the pruners it is handed for zero-pad shortcuts and
Conv1D-style layers, the graph (``build_graph``: norms' input shapes and the modules behind each op
recorded on its nodes), its groups one root layer at a time with a bound on endless traces
(``_all_groups``, ``_bounded_groups``), and what a dependency prunes."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch
import torch_pruning as tp
from torch import nn

from ..costs import is_conv1d_style
from ..errors import PrunekitError
from .mixing_norms import NORM_LAYERS


class PadShortcutPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's view of a zero-pad shortcut: a layer whose input and output channels are
    separate axes (like a conv's), pruned by rewriting its channel map
    (``remove_inputs`` / ``remove_outputs`` of the module)."""

    def prune_out_channels(self, layer: nn.Module, idxs):
        layer.remove_outputs([int(i) for i in idxs])
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs):
        layer.remove_inputs([int(i) for i in idxs])
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


def pad_pruners(model: nn.Module) -> dict:
    """``customized_pruners`` for torch-pruning: one ``PadShortcutPruner`` per zero-pad shortcut type."""
    return {type(m): PadShortcutPruner() for m in model.modules() if getattr(m, "pads_channels", False)}


class TransposedLinearPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning's view of a Conv1D-style layer (HuggingFace's GPT-2 ``Conv1D``: ``weight``
    (in, out), ``bias`` (out,), y = x @ W + b): a Linear whose input channels are the weight's rows
    and output channels its columns. Used to trace groups only; ``shrink`` does the surgery."""

    def prune_out_channels(self, layer: nn.Module, idxs):
        closed = {int(i) for i in idxs}
        keep = [i for i in range(layer.weight.shape[1]) if i not in closed]
        layer.weight = nn.Parameter(layer.weight.data[:, keep].clone())
        if getattr(layer, "bias", None) is not None:
            layer.bias = nn.Parameter(layer.bias.data[keep].clone())
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs):
        closed = {int(i) for i in idxs}
        keep = [i for i in range(layer.weight.shape[0]) if i not in closed]
        layer.weight = nn.Parameter(layer.weight.data[keep].clone())
        if hasattr(layer, "nx"):
            layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


def conv1d_pruners(model: nn.Module) -> dict:
    """``customized_pruners`` for torch-pruning: one ``TransposedLinearPruner`` per Conv1D-style
    layer type (recognized by ``costs.is_conv1d_style``: named Conv1D, weight (in, out), ``nf`` = out)."""
    return {type(m): TransposedLinearPruner() for m in model.modules() if is_conv1d_style(m)}


def build_graph(model: nn.Module, example_input: torch.Tensor, pads_residual: bool = True) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # A bare nn.Parameter used in forward: torch-pruning warns that it would prune its
            # last axis. We never do; its groups are left dense and listed in GroupSet.skipped.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            # Its concat-size inference gives up on deep recurrent graphs (a bidirectional LSTM):
            # those channels are then unknown, and such groups are skipped or caught by shrink's check.
            warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
            pruners = {**(pad_pruners(model) if pads_residual else {}), **conv1d_pruners(model)}
            shapes: dict[nn.Module, tuple | None] = {}

            def record(module, args):      # a norm's input shape (None: called with several shapes)
                shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
                shapes[module] = shape if shapes.get(module, shape) == shape else None
            made_by: dict[int, tuple[object, nn.Module]] = {}

            def made(module, args, out):   # the module whose output an op's result is (names a norm's ops)
                if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                    took = frozenset(id(a.grad_fn) for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None)
                    made_by.setdefault(id(out.grad_fn), (out.grad_fn, module, took))
            hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, NORM_LAYERS)]
            hooks += [m.register_forward_hook(made) for m in model.modules()    # (a ScriptModule takes no hooks:
                      if not isinstance(m, torch.jit.ScriptModule)]            # its ops stay unnamed)
            # traced through autograd: a frozen layer (requires_grad=False) gives no graph (a frozen first
            # layer none at all), so its channels would go unseen; traced as if trainable, then frozen again
            frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
            try:
                for p in frozen:
                    p.requires_grad_(True)
                graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_input, output_transform=_output_tensors,
                    customized_pruners=pruners or None)
            finally:
                for p in frozen:
                    p.requires_grad_(False)
                for hook in hooks:
                    hook.remove()
            for module, shape in shapes.items():     # read by _norm_mixes_channels
                if (node := graph.module2node.get(module)) is not None:
                    node.prunekit_input_shape = shape
            for node in graph.module2node.values():   # read by _statistic_module
                if (entry := made_by.get(id(getattr(node, "grad_fn", None)))) is not None and entry[0] is node.grad_fn:
                    node.prunekit_made_by, node.prunekit_made_from = entry[1], entry[2]
            return graph
    finally:
        model.train(was_training)


def _output_tensors(out, where: str = "output") -> list[torch.Tensor]:
    """The tensors of a model's output ``out`` (a tensor, or tuples, lists, dicts and dataclasses of them: a
    HuggingFace ModelOutput is a dict), flattened for torch-pruning's trace; None, numbers and
    strings are dropped (no graph behind them). Any other object (a KV cache such as
    HuggingFace's DynamicCache, which holds tensors torch-pruning cannot see into) is refused
    in one line naming its type, where it sits and the fix."""
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None or isinstance(out, (bool, int, float, str)):
        return []
    if isinstance(out, dict):
        return [t for key, value in out.items() for t in _output_tensors(value, f"{where}[{key!r}]")]
    if isinstance(out, (list, tuple)):
        return [t for i, value in enumerate(out) for t in _output_tensors(value, f"{where}[{i}]")]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):     # a plain @dataclass: its fields
        return [t for f in dataclasses.fields(out) for t in _output_tensors(getattr(out, f.name), f"{where}.{f.name}")]
    raise PrunekitError(f"the model's {where} is a {type(out).__name__}, not a tensor (a key/value cache, say), "
                        "which the channel dependency analysis cannot follow: build the model without it "
                        "(HuggingFace: use_cache=False, or model.config.use_cache = False) or wrap it in a module "
                        "whose forward returns only tensors (the logits)")


def _all_groups(graph, root_types: tuple, cycles: list):
    """torch-pruning's ``DependencyGraph.get_all_groups`` (1.6), one group per root layer not yet
    in a group, except that a root whose trace raises :class:`_EndlessGroup` is appended to
    ``cycles`` (the module) and skipped, instead of ending the whole analysis."""
    visited = set()
    ignored = list(getattr(graph, "IGNORED_LAYERS_IN_TRACING", []))
    for module in list(graph.module2node.keys()):
        if any(module is m for m in ignored) or not isinstance(module, root_types) or module in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                            list(range(pruner.get_out_channels(module))))
        except _EndlessGroup:
            if module not in cycles:
                cycles.append(module)
            visited.add(module)
            continue
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
        yield group


def _reach(graph, module: nn.Module) -> set:
    """Every (graph node, output axis?) that pruning ``module``'s output channels touches, indices
    ignored: a superset of its group's members, finite where the indexed trace is not."""
    node = graph.module2node[module]
    start = (node, graph.get_pruner_of_module(module).prune_out_channels)
    seen, stack = {start}, [start]
    while stack:
        node, fn = stack.pop()
        for dep in node.dependencies:
            if dep.is_triggered_by(fn) and (dep.target, dep.handler) not in seen:
                seen.add((dep.target, dep.handler))
                stack.append((dep.target, dep.handler))
    return {(node, graph.is_out_channel_pruning_fn(fn)) for node, fn in seen}


class _EndlessGroup(Exception):
    def __init__(self, root):
        super().__init__()
        self.root = root                     # the module whose group was being traced


# A group holds each (layer, pruning function, indices) at most once; over the zoo's models and
# HuggingFace BERT/ViT the largest traced group has at most one item per node of the graph.
# torch-pruning 1.6 never ends on some cycles of index mappings (a rotary embedding's slice-negate-
# concat feeding grouped-query attention's expand-reshape): each round maps the indices anew and
# adds them again. Past GROUP_ITEMS_PER_NODE items per node (+ GROUP_ITEMS_MIN) the trace stops.
GROUP_ITEMS_PER_NODE, GROUP_ITEMS_MIN = 8, 64


@contextlib.contextmanager
def _bounded_groups(nodes: int):
    """Within the block, torch-pruning's group tracing (``get_pruning_group``) raises
    :class:`_EndlessGroup` once one group holds more than GROUP_ITEMS_PER_NODE * ``nodes`` +
    GROUP_ITEMS_MIN items (``nodes``: the graph's node count), instead of running without end."""
    limit = GROUP_ITEMS_PER_NODE * nodes + GROUP_ITEMS_MIN
    try:                                     # torch-pruning's internals: a later version may move them
        from torch_pruning.dependency import graph as tp_graph
        plain = tp_graph.Group
    except (ImportError, AttributeError):
        yield
        return

    class Bounded(plain):
        def add_dep(self, dep, idxs):
            if len(self.items) >= limit:
                raise _EndlessGroup(self.items[0].dep.target.module)
            super().add_dep(dep, idxs)

    tp_graph.Group = Bounded
    try:
        yield
    finally:
        tp_graph.Group = plain


def _is_pad_layer(dep) -> bool:
    """True if torch-pruning handled this zero-pad shortcut as a layer (our ``PadShortcutPruner``)."""
    return isinstance(getattr(dep.handler, "__self__", None), PadShortcutPruner)


def _prunes_out_channels(dep) -> bool:
    """True if the dependency prunes the output channels of its layer."""
    fn = dep.handler
    name = getattr(fn, "__name__", "") or type(fn).__name__
    return "out" in name
