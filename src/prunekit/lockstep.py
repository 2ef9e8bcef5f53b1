"""Run a pruned network and its dense original node by node over a traced graph, all batches at once.

A layer-by-layer re-fit (``prunekit.refit``) needs, for each layer in forward order, the layer's
inputs in the pruned network *after the earlier layers were re-fit* and the dense layer's outputs.
With eager forwards that means one truncated forward of both networks per layer and batch: the
forwards grow with depth squared. Here both networks run once: their common ``torch.fx`` graph is
evaluated node by node on every batch, and at each chosen layer a callback sees its inputs and the
dense outputs on all batches and may change the pruned layer's weights before the pruned network
goes on. Values are dropped after their last use, so memory is about that of one forward on all
the batches together, per network.

A network that ``torch.fx`` cannot trace makes :class:`Lockstep` raise; one whose traced graph
does not reproduce its eager forward is refused by :meth:`Lockstep.check`. The caller then falls
back to truncated forwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.fx import Graph, Node, Tracer
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten

LayerCallback = Callable[[str, list[torch.Tensor], list[torch.Tensor]], None]


def _evaluate(node: Node, root: nn.Module, args: tuple, kwargs: dict):
    if node.op == "get_attr":
        return functools.reduce(getattr, node.target.split("."), root)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return root.get_submodule(node.target)(*args, **kwargs)
    raise ValueError(f"unexpected node {node.op}")


def _bytes(values) -> int:
    leaves, _ = tree_flatten(values)
    return sum(v.numel() * v.element_size() for v in leaves if isinstance(v, torch.Tensor))


class Lockstep:
    """The traced forward of ``model`` (in its current mode), to run on lists of batches."""

    def __init__(self, model: nn.Module):
        self.graph: Graph = Tracer().trace(model)           # raises where the model cannot be traced
        self.nodes = list(self.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders or any(not n.args for n in placeholders[1:]):
            raise ValueError("the forward takes more than one input without a default")
        self.input = placeholders[0]
        calls: dict[str, int] = {}
        for node in self.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        self.called_once = {name for name, count in calls.items() if count == 1}
        last_use: dict[Node, Node] = {}
        for node in self.nodes:
            for arg in node.all_input_nodes:
                last_use[arg] = node
        self.frees: dict[Node, list[Node]] = {}
        for value, user in last_use.items():
            self.frees.setdefault(user, []).append(value)

    def run(self, model: nn.Module | None, dense: nn.Module, inputs: list, dense_inputs: list,
            layers: set[str] = frozenset(), at_layer: LayerCallback | None = None) -> tuple[list, int]:
        """Evaluate the graph on every batch with ``dense`` (and ``model``, unless None); before the
        pruned network runs a node that calls one of ``layers``, ``at_layer(name, inputs, dense
        outputs)`` gets that layer's first argument in the pruned network and the dense layer's
        outputs, one tensor per batch. Returns the dense network's outputs per batch and the most
        bytes of tensors held at once."""
        env: dict[Node, list] = {}
        dense_env: dict[Node, list] = {}
        peak = 0
        for node in self.nodes:
            if node.op == "output":
                return [map_arg(node.args[0], lambda n, b=b: dense_env[n][b]) for b in range(len(dense_inputs))], peak
            if node.op == "placeholder":
                dense_env[node] = dense_inputs if node is self.input else [node.args[0]] * len(dense_inputs)
                env[node] = inputs if node is self.input else [node.args[0]] * len(inputs)
            else:
                dense_env[node] = [_evaluate(node, dense, *map_arg((node.args, node.kwargs), lambda n, b=b: dense_env[n][b]))
                                   for b in range(len(dense_inputs))]
                if model is not None:
                    args = [map_arg((node.args, node.kwargs), lambda n, b=b: env[n][b]) for b in range(len(inputs))]
                    if node.op == "call_module" and node.target in layers and at_layer is not None:
                        at_layer(node.target, [a[0][0] for a in args], dense_env[node])
                    env[node] = [_evaluate(node, model, *a) for a in args]
            peak = max(peak, _bytes(list(dense_env.values())) + _bytes(list(env.values())))
            for value in self.frees.get(node, ()):
                dense_env.pop(value, None)
                env.pop(value, None)
        raise ValueError("the traced graph has no output")

    @torch.no_grad()
    def check(self, dense: nn.Module, x) -> int:
        """Raise ValueError unless the graph run on ``x`` (one batch, as the model takes it)
        reproduces ``dense(x)`` to float rounding; returns the most bytes held at once."""
        (traced,), peak = self.run(None, dense, [], [x])
        eager = dense(x)
        got, _ = tree_flatten(traced)
        want, _ = tree_flatten(eager)
        if len(got) != len(want):
            raise ValueError("the traced forward returns other outputs than the model")
        for g, w in zip(got, want):
            if isinstance(w, torch.Tensor):
                if not isinstance(g, torch.Tensor) or g.shape != w.shape:
                    raise ValueError("the traced forward returns other outputs than the model")
                scale = float(w.detach().abs().max()) if w.numel() else 0.0
                if w.is_floating_point() and w.numel() and float((g - w).abs().max()) > 1e-4 * max(scale, 1e-12):
                    raise ValueError("the traced forward computes other values than the model")
        return peak
