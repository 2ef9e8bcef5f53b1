"""Per-layer channel counts of a model, and resizing a zoo model to them.

A structurally pruned (shrunk) model has the zoo architecture with smaller Conv/Linear/BatchNorm
layers (and, after depth pruning, ``RemovedBlock`` where blocks were); its saved sidecar records
``channel_layout(model)`` so that ``load_model`` can rebuild it with ``apply_layout`` before
loading the tensors (no code from the file is executed). A HuggingFace-style attention module
(``structured.attention.hf_heads_attrs``: BERT's, ViT's) records its head count and head size,
so that a model with heads removed gets its narrower q/k/v (their own Linear entries) and the
head count its forward reshapes by.
"""

from __future__ import annotations

import torch
from torch import nn

from ..costs import is_conv1d_style
from ..errors import PrunekitError
from ..layers import RemovedBlock, SlimAttention
from ..structured.attention import hf_heads_attrs, set_heads

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm
SHRUNK_MARK = "_prunekit_shrunk"      # set on a model, and on each layer, that channel surgery narrowed


def mark_shrunk(module: nn.Module) -> None:
    """Mark ``module`` as narrowed by channel surgery (``structured.shrink``) or resized to a saved
    layout (``apply_layout``), so that ``saving.save_model`` records its model's channel layout."""
    setattr(module, SHRUNK_MARK, True)


def is_shrunk(model: nn.Module) -> bool:
    """Whether ``model`` holds a layer with channels or blocks removed: one marked by ``mark_shrunk``
    (the model ``prunekit.prune`` or ``prunekit.load_pruned`` returned, a wrapper or part of it, a
    deep copy), a removed block (depth pruning) or attention with heads removed. A model narrowed by
    other code than prunekit's carries no mark and cannot be told from a dense one here."""
    return any(getattr(m, SHRUNK_MARK, False) or isinstance(m, (RemovedBlock, SlimAttention))
               for m in model.modules())


def channel_layout(model: nn.Module) -> dict[str, dict]:
    """Per-layer channel counts of every Conv/Linear/BatchNorm (and Conv1D-style layer: GPT-2's,
    "in" = its weight's rows), and the channel map of every zero-pad shortcut that lost channels
    (JSON-ready)."""
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, RemovedBlock):            # a block removed by depth pruning
            layout[name] = {"removed": True}
        elif isinstance(module, SlimAttention):        # attention with heads removed
            layout[name] = {"heads": module.num_heads, "head_dim": module.head_dim,
                            "embed_dim": module.embed_dim, "bias": module.in_proj_bias is not None,
                            "batch_first": module.batch_first, "dropout": module.dropout}
        elif (entry := _layer_entry(module)) is not None:
            layout[name] = entry
        elif (attrs := hf_heads_attrs(module)) is not None:   # HuggingFace-style attention: its head count
            layout[name] = {"attention_heads": getattr(module, attrs[1]), "head_size": getattr(module, attrs[2])}
        elif getattr(module, "pads_channels", False) and not getattr(module, "padded", True):
            # a zero-pad shortcut whose channels were cut: its map from input to output channels
            layout[name] = {"in": module.in_channels, "source": module.source_list()}
    return layout


