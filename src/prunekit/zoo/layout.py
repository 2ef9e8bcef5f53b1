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
from ..memory_format import memory_format
from ..structured.attention import hf_heads_attrs, set_heads

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm
SHRUNK_MARK = "_prunekit_shrunk"      # set on a model, and on each layer, that channel surgery narrowed
DENSE_MARK = "_prunekit_dense"        # a narrowed layer's channel counts before any cut (None: not known)


def mark_shrunk(module: nn.Module) -> None:
    """Mark ``module`` as narrowed by channel surgery (``structured.shrink``) or resized to a saved
    layout (``apply_layout``), so that ``saving.save_model`` records its model's channel layout."""
    setattr(module, SHRUNK_MARK, True)


def remember_dense(module: nn.Module) -> None:
    """Keep ``module``'s channel counts (``_dense_entry``) before its first cut, so that the saved
    layout records what the fresh model must be built as (``apply_layout`` checks it)."""
    if not hasattr(module, DENSE_MARK):
        setattr(module, DENSE_MARK, _dense_entry(module))


def remember_dense_all(model: nn.Module) -> None:
    """Keep the counts before any cut of every Conv/Linear/Conv1D-style/BatchNorm layer of ``model``,
    before channel or depth surgery cuts any: a layer the surgery leaves as it is was built so (its
    counts are its dense ones; a zero-pad shortcut's and HuggingFace-style attention's as built too,
    ``_built_entry``), while a layer that later code puts into the cut model carries no
    mark, and ``channel_layout`` records no dense counts for it. In a model already cut
    (``is_shrunk``) an unmarked layer is such a layer: its size before any cut is not known (None)."""
    known = not is_shrunk(model)
    for module in model.modules():
        if (entry := _dense_entry(module)) is not None and not hasattr(module, DENSE_MARK):
            setattr(module, DENSE_MARK, entry if known else None)


def mark_cut_since_remembered(model: nn.Module) -> None:
    """Mark shrunk (``mark_shrunk``) each layer of ``model`` whose counts now differ from those
    ``remember_dense_all`` kept: for a model narrowed by code that marks none of its cuts (torch-pruning's,
    ``structured.baselines``), so that ``channel_layout`` records each cut layer's counts before the cut
    and ``saving.save_model`` records the layout, as for a model ``shrink`` narrowed."""
    for module in model.modules():
        if hasattr(module, DENSE_MARK) and _dense_entry(module) != getattr(module, DENSE_MARK):
            mark_shrunk(module)


def is_shrunk(model: nn.Module) -> bool:
    """Whether ``model`` holds a layer with channels or blocks removed: one marked by ``mark_shrunk``
    (the model ``prunekit.prune`` or ``prunekit.load_pruned`` returned, a wrapper or part of it, a
    deep copy), a removed block (depth pruning) or attention with heads removed. A model narrowed by
    other code than prunekit's carries no mark and cannot be told from a dense one here
    (``save_model(..., pruned_from=)`` compares it with the model as built: ``layout_against``)."""
    return any(getattr(m, SHRUNK_MARK, False) or isinstance(m, (RemovedBlock, SlimAttention))
               for m in model.modules())


def _with_dense(entry: dict, module: nn.Module, otherwise: dict | None) -> dict:
    """``entry`` with the counts ``module`` had as built ("dense": ``remember_dense``'s mark, else
    ``otherwise``), or ``entry`` alone where neither is known."""
    dense = getattr(module, DENSE_MARK, otherwise)
    return {**entry, "dense": dense} if dense is not None else entry


