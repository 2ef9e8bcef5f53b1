"""Per-channel gates on channel groups, and the MACs of the gated model as a function of them.

A gate vector ``g`` of a group (shape ``(group.size,)``) multiplies the group's channels where
they are *consumed*: a forward pre-hook on every Conv/Linear that takes the group's channels as
input scales those input channels by ``g``. With ``g`` in {0, 1} the gated model computes
exactly what the model with the closed channels removed computes (per-channel ops such as BN,
ReLU and residual adds never mix channels, and every path of a channel ends in a consumer).
Depthwise convs are not gated (their output goes on to a gated consumer).

``GatedMacs`` counts MACs the way ``CostModel`` does (``weight.numel() * output positions``),
from the same per-layer trace: a layer costs
``coef * kept_in * kept_out`` with ``coef = macs_per_weight * kernel elements`` and
``kept = dense - sum_groups (size - sum(g)) * repeat``; a depthwise conv keeps one input
channel per output channel, so it costs ``coef * 1 * kept_out``. For 0/1 gates this equals
``CostModel.count`` of the shrunk model; for gates in (0, 1) it is the differentiable relaxation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..costs import CostModel
from .groups import GroupSet

GateValues = list[torch.Tensor]   # one (group.size,) tensor per group, in GroupSet order


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and \
        module.groups == module.in_channels == module.out_channels


class GateHooks:
    """Attach gates to ``model``; set ``values`` (a ``GateValues`` or None = no gating).

    Use as a context manager or call ``remove()``; the hooks read ``self.values`` on every
    forward, so a method can hold a parameter and write ``hooks.values = [sigmoid(t) ...]``.
    """

    def __init__(self, model: nn.Module, groups: GroupSet):
        self.values: GateValues | None = None
        modules = dict(model.named_modules())
        consumers: dict[str, list[tuple[int, int, int]]] = {}
        for group in groups:
            for member in group.layers("in"):
                consumers.setdefault(member.module, []).append((group.index, member.offset, member.repeat))
        self._handles = []
        for name, entries in consumers.items():
            module = modules[name]
            if _is_depthwise(module):
                continue
            self._handles.append(module.register_forward_pre_hook(self._hook(module, entries)))

    def _hook(self, module: nn.Module, entries):
        linear = isinstance(module, nn.Linear)
        width = module.in_features if linear else module.in_channels

        def hook(mod, inputs):
            if self.values is None:
                return None
            pieces, at = [], 0
            x = inputs[0]
            for index, offset, repeat in sorted(entries, key=lambda e: e[1]):
                g = self.values[index].to(x.dtype)
                if offset > at:
                    pieces.append(torch.ones(offset - at, dtype=x.dtype, device=x.device))
                pieces.append(g.repeat_interleave(repeat) if repeat > 1 else g)
                at = offset + g.numel() * repeat
            if at < width:
                pieces.append(torch.ones(width - at, dtype=x.dtype, device=x.device))
            scale = torch.cat(pieces)
            shape = (1,) * (x.dim() - 1) + (width,) if linear else (1, width) + (1,) * (x.dim() - 2)
            return (x * scale.view(shape),) + tuple(inputs[1:])
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class GatedMacs:
    """MACs per example of the model with gates ``values``: ``macs(values)`` (differentiable).

    ``dense`` equals ``costs.macs``; ``minimum`` is the cost with one channel kept per group.
    """

    def __init__(self, model: nn.Module, groups: GroupSet, costs: CostModel):
        self.groups = groups
        modules = dict(model.named_modules())
        by_layer: dict[str, dict[str, list[tuple[int, int]]]] = {}
        for group in groups:
            for member in group.members:
                if member.role in ("out", "in"):
                    by_layer.setdefault(member.module, {"out": [], "in": []})[member.role].append(
                        (group.index, member.repeat))
        self.terms = []   # (coef, dense_in, dense_out, in_groups, out_groups)
        self.fixed = 0
        for layer in costs.weight_layers():
            shape = layer.weight_shape
            coef = layer.macs_per_weight * math.prod(shape[2:])
            entry = by_layer.get(layer.name)
            if entry is None:
                self.fixed += layer.macs
                continue
            depthwise = _is_depthwise(modules[layer.name])
            in_groups = [] if depthwise else entry["in"]
            self.terms.append((coef, shape[1], shape[0], in_groups, entry["out"]))
        self.dense = costs.macs
        ones = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        for v in ones:
            v[0] = 1.0
        self.minimum = float(self.macs(ones))

    def macs(self, values: GateValues) -> torch.Tensor:
        """Total MACs (a 0-d tensor, float64 if the gates are) for gate ``values``."""
        closed = [g.numel() - g.sum() for g in values]
        total = torch.zeros((), dtype=values[0].dtype if values else torch.float64) + self.fixed
        for coef, dense_in, dense_out, in_groups, out_groups in self.terms:
            kept_in = dense_in - sum((closed[i] * r for i, r in in_groups), torch.zeros(()))
            kept_out = dense_out - sum((closed[i] * r for i, r in out_groups), torch.zeros(()))
            total = total + coef * kept_in * kept_out
        return total

    def macs_of_masks(self, masks: list[torch.Tensor]) -> int:
        """Exact integer MACs for boolean keep-masks."""
        return int(round(float(self.macs([m.to(torch.float64) for m in masks]))))


@torch.no_grad()
def fold_gates(model: nn.Module, groups: GroupSet, values: GateValues) -> None:
    """Multiply each gate into the consumer weights it scales (in place; exact, consumers are linear).

    After this, the ungated model computes what the gated one did: a gated model whose gates
    are then replaced by 0/1 masks keeps the learned scale of the channels it keeps.
    """
    modules = dict(model.named_modules())
    for group in groups:
        g = values[group.index].detach()
        for member in group.layers("in"):
            module = modules[member.module]
            if _is_depthwise(module):
                continue
            scale = g.repeat_interleave(member.repeat) if member.repeat > 1 else g
            stop = member.offset + scale.numel()
            shape = (1, -1) + (1,) * (module.weight.dim() - 2)
            module.weight[:, member.offset:stop] *= scale.to(module.weight.dtype).view(shape)
