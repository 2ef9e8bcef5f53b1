"""Channel groups: sets of coupled channels that must be kept or removed together.

An adapter over torch-pruning's ``DependencyGraph`` (which traces the autograd graph and knows
that residual adds tie channels, depthwise convs tie input to output, concatenation offsets
and flatten repeats indices). Its groups are turned into :class:`ChannelGroup` objects that
say, per member layer, which slice of which channel axis the group controls.

A Conv1D-style layer (HuggingFace's GPT-2 ``Conv1D``, recognised by ``costs.is_conv1d_style``:
class name Conv1D, a 2-D weight (in, out), ``nf`` = out; transformers is never imported) is a
Linear with its weight stored transposed: it is handed to torch-pruning as a layer of its own
(``TransposedLinearPruner``: inputs are the weight's rows, outputs its columns) and is a member
like a Linear ("out", "in"), so GPT-2's MLP hidden units (c_fc -> act -> c_proj) are one group.
Its fused q/k/v projection (c_attn, split into q, k and v) reaches c_proj only in part: left dense.

Attention heads are groups of their own (``kind == "heads"``): one member, the
``nn.MultiheadAttention`` module, role "heads", ``repeat`` = head dimension; removing a head
removes its rows of the q/k/v projections and its columns of ``out_proj`` (``attention.py``),
so the embedding width always stays ``heads x head_dim`` of the kept heads.
HuggingFace-style self-attention with separate q/k/v ``nn.Linear`` projections (BERT, ViT,
DistilBERT; ``attention.hf_heads``) is traced by torch-pruning as one group of single channels
(q, k and v outputs, the output projection's inputs), which cannot be cut one channel at a time
(the module reshapes by its head size); such a group becomes a group of heads
(``kind == "qkv_heads"``, ``attention`` = the module's name): the same members with ``repeat`` =
head size, so a head is its rows of q, k, v and its columns of the output projection, cut by the
Linear surgery, and ``shrink`` writes the kept head count into the module.

A residual add onto a concatenation (``y = x + torch.cat([a(x), b(x)], 1)``: Inception/DenseNet-style
or split-transform-merge blocks) ties x's channel i to the concatenation's channel i, which is a's
for i < C_a and b's beyond. Its channels are traced once from the add, over all of them, and cut
at every boundary of every concatenation in that trace (two concatenations added with different
splits: at the boundaries of both, their intersection) into parts, each a group of its own whose
members are slices (``offset``, ``size``) of their layers' channels: x's producer is an "out"
member of every part, at the part's offset, and each branch an "out" member of the parts it
holds, so removing channel j of a part removes x's channel and the branch's matching channel.
Every part keeps at least one channel, as every group does, so no branch loses all its outputs.
Left dense, naming the concatenation: a split or chunk in the trace, a concatenation whose sizes
torch-pruning did not find (e.g. flattened straight into a Linear), a grouped conv taking the
channels, a layer whose outputs the parts hold only in part.

A grouped convolution (``groups = G``, not depthwise) splits its channels into G blocks that
must keep equal counts: a group touching one has ``segments = G`` and group channel ``j``
stands for channel ``j`` of every block (so every block keeps the same positions).

What the adapter refuses (the group is left dense and listed in ``GroupSet.skipped``, by name):

* groups that reach the network's output (no consumer inside the net: the logits);
* groups touching a module with parameters that channel surgery cannot resize (LayerNorm,
  nn.MultiheadAttention's embedding width, an embedding, a recurrent layer, your own layer):
  in a transformer this is the residual stream, kept at full width;
* the output channels of a layer the channel methods do not shrink (ConvTranspose, Conv3d), where
  no Conv/Linear-rooted group holds them: traced with that layer as root, only to be named;
* a recurrent layer (LSTM, GRU, RNN), an embedding (Embedding, EmbeddingBag) or a Bilinear that the
  trace ran and no traced group touches (no group is rooted at them): named by the layer, at full width;
* groups touching a norm layer whose normalised axes include the channel axis (GroupNorm with fewer
  groups than channels, LayerNorm or RMSNorm whose normalized_shape covers the channels, with or without
  affine parameters: its statistics mix the channels; ``_norm_mixes_channels``; torch.nn.RMSNorm and a
  hand-written RMSNorm, which the trace sees as a mean over the channel axis, ``_statistic_over_channels``),
  named by the norm, or
  a GroupNorm or affine norm over other axes (channel surgery does not resize it), or as a
  transformer's residual stream (an add joining channels through norms or an nn.MultiheadAttention's
  embedding width: left dense by design); a norm without affine parameters over other axes only
  (LayerNorm([H, W]) on (B, C, H, W)) is not named: ``shrink.checked_groups`` judges such groups (and
  a norm over an axis as long as the channels, ``ChannelGroup.norm``, is named where the check fails);
* groups whose index maps are not one of the shapes we understand (identity, a concat offset,
  a flatten repeat): anything else would be pruned wrongly, so it is not pruned;
* groups passing through a bare channel pad (``F.pad`` on the channel axis outside a module that
  declares it): torch-pruning sees it as elementwise and would tie C channels to the first C
  of the padded 2C.

Zero-pad shortcuts (modules with ``pads_channels = True``, e.g. the zoo's option-A
``ZeroPadShortcut``) are handed to torch-pruning as layers of their own (``PadShortcutPruner``),
so their input channels belong to the previous stage's group and their output channels to the
next stage's: a stage's block outputs (stem or conv2, bn2, the adds, the next stage's conv1
inputs) are one group. Such a module is a member with role "in" (a consumer: it is gated, and
its copied channels follow the kept channels of the previous stage) and "out" (its zero
channels stay zero); it has no weight, costs no MACs, and ``shrink`` rewrites its channel map.
With ``pads_residual=False`` the adapter falls back to the older choice: the groups through a
shortcut are left dense (block outputs at full width) and only channels inside blocks are pruned.
* groups whose trace goes round a cycle of index maps without end (a rotary embedding feeding
  grouped-query attention, as Llama's: torch-pruning 1.6 never ends there), stopped past
  GROUP_ITEMS_PER_NODE items per graph node, and groups sharing an axis with such a group's reach;
* the groups of layers whose output channels an operation repeats (``repeat_interleave``, or
  ``unsqueeze().expand().reshape()``: hand-written grouped-query attention's k/v heads, shared between
  query heads), which torch-pruning maps without root channels: named as grouped-query attention where
  the k projection is narrower than the q projection (``grouped_query_attention``), else by the repeat;
* groups touching grouped convs of different G, or a grouped conv through a flatten;
* groups of one channel per block of a grouped conv (the input of a depthwise conv with a channel
  multiplier, Conv2d(16, 32, groups=16)): no channel can go without removing a whole conv group.

Groups whose index maps look right but are not (a channel shuffle: view, transpose, reshape,
read by torch-pruning as elementwise) are caught numerically by ``shrink.checked_groups``; where the
trace shows a reshape of the width into heads (hand-written attention, ``ChannelGroup.split``) its
refusal says so.

This module assembles the groups (``find_groups``); the parts live in modules of their own:
``dependency_trace`` (torch-pruning's graph and groups), ``group_types`` (``Member``, ``ChannelGroup``,
``GroupSet``), ``members`` (a traced group's members, or why it is left dense), ``concat_add`` (a
residual add onto a concatenation), ``mixing_norms`` (norms whose statistics mix channels),
``grouped_query`` (grouped-query attention), ``unshrunk`` (layers the channel methods do not shrink),
``left_dense`` (what the user is told of the groups left dense) and ``layer_kinds``.
"""