def _a(word: str) -> str:
    """``word`` with its article: "a Linear", "an Identity"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def channel_layout(model: nn.Module) -> dict[str, dict]:
    """Per-layer channel counts of every Conv/Linear/BatchNorm (and Conv1D-style layer: GPT-2's,
    "in" = its weight's rows), and the channel map of every zero-pad shortcut that lost channels
    (JSON-ready). Each such layer's entry holds under "dense" its counts in the model it was cut
    from (its own where it was not cut; a zero-pad shortcut's in, out and stride and HuggingFace-style
    attention's head count and head size, ``_built_entry``; an nn.MultiheadAttention with heads
    removed needs none: its embed_dim and head_dim fix the head count it was built with), which
    ``apply_layout`` requires of the fresh model (a model
    resized to an older prunekit's layout, which did not record them, records none). In a model
    with channels or blocks removed (``is_shrunk``), a layer the surgery did not see (one the
    caller's code put in since, e.g. a new head) records none either: only the counts kept by
    ``remember_dense`` are known, its current ones may be narrowed (``apply_layout`` then checks
    only that the fresh model's layer is not narrower)."""
    layout = {}
    shrunk = is_shrunk(model)
    for name, module in model.named_modules():
        if isinstance(module, RemovedBlock):            # a block removed by depth pruning
            layout[name] = {"removed": True}
        elif isinstance(module, SlimAttention):        # attention with heads removed
            layout[name] = {"heads": module.num_heads, "head_dim": module.head_dim,
                            "embed_dim": module.embed_dim, "bias": module.in_proj_bias is not None,
                            "batch_first": module.batch_first, "dropout": module.dropout}
        elif (entry := _layer_entry(module)) is not None:
            layout[name] = _with_geometry(_with_dense(entry, module, None if shrunk else entry), module)
        elif (attrs := hf_heads_attrs(module)) is not None:   # HuggingFace-style attention: its head count
            entry = {"attention_heads": getattr(module, attrs[1]), "head_size": getattr(module, attrs[2])}
            layout[name] = _with_dense(entry, module, None if shrunk else _built_entry(module))
        elif getattr(module, "pads_channels", False) and not getattr(module, "padded", True):
            # a zero-pad shortcut whose channels were cut: its map from input to output channels
            entry = {"in": module.in_channels, "source": module.source_list()}
            layout[name] = _with_dense(entry, module, None if shrunk else _built_entry(module))
    return layout


def layout_against(model: nn.Module, pruned_from: nn.Module) -> dict[str, dict] | None:
    """``model``'s channel layout with each Conv/Linear/BatchNorm layer's "dense" counts taken from
    ``pruned_from`` (the same architecture as built before the caller's code narrowed ``model``):
    its layer's counts before any cut where ``pruned_from`` is itself a cut model (``load_pruned``'s,
    ``prune``'s: the counts ``remember_dense`` kept; none recorded for a layer of such a model whose
    size before the cut is not known), its current ones otherwise; None when no layer differs
    (``model`` is as built). A layer in one model and not the other (but for the layers of blocks
    ``model`` records as removed and of attention it records with heads removed), or wider in
    ``model``, is refused: ``pruned_from`` is not what ``model`` was narrowed from."""
    ours, theirs = dict(model.named_modules()), dict(pruned_from.named_modules())
    layout = channel_layout(model)
    changed = is_shrunk(model)
    theirs_cut = is_shrunk(pruned_from)
    for name, module in ours.items():
        entry = _layer_entry(module)
        if entry is None or name not in layout:
            continue
        built = _layer_entry(theirs[name]) if name in theirs else None
        if built is None:
            raise PrunekitError(f"save_model(..., pruned_from=): the model has layer {name!r} ({_counts(entry)}), which "
                                "pruned_from lacks: pass the model as built before your code narrowed it")
        if any(entry[k] > built[k] for k in ("in", "out", "features") if k in entry and k in built):
            raise PrunekitError(f"save_model(..., pruned_from=): layer {name!r} has {_counts(entry)} in the model but "
                                f"{_counts(built)} in pruned_from, narrower: pass the model as built before your code "
                                "narrowed it")
        if entry != built:
            changed = True
        if isinstance(module, _CONV) and isinstance(theirs[name], _CONV):
            own, built_geometry = conv_geometry(module), conv_geometry(theirs[name])
            if differ := geometry_differs(own, built_geometry):
                raise PrunekitError(f"save_model(..., pruned_from=): conv {name!r} has "
                                    f"{_geometry_words({k: own.get(k) for k in differ})} in the model but "
                                    f"{_geometry_words({k: built_geometry.get(k) for k in differ})} in pruned_from: "
                                    "pass the model as built before your code narrowed it")
        layout[name] = _with_geometry(_with_dense(entry, theirs[name], None if theirs_cut else built), module)
    for name, spec in layout.items():       # a cut zero-pad shortcut, HuggingFace-style attention: as built there
        if ("source" in spec or "attention_heads" in spec) and name in theirs and name in ours:
            built = _built_entry(theirs[name])
            spec.pop("dense", None)
            if built is not None:
                spec.update(_with_dense({}, theirs[name], None if theirs_cut else built))
    replaced = [name for name, spec in layout.items() if spec.get("removed") or "heads" in spec]
    missing = [name for name, module in theirs.items()
               if _layer_entry(module) is not None and name not in ours and not _inside(name, replaced)]
    if missing:
        raise PrunekitError(f"save_model(..., pruned_from=): pruned_from has layer {missing[0]!r}, which the model "
                            "lacks: pass the model as built before your code narrowed it")
    return layout if changed else None


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


def conv_geometry(module: nn.Module) -> dict | None:
    """A conv's geometry as JSON values (kernel_size, stride, padding, dilation: lists of ints, one per
    spatial axis; padding may be "same" or "valid"; padding_mode; a ConvTranspose's output_padding,
    a list of ints too), which channel pruning never changes: ``channel_layout`` records it under
    "geometry" and ``apply_layout`` requires it of the fresh model (``geometry_differs``; its groups
    are in the entry's counts). None for a module that is not a conv."""
    if not isinstance(module, _CONV):
        return None
    def listed(value):
        return value if isinstance(value, str) else [int(v) for v in value]
    geometry = {"kernel_size": listed(module.kernel_size), "stride": listed(module.stride),
                "padding": listed(module.padding), "dilation": listed(module.dilation),
                "padding_mode": str(module.padding_mode)}
    if module.transposed:
        geometry["output_padding"] = listed(module.output_padding)
    return geometry


def _as_computed(geometry: dict) -> dict:
    """``geometry`` (``conv_geometry``'s) with padding "valid" as zeros and "same" as the per-axis
    padding torch computes it with (dilation * (kernel_size - 1) / 2, torch allows "same" only at
    stride 1) where that is a whole number on every axis (else "same" is kept: it pads unevenly)."""
    padding = geometry.get("padding")
    kernel, dilation = geometry.get("kernel_size"), geometry.get("dilation")
    if padding not in ("same", "valid") or not isinstance(kernel, list):
        return geometry
    if padding == "valid":
        return {**geometry, "padding": [0] * len(kernel)}
    if not isinstance(dilation, list) or len(dilation) != len(kernel):
        return geometry
    try:
        total = [int(d) * (int(k) - 1) for d, k in zip(dilation, kernel)]
    except (TypeError, ValueError):
        return geometry
    if any(t % 2 for t in total):
        return geometry
    return {**geometry, "padding": [t // 2 for t in total]}


def geometry_differs(own: dict, saved: dict) -> list[str]:
    """The fields of ``saved`` (a conv geometry, ``conv_geometry``'s) in which ``own`` computes
    otherwise: padding compared as computed ("same" at kernel 3 is padding 1, "valid" is 0,
    ``_as_computed``); a field ``saved`` lacks (output_padding in an older prunekit's file) is not
    compared."""
    mine, theirs = _as_computed(own), _as_computed(saved)
    return [k for k in saved if mine.get(k) != theirs[k]]


def _with_geometry(entry: dict, module: nn.Module) -> dict:
    """``entry`` with a conv's ``conv_geometry`` under "geometry" (other layers: ``entry`` as it is)."""
    geometry = conv_geometry(module)
    return {**entry, "geometry": geometry} if geometry is not None else entry


def _geometry_words(geometry) -> str:
    """A conv geometry (``conv_geometry``'s, or the conv itself) in words: "kernel_size 3x3, stride 2x2, ..."."""
    if isinstance(geometry, nn.Module):
        geometry = conv_geometry(geometry)
    def said(value):
        return value if isinstance(value, str) else "x".join(str(v) for v in value) \
            if isinstance(value, (list, tuple)) else str(value)
    return ", ".join(f"{k} {said(v)}" for k, v in geometry.items())


def _check_geometry(name: str, module: nn.Module, spec: dict) -> None:
    """Refuse, before anything is resized, a model passed whose conv ``name`` has another kernel size,
    stride, padding (as computed: "same" at kernel 3 is padding 1), dilation, padding mode or
    ConvTranspose output_padding than the saved entry's "geometry" records (loaded quietly, it would
    compute something else with the saved weights). An entry without "geometry" (an older prunekit's
    file) is not checked, nor output_padding where the entry lacks it."""
    saved = spec.get("geometry") if isinstance(spec, dict) else None
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise PrunekitError(f"bad channel layout entry for {name!r}: {spec!r} (geometry is not a mapping); "
                            "the sidecar JSON is damaged")
    own = conv_geometry(module)
    if own is None:
        raise PrunekitError(f"layer {name!r} is {_a(type(module).__name__)} in the model passed but a conv in the "
                            "model the file was pruned from: pass a fresh, dense instance of that architecture")
    differ = geometry_differs(own, saved)
    if differ:
        mine = _geometry_words({k: own.get(k) for k in differ})
        theirs = _geometry_words({k: saved[k] for k in differ})
        raise PrunekitError(f"conv {name!r} is built with {mine} in the model passed but had {theirs} in the model "
                            "the file was pruned from: build it as that one was (the same code and constructor "
                            "arguments), fresh and dense")


def _built_entry(module: nn.Module) -> dict | None:
    """What a zero-pad shortcut (``pads_channels``: its in and out channels, and its stride where it
    is a number) or HuggingFace-style attention (its head count and head size) is built with, which
    its layout entry records as "dense" and ``apply_layout`` requires of the fresh model; None otherwise."""
    if getattr(module, "pads_channels", False):
        cin, cout, stride = (getattr(module, k, None) for k in ("in_channels", "out_channels", "stride"))
        if type(cin) is int and type(cout) is int:
            return {"in": cin, "out": cout, **({"stride": stride} if type(stride) is int else {})}
        return None
    if (attrs := hf_heads_attrs(module)) is not None:
        return {"attention_heads": getattr(module, attrs[1]), "head_size": getattr(module, attrs[2])}
    return None


def _dense_entry(module: nn.Module) -> dict | None:
    """``_layer_entry``, else ``_built_entry``: the counts a layout's "dense" records for ``module``."""
    entry = _layer_entry(module)
    return entry if entry is not None else _built_entry(module)


def tied_parameters(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Each parameter two or more modules hold (``b.weight = a.weight``), as its holders'
    [(module name, attribute), ...], in ``named_modules`` order."""
    holders: dict[int, list[tuple[str, str]]] = {}
    for name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((name, attr))
    return [h for h in holders.values() if len(h) > 1]


def _tie_again(model: nn.Module, ties: list[list[tuple[str, str]]]) -> None:
    """Give the holders of each tied parameter of ``ties`` (``tied_parameters`` before resizing) one
    tensor again where they were resized alike (the channel methods cut a tie alike or not at all)."""
    for holders in ties:
        try:
            params = [getattr(model.get_submodule(name), attr) for name, attr in holders]
        except AttributeError:         # inside a removed block
            continue
        if all(isinstance(p, nn.Parameter) and p.shape == params[0].shape for p in params):
            for (name, attr), p in zip(holders[1:], params[1:]):
                if p is not params[0]:
                    setattr(model.get_submodule(name), attr, params[0])


def apply_layout(model: nn.Module, layout: dict[str, dict]) -> nn.Module:
    """Resize ``model``'s layers in place to ``layout`` (fresh tensors; load weights after); each layer
    resized, and ``model`` itself, is marked shrunk (``mark_shrunk``: ``save_model`` records the layout).
    ``model`` must be built as the one the layout was pruned from: each layer's counts equal to its
    entry's "dense" ones (``_check_dense``: a zero-pad shortcut's in/out/stride and HuggingFace-style
    attention's head count too), an nn.MultiheadAttention that lost heads built with the saved embed_dim,
    head_dim, bias and batch_first (``_check_attention``), no Conv/Linear/BatchNorm layer the layout
    lacks; all checked before any layer is resized; else one line names the layer and both counts
    (a layout without "dense", an older prunekit's, is only checked for layers wider in the file,
    ``_check_no_wider``)."""
    modules = dict(model.named_modules())
    ties = tied_parameters(model)
    replaced = [name for name, spec in layout.items() if isinstance(spec, dict) and (
        spec.get("removed") or "heads" in spec)]           # layers inside these are the saved ones' own
    for name, spec in layout.items():
        module = modules.get(name)
        if module is None:
            raise PrunekitError(f"the saved channel layout names layer {name!r}, which the model lacks: "
                                "the file belongs to another architecture")
        if not _inside(name, replaced):
            _check_kind(name, module, spec)
            _check_dense(name, module, spec)
            _check_geometry(name, module, spec)
        elif name in replaced and isinstance(spec, dict) and "heads" in spec:
            _check_attention(name, module, spec)
    if any(isinstance(spec, dict) and "dense" in spec for spec in layout.values()):
        for name, module in modules.items():       # a layer the saved model lacks: another architecture
            if name not in layout and _layer_entry(module) is not None and not _inside(name, replaced):
                raise PrunekitError(f"the model passed has layer {name!r} ({_counts(_layer_entry(module))}), which the "
                                    "saved model lacks: pass a fresh, dense instance of the architecture it was pruned "
                                    "from (the same code and constructor arguments)")
    for name, spec in layout.items():
        module = modules[name]
        if _inside(name, replaced) and name not in replaced:
            continue     # built by the removed block / attention that replaced its parent
        try:
            if spec.get("removed"):
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, RemovedBlock())
                continue
            if "heads" in spec:                          # an nn.MultiheadAttention that lost heads
                slim = SlimAttention(int(spec["embed_dim"]), int(spec["heads"]), int(spec["head_dim"]),
                                     bool(spec["bias"]), bool(spec["batch_first"]), float(spec["dropout"]))
                if (old := next(module.parameters(), None)) is not None:
                    slim.to(**_like(old))
                keep_out_proj_dense(slim, module)
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, attr, slim)
                continue
            if "attention_heads" in spec:                # HuggingFace-style attention, maybe with heads removed
                _set_attention_heads(name, module, int(spec["attention_heads"]), int(spec["head_size"]))
                _keep_dense_as_saved(module, spec)
                continue
            if getattr(module, "pads_channels", False) and "source" in spec:
                _keep_dense_as_saved(module, spec)
                module.set_source(int(spec["in"]), [int(v) for v in spec["source"]])
                mark_shrunk(module)
                continue
            dense = spec.get("dense")
            spec = {k: v for k, v in spec.items() if k not in ("dense", "geometry")}
            if _layer_entry(module) == spec:
                continue        # as saved: its own tensors kept (a weight tied to another layer stays tied)
            _check_no_wider(name, module, spec)
            if not hasattr(module, DENSE_MARK) or dense is not None:
                setattr(module, DENSE_MARK, dense)   # None: an older prunekit's layout, which did not record it
            mark_shrunk(module)
            if isinstance(module, _CONV):
                cin, cout, groups = int(spec["in"]), int(spec["out"]), int(spec["groups"])
                module.in_channels, module.out_channels, module.groups = cin, cout, groups
                shape = (cin, cout // groups) if module.transposed else (cout, cin // groups)   # ConvTranspose: (in, out/groups, k...)
                module.weight = nn.Parameter(torch.empty(*shape, *module.kernel_size, **_like(module.weight),
                                                         memory_format=memory_format(module.weight)))
                if module.bias is not None:
                    module.bias = nn.Parameter(torch.empty(cout, **_like(module.bias)))
            elif isinstance(module, nn.Linear):
                cin, cout = int(spec["in"]), int(spec["out"])
                module.in_features, module.out_features = cin, cout
                module.weight = nn.Parameter(torch.empty(cout, cin, **_like(module.weight)))
                if module.bias is not None:
                    module.bias = nn.Parameter(torch.empty(cout, **_like(module.bias)))
            elif is_conv1d_style(module):
                cin, cout = int(spec["in"]), int(spec["out"])
                module.nf = cout
                if hasattr(module, "nx"):
                    module.nx = cin
                module.weight = nn.Parameter(torch.empty(cin, cout, **_like(module.weight)))
                if getattr(module, "bias", None) is not None:
                    module.bias = nn.Parameter(torch.empty(cout, **_like(module.bias)))
            elif isinstance(module, _BN):
                n = int(spec["features"])
                module.num_features = n
                if module.affine:
                    module.weight = nn.Parameter(torch.ones(n, **_like(module.weight)))
                    module.bias = nn.Parameter(torch.zeros(n, **_like(module.bias)))
                if module.track_running_stats:
                    module.running_mean = torch.zeros(n, **_like(module.running_mean))
                    module.running_var = torch.ones(n, **_like(module.running_var))
            else:
                raise PrunekitError(f"layer {name!r} is {_a(type(module).__name__)}, not a Conv/Linear/Conv1D/BatchNorm")
        except PrunekitError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise PrunekitError(f"bad channel layout entry for {name!r}: {spec!r} ({err}); "
                                "the sidecar JSON is damaged") from None
    _tie_again(model, ties)
    recorded = any(isinstance(spec, dict) and "dense" in spec for spec in layout.values())
    for name, module in model.named_modules():    # left as built (as saved, or not in the layout)
        if _inside(name, replaced) or _dense_entry(module) is None or hasattr(module, DENSE_MARK):
            continue
        spec = layout.get(name)
        if recorded and isinstance(spec, dict) and isinstance(spec.get("dense"), dict):
            setattr(module, DENSE_MARK, {k: int(v) for k, v in spec["dense"].items()})
        elif recorded and isinstance(spec, dict):
            setattr(module, DENSE_MARK, None)    # the file records no size before a cut: not known
        else:
            remember_dense(module)               # as built (an older prunekit's layout: as it recorded)
    mark_shrunk(model)
    return model


def _like(old: torch.Tensor) -> dict:
    """The dtype and device of ``old``, for the tensor that replaces it at another size (a model built
    in float64 or on a GPU keeps its resized layers so)."""
    return {"dtype": old.dtype, "device": old.device}


def _keep_dense_as_saved(module: nn.Module, spec: dict) -> None:
    """Give a shortcut or attention module resized to ``spec`` the counts before any cut that the
    file records (None where it records none: an older prunekit's, resaved as it was)."""
    dense = spec.get("dense")
    if not hasattr(module, DENSE_MARK) or isinstance(dense, dict):
        setattr(module, DENSE_MARK, {k: int(v) for k, v in dense.items()} if isinstance(dense, dict) else None)


def keep_out_proj_dense(slim: nn.Module, attention: nn.Module) -> None:
    """Give ``slim``'s (a ``SlimAttention``'s) output projection the dense counts of ``attention``'s
    (the ``nn.MultiheadAttention`` it replaces: in = out = embed_dim as built), so that the layout
    records them rather than its narrowed input count; none where ``attention`` has no such layer."""
    out_proj = getattr(attention, "out_proj", None)
    if out_proj is not None and _layer_entry(out_proj) is not None:
        setattr(slim.out_proj, DENSE_MARK, getattr(out_proj, DENSE_MARK, _layer_entry(out_proj)))


def _inside(name: str, parents: list[str]) -> bool:
    """Whether layer ``name`` is one of ``parents`` or inside one."""
    return any(name == p or name.startswith(p + ".") or p == "" for p in parents)


def _counts(entry: dict) -> str:
    """A layer's channel counts in words: "in 64, out 10" (a conv's groups where not 1), "64 features",
    "4 heads of 16" (HuggingFace-style attention), "in 16, out 32, stride 2" (a zero-pad shortcut)."""
    if "features" in entry:
        return f"{entry['features']} features"
    if "attention_heads" in entry:
        return f"{entry['attention_heads']} heads of {entry.get('head_size', '?')}"
    if "stride" in entry:
        return f"in {entry['in']}, out {entry['out']}, stride {entry['stride']}"
    groups = f", groups {entry['groups']}" if entry.get("groups", 1) != 1 else ""
    return f"in {entry['in']}, out {entry['out']}{groups}"


def _check_dense(name: str, module: nn.Module, spec: dict) -> None:
    """Refuse a model passed whose layer ``name`` is not built as the one the file was pruned from
    (``spec["dense"]``, ``channel_layout``'s): wider (another class count, a wider stem) would be
    narrowed to the saved counts quietly, narrower or other would not load. The model's own counts
    before any cut are compared, so a model pruned before (load_pruned's, pruned again) passes.
    Entries without "dense" (an older prunekit's) are checked by ``_check_no_wider`` only."""
    dense = spec.get("dense") if isinstance(spec, dict) else None
    if not isinstance(dense, dict) or (hasattr(module, DENSE_MARK) and getattr(module, DENSE_MARK) is None):
        return                  # nothing to compare with: its size before a cut is not known
    own = getattr(module, DENSE_MARK, None) or _dense_entry(module)
    if own is None:
        raise PrunekitError(f"layer {name!r} is {_a(type(module).__name__)} in the model passed but a layer with "
                            f"{_counts(dense)} in the one the file was pruned from: pass a fresh, dense instance of "
                            "that architecture")
    try:
        differs = {k: int(v) for k, v in dense.items()} != {k: int(v) for k, v in own.items()}
        said = _counts(dense)
    except (KeyError, TypeError, ValueError) as err:
        raise PrunekitError(f"bad channel layout entry for {name!r}: {spec!r} ({err}); "
                            "the sidecar JSON is damaged") from None
    if differs:
        raise PrunekitError(f"layer {name!r} is built with {_counts(own)} in the model passed but had {said} in the "
                            "model the file was pruned from: build it as that one was (the same code and constructor "
                            "arguments, e.g. the class count and widths), fresh and dense")


def _check_kind(name: str, module: nn.Module, spec: dict) -> None:
    """Refuse, before anything is resized, a model passed whose module ``name`` is not the kind the
    saved entry ``spec`` resizes: a zero-pad shortcut's channel map ("source") or HuggingFace-style
    attention's head count ("attention_heads") on another module (an option-B or identity shortcut)."""
    if not isinstance(spec, dict):
        return
    if "source" in spec and not getattr(module, "pads_channels", False):
        raise PrunekitError(f"layer {name!r} is {_a(type(module).__name__)} in the model passed but a zero-pad "
                            "(option-A) shortcut in the model the file was pruned from: build it as that one was "
                            "(the same code and constructor arguments, e.g. the shortcut option), fresh and dense")
    if "attention_heads" in spec and hf_heads_attrs(module) is None:
        raise PrunekitError(f"the saved channel layout records attention heads for {name!r}, a "
                            f"{type(module).__name__} without q/k/v projections and a head count: the file belongs "
                            "to another architecture")


def _check_attention(name: str, module: nn.Module, spec: dict) -> None:
    """Refuse a model passed whose ``name`` is not an nn.MultiheadAttention built as the one the file
    removed heads from: the saved embed_dim and head_dim (embed_dim / head_dim heads as built), bias
    and batch_first, and keys and values of embed_dim features (kdim, vdim) with no add_bias_kv or
    add_zero_attn (the saved one's SlimAttention computes without them). Checked before anything is resized; the saved attention replaces it."""
    try:
        embed, size = int(spec["embed_dim"]), int(spec["head_dim"])
        bias, batch_first = bool(spec["bias"]), bool(spec["batch_first"])
    except (KeyError, TypeError, ValueError) as err:
        raise PrunekitError(f"bad channel layout entry for {name!r}: {spec!r} ({err}); "
                            "the sidecar JSON is damaged") from None
    said = f"{embed // size if size > 0 else '?'} heads of {size} (embed_dim {embed})"
    fix = ("build it as that one was (the same code and constructor arguments, e.g. the head count), fresh and "
           "dense")
    if not isinstance(module, (nn.MultiheadAttention, SlimAttention)):
        raise PrunekitError(f"layer {name!r} is {_a(type(module).__name__)} in the model passed but an "
                            f"nn.MultiheadAttention with {said} in the model the file was pruned from: {fix}")
    built_heads = module.embed_dim // module.head_dim if module.head_dim else module.num_heads
    own = f"{built_heads} heads of {module.head_dim} (embed_dim {module.embed_dim})"
    if (module.embed_dim, module.head_dim) != (embed, size) or int(spec["heads"]) > built_heads:
        raise PrunekitError(f"attention {name!r} is built with {own} in the model passed but had {said} in the "
                            f"model the file was pruned from: {fix}")
    built = {"kdim": getattr(module, "kdim", module.embed_dim), "vdim": getattr(module, "vdim", module.embed_dim),
             "add_bias_kv": getattr(module, "bias_k", None) is not None,
             "add_zero_attn": bool(getattr(module, "add_zero_attn", False))}
    saved = {"kdim": embed, "vdim": embed, "add_bias_kv": False, "add_zero_attn": False}   # as SlimAttention computes
    if built != saved:
        differ = ", ".join(f"{k}={built[k]}" for k in built if built[k] != saved[k])
        raise PrunekitError(f"attention {name!r} is built with {differ} in the model passed but kdim=vdim={embed} "
                            f"(its embed_dim), add_bias_kv=False, add_zero_attn=False in the model the file was "
                            f"pruned from: {fix}")
    own_bias = module.in_proj_bias is not None
    if own_bias != bias or bool(getattr(module, "batch_first", False)) != batch_first:
        raise PrunekitError(f"attention {name!r} is built with bias={own_bias}, batch_first="
                            f"{bool(getattr(module, 'batch_first', False))} in the model passed but bias={bias}, "
                            f"batch_first={batch_first} in the model the file was pruned from: {fix}")


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
    for 3 classes where the file has 10). Without the "dense" counts (an older prunekit's layout) a
    fresh model wider than the saved one cannot be told from a pruned layer here."""
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
