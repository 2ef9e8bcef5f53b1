"""Per-channel gates on channel groups, and the MACs of the gated model as a function of them.

A gate vector ``g`` of a group (shape ``(group.size,)``) multiplies the group's channels where
they are *consumed*: a forward pre-hook on every Conv/Linear that takes the group's channels as
input scales those input channels by ``g``. With ``g`` in {0, 1} the gated model computes
exactly what the model with the closed channels removed computes (per-channel ops such as BN,
ReLU and residual adds never mix channels, and every path of a channel ends in a consumer).
Depthwise convs are not gated (their output goes on to a gated consumer). A zero-pad shortcut
(``pads_channels``) is gated like a consumer: a closed channel of the previous stage does not
reach the next stage through it. An attention head
is gated where its output leaves the head, before ``out_proj`` (``attention.py``: a forward
hook recomputes the module's output with the gates; the fused fast path of
``TransformerEncoderLayer`` is turned off while gates are attached, as it would skip it).

``GatedMacs`` counts MACs the way ``CostModel`` does (``weight.numel() * output positions``),
from the same per-layer trace: a layer costs
``coef * kept_in * kept_out`` with ``coef = macs_per_weight * kernel elements`` and
``kept = dense - sum_groups (size - sum(g)) * repeat * segments``; a depthwise conv keeps one
input channel per output channel, so it costs ``coef * 1 * kept_out``, a conv of G groups
``coef * kept_in / G * kept_out``. A head group prices the rows of q, k and v of its heads,
the columns of ``out_proj`` and the attention products (QKᵀ and AV: linear in the kept heads);
a "qkv_heads" group (HuggingFace-style attention) is priced as the Linear channels it is (q/k/v
rows and output projection columns, ``repeat`` = head size) plus its module's attention products.
For 0/1 gates this equals ``CostModel.count`` of the shrunk model; for gates in (0, 1) it is
the differentiable relaxation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..costs import CostModel, get_mha_fastpath, is_conv1d_style, set_mha_fastpath
from ..errors import PrunekitError
from .attention import gated_forward_hook
from .group_types import GroupSet
from .layer_kinds import is_linear, linear_in_out

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
        consumers: dict[str, list[tuple[int, torch.Tensor, int, int]]] = {}
        self._handles = []
        for group in groups:
            if group.kind == "heads":
                member = group.members[0]
                get = (lambda i: lambda: None if self.values is None else self.values[i])(group.index)
                self._handles.append(modules[member.module].register_forward_hook(
                    gated_forward_hook(get), with_kwargs=True))
                continue
            for member in group.layers("in"):
                idx = group.channels(member, torch.arange(group.size))
                consumers.setdefault(member.module, []).append((group.index, idx, member.repeat, group.segments))
        for name, entries in consumers.items():
            module = modules[name]
            if _is_depthwise(module):
                continue
            self._handles.append(module.register_forward_pre_hook(self._hook(module, entries)))
        self._fastpath, self._attached = get_mha_fastpath(), True
        set_mha_fastpath(False)

    def _hook(self, module: nn.Module, entries):
        linear = is_linear(module)                # nn.Linear or Conv1D-style: channels on the last axis
        width = linear_in_out(module)[0] if linear else module.in_channels

        def hook(mod, inputs):
            if self.values is None:
                return None
            x = inputs[0]
            scale = torch.ones(width, dtype=x.dtype, device=x.device)
            for index, idx, repeat, segments in entries:
                g = self.values[index].to(x.dtype)
                scale = scale.index_copy(0, idx.to(x.device), _spread(g, repeat, segments))
            shape = (1,) * (x.dim() - 1) + (width,) if linear else (1, width) + (1,) * (x.dim() - 2)
            return (x * scale.view(shape),) + tuple(inputs[1:])
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._attached:
            set_mha_fastpath(self._fastpath)
            self._attached = False
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _spread(g: torch.Tensor, repeat: int, segments: int) -> torch.Tensor:
    """Gate values laid out like ``ChannelGroup.channels``: each gate ``repeat`` times in a row,
    the whole block once per segment, (size * repeat * segments,)."""
    g = g.repeat_interleave(repeat) if repeat > 1 else g
    return g.repeat(segments) if segments > 1 else g


class GatedMacs:
    """MACs per example of the model with gates ``values``: ``macs(values)`` (differentiable).

    ``dense`` equals ``costs.macs``; ``minimum`` is the cost with one channel kept per group.
    """

    def __init__(self, model: nn.Module, groups: GroupSet, costs: CostModel):
        self.groups = groups
        modules = dict(model.named_modules())
        by_layer: dict[str, dict[str, list[tuple[int, int]]]] = {}
        self.terms = []   # (coef, dense_in, dense_out, in_groups, out_groups, in_divisor)
        handled = 0
        for group in groups:
            if group.kind == "heads":
                handled += self._head_terms(group, costs)
                continue
            if group.kind == "qkv_heads":
                handled += self._product_terms(group, costs)
            for member in group.members:
                if member.role in ("out", "in"):
                    by_layer.setdefault(member.module, {"out": [], "in": []})[member.role].append(
                        (group.index, member.repeat * group.segments))
        for layer in costs.weight_layers():
            entry = by_layer.get(layer.name)
            if entry is None:
                continue
            shape = layer.weight_shape
            coef = layer.macs_per_weight * math.prod(shape[2:])
            module = modules[layer.name]
            groups_of = getattr(module, "groups", 1)
            if _is_depthwise(module):
                self.terms.append((coef, shape[1], shape[0], [], entry["out"], 1))
            elif is_conv1d_style(module):    # Conv1D-style: weight (in, out)
                self.terms.append((coef, shape[0], shape[1], entry["in"], entry["out"], 1))
            else:
                self.terms.append((coef, shape[1] * groups_of, shape[0], entry["in"], entry["out"], groups_of))
            handled += layer.weight_macs
        self.fixed = costs.macs - handled
        self.dense = costs.macs
        ones = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        for v in ones:
            v[0] = 1.0
        self.minimum = float(self.macs(ones))

    def _head_terms(self, group, costs: CostModel) -> int:
        """Terms of one attention module's head group; returns the dense MACs they cover."""
        member = group.members[0]
        d, heads = member.repeat, group.size
        inner = heads * d
        in_proj = costs.layer(f"{member.module}.in_proj_weight")
        out_proj = costs.layer(f"{member.module}.out_proj")
        embed = in_proj.weight_shape[1]
        per_row = in_proj.weight_costs().view(3 * inner, embed)
        for chunk in per_row.split(inner):
            coef = int(chunk[0, 0])
            if not bool((chunk == coef).all()):
                raise AssertionError(f"{member.module}: projection rows of one kind cost different MACs")
            self.terms.append((coef, embed, inner, [], [(group.index, d)], 1))
        self.terms.append((out_proj.macs_per_weight, inner, out_proj.weight_shape[0], [(group.index, d)], [], 1))
        products = costs.layer(member.module).activation_macs if costs.has_layer(member.module) else 0
        self.terms.append((products / inner, 1, inner, [], [(group.index, d)], 1))
        return in_proj.weight_macs + out_proj.weight_macs + products

    def _product_terms(self, group, costs: CostModel) -> int:
        """The attention products (QKᵀ and AV, the activation MACs of module ``group.attention``) of
        a "qkv_heads" group, each head's share ``products / heads``; returns the dense MACs covered."""
        if not costs.has_layer(group.attention):
            return 0
        products = costs.layer(group.attention).activation_macs
        if products:
            self.terms.append((products / group.size, 1, group.size, [], [(group.index, 1)], 1))
        return products

    def macs(self, values: GateValues) -> torch.Tensor:
        """Total MACs (a 0-d tensor, float64 if the gates are) for gate ``values``."""
        return _total(self.terms, self.fixed, values)

    def macs_of_masks(self, masks: list[torch.Tensor]) -> int:
        """Exact integer MACs for boolean keep-masks."""
        return int(round(float(self.macs([m.to(torch.float64) for m in masks]))))