from __future__ import annotations

import gc

import torch
import torch_pruning as tp
from torch import nn

from ..errors import PrunekitError
from .attention import head_prunable, hf_heads
from .concat_add import _added_concatenation, _concat_parts, _part_root, _uncovered_outputs, _widened
from .dependency_trace import _all_groups, _bounded_groups, _prunes_out_channels, _reach, build_graph, conv1d_pruners
from .group_types import ChannelGroup, GroupSet, Member
from .grouped_query import _broadcast_gqa, _repeated_layers, grouped_query_attention
from .layer_kinds import _BN, _CONV, _size_of, is_linear
from .left_dense import no_group_error
from .members import _NO_CONSUMER, _members
from .mixing_norms import NORM_LAYERS, _ambiguous_norm
from .unshrunk import (_UNSHRUNK_ROOTS, _WHOLE_LAYERS, _loose_weights, _traced_untouched, _unshrunk_layer_reason,
                       _unshrunk_root_reason)


def find_groups(model: nn.Module, example_input: torch.Tensor, pads_residual: bool = True) -> GroupSet:
    """The channel groups of ``model`` (Conv/Linear/BatchNorm channels and attention heads),
    traced on ``example_input``. ``pads_residual=False``: every residual stream is left dense
    (groups through a zero-pad shortcut, and groups whose outputs an elementwise add joins: an
    option-B projection's, a model of your own), so only channels inside blocks are pruned."""
    try:
        return _find_groups(model, example_input, pads_residual)
    finally:
        # torch-pruning's graph holds the trace's activations (with their autograd graph) in
        # reference cycles: freed now, not at some later collection (72 MB for BERT-base, 128 tokens)
        gc.collect()


