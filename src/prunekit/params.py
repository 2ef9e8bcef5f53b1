"""ParamSpace: the prunable weights of a model as one flat vector with per-layer slices.

Solvers work on a flat vector w of shape (p,); this module maps it to and from the model's
tensors. By default every Conv/Linear ``weight`` is prunable; users include or exclude
modules by name pattern (``fnmatch`` style, e.g. ``"layer1.*"`` or ``"fc"``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .costs import WEIGHT_LAYERS, CostModel
from .errors import PrunekitError


@dataclass(frozen=True)
class Entry:
    """One prunable tensor: ``module_name``'s ``weight``, at ``w[slice]`` in the flat vector."""

    module_name: str
    shape: tuple[int, ...]
    slice: slice

    @property
    def numel(self) -> int:
        return self.slice.stop - self.slice.start


class ParamSpace:
    """The prunable weights of ``model``.

    Args:
        model: the network; its tensors are read and written in place.
        include: name patterns of modules to prune (default: every Conv/Linear).
        exclude: name patterns of modules to leave dense (applied after ``include``).
    """

    def __init__(self, model: nn.Module, include: list[str] | None = None,
                 exclude: list[str] | None = None):
        self.model = model
        self.entries: list[Entry] = []
        self._modules: dict[str, nn.Module] = {}
        start = 0
        for name, module in model.named_modules():
            if not isinstance(module, WEIGHT_LAYERS):
                continue
            if include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in include):
                continue
            if exclude is not None and any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
                continue
            numel = module.weight.numel()
            self.entries.append(Entry(name, tuple(module.weight.shape), slice(start, start + numel)))
            self._modules[name] = module
            start += numel
        if not self.entries:
            raise PrunekitError("no prunable Conv/Linear weights matched: check the include/exclude "
                                f"patterns {include!r}/{exclude!r} against the module names")
        self.numel = start

    def names(self) -> list[str]:
        return [e.module_name for e in self.entries]

    def param_names(self) -> list[str]:
        """The prunable tensors' names in ``model.named_parameters()``."""
        return [f"{e.module_name}.weight" if e.module_name else "weight" for e in self.entries]

    def weights(self) -> list[torch.Tensor]:
        """The live weight tensors, in entry order."""
        return [self._modules[e.module_name].weight for e in self.entries]

    def vector(self) -> torch.Tensor:
        """A detached copy of the prunable weights, (p,)."""
        return torch.cat([w.detach().reshape(-1) for w in self.weights()])

    def assign(self, w: torch.Tensor) -> None:
        """Write the flat vector ``w`` (p,) back into the model, in place."""
        if w.shape != (self.numel,):
            raise PrunekitError(f"expected a flat vector of {self.numel} weights, got shape {tuple(w.shape)}")
        with torch.no_grad():
            for entry, weight in zip(self.entries, self.weights()):
                weight.copy_(w[entry.slice].view(entry.shape).to(weight))

    def split(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer views of a flat vector (p,), shaped like the weights."""
        return {e.module_name: v[e.slice].view(e.shape) for e in self.entries}

    def macs_per_weight(self, costs: CostModel) -> torch.Tensor:
        """MACs each prunable weight costs, per example, (p,) int64."""
        return torch.cat([torch.full((e.numel,), costs.layer(e.module_name).macs_per_weight,
                                     dtype=torch.int64, device=self.weights()[0].device) for e in self.entries])

    def layer_slices(self) -> list[slice]:
        return [e.slice for e in self.entries]
