"""Keep-masks that hold through training.

A mask is a bool tensor per prunable weight (True = kept). ``MaskHold`` keeps pruned weights
exactly zero while a model trains: their gradients are zeroed (so optimizer state such as
momentum never grows for them) and, after every optimizer step, the weights are multiplied by
the mask again (so weight decay, Adam's epsilon terms or stale state cannot move them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .params import ParamSpace


def masks_from_weights(space: ParamSpace) -> dict[str, torch.Tensor]:
    """Keep-masks of the current weights: True where the weight is nonzero."""
    return {e.module_name: w.detach() != 0 for e, w in zip(space.entries, space.weights())}


# A layer at least this share exact zeros (and not all zeros) was pruned: trained float weights
# are almost never exactly zero, while a wholly zero layer is an initialisation (zero-init), not pruning.
PRUNED_LAYER_SHARE = 0.5
# A layer (not all zeros) at least this share exact zeros is worth a line when its zeros are
# trained: under it (a zero row here and there) they are left to train without a word.
NOTABLE_LAYER_SHARE = 0.1


@dataclass(frozen=True)
class ExactZeros:
    """The exact zeros of a model's prunable weights (``exact_zeros``): ``zeros`` of ``numel``
    weights (counts; an Embedding's ``padding_idx`` row, zero by design and never trained, is left
    out), ``pruned_layers`` (names of layers at least ``PRUNED_LAYER_SHARE`` zeros but not all),
    ``empty_layers`` (names of layers that are all zeros), ``notable_layers`` (names of layers at
    least ``NOTABLE_LAYER_SHARE`` zeros but not all; the pruned ones among them)."""
    zeros: int
    numel: int
    pruned_layers: tuple[str, ...]
    empty_layers: tuple[str, ...]
    notable_layers: tuple[str, ...] = ()

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
        """Whether training these zeros is worth a line: some layer, not all zeros, is at least
        ``NOTABLE_LAYER_SHARE`` exact zeros (a lone zero row, a padding row or a wholly zero,
        zero-initialised layer is not)."""
        return bool(self.notable_layers)

    def layers(self, limit: int = 3, notable: bool = False) -> str:
        """The pruned-looking layers (``notable``: the notable ones), named (at most ``limit``,
        then a count)."""
        chosen = self.notable_layers if notable else self.pruned_layers
        names = [f"'{name}'" for name in chosen]     # quoted: a Sequential child "3" is no count
        return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _padding_row(space: ParamSpace, entry) -> int | None:
    """The ``padding_idx`` row of ``entry`` when it is an Embedding's weight, else None."""
    owner, _, local = entry.param_name.rpartition(".")
    if local != "weight":
        return None
    try:
        module = space.model.get_submodule(owner)
    except AttributeError:
        return None
    padding = getattr(module, "padding_idx", None) if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) else None
    return None if padding is None else int(padding) % module.num_embeddings


def exact_zeros(space: ParamSpace) -> ExactZeros:
    """Count the exact zeros of ``space``'s weights, per layer (see ``ExactZeros``)."""
    zeros, numel, pruned, empty, notable = 0, 0, [], [], []
    for entry, weight in zip(space.entries, space.weights()):
        weight = weight.detach()
        padding = _padding_row(space, entry)
        if padding is not None and weight.dim() == 2:      # zero by design, never trained
            weight = torch.cat([weight[:padding], weight[padding + 1:]])
        n, z = weight.numel(), int((weight == 0).sum())
        zeros, numel = zeros + z, numel + n
        if n and z == n:
            empty.append(entry.module_name)
            continue
        if n and z >= PRUNED_LAYER_SHARE * n:
            pruned.append(entry.module_name)
        if n and z >= NOTABLE_LAYER_SHARE * n:
            notable.append(entry.module_name)
    return ExactZeros(zeros, numel, tuple(pruned), tuple(empty), tuple(notable))


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
