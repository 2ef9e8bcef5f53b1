"""A residual add onto a concatenation (``y = x + torch.cat([a(x), b(x)], 1)``): its group traced
again from the add over all its channels (``_widened``) and cut into parts at the concatenations'
boundaries (``_concat_parts``), each a group of slices of its layers' channels."""

from __future__ import annotations

import torch_pruning as tp
from torch import nn

from .dependency_trace import _EndlessGroup
from .group_types import Member
from .layer_kinds import _BN, _CONV, _size_of, is_linear


def _added_concatenation(tp_group, names: dict) -> str | None:
    """The branches ("a.0 and b.0": the layer making each input) of a concatenation added to a
    group's channels (a residual add onto ``torch.cat``: each branch's output channels are part of
    the sum's), or None where no concatenation and add both lie in ``tp_group``."""
    concat = next((item.dep.target for item in tp_group.items
                   if isinstance(item.dep.target.module, tp.ops._ConcatOp) and _feeds_an_add(item.dep.target)), None)
    if concat is None:
        return None
    parts = []
    for node in concat.inputs:
        for _ in range(64):             # back through BatchNorm, activations, ops to the layer that made it
            module = node.module
            if isinstance(module, (*_CONV, nn.Linear)) or is_linear(module) or len(node.inputs) != 1:
                break
            node = node.inputs[0]
        parts.append(names.get(node.module, "a branch"))
    if not parts:
        return "branches"
    return f"{', '.join(parts[:-1])} and {parts[-1]}" if len(parts) > 1 else parts[0]


def _feeds_an_add(node) -> bool:
    """Whether torch-pruning graph ``node``'s output reaches an elementwise add before any layer
    (Conv/Linear) takes it: e.g. ``x + torch.cat([...])``, not ``conv(torch.cat([...]))``."""
    return _add_fed_by(node) is not None


def _add_fed_by(node):
    """The first elementwise add (a torch-pruning graph node) that ``node``'s output reaches before
    any layer (Conv/Linear) takes it, or None."""
    seen, todo = set(), list(node.outputs)
    while todo and len(seen) < 256:
        nxt = todo.pop()
        if id(nxt) in seen:
            continue
        seen.add(id(nxt))
        if type(getattr(nxt, "grad_fn", None)).__name__.startswith("AddBackward"):
            return nxt
        module = nxt.module
        if not (isinstance(module, (*_CONV, nn.Linear)) or is_linear(module)):
            todo.extend(nxt.outputs)
    return None


# A residual add onto a concatenation (``y = x + torch.cat([a(x), b(x)], 1)``, Inception/DenseNet-style
# or split-transform-merge blocks): torch-pruning traces it from each branch layer, and each such group
# holds only the branch's share of x's channels (x's producer "out" at an offset, part of its width).
# Such groups are traced again from the add over all its channels (``_widened``), then cut into parts
# at every boundary of every concatenation in the trace (``_concat_parts``: two concatenations added
# with different splits are cut at the boundaries of both, their intersection): each part is a
# ChannelGroup whose members are slices (``offset``, ``size``) of their layers' channels, e.g. with
# C_a = 3, C_b = 5 the parts [0, 3) = {x's producer out at 0, a out at 0, consumers in at 0, ...} and
# [3, 8) = {x's producer out at 3, b out at 0, consumers in at 3, ...}. Channel j of a part is channel
# offset + j of each member, so removing it removes x's channel and the matching channel of the branch
# that holds it. Every part keeps at least one channel (as every group does), so no branch ever loses
# all its outputs (torch has no Conv with 0 output channels); a layer whose output channels the parts
# do not cover whole, or a split (chunk) in the trace, leaves them all dense with the reason.
_SPLITS = tuple(t for t in (getattr(tp.ops, "_SplitOp", None), getattr(tp.ops, "_UnbindOp", None)) if t is not None)


class _Item:
    """One member entry of a part of a concatenation-add group, shaped like torch-pruning's group items."""

    def __init__(self, dep, idxs: list[int], root_idxs: list[int]):
        self.dep, self.idxs, self.root_idxs = dep, idxs, root_idxs


class _Part:
    """Channels ``[start, start + size)`` of a residual add onto a concatenation, as a torch-pruning-like
    group (``items``, indexable) whose root channels are counted from ``start``."""

    def __init__(self, items: list[_Item], start: int, size: int):
        self.items, self.start, self.size = items, start, size

    def __getitem__(self, i):
        return self.items[i]


def _concat_add_node(tp_group):
    """The add node of a residual add onto a concatenation in ``tp_group``, or None."""
    for item in tp_group.items:
        if isinstance(item.dep.target.module, tp.ops._ConcatOp):
            add = _add_fed_by(item.dep.target)
            if add is not None:
                return add
    return None


