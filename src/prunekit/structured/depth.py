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

Which blocks go: greedily, one per round, the block whose removal from the current cut raises
the mean cross-entropy on ``depth_batches`` training batches least per MAC it saves (or, with
``depth_per="time"``, per second of its measured forward time), while the
MACs stay at or above ``depth_flops``. The loss is taken with BatchNorm on batch statistics, as
the recalibrated model will see it. Every round scores every remaining block (a forward pass of
the batches each): one ranking on the dense model was tried first and, on ResNet-56, removed all
of stage 2 but its first block, as the blocks' single-removal scores were each small.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from ..costs import CostModel
from ..layers import RemovedBlock
from ..losses import LossFn, summed_loss

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


def _mean_loss(model: nn.Module, batches: list, loss_fn: LossFn | None = None) -> float:
    """Mean loss (``prunekit.losses``; None: cross-entropy) of a copy of ``model`` with BatchNorm
    on each batch's own statistics (as after recalibration: a removed block shifts the statistics
    of every layer after it) and everything else in eval mode; ``model`` itself is not changed."""
    probe = copy.deepcopy(model).eval()
    for module in probe.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    device = next(probe.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += float(summed_loss(loss_fn, probe(x.to(device)), y.to(device)))
            count += y.shape[0]
    return total / count


def block_seconds(model: nn.Module, blocks: list[str], x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Median seconds of each block's forward on its own input when ``model`` runs on ``x`` (eval
    mode, no grad, on this machine and torch's current thread count), after one warm-up call."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs.__setitem__(name, args[0])) for name in blocks]
    probe_mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    seconds = {}
    with torch.no_grad():
        for name in blocks:
            block = model.get_submodule(name)
            block(inputs[name])
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                block(inputs[name])
                times.append(time.perf_counter() - start)
            seconds[name] = statistics.median(times)
    model.train(probe_mode)
    return seconds


def depth_cut(model: nn.Module, costs: CostModel, target_macs: float, batches: list, per: str = "macs",
              progress=None, loss_fn: LossFn | None = None) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with blocks removed greedily, keeping at least ``target_macs`` MACs
    (counted by ``costs``, the dense model's cost model): each round scores every block that
    still fits by the loss rise per unit saved when it is removed from the current cut, and
    removes the cheapest (so removals that only hurt together, e.g. a whole stage, are seen).

    ``per``: the unit, ``"macs"`` (MACs saved) or ``"time"`` (the block's measured forward time on
    the first batch, ``block_seconds``: blocks that are slow for their MACs, e.g. thin ones at
    high resolution, go first; the MAC budget is the same). ``batches``: a list of (x, y)
    training batches for the scores. Returns the cut copy and facts to record: removed names in
    order, each round's loss and MACs, MACs kept, the block times when measured.
    """
    if per not in ("macs", "time"):
        raise ValueError(f"per must be 'macs' or 'time', got {per!r}")
    blocks = removable_blocks(model, costs.example_input)
    seconds = block_seconds(model, blocks, batches[0][0]) if per == "time" and blocks else {}
    cut = copy.deepcopy(model)
    macs = costs.count(cut).macs
    loss = _mean_loss(cut, batches, loss_fn) if blocks else None
    rounds: list[dict] = []
    while True:
        best = None
        for name in blocks:
            trial = remove_blocks(copy.deepcopy(cut), [name])
            after = costs.count(trial).macs
            if after < target_macs or after >= macs:
                continue
            rise = _mean_loss(trial, batches, loss_fn) - loss
            score = rise / (max(seconds[name], 1e-9) if per == "time" else macs - after)
            if best is None or score < best[0]:
                best = (score, name, trial, after, rise)
        if best is None:
            break
        _, name, cut, macs, rise = best
        loss += rise
        blocks.remove(name)
        rounds.append({"removed": name, "loss_rise": rise, "loss": loss, "macs": macs})
        if progress is not None:
            progress({"depth_round": len(rounds), **rounds[-1]})
    info = {"removed": [r["removed"] for r in rounds], "macs": macs, "flops_kept": macs / costs.macs, "per": per,
            "rounds": rounds}
    if seconds:
        info["block_seconds"] = seconds
    if not rounds:
        info["note"] = "no block could be removed within depth_flops"
    return cut, info