def _find_groups(model: nn.Module, example_input: torch.Tensor, pads_residual: bool) -> GroupSet:
    names = {module: name for name, module in model.named_modules()}
    names.update({param: name for name, param in model.named_parameters()})
    modules = dict(model.named_modules())
    groups: list[ChannelGroup] = []
    seen: set[frozenset] = set()
    traced, skipped, in_graph = _traced_groups(model, example_input, pads_residual)
    repeated = _repeated_layers(traced, names, modules)
    for tp_group in traced:
        root_module = tp_group[0].dep.target.module
        root = names.get(root_module, str(root_module))
        if isinstance(root_module, nn.modules.linear.NonDynamicallyQuantizableLinear):
            continue               # an attention's out_proj: its heads are a group of their own
        if isinstance(root_module, (_CONV, nn.Linear)) and _size_of(root_module) == 0:
            continue               # a layer of no outputs (nn.Linear(64, 0)): no channel to prune, nothing to say
        if root_module in repeated:
            if frozenset([root]) not in seen:
                seen.add(frozenset([root]))
                skipped.append((root, repeated[root_module]))
            continue
        if isinstance(root_module, _UNSHRUNK_ROOTS):
            key = frozenset([root])
            if key not in seen:
                seen.add(key)
                skipped.append((root, _unshrunk_root_reason(tp_group, root, root_module)))
            continue
        if (width := getattr(tp_group, "concat_add_width", None)) is not None:
            _add_concat_parts(tp_group, width, names, pads_residual, groups, skipped, seen)
            continue
        members, segments, reason = _members(tp_group, names)
        key = frozenset((m.module, m.role) for m in members) if members else frozenset([root])
        if key in seen:
            continue
        seen.add(key)
        if reason == _NO_CONSUMER and (gqa := _broadcast_gqa(tp_group, root, modules)):
            reason = gqa
        if reason is None and not pads_residual and _joined_by_add(tp_group):
            reason = "a residual stream (outputs joined by an add): kept at full width (residual_channels keep)"
        elif reason is not None and (through := _transformer_stream(tp_group, names)):
            reason = (f"a transformer's residual stream (outputs joined by adds, through {through}): kept at full "
                      "width, as expected; channels inside the blocks are pruned")
        if reason is not None:
            skipped.append((root, reason))
            continue
        heads = _qkv_heads(members, modules) if segments == 1 else None
        if heads is not None:
            attention, count, head_size = heads
            if count < 2:
                skipped.append((attention, "attention heads kept: a single head"))
                continue
            groups.append(ChannelGroup(index=len(groups), root=attention, size=count, kind="qkv_heads",
                                       members=[Member(m.module, m.role, 0, head_size) for m in members],
                                       attention=attention))
            continue
        size = _size_of(root_module) // segments
        if size == 1 and segments > 1:     # one channel per block: no block can lose one
            skipped.append((root, _multiplier_reason(members, segments, model)))
            continue
        groups.append(ChannelGroup(index=len(groups), root=root, size=size, members=members, segments=segments,
                                   split=_split_width(tp_group, size), norm=_ambiguous_norm(tp_group, size, names)))
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            why = head_prunable(module)
            if why is None and module.num_heads < 2:
                why = "a single head"
            if why is not None:
                skipped.append((name, f"attention heads kept: {why}"))
                continue
            groups.append(ChannelGroup(index=len(groups), root=name, size=module.num_heads,
                                       members=[Member(name, "heads", 0, module.head_dim)], kind="heads"))
    # recurrent layers, embeddings (a layer whose width no traced group holds): at full width, named
    touched = {item.dep.target.module for tp_group in traced for item in tp_group.items}
    named = {root for root, _ in skipped}
    skipped += [(name, _unshrunk_layer_reason(module)) for name, module in model.named_modules()
                if isinstance(module, _WHOLE_LAYERS) and name not in named
                and _traced_untouched(module, in_graph, touched)]
    if not groups:
        raise no_group_error(_loose_weights(model) + skipped)
    return GroupSet(groups, skipped)


