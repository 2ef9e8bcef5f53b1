"""Keep-masks that hold through training.

A mask is a bool tensor per prunable weight (True = kept). ``MaskHold`` keeps pruned weights
exactly zero while a model trains: their gradients are zeroed (so optimizer state such as
momentum never grows for them) and, after every optimizer step, the weights are multiplied by
the mask again (so weight decay, Adam's epsilon terms or stale state cannot move them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .params import ParamSpace


def masks_from_weights(space: ParamSpace) -> dict[str, torch.Tensor]:
    """Keep-masks of the current weights: True where the weight is nonzero."""
    return {e.module_name: w.detach() != 0 for e, w in zip(space.entries, space.weights())}


# A layer at least this share exact zeros (and not all zeros) was pruned: trained float weights
# are almost never exactly zero, while a wholly zero layer is an initialisation (zero-init), not pruning.
PRUNED_LAYER_SHARE = 0.5
# Exact zeros at least this share of the prunable weights are worth a line when they are trained.
NOTABLE_ZERO_SHARE = 0.01


@dataclass(frozen=True)
class ExactZeros:
    """The exact zeros of a model's prunable weights (``exact_zeros``): ``zeros`` of ``numel``
    weights (counts), ``pruned_layers`` (names of layers at least ``PRUNED_LAYER_SHARE`` zeros but
    not all), ``empty_layers`` (names of layers that are all zeros)."""
    zeros: int
    numel: int
    pruned_layers: tuple[str, ...]
    empty_layers: tuple[str, ...]

    @property
    def share(self) -> float:
        """Zeros as a fraction (0-1) of the prunable weights."""
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def looks_pruned(self) -> bool:
        """Whether some layer is at least half exact zeros without being all zeros: pruned."""
        return bool(self.pruned_layers)

    @property
    def notable(self) -> bool:
        """Whether training these zeros is worth a line: pruned-looking, a wholly zero layer, or
        at least ``NOTABLE_ZERO_SHARE`` of the prunable weights."""
        return self.looks_pruned or bool(self.empty_layers) or self.share >= NOTABLE_ZERO_SHARE

    def layers(self, limit: int = 3) -> str:
        """The pruned-looking layers, named (at most ``limit``, then a count)."""
        names = [f"'{name}'" for name in self.pruned_layers]     # quoted: a Sequential child "3" is no count
        return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def exact_zeros(space: ParamSpace) -> ExactZeros:
    """Count the exact zeros of ``space``'s weights, per layer (see ``ExactZeros``)."""
    zeros, numel, pruned, empty = 0, 0, [], []
    for entry, weight in zip(space.entries, space.weights()):
        n, z = weight.numel(), int((weight.detach() == 0).sum())
        zeros, numel = zeros + z, numel + n
        if n and z == n:
            empty.append(entry.module_name)
        elif n and z >= PRUNED_LAYER_SHARE * n:
            pruned.append(entry.module_name)
    return ExactZeros(zeros, numel, tuple(pruned), tuple(empty))


def masks_from_vector(space: ParamSpace, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a flat keep vector (p,) bool into per-layer masks shaped like the weights."""
    return {name: m.clone() for name, m in space.split(keep.bool()).items()}


def apply_masks(space: ParamSpace, masks: dict[str, torch.Tensor]) -> None:
    """Zero every pruned weight in place."""
    with torch.no_grad():
        for entry, weight in zip(space.entries, space.weights()):
            weight.mul_(masks[entry.module_name].to(weight))


class MaskHold:
    """Holds ``masks`` on ``space``'s weights during training with ``optimizer``.

    Use as a context manager, or call ``remove()`` when done::

        with MaskHold(space, masks, optimizer):
            train(...)
    """

    def __init__(self, space: ParamSpace, masks: dict[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer):
        self.space, self.masks = space, masks
        apply_masks(space, masks)
        self._handles = [optimizer.register_step_post_hook(lambda *_: apply_masks(space, masks))]
        for entry, weight in zip(space.entries, space.weights()):
            if weight.requires_grad:          # a frozen weight never moves: the step hook holds it
                mask = masks[entry.module_name]
                self._handles.append(weight.register_hook(lambda grad, m=mask: grad * m.to(grad)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "MaskHold":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