def _layer_entry(module: nn.Module) -> dict | None:
    """The channel counts ``channel_layout`` records for a Conv/Linear/Conv1D-style/BatchNorm layer; None otherwise."""
    if isinstance(module, _CONV):
        return {"in": module.in_channels, "out": module.out_channels, "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"in": module.in_features, "out": module.out_features}
    if is_conv1d_style(module):                      # GPT-2's Conv1D: weight (in, out)
        return {"in": module.weight.shape[0], "out": module.weight.shape[1]}
    if isinstance(module, _BN):
        return {"features": module.num_features}
    return None


def apply_layout(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Resize ``model``'s layers in place to ``layout`` (fresh tensors; load weights after); each layer
    resized, and ``model`` itself, is marked shrunk (``mark_shrunk``: ``save_model`` records the layout)."""
    modules = dict(model.named_modules())
    for name, spec in layout.items():
        module = modules.get(name)
        if module is None:
            raise PrunekitError(f"the saved channel layout names layer {name!r}, which the model lacks: "
                                "the file belongs to another architecture")
        try:
            if spec.get("removed"):
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, RemovedBlock())
                continue
            if "heads" in spec:                          # an nn.MultiheadAttention that lost heads
                slim = SlimAttention(int(spec["embed_dim"]), int(spec["heads"]), int(spec["head_dim"]),
                                     bool(spec["bias"]), bool(spec["batch_first"]), float(spec["dropout"]))
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, slim)
                continue
            if "attention_heads" in spec:                # HuggingFace-style attention, maybe with heads removed
                _set_attention_heads(name, module, int(spec["attention_heads"]), int(spec["head_size"]))
                continue
            if getattr(module, "pads_channels", False) and "source" in spec:
                module.set_source(int(spec["in"]), [int(v) for v in spec["source"]])
                continue
            if _layer_entry(module) == spec:
                continue        # as saved: its own tensors kept (a weight tied to another layer stays tied)
            _check_no_wider(name, module, spec)
            mark_shrunk(module)
            if isinstance(module, _CONV):
                cin, cout, groups = int(spec["in"]), int(spec["out"]), int(spec["groups"])
                module.in_channels, module.out_channels, module.groups = cin, cout, groups
                module.weight = nn.Parameter(torch.empty(cout, cin // groups, *module.kernel_size))
                if module.bias is not None:
                    module.bias = nn.Parameter(torch.empty(cout))
            elif isinstance(module, nn.Linear):
                cin, cout = int(spec["in"]), int(spec["out"])
                module.in_features, module.out_features = cin, cout
                module.weight = nn.Parameter(torch.empty(cout, cin))
                if module.bias is not None:
                    module.bias = nn.Parameter(torch.empty(cout))
            elif is_conv1d_style(module):
                cin, cout = int(spec["in"]), int(spec["out"])
                module.nf = cout
                if hasattr(module, "nx"):
                    module.nx = cin
                module.weight = nn.Parameter(torch.empty(cin, cout))
                if getattr(module, "bias", None) is not None:
                    module.bias = nn.Parameter(torch.empty(cout))
            elif isinstance(module, _BN):
                n = int(spec["features"])
                module.num_features = n
                if module.affine:
                    module.weight = nn.Parameter(torch.ones(n))
                    module.bias = nn.Parameter(torch.zeros(n))
                if module.track_running_stats:
                    module.running_mean = torch.zeros(n)
                    module.running_var = torch.ones(n)
            else:
                raise PrunekitError(f"layer {name!r} is a {type(module).__name__}, not a Conv/Linear/Conv1D/BatchNorm")
        except PrunekitError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise PrunekitError(f"bad channel layout entry for {name!r}: {spec!r} ({err}); "
                                "the sidecar JSON is damaged") from None
    mark_shrunk(model)
    return model


def _set_attention_heads(name: str, module: nn.Module, heads: int, head_size: int) -> None:
    """Give a fresh HuggingFace-style attention module ``module`` the saved head count (its q/k/v and
    output projection are resized by their own entries)."""
    attrs = hf_heads_attrs(module)
    if attrs is None:
        raise PrunekitError(f"the saved channel layout records attention heads for {name!r}, a "
                            f"{type(module).__name__} without q/k/v projections and a head count: the file belongs "
                            "to another architecture")
    fresh_heads, fresh_size = getattr(module, attrs[1]), getattr(module, attrs[2])
    if head_size != fresh_size or heads > fresh_heads or heads < 1:
        raise PrunekitError(f"attention {name!r} has {heads} heads of {head_size} in the saved model, {fresh_heads} of "
                            f"{fresh_size} in the model passed: pass a fresh, dense instance of the architecture it "
                            "was pruned from (the same config; not one already pruned)")
    set_heads(module, heads)


def _check_no_wider(name: str, module: nn.Module, spec: dict) -> None:
    """Channel pruning only removes channels: a saved layer wider than ``module`` (the fresh
    model's) means the model passed is not the architecture the file was pruned from (e.g. built
    for 3 classes where the file has 10). A fresh model wider than the saved one cannot be told
    from a pruned layer here."""
    if isinstance(module, _CONV):
        fresh = {"in": module.in_channels, "out": module.out_channels}
    elif isinstance(module, nn.Linear):
        fresh = {"in": module.in_features, "out": module.out_features}
    elif is_conv1d_style(module):
        fresh = {"in": module.weight.shape[0], "out": module.weight.shape[1]}
    elif isinstance(module, _BN):
        fresh = {"features": module.num_features}
    else:
        return
    wider = [f"{key} {int(spec[key])} > {value}" for key, value in fresh.items()
             if key in spec and int(spec[key]) > value]
    if wider:
        raise PrunekitError(f"layer {name!r} is wider in the saved model than in the model passed ({', '.join(wider)}): "
                            "pass a fresh, dense instance of the architecture it was pruned from (the same "
                            "constructor arguments; not one already pruned)")