def _qkv_heads(members: list[Member], modules: dict) -> tuple[str, int, int] | None:
    """(attention module name, heads, head size) if ``members`` are the q, k and v outputs of one
    HuggingFace-style attention module (``attention.hf_heads``) whole and the inputs of the
    layers they feed (its output projection), else None."""
    outs = [m for m in members if m.role == "out"]
    if len(outs) != 3 or any(m.role not in ("out", "in") or m.offset or m.repeat != 1 for m in members):
        return None
    parents = {m.module.rpartition(".")[0] for m in outs}
    if len(parents) != 1:
        return None
    parent = parents.pop()
    spec = hf_heads(modules.get(parent))
    if spec is None:
        return None
    qkv, heads, size = spec
    if {f"{parent}.{n}" if parent else n for n in qkv} != {m.module for m in outs}:
        return None
    module = modules[parent]
    return parent, getattr(module, heads), getattr(module, size)


def _multiplier_reason(members: list, segments: int, model: nn.Module) -> str:
    """Why a group whose channels are each a whole block of a grouped conv (a depthwise conv with
    a channel multiplier: Conv2d(16, 32, groups=16)) is kept: removing one would remove a block."""
    modules = dict(model.named_modules())
    conv = next((m.module for m in members if m.role == "in" and isinstance(modules.get(m.module), _CONV)
                 and modules[m.module].groups == segments), "a grouped conv")
    return (f"its {segments} channels are the {segments} input groups of {conv} (groups={segments}: a depthwise "
            "conv with a channel multiplier), one channel each, and the channel methods do not remove whole "
            "conv groups: kept dense")


def _traced_groups(model: nn.Module, example_input: torch.Tensor, pads_residual: bool) -> tuple[list, list, set]:
    """torch-pruning's dependency groups rooted at Conv/Linear layers, the modules its trace saw,
    and the groups left dense
    because their trace goes round a cycle of index maps without end (``(root, reason)``: a
    rotary embedding feeding grouped-query attention, as Llama's) or shares channels with such a
    group; its failure (on some recurrent models it fails with an IndexError) refused in one line."""
    names = {module: name for name, module in model.named_modules()}
    try:
        graph = build_graph(model, example_input, pads_residual)
        cycles: list = []
        with _bounded_groups(len(graph.module2node)):
            roots = (nn.Conv2d, nn.Conv1d, nn.Linear, *conv1d_pruners(model))    # Conv1D-style types too
            groups = list(_all_groups(graph, roots, cycles))
            # the output channels of layers the channel methods do not shrink, where no group above
            # holds them: listed too, so that every group left dense is named
            covered = {item.dep.target.module for group in groups for item in group.items
                       if _prunes_out_channels(item.dep)}
            groups += [group for group in _all_groups(graph, _UNSHRUNK_ROOTS, cycles)
                       if group[0].dep.target.module not in covered]
            groups = _widened(graph, groups)
    except PrunekitError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure inside torch-pruning's trace of the user's model
        recurrent = [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
                     if isinstance(m, nn.RNNBase)]
        suspect = f"; it does not follow the recurrent layer {', '.join(recurrent[:3])}" if recurrent else ""
        raise PrunekitError(f"the channel dependency analysis (torch-pruning) failed on this model "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else '?'}){suspect}: "
                            "prune its weights instead (falcon, chita, magnitude)") from None
    in_graph = set(graph.module2node)
    if not cycles:
        return groups, [], in_graph
    cyclic = [names.get(root, type(root).__name__) for root in cycles]
    modules = dict(model.named_modules())
    gqa = {name: grouped_query_attention(modules, name) for name in cyclic}
    why = "its channel trace (torch-pruning) goes round a cycle without end: kept dense"
    skipped = [(root, gqa[root] or why) for root in cyclic]
    # a group sharing an axis with a cycling group's reach is as unknown: left dense too
    reach = set().union(*(_reach(graph, root) for root in cycles))
    kept = []
    for group in groups:
        if any((item.dep.target, graph.is_out_channel_pruning_fn(item.dep.handler)) in reach for item in group.items):
            root = names.get(group[0].dep.target.module, str(group[0].dep.target.module))
            skipped.append((root, f"shares channels with the group of '{cyclic[0]}', "
                                  + ("which is in grouped-query attention (k/v heads shared between q heads), which "
                                     "the channel methods do not prune: kept dense" if gqa[cyclic[0]] else
                                     "whose channel trace goes round a cycle without end: kept dense")))
        else:
            kept.append(group)
    return kept, skipped, in_graph