def _total(terms: list, fixed: float, values: GateValues) -> torch.Tensor:
    """``fixed`` + the sum over ``terms`` (coef, dense_in, dense_out, in_groups, out_groups, divisor)
    of ``coef * kept_in / divisor * kept_out``, each kept extent its dense one less the closed
    channels (``size - sum(g)``) of its groups times their repeat: a 0-d tensor (differentiable)."""
    closed = [g.numel() - g.sum() for g in values]
    total = torch.zeros((), dtype=values[0].dtype if values else torch.float64) + fixed
    for coef, dense_in, dense_out, in_groups, out_groups, divisor in terms:
        kept_in = dense_in - sum((closed[i] * r for i, r in in_groups), torch.zeros(()))
        kept_out = dense_out - sum((closed[i] * r for i, r in out_groups), torch.zeros(()))
        total = total + coef * kept_in / divisor * kept_out
    return total


class ParamsNotCountable(PrunekitError):
    """A model whose parameters per channel ``GatedParams`` cannot count (a layer kind it does not
    know, a weight shared between layers): a params budget cannot be cut to by channels."""


class GatedParams:
    """Parameters of the model with gates ``values``: ``params(values)`` (differentiable), counted
    like ``GatedMacs`` counts MACs, from the groups' members: a tensor keeps ``kernel elements x
    kept_in / G x kept_out`` entries (a Conv or Linear weight, a Conv1D-style weight stored (in, out);
    G its groups), ``kept_out`` (a bias,
    a BatchNorm's weight and bias), a depthwise conv's weight ``kernel elements x kept_out``; an
    attention head group the rows of q, k and v of its heads (weight and bias) and the columns of
    ``out_proj``. Every other parameter is ``fixed``. For 0/1 gates this is
    ``sum(p.numel() for p in shrink(...).parameters())`` (``pipeline._params_counter`` compares once).

    ``dense``: the model's parameters; ``minimum``: with one channel kept per group.
    Raises ``ParamsNotCountable`` for a group member it cannot count.
    """

    def __init__(self, model: nn.Module, groups: GroupSet):
        self.groups = groups
        modules = dict(model.named_modules())
        self.terms = []
        axes: dict[str, dict[str, list[tuple[int, int]]]] = {}
        covered, seen = 0, set()
        for group in groups:
            if group.kind == "heads":
                covered += self._head_terms(group, modules[group.members[0].module], seen)
                continue
            for member in group.members:
                module = modules[member.module]
                axis = "in" if member.role == "in" and not _is_depthwise(module) else "out"
                axes.setdefault(member.module, {"in": [], "out": []})[axis].append(
                    (group.index, member.repeat * group.segments))
        for name, entry in axes.items():
            module = modules[name]
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    raise ParamsNotCountable(f"{name}.{pname} is shared with another layer of a channel group")
                seen.add(id(p))
                self.terms.append(self._term(module, name, pname, p, entry))
                covered += p.numel()
        self.dense = sum(p.numel() for p in model.parameters())
        self.fixed = self.dense - covered
        ones = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
        for v in ones:
            v[0] = 1.0
        self.minimum = int(round(float(self.params(ones))))

    @staticmethod
    def _term(module: nn.Module, name: str, pname: str, p: torch.Tensor, entry: dict) -> tuple:
        ins, outs = entry["in"], entry["out"]
        if pname == "bias" or (isinstance(module, nn.modules.batchnorm._BatchNorm) and pname == "weight"):
            if p.dim() == 1:
                return (1, 1, p.shape[0], [], outs, 1)
        elif pname == "weight" and isinstance(module, nn.Linear) and p.dim() == 2:
            return (1, p.shape[1], p.shape[0], ins, outs, 1)
        elif pname == "weight" and is_conv1d_style(module):     # GPT-2's Conv1D: weight (in, out)
            return (1, p.shape[0], p.shape[1], ins, outs, 1)
        elif pname == "weight" and isinstance(module, nn.modules.conv._ConvNd):
            kernel = math.prod(p.shape[2:])
            if _is_depthwise(module):
                return (kernel, 1, p.shape[0], [], outs, 1)
            return (kernel, p.shape[1] * module.groups, p.shape[0], ins, outs, module.groups)
        raise ParamsNotCountable(f"{name}.{pname} ({type(module).__name__}) is not counted per channel")

    def _head_terms(self, group, module: nn.Module, seen: set) -> int:
        d = group.members[0].repeat
        inner, covered = group.size * d, 0
        for p in (module.in_proj_weight, module.in_proj_bias, module.out_proj.weight):
            if p is None:
                continue
            if id(p) in seen:
                raise ParamsNotCountable(f"{group.root}: a projection shared with another layer")
            seen.add(id(p))
            covered += p.numel()
        embed = module.in_proj_weight.shape[1]
        self.terms.append((1, embed, 3 * inner, [], [(group.index, 3 * d)], 1))
        if module.in_proj_bias is not None:
            self.terms.append((1, 1, 3 * inner, [], [(group.index, 3 * d)], 1))
        self.terms.append((1, inner, module.out_proj.weight.shape[0], [(group.index, d)], [], 1))
        return covered

    def params(self, values: GateValues) -> torch.Tensor:
        """Total parameters (a 0-d tensor, float64 if the gates are) for gate ``values``."""
        return _total(self.terms, self.fixed, values)

    def params_of_masks(self, masks: list[torch.Tensor]) -> int:
        """Exact integer parameters for boolean keep-masks."""
        return int(round(float(self.params([m.to(torch.float64) for m in masks]))))


