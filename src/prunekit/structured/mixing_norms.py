"""Norms in a channel group whose statistics may mix its channels: a LayerNorm/GroupNorm/RMSNorm
over the channel axis, a mean/var/std over it (torch.nn.RMSNorm's, a hand-written norm's), and norms
over an axis as long as the channels that the trace cannot place (``ChannelGroup.norm``)."""

from __future__ import annotations

import torch
from torch import nn


# the norm layers whose channels channel surgery cannot resize (BatchNorm it resizes): public, baselines reads it too
NORM_LAYERS = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if t is not None)


def _norm_mixes_channels(module: nn.Module, node, lengths: set[int]) -> bool:
    """Whether the norm ``module`` (LayerNorm, GroupNorm, RMSNorm; traced as torch-pruning's ``node``)
    surely normalises over the axis holding a group's channels, so that its statistics mix them (removing
    one changes the others), with or without affine parameters: a GroupNorm with fewer groups than
    channels (its channel axis is 1); a LayerNorm or RMSNorm whose ``normalized_shape`` (the trailing
    axes of its input) covers every axis that could hold the channels, those of the input's axes
    (the batch axis 0 aside) whose length is one of ``lengths`` (the group's channel count, and that
    times a flatten's repeat). False where that is not sure (no such axis, the input's shape unknown or
    different between calls, or an ambiguous axis left out: LayerNorm([H, W]) on (B, C, H, W) with
    C == H == W): the norm is then not named, and ``shrink.checked_groups``' numeric check judges the
    group (a norm over H, W alone mixes no channels, so the group is pruned)."""
    if isinstance(module, nn.GroupNorm):
        return module.num_groups < module.num_channels
    shape = getattr(node, "prunekit_input_shape", None)
    normalized = getattr(module, "normalized_shape", None)
    if not shape or normalized is None:
        return False
    normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    first = 0 if len(shape) == 1 else 1
    candidates = [axis for axis in range(first, len(shape)) if shape[axis] in lengths]
    return bool(candidates) and all(axis >= len(shape) - len(normalized) for axis in candidates)


# autograd ops of a norm's statistics (torch.nn.RMSNorm runs as pow, mean, rsqrt on the CPU; a hand-written
# RMSNorm or LayerNorm the same): torch-pruning reads them as elementwise, channel for channel
_STATISTICS = ("MeanBackward", "VarBackward", "StdBackward", "VarMeanBackward", "StdMeanBackward")


def _statistic_axes(grad_fn) -> tuple[tuple[int, ...], set[int]] | None:
    """(input shape, axes reduced) of a mean/var/std autograd op, None for another op or where
    its saved fields do not say."""
    if not type(grad_fn).__name__.startswith(_STATISTICS):
        return None
    shape = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if shape is None:
        saved = getattr(grad_fn, "_saved_self", None)
        shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else None
    if not shape:
        return None
    shape = tuple(int(v) for v in shape)
    dims = getattr(grad_fn, "_saved_dim", None)
    if dims is None:                                 # a mean of every element
        return shape, set(range(len(shape)))
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return shape, {(d - 2 ** 64 if d >= 2 ** 63 else d) % len(shape) for d in (int(v) for v in dims)}


def _channel_axes(shape: tuple, lengths: set[int]) -> list[int]:
    """The axes of an activation ``shape`` that could hold a group's channels (the batch axis 0 aside):
    those whose length is one of ``lengths``."""
    first = 0 if len(shape) == 1 else 1
    return [axis for axis in range(first, len(shape)) if shape[axis] in lengths]


def _owner(param: nn.Parameter, names: dict) -> nn.Module | None:
    """The module holding ``param`` as its own (``names``: module and parameter -> name), or None."""
    full = names.get(param)
    if not full:
        return None
    prefix = full.rpartition(".")[0]
    return next((m for m, n in names.items() if n == prefix and isinstance(m, nn.Module)), None)