def _transformer_stream(tp_group, names: dict) -> str | None:
    """What a transformer's residual stream runs through that channel surgery cannot resize, in words
    ("norm layers channel surgery cannot resize: norm (LayerNorm) and 4 more", "the embedding width of
    attn (MultiheadAttention), which removing heads keeps"), when ``tp_group`` is one: joined by an add,
    through at least one norm layer (LayerNorm, GroupNorm, RMSNorm) or ``nn.MultiheadAttention`` (whose
    embedding width stays: its heads are pruned, each whole), and what channel surgery cannot resize in
    it only such norms, attention's embedding width, token embeddings and bare parameters (a class
    token, a positional embedding). None otherwise: another layer of that kind (a layer of your own, a
    recurrent one) is a surprise worth a warning."""
    if not _joined_by_add(tp_group):
        return None
    norms, attention, others = [], [], False
    for item in tp_group.items:
        module = item.dep.target.module
        if isinstance(module, NORM_LAYERS):
            norms.append(f"{names.get(module, '?')} ({type(module).__name__})")
        elif isinstance(module, nn.MultiheadAttention):
            attention.append(f"{names.get(module, '?')} ({type(module).__name__})")
        elif isinstance(module, (nn.Parameter, nn.Embedding)):
            continue
        elif not isinstance(module, (*_CONV, nn.Linear, _BN)) and not is_linear(module) and \
                isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
            others = True
    if others or not (norms or attention):
        return None

    def listed(found: list[str]) -> str:
        found = list(dict.fromkeys(found))
        return found[0] + (f" and {len(found) - 1} more" if len(found) > 1 else "")
    if norms:
        return f"norm layers channel surgery cannot resize: {listed(norms)}"
    return f"the embedding width of {listed(attention)}, which removing heads keeps"


def _split_width(tp_group, size: int) -> tuple[int, int] | None:
    """(heads, head size) where a reshape in ``tp_group`` reads the group's ``size`` channels as two
    trailing axes (its input shape ends ``..., heads, head size`` (then only 1s), both over 1: the
    head merge of hand-written multi-head attention, ``x.view(B, T, 2, 8)`` ... ``.reshape(B, T, 16)``),
    else None. A channel shuffle's (``view(B, g, C/g, H, W)``) split is followed by spatial axes: not this."""
    for item in tp_group.items:
        if not isinstance(item.dep.target.module, tp.ops._ReshapeOp):
            continue
        shape = list(getattr(item.dep.target.grad_fn, "_saved_self_sym_sizes", None) or ())
        while shape and shape[-1] == 1:
            shape.pop()
        if len(shape) >= 3 and shape[-2] > 1 and shape[-1] > 1 and shape[-2] * shape[-1] == size:
            return int(shape[-2]), int(shape[-1])
    return None


def _joined_by_add(tp_group) -> bool:
    """Whether an elementwise add joins the group's channels (a residual connection)."""
    return any(type(getattr(item.dep.target, "grad_fn", None)).__name__.startswith("AddBackward")
               for item in tp_group.items)


def _add_concat_parts(tp_group, width: int, names: dict, pads_residual: bool, groups: list, skipped: list,
                      seen: set) -> None:
    """Append to ``groups`` a ChannelGroup per part (``_concat_parts``) of a residual add onto a
    concatenation traced whole from the add (``width`` channels), or to ``skipped`` one reason that
    leaves them all dense."""
    branches = _added_concatenation(tp_group, names) or "branches"
    parts, reason = _concat_parts(tp_group, width)
    found = []
    for part in parts:
        members, segments, reason = _members(part, names, part.size, sliced=True)
        if reason is None and segments > 1:
            reason = "a grouped conv takes its channels"
        if reason is not None:
            break
        found.append((part, members))
    if reason is None:
        reason = _uncovered_outputs(found, names)
    if reason is not None and "reaches the network output" not in reason:
        reason = (f"a residual add onto a concatenation of {branches} (x + torch.cat([...])) whose channels "
                  f"cannot be followed ({reason.removesuffix(': kept dense')}): kept dense")
    if reason is None and not pads_residual:
        reason = "a residual stream (outputs joined by an add): kept at full width (residual_channels keep)"
    first = branches.split(",")[0].split(" and ")[0]
    if reason is not None:
        if ("concat", first) not in seen:
            seen.add(("concat", first))
            skipped.append((first, reason))
        return
    key = frozenset((m.module, m.role, m.offset, part.size) for part, members in found for m in members)
    if key in seen:
        return
    seen.add(key)
    for part, members in found:
        groups.append(ChannelGroup(index=len(groups), root=_part_root(part, members, names), size=part.size,
                                   members=members))