@torch.no_grad()
def fold_gates(model: nn.Module, groups: GroupSet, values: GateValues) -> None:
    """Multiply each gate into the consumer weights it scales (in place; exact, consumers are linear).

    After this, the ungated model computes what the gated one did: a gated model whose gates
    are then replaced by 0/1 masks keeps the learned scale of the channels it keeps. A head's
    gate goes into its columns of ``out_proj``. A weight shared by several consumers of a group
    (``b.weight = a.weight``) is scaled once: each of their calls was gated once.
    """
    modules = dict(model.named_modules())
    for group in groups:
        g = values[group.index].detach()
        if group.kind == "heads":
            member = group.members[0]
            out_proj = modules[member.module].out_proj
            out_proj.weight *= g.repeat_interleave(member.repeat).to(out_proj.weight.dtype).view(1, -1)
            continue
        scaled: set[tuple[int, int]] = set()      # (weight, first channel) already scaled
        for member in group.layers("in"):
            module = modules[member.module]
            if _is_depthwise(module) or getattr(module, "pads_channels", False):
                continue      # a zero-pad shortcut has no weight: it passes kept channels unscaled
            if (id(module.weight), member.offset) in scaled:
                continue
            scaled.add((id(module.weight), member.offset))
            idx = group.channels(member, torch.arange(group.size)).to(module.weight.device)
            scale = _spread(g, member.repeat, group.segments).to(module.weight.dtype)
            if is_conv1d_style(module):    # Conv1D-style: inputs are rows
                module.weight[idx] *= scale.view(-1, 1)
                continue
            shape = (1, -1) + (1,) * (module.weight.dim() - 2)
            groups_of = getattr(module, "groups", 1)
            if groups_of > 1:                     # weight (out, in/G, ...): block s scales its outputs' inputs
                per = module.weight.shape[1]
                full = torch.ones(per * groups_of, dtype=scale.dtype, device=scale.device).index_copy(0, idx, scale)
                out_per = module.weight.shape[0] // groups_of
                for s in range(groups_of):
                    module.weight[s * out_per:(s + 1) * out_per] *= full[s * per:(s + 1) * per].view(shape)
            else:
                module.weight[:, idx] *= scale.view(shape)