def _width_into(node) -> int | None:
    """The channels of what add ``node`` sums: a concatenation's total, a layer's outputs or a
    BatchNorm's features, found back through elementwise ops; None where none is found."""
    todo, seen = list(node.inputs), set()
    while todo and len(seen) < 256:
        nxt = todo.pop(0)
        if id(nxt) in seen:
            continue
        seen.add(id(nxt))
        module = nxt.module
        if isinstance(module, tp.ops._ConcatOp) and module.offsets:
            return int(module.offsets[-1])
        if isinstance(module, _BN):
            return module.num_features
        if isinstance(module, _CONV) or is_linear(module):
            return _size_of(module)
        if isinstance(module, tp.ops._ElementWiseOp):
            todo.extend(nxt.inputs)
    return None


def _widened(graph, groups: list) -> list:
    """``groups`` with each group that holds a residual add onto a concatenation replaced by the
    group traced from that add over all its channels (once per add; its ``concat_add_width`` set to
    their count); a group whose add's width is not found, or whose trace does not end, stays as it is
    (and is left dense by ``_members``, naming the concatenation)."""
    out, done = [], set()
    for group in groups:
        add = _concat_add_node(group)
        width = _width_into(add) if add is not None else None
        if width is None:
            out.append(group)
            continue
        if id(add) in done:
            continue
        pruner = graph.get_pruner_of_module(add.module)
        try:
            wide = graph.get_pruning_group(add.module, pruner.prune_out_channels, list(range(width)))
        except _EndlessGroup:
            out.append(group)
            continue
        done.add(id(add))
        wide.concat_add_width = width
        out.append(wide)
    return out


def _concat_parts(tp_group, width: int) -> tuple[list[_Part], str | None]:
    """The parts of a group traced from a residual add over its ``width`` channels: cut wherever
    some item's channels stop running in step with the add's (a concatenation's boundary, where a
    branch starts or ends), so that in each part every item holds a run of consecutive channels.
    ([], reason) where the trace cannot be cut so (a split or chunk in it, an unmapped item)."""
    cuts, paired = {0, width}, []
    for item in tp_group.items:
        if _SPLITS and isinstance(item.dep.target.module, _SPLITS):
            return [], "a split or chunk of the channels lies in it"
        if isinstance(item.dep.target.module, tp.ops._ConcatOp) and not item.dep.target.module.offsets:
            return [], "the dependency analysis did not find the sizes of a concatenation in it"
        idxs = [int(i) for i in item.idxs]
        roots = getattr(item, "root_idxs", None)
        if roots is None or len(roots) != len(idxs) or None in roots:     # None: a repeat (repeat_interleave)
            return [], "an operation in it does not map channels one to one"
        pairs = sorted(zip((int(r) for r in roots), idxs))
        if not pairs:
            continue
        if pairs[0][0] < 0 or pairs[-1][0] >= width:
            return [], "an operation in it maps channels outside the add's"
        paired.append((item, pairs))
        if len({r for r, _ in pairs}) != len(pairs):
            continue                      # a flatten (channel x positions) repeats channels: no cut of its own
        cuts.update((pairs[0][0], pairs[-1][0] + 1))
        for (r0, i0), (r1, i1) in zip(pairs, pairs[1:]):
            if r1 != r0 + 1 or i1 != i0 + 1:
                cuts.update((r0 + 1, r1))
    bounds = sorted(cuts)
    parts = []
    for start, end in zip(bounds, bounds[1:]):
        items = [_Item(item.dep, [i for r, i in pairs if start <= r < end], [r - start for r, _ in pairs
                                                                               if start <= r < end])
                 for item, pairs in paired]
        parts.append(_Part([i for i in items if i.idxs], start, end - start))
    return parts, None


def _uncovered_outputs(found: list, names: dict) -> str | None:
    """Why the parts ``found`` ((part, members)) cannot be pruned: a Conv/Linear whose output
    channels they hold only some of (the rest would be neither kept nor followed); None if none."""
    modules = {name: module for module, name in names.items() if isinstance(module, nn.Module)}
    held: dict[str, int] = {}
    for part, members in found:
        for m in members:
            module = modules.get(m.module)
            if m.role == "out" and (isinstance(module, _CONV) and module.groups == 1 or is_linear(module)):
                held[m.module] = held.get(m.module, 0) + part.size
    for name, count in held.items():
        if count != _size_of(modules[name]):
            return f"{name}'s {_size_of(modules[name])} output channels reach the add as {count}"
    return None


def _part_root(part: _Part, members: list[Member], names: dict) -> str:
    """A part's root: the Conv/Linear whose output channels are exactly the part (a branch), else its
    first Conv/Linear "out" member."""
    modules = {name: module for module, name in names.items() if isinstance(module, nn.Module)}
    outs = [m for m in members if m.role == "out" and (isinstance(modules.get(m.module), _CONV)
                                                       or is_linear(modules.get(m.module)))]
    whole = [m for m in outs if m.offset == 0 and _size_of(modules[m.module]) == part.size]
    return (whole or outs or members)[0].module
