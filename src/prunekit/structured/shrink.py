"""Remove closed channels physically.

``shrink`` copies the model and cuts the closed channels of every group out of each member
layer: Conv (plain, depthwise, grouped: each block keeps the same positions) and Linear weights
and biases (a Conv1D-style layer's weight, stored (in, out), is cut on the transposed axes),
BatchNorm parameters and statistics, the channel map of a zero-pad shortcut
(its copies follow the kept input channels, closed ones and pads are zero); a head group replaces its
``nn.MultiheadAttention`` by a ``SlimAttention`` holding the kept heads; a "qkv_heads" group
(HuggingFace-style attention) cuts its q/k/v rows and output projection columns as Linear
channels and writes the kept head count into the attention module (``attention.set_heads``). The result is an
ordinary ``nn.Module`` with smaller layers, computing what the gated model with 0/1 gates
computes. ``zoo.layout`` records and rebuilds its per-layer channel counts for saving.

``checked_groups`` makes sure of that before any work: torch-pruning reads some operations as
elementwise that move channels (a ShuffleNet channel shuffle, view + transpose + reshape), so the
layers of such a group would lose channels at different positions; it removes random channels
of every group once, compares with the gates, and leaves the groups that disagree dense.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..costs import is_conv1d_style
from ..errors import PrunekitError
from ..memory_format import memory_format
from ..zoo.layout import mark_shrunk, remember_dense, remember_dense_all, tied_parameters
from .attention import set_heads, slim_copy
from .gates import GateHooks
from .group_types import GroupSet
from .left_dense import no_group_error

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm


def shrink(model: nn.Module, groups: GroupSet, masks: list[torch.Tensor], example_input: torch.Tensor
           ) -> nn.Module:
    """A copy of ``model`` without the channels whose mask is False (masks in group order).

    ``example_input`` is kept for the callers' convenience (the surgery needs no trace).
    """
    if len(masks) != len(groups):
        raise PrunekitError(f"got {len(masks)} masks for {len(groups)} channel groups")
    for group, mask in zip(groups, masks):
        if mask.numel() != group.size:
            raise PrunekitError(f"mask of {group} has {mask.numel()} entries")
        if not bool(mask.any()):
            raise PrunekitError(f"{group} would lose every channel; keep at least one")
    small = copy.deepcopy(model)
    remember_dense_all(small)          # before any cut: the layers left as they are record their own counts
    modules = dict(small.named_modules())
    ties = tied_parameters(small)
    removed: dict[tuple[str, str], set[int]] = {}
    heads: dict[str, torch.Tensor] = {}
    head_counts: dict[str, int] = {}
    for group, mask in zip(groups, masks):
        closed = torch.nonzero(~mask.bool().cpu()).flatten()
        if closed.numel() == 0:
            continue
        if group.kind == "heads":
            heads[group.members[0].module] = mask.bool().cpu()
            continue
        if group.kind == "qkv_heads":
            head_counts[group.attention] = int(mask.sum())
        for member in group.members:
            axis = "in" if member.role == "in" and not _is_depthwise(modules[member.module]) else "out"
            removed.setdefault((member.module, axis), set()).update(group.channels(member, closed).tolist())
    with torch.no_grad():
        for (name, axis), channels in removed.items():
            module = modules[name]
            if getattr(module, "pads_channels", False):     # a zero-pad shortcut: rewrite its channel map
                (module.remove_inputs if axis == "in" else module.remove_outputs)(sorted(channels))
                continue
            _cut(module, axis, sorted(channels), name)
        for holders in ties:           # b.weight = a.weight: cut alike, they share the cut tensor again
            first = getattr(modules[holders[0][0]], holders[0][1])
            if any(_axes_cut(removed, name, attr) != _axes_cut(removed, *holders[0])
                   or getattr(modules[name], attr).shape != first.shape for name, attr in holders[1:]):
                raise PrunekitError(f"{_tie_text(holders)}: the cut would untie them")
            for name, attr in holders[1:]:
                setattr(modules[name], attr, first)
        for name, keep in heads.items():
            _replace(small, name, slim_copy(modules[name], keep))
        for name, kept in head_counts.items():
            set_heads(modules[name], kept)
    return small


MISMATCH = ("removing its channels does not compute what closing them computes (an operation between its "
            "layers moves or mixes channels, e.g. a channel shuffle, or places them where the dependency analysis "
            "did not map them, e.g. a concatenation after the network's own input): kept dense")


HEADS_MISMATCH = ("attention heads kept: with heads removed (their q/k/v rows and output projection columns cut, "
                  "the module's head count lowered) this attention module does not compute what closing them "
                  "computes (its forward reads the head count or width from elsewhere, e.g. its config)")


def checked_groups(model: nn.Module, groups: GroupSet, example_input: torch.Tensor) -> GroupSet:
    """``groups`` less those whose shrunk model differs from the gated one, which join ``skipped``.

    Closes about half the channels of every group (a fixed seed: the same groups every run) on
    an input of ``example_input``'s shape (random if it is floating point; (1, ...) is enough)
    and compares the outputs; if they differ, each group is tried alone to find the culprits.
    Refuses (``PrunekitError``) a model left without a group.
    """
    groups = _keeping_ties(model, groups)
    gen = torch.Generator().manual_seed(0)
    x = example_input
    if x.is_floating_point():
        x = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
    masks = [_half_closed(group.size, gen) for group in groups]
    was_training = model.training
    model.eval()
    try:
        if _agrees(model, groups, masks, x):
            return groups
        full = [torch.ones(group.size, dtype=torch.bool) for group in groups]
        bad = {group.index for group in groups
               if not _agrees(model, groups, [masks[i] if i == group.index else full[i] for i in range(len(full))], x)}
    finally:
        model.train(was_training)
    if not bad:
        raise PrunekitError("the model with channels removed does not compute what its gated form computes, "
                            "though each channel group alone does: use a weights method (e.g. --method falcon)")
    skipped = list(groups.skipped) + [(group.root, _mismatch(group)) for group in groups if group.index in bad]
    kept = [dataclasses.replace(group, index=i) for i, group in
            enumerate(group for group in groups if group.index not in bad)]
    if not kept:
        raise no_group_error(skipped)
    return GroupSet(kept, skipped)


def _tie_text(holders: list[tuple[str, str]]) -> str:
    """"b.weight = a.weight (one tensor, tied)" for the holders of a tied parameter."""
    names = [f"{name}.{attr}" if name else attr for name, attr in holders]
    return f"{' = '.join(names[1:])} = {names[0]} (one tensor, tied)"


def _axes(module: nn.Module, member) -> str:
    return "in" if member.role == "in" and not _is_depthwise(module) else "out"


def _axes_cut(removed: dict, name: str, attr: str) -> tuple:
    """The channels ``shrink`` removes from parameter ``attr`` of module ``name``: its "out" axis, and
    its "in" axis for a weight (a bias has outputs only)."""
    axes = ("out",) if attr != "weight" else ("out", "in")
    return tuple(sorted(removed.get((name, axis), ())) for axis in axes)


def _keeping_ties(model: nn.Module, groups: GroupSet) -> GroupSet:
    """``groups`` less those that would cut the holders of a tied parameter (``tied_parameters``) on
    one axis differently, which would untie it; those join ``skipped``, kept dense, naming the tie.
    Holders cut by the same groups on every axis are cut alike and share the cut tensor."""
    ties = tied_parameters(model)
    if not ties:
        return groups
    modules = dict(model.named_modules())
    cutting: dict[tuple[str, str], set[int]] = {}
    for group in groups:
        if group.kind == "heads":
            continue
        for member in group.members:
            cutting.setdefault((member.module, _axes(modules[member.module], member)), set()).add(group.index)
    bad: dict[int, str] = {}
    for holders in ties:
        for axis in (("out",) if holders[0][1] != "weight" else ("out", "in")):
            cuts = [frozenset(cutting.get((name, axis), ())) for name, _ in holders]
            if len(set(cuts)) > 1:
                why = (f"{_tie_text(holders)}: a cut here would cut their {axis}puts differently, which channel "
                       "surgery cannot resize without untying them: kept dense")
                for index in frozenset().union(*cuts):
                    bad.setdefault(index, why)
    if not bad:
        return groups
    skipped = list(groups.skipped) + [(group.root, bad[group.index]) for group in groups if group.index in bad]
    kept = [dataclasses.replace(group, index=i) for i, group in
            enumerate(group for group in groups if group.index not in bad)]
    if not kept:
        raise no_group_error(skipped)
    return GroupSet(kept, skipped)


def _mismatch(group) -> str:
    """Why ``group`` failed the check: its head count, a split of its width into heads, a norm over
    an axis as long as its channels (``ChannelGroup.norm``), or MISMATCH."""
    if group.kind == "qkv_heads":
        return HEADS_MISMATCH
    if group.split is not None:
        heads, size = group.split
        return (f"removing its channels does not compute what closing them computes: its {heads * size} channels "
                f"are split into {heads} heads of {size} by a reshape (e.g. view(B, T, {heads}, {size}), hand-written "
                "multi-head attention), so they cannot shrink channel by channel: kept dense; whole heads are removed "
                "from nn.MultiheadAttention and HuggingFace-style attention modules")
    if group.norm is not None:
        return (f"removing its channels does not compute what closing them computes: it passes {group.norm}, a norm "
                "over an axis as long as its channels, which the dependency analysis could not tell from the "
                "channel axis; its statistics mix the channels here (removing one changes the others): kept dense")
    return MISMATCH


def _half_closed(size: int, gen: torch.Generator) -> torch.Tensor:
    """A keep-mask (size,) with about half the channels closed, at least one kept and, if
    ``size`` > 1, at least one closed."""
    mask = torch.rand(size, generator=gen) < 0.5
    mask[int(torch.randint(size, (1,), generator=gen))] = True
    if size > 1 and bool(mask.all()):
        mask[int(torch.randint(size, (1,), generator=gen))] = False
    return mask


@torch.no_grad()
def _agrees(model: nn.Module, groups: GroupSet, masks: list[torch.Tensor], x: torch.Tensor) -> bool:
    """True if the model shrunk by ``masks`` gives the gated model's outputs on ``x``, to 1e-4 of
    their scale (1e-2 below float32); False also if the surgery or the shrunk model fails."""
    with GateHooks(model, groups) as hooks:
        hooks.values = [mask.to(device=x.device, dtype=torch.float32) for mask in masks]
        gated = _tensors(model(x))
    try:
        small = _tensors(shrink(model, groups, masks, x)(x))
    except (RuntimeError, AssertionError, PrunekitError):   # e.g. widths that no longer fit
        return False
    rel = 1e-4 if all(t.dtype in (torch.float32, torch.float64) for t in gated) else 1e-2
    for a, b in zip(gated, small):
        a, b = a.detach().float(), b.detach().float()
        if a.shape != b.shape or float((a - b).abs().max()) > rel * float(a.abs().max()):
            return False
    return len(gated) == len(small)


def _tensors(output) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, or a tuple, list, dict or dataclass of them)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):      # a plain @dataclass: its fields
        return [t for f in dataclasses.fields(output) for t in _tensors(getattr(output, f.name))]
    return []


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, _CONV) and module.groups > 1 and module.groups == module.in_channels == module.out_channels


def _keep(extent: int, closed: list[int]) -> torch.Tensor:
    keep = torch.ones(extent, dtype=torch.bool)
    keep[closed] = False
    return torch.nonzero(keep).flatten()


def _cut(module: nn.Module, axis: str, closed: list[int], name: str) -> None:
    """Remove channels ``closed`` from ``module``'s ``axis`` ("out": outputs/features, "in": inputs),
    marking it shrunk (``zoo.layout.mark_shrunk``: ``save_model`` records its model's layout) and
    keeping its counts before the first cut (``zoo.layout.remember_dense``: the layout records them).
    Each new parameter keeps its old one's ``requires_grad`` (a frozen layer stays frozen), and a conv
    weight its memory format (``memory_format``: channels-last stays channels-last)."""
    frozen = {attr for attr, p in module.named_parameters(recurse=False) if not p.requires_grad}
    _cut_tensors(module, axis, closed, name)
    for attr, p in module.named_parameters(recurse=False):
        if attr in frozen:
            p.requires_grad_(False)


def _cut_tensors(module: nn.Module, axis: str, closed: list[int], name: str) -> None:
    remember_dense(module)
    mark_shrunk(module)
    if isinstance(module, _BN):
        keep = _keep(module.num_features, closed)
        for attr in ("weight", "bias"):
            if getattr(module, attr) is not None:
                setattr(module, attr, nn.Parameter(getattr(module, attr)[keep].clone()))
        for attr in ("running_mean", "running_var"):
            if getattr(module, attr) is not None:
                setattr(module, attr, getattr(module, attr)[keep].clone())
        module.num_features = keep.numel()
        return
    if is_conv1d_style(module):     # Conv1D-style: weight (in, out)
        if axis == "out":
            keep = _keep(module.weight.shape[1], closed)
            module.weight = nn.Parameter(module.weight[:, keep].clone())
            if getattr(module, "bias", None) is not None:
                module.bias = nn.Parameter(module.bias[keep].clone())
            module.nf = keep.numel()
        else:
            keep = _keep(module.weight.shape[0], closed)
            module.weight = nn.Parameter(module.weight[keep].clone())
            if hasattr(module, "nx"):
                module.nx = keep.numel()
        return
    if isinstance(module, nn.Linear):
        if axis == "out":
            keep = _keep(module.out_features, closed)
            module.weight = nn.Parameter(module.weight[keep].clone())
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias[keep].clone())
            module.out_features = keep.numel()
        else:
            keep = _keep(module.in_features, closed)
            module.weight = nn.Parameter(module.weight[:, keep].clone())
            module.in_features = keep.numel()
        return
    if not isinstance(module, _CONV):
        raise PrunekitError(f"cannot remove channels of {name} ({type(module).__name__})")
    depthwise = _is_depthwise(module)
    if axis == "out" or depthwise:
        keep = _keep(module.out_channels, closed)
        module.weight = nn.Parameter(module.weight[keep].clone(memory_format=memory_format(module.weight)))
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias[keep].clone())
        module.out_channels = keep.numel()
        if depthwise:
            module.in_channels = module.groups = keep.numel()
        return
    keep = _keep(module.in_channels, closed)
    per = module.in_channels // module.groups
    local = keep[keep < per]                   # every block keeps the same positions
    if local.numel() * module.groups != keep.numel() or not all(
            torch.equal(keep[(keep >= s * per) & (keep < (s + 1) * per)] - s * per, local)
            for s in range(module.groups)):
        raise AssertionError(f"{name}: the kept input channels differ between its {module.groups} groups")
    module.weight = nn.Parameter(module.weight[:, local].clone(memory_format=memory_format(module.weight)))
    module.in_channels = keep.numel()


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