def _statistic_module(node, names: dict) -> str:
    """The module whose forward ran the op ``node`` (the first module output reached from it, by a
    path that does not pass through that module's input: a module whose input the op made ran after
    it), in words: "norm (RMSNorm)"; "the model's forward" where none is found (an op in the model's
    own forward, or in a ScriptModule's)."""
    seen, todo = set(), [(node, frozenset())]
    while todo:
        current, path = todo.pop(0)
        if id(current) in seen or len(seen) > 64:
            continue
        seen.add(id(current))
        module = getattr(current, "prunekit_made_by", None)
        if module is not None and not (getattr(current, "prunekit_made_from", frozenset()) & path):
            name = names.get(module, "")
            return f"{name} ({type(module).__name__})" if name else "the model's forward"
        path = path | {id(getattr(current, "grad_fn", None))}
        todo.extend((following, path) for following in getattr(current, "outputs", ()))
    return "the model's forward"


def _normalises_its_input(node, depth: int = 6) -> bool:
    """Whether the statistic ``node`` (a mean/var/std) is combined again with the tensor it was taken
    of (x - mean, x * rsqrt(mean(x**2))), a norm's use, before any layer with weights: a
    squeeze-and-excitation block's spatial mean feeds its Linear layers instead."""
    sources, frontier = set(), list(getattr(node, "inputs", ()))
    for _ in range(3):                          # its input, and what that was made of (x**2 of x)
        sources |= {id(n) for n in frontier}
        frontier = [i for n in frontier if not _has_weights(n) for i in getattr(n, "inputs", ())]
    seen, todo = {id(node)}, [(n, 1) for n in getattr(node, "outputs", ())]
    while todo:
        current, level = todo.pop(0)
        if id(current) in seen or level > depth:
            continue
        seen.add(id(current))
        if any(id(i) in sources for i in getattr(current, "inputs", ())):
            return True
        if not _has_weights(current):
            todo.extend((n, level + 1) for n in getattr(current, "outputs", ()))
    return False


def _has_weights(node) -> bool:
    module = getattr(node, "module", None)
    return isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False))


def _statistic_over_channels(item, names: dict, size: int) -> str | None:
    """Where ``item`` of a group of ``size`` channels is a mean/var/std (a norm's statistic: torch.nn.RMSNorm's,
    a hand-written one's) over every axis that could hold the channels, which torch-pruning reads as
    elementwise though the shrunk model's statistic differs from the gated one's: its module in
    words, with the op ("norm (RMSNorm), whose forward takes a mean"; "a mean taken in the model's
    forward"); else None."""
    axes = _statistic_axes(getattr(item.dep.target, "grad_fn", None))
    if axes is None:
        return None
    shape, reduced = axes
    candidates = _channel_axes(shape, {size, len(item.idxs)})
    if not candidates or not all(axis in reduced for axis in candidates):
        return None
    op = type(item.dep.target.grad_fn).__name__.split("Backward")[0].lower()
    where = _statistic_module(item.dep.target, names)
    if where == "the model's forward":
        return f"a {op} taken in the model's forward"
    return f"{where}, whose forward takes a {op}"


def _ambiguous_norm(tp_group, size: int, names: dict) -> str | None:
    """A norm in ``tp_group`` (a LayerNorm/RMSNorm module, or a mean/var/std with kept dims: a
    hand-written one's) whose normalised axes hold one but not every axis as long as the channels, in words
    ("norm (LayerNorm)"), else None: the trace cannot tell whether it normalises over the channels."""
    for item in tp_group.items:
        target = item.dep.target
        module = target.module
        lengths = {size, len(item.idxs)}
        if isinstance(module, NORM_LAYERS) and not isinstance(module, nn.GroupNorm):
            shape = getattr(target, "prunekit_input_shape", None)
            normalized = getattr(module, "normalized_shape", None)
            if not shape or normalized is None:
                continue
            count = 1 if isinstance(normalized, int) else len(tuple(normalized))
            reduced = set(range(len(shape) - count, len(shape)))
            described = f"{names.get(module, '?')} ({type(module).__name__})"
        elif (axes := _statistic_axes(getattr(target, "grad_fn", None))) is not None and \
                getattr(target.grad_fn, "_saved_keepdim", False) and \
                _normalises_its_input(target):     # kept dims and used on its input: a norm's, not a pooling's (SE)
            shape, reduced = axes
            described = _statistic_module(target, names)
        else:
            continue
        candidates = _channel_axes(tuple(shape), lengths)
        if any(axis in reduced for axis in candidates) and not all(axis in reduced for axis in candidates):
            return described
    return None
