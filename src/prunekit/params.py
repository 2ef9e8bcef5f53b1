"""ParamSpace: the prunable weights of a model as one flat vector with per-layer slices.

Solvers work on a flat vector w of shape (p,); this module maps it to and from the model's
tensors. A *prunable weight* is a parameter tensor the network multiplies: every Conv/Linear
``weight``, the packed ``in_proj_weight`` (or ``q/k/v_proj_weight``) of
``nn.MultiheadAttention``, embedding tables, recurrent layers' ``weight_ih``/``weight_hh``, and,
given the ``CostModel``, any parameter the trace saw as an operand of a product (a functional
``F.linear(x, self.w)`` or ``x @ self.w``). Biases, norm scales, class tokens and positional
embeddings are never prunable.

Each prunable tensor is an ``Entry`` named like its ``CostModel`` layer: the module's name for
a module's ``weight`` ("fc1"), the parameter's name otherwise ("blocks.0.attn.in_proj_weight").
Users include or exclude by name pattern (``fnmatch`` style, e.g. ``"layer1.*"`` or ``"fc"``),
matched against the entry's name, its module's name and every module above it, so excluding
``"blocks.*.attn"`` leaves that attention's ``in_proj_weight`` and its ``out_proj`` dense.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .costs import WEIGHT_LAYERS, CostModel
from .errors import PrunekitError, worded

_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass(frozen=True)
class Entry:
    """One prunable tensor: parameter ``param_name``, at ``w[slice]`` in the flat vector.

    ``name`` is its layer name (the ``CostModel``'s, and the key of masks); ``module`` the name
    of the module that owns it.
    """

    name: str
    param_name: str
    module: str
    shape: tuple[int, ...]
    slice: slice

    @property
    def numel(self) -> int:
        return self.slice.stop - self.slice.start

    @property
    def module_name(self) -> str:
        """The layer name (kept under its old name: masks and checkpoints are keyed by it)."""
        return self.name


def default_prunable(model: nn.Module) -> list[str]:
    """Names (as in ``named_parameters``) of the parameters prunable by type, without a trace."""
    names = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for local, p in module.named_parameters(recurse=False):
            if _prunable_by_type(module, local, p):
                names.append(prefix + local)
    return names


def _prunable_by_type(module: nn.Module, local: str, p: torch.Tensor) -> bool:
    if isinstance(module, (*WEIGHT_LAYERS, nn.Embedding, nn.EmbeddingBag, nn.Bilinear)):
        return local == "weight"
    if isinstance(module, nn.MultiheadAttention):
        return local in _ATTENTION_WEIGHTS
    if isinstance(module, (nn.modules.rnn.RNNBase, nn.modules.rnn.RNNCellBase)):
        return local.startswith(("weight_ih", "weight_hh"))
    return False


class ParamSpace:
    """The prunable weights of ``model``.

    Args:
        model: the network; its tensors are read and written in place.
        include: name patterns of layers to prune (default: every prunable weight).
        exclude: name patterns of layers to leave dense (applied after ``include``).
        costs: the model's ``CostModel``; with it, parameters the trace saw multiplied in
            functional code are prunable too, and a layer the trace never ran (a branch the
            example input did not take, a module forward never calls) is left dense and named
            in ``not_run`` (its cost is unknown, so no budget can count it); without it, only
            the module types above.
    """

    def __init__(self, model: nn.Module, include: list[str] | None = None,
                 exclude: list[str] | None = None, costs: CostModel | None = None):
        self.model = model
        self.entries: list[Entry] = []
        params = dict(model.named_parameters())
        chosen = set(default_prunable(model))
        seen = chosen
        if costs is not None:
            seen = {layer.param_name for layer in costs.weight_layers() if layer.param_name in params}
            chosen = chosen | seen
        self.not_run: list[str] = []
        places = _places(model)
        candidates = []                       # (param name, entry name, every module holding it)
        for param_name in params:
            if param_name in chosen:
                owner, _, local = param_name.rpartition(".")
                candidates.append((param_name, owner if local == "weight" else param_name, places[param_name]))
        _refuse_torch_pruned(model)
        parametrized = _parametrized(model)      # (weight name, entry name, its module): prunable by type
        _check_patterns_match(include, "include", candidates + parametrized)
        _check_patterns_match(exclude, "exclude", candidates + parametrized)
        for param_name, name, owners in parametrized:    # made before each call: no pruning can stick to it
            if (include is None or _matches(include, name, owners)) and not (
                    exclude is not None and _matches(exclude, name, owners)):
                module = model.get_submodule(owners[0])
                local = param_name.rpartition(".")[2]
                kinds = ", ".join(type(p).__name__ for p in module.parametrizations[local])
                raise PrunekitError(
                    f"{param_name} is under a torch parametrization ({kinds}), made anew before each call from "
                    f"{owners[0] + '.' if owners[0] else ''}parametrizations.{local}.original: prunekit cannot "
                    f"prune it (it would stay dense); fold it into a plain weight first with "
                    f"torch.nn.utils.parametrize.remove_parametrizations(module, {local!r}), or exclude {name!r}")
        start = 0
        for param_name, name, owners in candidates:
            if include is not None and not _matches(include, name, owners):
                continue
            if exclude is not None and _matches(exclude, name, owners):
                continue
            if param_name not in seen:
                if params[param_name].numel():      # a layer of no weights (nn.Linear(64, 0)): none to prune
                    self.not_run.append(name)
                continue
            p = params[param_name]
            self.entries.append(Entry(name, param_name, owners[0], tuple(p.shape), slice(start, start + p.numel())))
            start += p.numel()
        if not self.entries and not chosen:
            raise PrunekitError("the model has no prunable weights: prunekit prunes the weights of "
                                "Conv/Linear layers and of parameters multiplied in functional code")
        if not self.entries and self.not_run:
            listed = _listed(self.not_run)
            raise worded(f"none of the layers to prune ran on the example input ({listed}): give an example_input "
                         "(or data) that runs them",
                         f"none of the layers to prune ran on the data's first example ({listed}): give --data whose "
                         "examples take the branch they are in, or --include layers that run")
        if not self.entries:
            candidates = sorted({e.rpartition(".")[0] or e for e in chosen})
            given = [(flag, patterns) for flag, patterns in (("include", include), ("exclude", exclude))
                     if patterns is not None]
            python = " and ".join(f"{flag}={list(patterns)!r}" for flag, patterns in given)
            flags = " and ".join(f"--{flag} {' '.join(patterns)}" for flag, patterns in given)
            leave = "leaves" if len(given) == 1 else "leave"
            raise worded(f"no prunable weights matched: {python} {leave} no layer to prune; check those patterns "
                         f"against the layer names ({_listed(candidates)})",
                         f"no prunable weights matched: {flags} {leave} no layer to prune; check those patterns "
                         f"against the layer names ({_listed(candidates)})")
        self._params = {e.name: params[e.param_name] for e in self.entries}
        self.numel = start

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def param_names(self) -> list[str]:
        """The prunable tensors' names in ``model.named_parameters()``."""
        return [e.param_name for e in self.entries]

    def weights(self) -> list[torch.Tensor]:
        """The live weight tensors, in entry order."""
        return [self._params[e.name] for e in self.entries]

    def vector(self) -> torch.Tensor:
        """A detached copy of the prunable weights, (p,)."""
        return torch.cat([w.detach().reshape(-1) for w in self.weights()])

    def count_nonzero(self) -> int:
        """Nonzero prunable weights: ``count_nonzero(vector())`` without that (p,) copy."""
        return sum(int(torch.count_nonzero(w.detach())) for w in self.weights())

    def assign(self, w: torch.Tensor) -> None:
        """Write the flat vector ``w`` (p,) back into the model, in place."""
        if w.shape != (self.numel,):
            raise PrunekitError(f"expected a flat vector of {self.numel} weights, got shape {tuple(w.shape)}")
        with torch.no_grad():
            for entry, weight in zip(self.entries, self.weights()):
                weight.copy_(w[entry.slice].view(entry.shape).to(weight))

    def split(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer views of a flat vector (p,), shaped like the weights."""
        return {e.name: v[e.slice].view(e.shape) for e in self.entries}

    def macs_per_weight(self, costs: CostModel) -> torch.Tensor:
        """MACs each prunable weight costs, per example, (p,) int64 (0 for a weight the trace
        never saw multiplied: a layer that did not run, an embedding table)."""
        device = self.weights()[0].device
        return torch.cat([self._layer_costs(costs, e, device) for e in self.entries])

    def macs_summary(self, costs: CostModel) -> tuple[int, int, bool]:
        """(sum, least, any zero) of ``macs_per_weight(costs)``: MACs per example, as Python ints,
        without building that (p,) int64 vector (8 bytes a weight: 0.9 GB for BERT-base, twice
        over while ``torch.cat`` joins it), one layer at a time and none for a layer costing the
        same per weight. ``least`` is 0 when any weight costs none; p = 0 gives (0, 0, False)."""
        total, least, zero = 0, None, False
        for e in self.entries:
            if e.numel == 0:
                continue
            layer = costs.layer(e.name) if costs.has_layer(e.name) else None
            if layer is None or layer.param_name != e.param_name:
                low, part = 0, 0
            elif layer.element_macs is not None:
                values = layer.element_macs
                low, part = int(values.min()), int(values.sum())
            else:
                low, part = int(layer.macs_per_weight), int(layer.macs_per_weight) * e.numel
            total += part
            zero = zero or low == 0
            least = low if least is None else min(least, low)
        return total, least or 0, zero

    def cost_slices(self, costs: CostModel) -> tuple[list[slice], list[int]]:
        """Slices of w over which every weight costs the same, and that cost: per layer, or
        finer where a layer's elements cost different amounts (cross-attention projections)."""
        slices, macs = [], []
        for e in self.entries:
            layer = costs.layer(e.name) if costs.has_layer(e.name) else None
            if layer is None or layer.param_name != e.param_name or layer.element_macs is None:
                slices.append(e.slice)
                macs.append(0 if layer is None or layer.param_name != e.param_name else layer.macs_per_weight)
                continue
            values = layer.element_macs
            change = torch.nonzero(values[1:] != values[:-1]).flatten().add(1).tolist()
            bounds = [0, *change, values.numel()]
            for a, b in zip(bounds[:-1], bounds[1:]):
                slices.append(slice(e.slice.start + a, e.slice.start + b))
                macs.append(int(values[a]))
        return slices, macs

    @staticmethod
    def _layer_costs(costs: CostModel, e: Entry, device) -> torch.Tensor:
        layer = costs.layer(e.name) if costs.has_layer(e.name) else None
        if layer is None or layer.param_name != e.param_name:
            return torch.zeros(e.numel, dtype=torch.int64, device=device)
        return layer.weight_costs(device)

    def layer_slices(self) -> list[slice]:
        return [e.slice for e in self.entries]


def _refuse_torch_pruned(model: nn.Module) -> None:
    """Refuse a layer pruned with ``torch.nn.utils.prune``: its ``weight`` is ``weight_orig *
    weight_mask``, made in a forward pre-hook, so prunekit would see neither a prunable weight nor
    the zeros its mask makes (the layer left out, its MACs counted dense); and one under the old
    form of ``spectral_norm`` (``weight_orig`` divided in a pre-hook: left out too)."""
    from torch.nn.utils import prune as torch_prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    for module_name, module in model.named_modules():
        normed = [hook.name for hook in module._forward_pre_hooks.values() if isinstance(hook, SpectralNorm)]
        if normed:            # the old form of spectral_norm: weight = weight_orig / sigma, in a pre-hook
            raise PrunekitError(
                f"module {module_name or '(root)'!r} has spectral normalization (its {normed[0]} is made from "
                f"{normed[0]}_orig before each call), which prunekit cannot prune: fold it into a plain weight first "
                f"with torch.nn.utils.remove_spectral_norm(module, {normed[0]!r}), then prune")
        names = [hook._tensor_name for hook in module._forward_pre_hooks.values()
                 if isinstance(hook, torch_prune.BasePruningMethod)]
        names += [local[:-len("_orig")] for local, _ in module.named_parameters(recurse=False)
                  if local.endswith("_orig") and hasattr(module, local[:-len("_orig")] + "_mask")]
        # refused even where exclude= names it (unlike a parametrized weight): its weight is no
        # parameter, so the cost model counts the layer's MACs and parameters dense, the zeros of its
        # mask unseen (the budget and the reported sparsity and MACs kept would be wrong)
        if names:
            where = module_name or "(root)"
            raise PrunekitError(
                f"module {where!r} was pruned with torch.nn.utils.prune (its {names[0]} is {names[0]}_orig * "
                f"{names[0]}_mask, made before each call), which prunekit cannot count or prune, excluded or not: "
                f"make that pruning permanent first with torch.nn.utils.prune.remove(module, {names[0]!r}) (its "
                "zeros stay), then prune")


def _parametrized(model: nn.Module) -> list[tuple[str, str, list[str]]]:
    """The weights prunable by type (a Conv/Linear ``weight`` ...) that are under a
    ``torch.nn.utils.parametrize`` parametrization: (name as ``module.weight``, entry name, [module])."""
    from torch.nn.utils import parametrize
    found = []
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for local in module.parametrizations:
            if _prunable_by_type(module, local, None):
                name = f"{module_name}.{local}" if module_name else local
                found.append((name, module_name if local == "weight" and module_name else name, [module_name]))
    return found


def _listed(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _places(model: nn.Module) -> dict[str, list[str]]:
    """Per parameter name (as ``named_parameters`` gives it), the names of every module holding
    that tensor, its own first: a tied weight (GPT-2's ``lm_head`` shares ``transformer.wte``'s)
    is listed once by torch, under its first holder, but may be named by any of them."""
    holders: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(name.rpartition(".")[0])
    return {name: holders[id(p)] for name, p in model.named_parameters()}


def _check_patterns_match(patterns: list[str] | None, what: str, candidates) -> None:
    """Refuse a pattern that names no prunable layer (a typo would silently prune or keep all)."""
    for pattern in patterns or ():
        if not any(_matches([pattern], name, owners) for _, name, owners in candidates):
            names = sorted({owners[0] or name for _, name, owners in candidates})
            raise PrunekitError(f"{what} pattern {pattern!r} matches no prunable layer: check it against the "
                                f"layer names ({_listed(names)})")


def _matches(patterns: list[str], name: str, owners: list[str]) -> bool:
    """True if a pattern matches the entry's name, a module holding it or any module above one."""
    candidates = [name]
    for owner in owners:
        parts = owner.split(".") if owner else []
        candidates += [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    return any(fnmatch.fnmatchcase(c, pat) for c in candidates for pat in patterns)
