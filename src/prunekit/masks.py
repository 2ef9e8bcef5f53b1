"""Keep-masks that hold through training.

A mask is a bool tensor per prunable weight (True = kept). ``MaskHold`` keeps pruned weights
exactly zero while a model trains: their gradients are zeroed (so optimizer state such as
momentum never grows for them) and, after every optimizer step, the weights are multiplied by
the mask again (so weight decay, Adam's epsilon terms or stale state cannot move them).
"""

from __future__ import annotations

import torch

from .params import ParamSpace


def masks_from_weights(space: ParamSpace) -> dict[str, torch.Tensor]:
    """Keep-masks of the current weights: True where the weight is nonzero."""
    return {e.module_name: w.detach() != 0 for e, w in zip(space.entries, space.weights())}


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
