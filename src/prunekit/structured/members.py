"""A traced torch-pruning group turned into our members (``Member``) and segment count, or the
reason it cannot be pruned (``_members``)."""

from __future__ import annotations

from torch import nn

from .concat_add import _added_concatenation
from .dependency_trace import _is_pad_layer, _prunes_out_channels
from .group_types import Member
from .layer_kinds import _BN, _CONV, _size_of, is_linear, linear_in_out
from .mixing_norms import NORM_LAYERS, _norm_mixes_channels, _owner, _statistic_over_channels


_NO_CONSUMER = "reaches the network output (no consuming layer)"


def _members(tp_group, names: dict, size: int | None = None, sliced: bool = False
             ) -> tuple[list[Member], int, str | None]:
    """Our members of a torch-pruning group and its segment count, or a reason why it cannot be pruned.

    ``size``: the group's channels (default: the root layer's outputs); ``sliced``: a part of a
    residual add onto a concatenation (``_concat_parts``), whose "out" members may hold a slice
    (``offset``, ``size``) of their layer's output channels, the other parts holding the rest."""
    root_module = tp_group[0].dep.target.module
    size = _size_of(root_module) if size is None else size
    members: list[Member] = []
    segments = 1
    has_consumer = False
    for item in tp_group.items:            # first: a norm's statistic over the channels (named by its module)
        if (said := _statistic_over_channels(item, names, size)) is not None:
            return [], 1, (f"touches {said} over the channel axis, which mixes its channels (a norm's "
                           "statistics, as torch.nn.RMSNorm's or a hand-written RMSNorm's: removing one changes the "
                           "others), so channel surgery cannot resize it: kept dense")
    for item in tp_group.items:
        dep, idxs = item.dep, [int(i) for i in item.idxs]
        roots = getattr(item, "root_idxs", None)
        if roots is not None and None in roots:    # a repeat (repeat_interleave, expand): no root channel
            return [], 1, (f"its channels reach {names.get(dep.target.module, 'a layer')} through an operation that "
                           "repeats them (repeat_interleave, expand), which the dependency analysis cannot map "
                           "channel by channel: kept dense")
        if roots is not None and len(roots) == len(idxs):
            # torch-pruning's map is root channel -> member channel; a flatten read backwards hands
            # the member's channels over as a set (any order), so they are put in root order here
            idxs = [i for _, i in sorted(zip((int(r) for r in roots), idxs))]
        module = dep.target.module
        grad_name = type(dep.target.grad_fn).__name__ if getattr(dep.target, "grad_fn", None) else ""
        pads = getattr(module, "pads_channels", False) and _is_pad_layer(dep)
        if not pads and ("ConstantPadNd" in grad_name or getattr(module, "pads_channels", False)):
            return [], 1, "passes through a zero-pad (option-A) shortcut: block outputs kept dense"
        if isinstance(module, nn.Parameter):     # used bare in forward, outside any layer
            if isinstance(owner := _owner(module, names), NORM_LAYERS):     # torch.nn.RMSNorm's weight
                return [], 1, (f"touches {names.get(owner, '?')} ({type(owner).__name__}), whose channels channel "
                               "surgery cannot resize: kept dense")
            return [], 1, f"touches parameter {names.get(module, '?')} outside a Conv/Linear/BatchNorm layer"
        if not isinstance(module, (*_CONV, nn.Linear, _BN)) and not pads and not is_linear(module):
            if isinstance(module, NORM_LAYERS) and _norm_mixes_channels(module, dep.target, {size, len(idxs)}):
                return [], 1, (f"touches {names.get(module, type(module).__name__)} ({type(module).__name__}), a norm "
                               "whose statistics mix its channels (removing one changes the others), so channel "
                               "surgery cannot resize it: kept dense")
            if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)) \
                    or isinstance(module, (nn.MultiheadAttention, nn.GroupNorm)):    # GroupNorm: its num_channels
                return [], 1, (f"touches {names.get(module, type(module).__name__)} ({type(module).__name__}), "
                               "whose channels channel surgery cannot resize: kept dense")
            continue
        name = names[module]
        out_fn = _prunes_out_channels(dep)
        if pads:                                   # a zero-pad shortcut handed to torch-pruning as a layer
            role = "out" if out_fn else "in"
            extent = module.out_channels if out_fn else module.in_channels
        elif isinstance(module, _BN):
            role, extent = "bn", module.num_features
        elif out_fn:
            role, extent = "out", _size_of(module)
        else:
            role, extent = "in", module.in_channels if isinstance(module, _CONV) else linear_in_out(module)[0]
            has_consumer = True
        if isinstance(module, _CONV) and module.groups > 1:
            depthwise = module.groups == module.in_channels == module.out_channels
            if depthwise:
                if role == "in":
                    role = "out"           # a depthwise conv's input channel is its output channel
            elif segments not in (1, module.groups):
                return [], 1, f"touches grouped convs of different groups ({segments}, {module.groups} at {name})"
            else:
                segments = module.groups
        if len(idxs) == 0 or len(idxs) % size:
            if (branches := _added_concatenation(tp_group, names)) is not None:
                return [], 1, (f"its {size} channels reach {name} as {len(idxs)}: a concatenation of {branches} "
                               f"is added to them (x + torch.cat([...])), each branch holding part of the "
                               "channels, which channel pruning does not follow (it does a concatenation a layer "
                               "consumes): kept dense")
            return [], 1, (f"its {size} channels reach {name} as {len(idxs)} (an operation between them splits, "
                           "halves or merges channels, e.g. chunk or GLU): kept dense")
        repeat = len(idxs) // size
        offset = idxs[0]
        if idxs != list(range(offset, offset + len(idxs))) or offset + len(idxs) > extent:
            return [], 1, (f"its {size} channels reach {name} ({type(module).__name__}) reordered or only in part "
                           "(an operation between them, e.g. a channel shuffle, index_select or a reshape across "
                           "the channel axis, moves channels), so they cannot be followed: kept dense; to prune "
                           "them make that operation keep each channel in place, or exclude the layer")
        if repeat > 1 and role != "in":
            return [], 1, f"{name} repeats channels on its {role} axis"
        if role == "out" and extent != size and not sliced:   # BatchNorm may see the group at an offset (after a concat)
            if (branches := _added_concatenation(tp_group, names)) is not None:
                return [], 1, (f"{name} has {extent} channels where the group has {size}: a concatenation of "
                               f"{branches} is added to {name}'s output (x + torch.cat([...])), each branch "
                               "holding part of its channels, which channel pruning does not follow (it does a "
                               "concatenation a layer consumes): kept dense")
            return [], 1, f"{name} has {extent} channels where the group has {size}"
        member = Member(name, role, offset, repeat)
        if member not in members:
            members.append(member)
    if not has_consumer:
        return [], 1, _NO_CONSUMER
    if segments > 1:
        if size % segments or any(m.repeat > 1 for m in members):
            return [], 1, f"{size} channels do not split into the {segments} blocks of a grouped conv"
    return members, segments, None
