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
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import warnings
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from ..costs import is_conv1d_style
from ..errors import PrunekitError
from ..options import OptionError
from .attention import head_prunable, hf_heads

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm


@dataclass(frozen=True)
class Member:
    """One layer's share of a group.

    ``role``: "out" (output channels of a Conv/Linear), "in" (input channels of a Conv/Linear),
    "bn" (BatchNorm features) or "heads" (heads of an attention module, ``repeat`` = head dim);
    in a "qkv_heads" group the q/k/v Linears are "out" and the output projection "in" members,
    each with ``repeat`` = head size.
    Group channel ``j`` is the layer's channels ``offset + s * size * repeat + j * repeat ...
    + repeat - 1`` on that axis for each segment ``s < group.segments`` (``repeat`` > 1 only for
    a Linear after a flatten of C x H x W, and for heads): the member is the slice (``offset``,
    ``size * repeat``) of the layer's channels. An "out" member holds all its layer's outputs
    except in a part of a residual add onto a concatenation, where x's producer is an "out"
    member of every part, each at its own offset.
    """

    module: str
    role: str
    offset: int = 0
    repeat: int = 1


@dataclass
class ChannelGroup:
    """``size`` coupled channels; ``root`` is the layer torch-pruning grouped them from.

    ``kind``: "channels", "heads" (an ``nn.MultiheadAttention``'s heads) or "qkv_heads" (the heads
    of HuggingFace-style attention ``attention``, the module whose head count follows the group).
    ``split``: (heads, head size) when the trace shows a reshape of the group's last axis into two
    (``view(B, T, 2, 8)``: hand-written multi-head attention), else None; only words a refusal.
    ``norm``: a norm (a LayerNorm/RMSNorm/GroupNorm, or the statistic of a hand-written one: a mean,
    var or std) whose normalised axes hold an axis as long as the channels but not every such axis
    (LayerNorm(T) on (B, C, T) with T == C), so the trace cannot tell whether it mixes them; the
    numeric check (``shrink.checked_groups``) decides, and its refusal names it; else None."""

    index: int
    root: str
    size: int
    members: list[Member] = field(default_factory=list)
    segments: int = 1
    kind: str = "channels"
    attention: str = ""
    split: tuple[int, int] | None = None    # (heads, head size) where a reshape splits the width into heads
    norm: str | None = None                 # a norm over an axis as long as the channels, not surely theirs (words)

    def layers(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def channels(self, member: Member, j: torch.Tensor) -> torch.Tensor:
        """The layer channels of ``member`` that group channels ``j`` (k,) stand for, (k·repeat·segments,)."""
        block = self.size * member.repeat
        per = (j.view(-1, 1) * member.repeat + torch.arange(member.repeat)).flatten()
        return torch.cat([member.offset + s * block + per for s in range(self.segments)])

    def __str__(self) -> str:
        what = "heads" if self.kind in ("heads", "qkv_heads") else "channels"
        extra = f" x {self.segments} blocks" if self.segments > 1 else ""
        return f"group {self.index} ({self.root}, {self.size} {what}{extra}, {len(self.members)} members)"


@dataclass
class GroupSet:
    """The prunable groups of a model plus the groups left dense and why."""

    groups: list[ChannelGroup]
    skipped: list[tuple[str, str]]   # (root layer, reason)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)


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


def is_linear(module) -> bool:
    """Whether ``module`` is a Linear layer of either weight layout: ``nn.Linear`` (out, in) or a
    Conv1D-style layer (in, out)."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and is_conv1d_style(module))


def linear_in_out(module: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a Linear of either layout (see ``is_linear``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


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


def _repeated_layers(traced: list, names: dict, modules: dict) -> dict:
    """{layer: reason} for every Conv/Linear whose output channels a traced group holds through an
    operation that repeats them (torch-pruning gives such items no root channel: ``root_idxs`` with
    None), e.g. hand-written grouped-query attention's ``k.repeat_interleave(2, 1)`` or
    ``k[:, :, None].expand(...).reshape(...)``; every such layer's group is left dense, named as
    grouped-query attention (``grouped_query_attention``) where its k projection is the narrower."""
    found: dict = {}
    for tp_group in traced:
        if not any(None in (getattr(item, "root_idxs", None) or ()) for item in tp_group.items):
            continue
        layers = [item.dep.target.module for item in tp_group.items if _prunes_out_channels(item.dep)
                  and (isinstance(item.dep.target.module, _CONV) or is_linear(item.dep.target.module))]
        gqa = next((why for layer in layers
                    if (why := grouped_query_attention(modules, names.get(layer, ""), model_level=True))), None)
        for layer in layers:
            found.setdefault(layer, gqa or (
                f"{names.get(layer, type(layer).__name__)}'s output channels pass an operation that repeats them "
                "(repeat_interleave, or expand then reshape, as attention sharing k/v heads between query heads "
                "does), which the dependency analysis cannot map channel by channel: kept dense"))
    return found


_NO_CONSUMER = "reaches the network output (no consuming layer)"
_GQA_V = ("v_proj", "value", "v", "wv", "v_lin")


def _broadcast_gqa(tp_group, root: str, modules: dict) -> str | None:
    """The grouped-query attention reason for a group whose trace found no consuming layer although
    its root layer's output goes on to further operations (not the network's output): a q, k or v
    projection of attention that shares k/v heads by broadcasting (k/v ``[B, Hkv, 1, T, d]`` against
    q's ``[B, Hkv, G, T, d]``, no repeat_interleave or expand), where torch-pruning's trace loses the
    channels. None when the layer is not such a projection (by name) or its attention is not
    grouped-query (``grouped_query_attention``)."""
    if root.rpartition(".")[2] not in (*_GQA_Q, *_GQA_K, *_GQA_V) or not getattr(tp_group[0].dep.target,
                                                                                 "outputs", None):
        return None
    return grouped_query_attention(modules, root, model_level=True)


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


_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                nn.Embedding, nn.MultiheadAttention, nn.RNNBase, nn.PReLU)


# layers whose channels the channel methods leave whole (their groups are rooted at Conv1d/2d and Linear)
_NOT_SHRUNK = (nn.modules.conv._ConvTransposeNd, nn.Conv3d, nn.EmbeddingBag, nn.Bilinear, nn.RNNBase)
# of those, the ones whose output channels torch-pruning can trace: such a group is left dense, by name
_UNSHRUNK_ROOTS = (nn.modules.conv._ConvTransposeNd, nn.Conv3d)
# layers whose width no group is rooted at (recurrent layers, embeddings): named as left dense where
# no traced group touches them (one that does is named by that group's reason)
_WHOLE_LAYERS = (nn.RNNBase, nn.Embedding, nn.EmbeddingBag, nn.Bilinear)


def _traced_untouched(module: nn.Module, in_graph: set, touched: set) -> bool:
    """Whether the trace ran ``module`` (itself a graph node, or a parameter of its own one: torch-pruning
    sees a GRU or EmbeddingBag by its weights) and no traced group holds it or its parameters."""
    own = [module, *module.parameters(recurse=False)]
    return any(x in in_graph for x in own) and not any(x in touched for x in own)


def _unshrunk_layer_reason(module: nn.Module) -> str:
    """Why a layer the channel methods do not shrink keeps its width ("LSTM: the channel methods do not
    shrink recurrent layers (hidden width 16): kept dense")."""
    kind = type(module).__name__
    if isinstance(module, nn.RNNBase):
        return (f"{kind}: the channel methods do not shrink recurrent layers (hidden width {module.hidden_size}): "
                "kept dense")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{kind}: the channel methods do not shrink embeddings (width {module.embedding_dim}): kept dense"
    return f"{kind}: the channel methods do not shrink this layer type's channels: kept dense"


def _loose_weights(model: nn.Module) -> list[tuple[str, str]]:
    """Layers of a type the channel methods do not shrink, and parameters of at least two
    dimensions held by a module that is not a known layer (used by einsum / matmul in a
    forward): the dependency analysis cannot follow channels through them."""
    loose = []
    for module_name, module in model.named_modules():
        if isinstance(module, _NOT_SHRUNK):
            loose.append((module_name, _unshrunk_layer_reason(module)))
            continue
        if isinstance(module, _LAYER_TYPES):
            continue
        if is_conv1d_style(module):       # a Linear stored (in, out): shrunk as one
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                full = f"{module_name}.{name}" if module_name else name
                loose.append((full, "a weight held outside a known layer (used by einsum or matmul, say), "
                                    "which the channel analysis cannot follow"))
    return loose


def _multiplier_reason(members: list, segments: int, model: nn.Module) -> str:
    """Why a group whose channels are each a whole block of a grouped conv (a depthwise conv with
    a channel multiplier: Conv2d(16, 32, groups=16)) is kept: removing one would remove a block."""
    modules = dict(model.named_modules())
    conv = next((m.module for m in members if m.role == "in" and isinstance(modules.get(m.module), _CONV)
                 and modules[m.module].groups == segments), "a grouped conv")
    return (f"its {segments} channels are the {segments} input groups of {conv} (groups={segments}: a depthwise "
            "conv with a channel multiplier), one channel each, and the channel methods do not remove whole "
            "conv groups: kept dense")


def _unshrunk_root_reason(tp_group, root: str, root_module: nn.Module) -> str:
    """Why the output channels of a layer the channel methods do not shrink (a ConvTranspose, a
    Conv3d) are kept: the network's output, or that layer type."""
    if not any(not _prunes_out_channels(item.dep) for item in tp_group.items):
        return "reaches the network output (no consuming layer)"
    return (f"output channels of a {type(root_module).__name__}, a layer type whose channels the channel methods "
            "do not shrink: kept dense")


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


_GQA_Q, _GQA_K = ("q_proj", "query", "q", "wq", "q_lin"), ("k_proj", "key", "k", "wk", "k_lin")


def grouped_query_attention(modules: dict[str, nn.Module], root: str, model_level: bool = False) -> str | None:
    """The reason for a group rooted at layer ``root`` (a name of ``modules``, the model's
    ``named_modules``) whose trace cycles, when ``root`` lies in grouped-query attention (fewer k/v
    heads than q heads, each k/v head shared by several q heads, as Llama's with
    ``num_key_value_heads`` < ``num_attention_heads``): the channel methods do not prune it. Told by
    the attention module's head counts (HuggingFace's attributes or config) or, failing those, by its
    k projection being narrower than its q projection. None when ``root`` is not in such attention.
    ``model_level``: the model itself (``modules[""]``) may be that attention too (a layer's repeated k/v
    heads, ``_repeated_layers``; a cycling trace is named so only inside a submodule)."""
    parts = root.split(".")
    for cut in range(len(parts) - 1, -1 if model_level else 0, -1):     # cut 0: the model itself
        name = ".".join(parts[:cut])
        module = modules.get(name)
        if module is None:
            continue
        counts = _head_counts(module)
        if counts is None:
            children = dict(module.named_children())
            q = next((children[n] for n in _GQA_Q if isinstance(children.get(n), nn.Linear)), None)
            k = next((children[n] for n in _GQA_K if isinstance(children.get(n), nn.Linear)), None)
            if q is None or k is None:
                continue
            if k.out_features >= q.out_features:
                return None
            said = f"its k projection has {k.out_features} outputs, its q projection {q.out_features}"
        else:
            heads, kv_heads = counts
            if kv_heads >= heads:
                return None
            said = f"{kv_heads} k/v heads for {heads} q heads"
        where = f"'{name}'" if name else "the model"
        return (f"in grouped-query attention {where} ({said}: each k/v head is shared between q heads), which the "
                "channel methods do not prune: kept dense")
    return None


def _head_counts(module: nn.Module) -> tuple[int, int] | None:
    """(q heads, k/v heads) of a HuggingFace-style attention module, from its attributes or its config."""
    config = getattr(module, "config", None)
    for source in (module, config):
        if source is None:
            continue
        heads = next((getattr(source, a) for a in ("num_heads", "num_attention_heads", "n_heads")
                      if isinstance(getattr(source, a, None), int)), None)
        kv = next((getattr(source, a) for a in ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
                   if isinstance(getattr(source, a, None), int)), None)
        if heads is not None and kv is not None:
            return heads, kv
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int) and groups > 1:
        heads = getattr(config, "num_attention_heads", None)
        if isinstance(heads, int):
            return heads, heads // groups
    return None


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


# What left a group dense, from its reason in GroupSet.skipped: the first cause whose words it holds.
_CAUSES = (("output", "reaches the network's output", ("reaches the network output",)),
           ("residual", "is a residual stream kept at full width",
            ("residual stream", "zero-pad (option-A) shortcut", "a single head")),
           ("resize", "touches a layer or parameter that channel surgery cannot resize",
            ("cannot resize", "touches parameter", "outside a known layer", "do not shrink", "attention heads kept")),
           ("multiplier", "feeds a depthwise conv with a channel multiplier (one channel per conv group)",
            ("channel multiplier",)),
           ("gqa", "is in grouped-query attention (k/v heads shared between q heads, as Llama's), which the "
                   "channel methods do not prune", ("grouped-query attention",)),
           ("cycle", "has a channel trace that goes round a cycle without end (e.g. a layer's output added to a "
                     "copy of itself with its channel halves swapped, as a rotate-half does)", ("round a cycle",)),
           ("map", "passes an operation the dependency analysis cannot map", ("",)))
_EXPECTED = ("output", "residual")       # left dense by design: no reason to warn


def _cause(why: str) -> tuple[str, str]:
    return next((kind, text) for kind, text, words in _CAUSES if any(w in why for w in words))


def listed_skips(skipped: list[tuple[str, str]], shown: int = 3) -> str:
    """The first ``shown`` of ``skipped`` as "root: why", then how many more."""
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return "; ".join(f"{root}: {why}" for root, why in skipped[:shown]) + more


def unexpected_skips(skipped: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The groups of ``skipped`` left dense for a reason a user may not expect (a layer or parameter
    channel surgery cannot resize, an operation the analysis cannot map), not by design (the
    network output, a residual stream kept at full width)."""
    return [(root, why) for root, why in skipped if _cause(why)[0] not in _EXPECTED]


def is_whole_layer(why: str) -> bool:
    """Whether a reason in ``GroupSet.skipped`` names a whole layer the channel methods do not shrink
    (a recurrent layer, an embedding: ``_unshrunk_layer_reason``, "LSTM: the channel methods do not
    shrink ..."), not a channel group rooted at a traced layer."""
    kind, sep, rest = why.partition(": ")
    return bool(sep) and kind.isidentifier() and rest.startswith("the channel methods do not shrink ")


def left_dense_count(skipped: list[tuple[str, str]]) -> str:
    """How many of ``skipped`` are whole layers and how many channel groups, in words: "2 layers and
    1 channel group", "1 layer", "3 channel groups"."""
    layers = sum(is_whole_layer(why) for _, why in skipped)
    groups = len(skipped) - layers
    parts = ([f"{layers} layer{'s' if layers > 1 else ''}"] if layers else []) + \
            ([f"{groups} channel group{'s' if groups > 1 else ''}"] if groups else [])
    return " and ".join(parts)


def dense_groups_text(skipped: list[tuple[str, str]]) -> str:
    """", N channel groups left dense among them (root: why; ... and N more)" for a refusal of a budget
    below the channel floor ("" if none): those a user may not expect first (a GroupNorm, a layer
    channel surgery cannot resize), then those dense by design. Recurrent layers and embeddings
    among them are counted as layers ("2 layers and 1 channel group", ``left_dense_count``)."""
    if not skipped:
        return ""
    unexpected = unexpected_skips(skipped)
    ordered = unexpected + [s for s in skipped if s not in unexpected]
    return f", {left_dense_count(ordered)} left dense among them ({listed_skips(ordered)})"


def dense_groups_warning(skipped: list[tuple[str, str]]) -> str | None:
    """What a user is told of the groups (and whole layers: ``left_dense_count``) left dense that they
    may expect pruned; None if none."""
    unexpected = unexpected_skips(skipped)
    if not unexpected:
        return None
    return (f"{left_dense_count(unexpected)} left dense (the budget is met "
            f"from the others): {listed_skips(unexpected)} (skipped_groups in the record lists every one left dense)")


def no_group_error(skipped: list[tuple[str, str]]) -> PrunekitError:
    """The refusal of a model without a prunable group: the causes that apply, the first reasons in
    ``skipped`` (those of groups reaching the output only if nothing else applies), and the fix."""
    first: dict[str, str] = {}
    for root, why in skipped:       # one entry per layer: the first reason given for it
        first.setdefault(root, why)
    skipped = list(first.items())
    causes = list(dict.fromkeys(_cause(why)[1] for _, why in skipped))
    listed = [(root, why) for root, why in skipped if _cause(why)[0] != "output"] or skipped
    why = (f"every coupled channel set {' or '.join(causes)} ({listed_skips(listed)})" if causes else
           "structured pruning needs Conv/Linear layers with channels feeding other layers")
    return OptionError(f"the model has no prunable channel group: {why}; prune its weights instead, e.g. "
                       "method falcon", ("method",))


def _size_of(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, _CONV) else linear_in_out(module)[1]


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


def _is_pad_layer(dep) -> bool:
    """True if torch-pruning handled this zero-pad shortcut as a layer (our ``PadShortcutPruner``)."""
    return isinstance(getattr(dep.handler, "__self__", None), PadShortcutPruner)


def _prunes_out_channels(dep) -> bool:
    """True if the dependency prunes the output channels of its layer."""
    fn = dep.handler
    name = getattr(fn, "__name__", "") or type(fn).__name__
    return "out" in name

