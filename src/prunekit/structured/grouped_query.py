"""Grouped-query attention (k/v heads shared between q heads), which the channel methods leave
dense: told by head counts or a k projection narrower than the q projection, named in the reasons
of groups whose k/v outputs are repeated, broadcast or traced round a cycle."""

from __future__ import annotations

from torch import nn

from .dependency_trace import _prunes_out_channels
from .layer_kinds import _CONV, is_linear


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
