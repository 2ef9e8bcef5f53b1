"""Depth pruning: whole blocks removed before a channel method thins what is left (``depth_flops``).

Thinning channels lowers MACs much faster than time on a CPU: a thin convolution's time follows
its activations, and BatchNorm, ReLU and the residual adds of kept block outputs keep their
cost (ResNet-56 at 30% of the MACs by the taper alone ran at 0.55x dense). Removing a block
removes all of its work. So a channel method can be given a depth cut first: blocks are removed
down to ``depth_flops`` of the dense MACs, then the method prunes channels of the rest to the
final budget (the MACs of both counted by the same ``CostModel``).

What a block is: a child of an ``nn.Sequential`` whose output has the shape of its input on the
example input and that holds a Conv/Linear layer (a residual block with an identity shortcut,
a shape-keeping layer of a plain net); where such blocks nest, only the innermost count.
Removing one replaces it by :class:`~prunekit.layers.RemovedBlock` (the identity), which the
saved channel layout records, so the smaller model reloads without code from the file.

Which blocks go: each block is scored once, on the dense model, by the rise of the mean
cross-entropy on ``depth_batches`` training batches (eval mode) when it alone is removed, per MAC
it saves; blocks go cheapest first while the MACs stay at or above ``depth_flops`` (one ranking:
re-scoring after every removal costs a pass per block per removal).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..costs import CostModel
from ..layers import RemovedBlock

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


def removable_blocks(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the blocks of ``model`` (module docstring), in module order."""
    shapes: dict[str, bool] = {}
    handles = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, RemovedBlock) or not any(isinstance(m, _WEIGHTED) for m in child.modules()):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name

            def hook(module, inputs, output, name=name):
                shapes[name] = (len(inputs) == 1 and torch.is_tensor(inputs[0]) and torch.is_tensor(output)
                                and inputs[0].shape == output.shape)
            handles.append(child.register_forward_hook(hook))
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(example_input)
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    blocks = [name for name, same in shapes.items() if same]
    return [b for b in blocks if not any(other.startswith(b + ".") for other in blocks)]


def remove_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named blocks of ``model`` in place by ``RemovedBlock``; returns ``model``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, RemovedBlock())
    return model


def _mean_loss(model: nn.Module, batches: list) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x.to(device))
            total += float(nn.functional.cross_entropy(out, y.to(device), reduction="sum"))
            count += len(y)
    return total / count


def depth_cut(model: nn.Module, costs: CostModel, target_macs: float, batches: list,
              progress=None) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with blocks removed, cheapest first by loss rise per MAC, keeping at
    least ``target_macs`` MACs (counted by ``costs``, the dense model's cost model).

    ``batches``: a list of (x, y) training batches for the scores. Returns the cut copy and
    facts to record: removed names, every block's loss rise and MACs saved, MACs kept.
    """
    blocks = removable_blocks(model, costs.example_input)
    if not blocks:
        return copy.deepcopy(model), {"removed": [], "blocks": {}, "note": "no removable block found"}
    was_training = model.training
    model.eval()
    base = _mean_loss(model, batches)
    dense_macs = costs.count(model).macs
    scores = {}
    for i, name in enumerate(blocks):
        trial = remove_blocks(copy.deepcopy(model), [name])
        saved = dense_macs - costs.count(trial).macs
        scores[name] = {"loss_rise": _mean_loss(trial, batches) - base, "macs_saved": saved}
        if progress is not None:
            progress({"depth_scored": i + 1, "blocks": len(blocks), "block": name, **scores[name]})
    model.train(was_training)
    order = sorted((b for b in blocks if scores[b]["macs_saved"] > 0),
                   key=lambda b: scores[b]["loss_rise"] / scores[b]["macs_saved"])
    cut, removed = copy.deepcopy(model), []
    macs = dense_macs
    for name in order:
        if macs - scores[name]["macs_saved"] < target_macs:
            continue
        block = cut.get_submodule(name)
        remove_blocks(cut, [name])
        after = costs.count(cut).macs         # recount: savings of neighbours need not add up exactly
        if after < target_macs:
            parent_name, _, child = name.rpartition(".")
            setattr(cut.get_submodule(parent_name) if parent_name else cut, child, block)
            continue
        removed.append(name)
        macs = after
    return cut, {"removed": removed, "macs": macs, "flops_kept": macs / costs.macs, "base_loss": base,
                 "blocks": scores}
