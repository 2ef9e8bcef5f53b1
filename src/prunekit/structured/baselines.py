"""torch-pruning's own pruners (GroupMagnitudeImportance, GroupTaylorImportance) at a MAC budget.

Reference points for our methods: the same prunable channel groups (layers outside our groups
are passed to torch-pruning as ignored). Option-A ResNets: with ``pads_residual=True`` (default)
the zero-pad shortcuts are handed to torch-pruning as layers (``groups.PadShortcutPruner``), so
it prunes the block outputs too; with ``False`` they stay dense (inner channels only). Global
ranking of channels (see ``tp_prune``), and the pruning ratio found by bisection
so that ``CostModel.count`` of the pruned model is the largest not above the budget.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch_pruning as tp
from torch import nn

from ..costs import CostModel
from .groups import find_groups, pad_pruners

TP_METHODS = ("tp-magnitude", "tp-taylor")


def _prune_once(model, method, ratio, example_input, ignored_names, grads, global_pruning, round_to,
                pads_residual=True):
    pruned = copy.deepcopy(model).eval()
    if grads is not None:
        for p, g in zip(pruned.parameters(), grads):
            p.grad = None if g is None else g.clone()
    modules = dict(pruned.named_modules())
    importance = tp.importance.GroupMagnitudeImportance(p=2) if method == "tp-magnitude" \
        else tp.importance.GroupTaylorImportance()
    with warnings.catch_warnings():
        # torch-pruning prunes bare parameters itself (their last axis) and says so; a baseline
        # run is its behaviour by definition, so its notice is not for our users.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(pruned, example_input, importance=importance, pruning_ratio=ratio,
                                      ignored_layers=[modules[n] for n in ignored_names],
                                      global_pruning=global_pruning, max_pruning_ratio=0.95,
                                      round_to=round_to if round_to > 1 else None,
                                      customized_pruners=pad_pruners(pruned) if pads_residual else None)
        pruner.step()
    for p in pruned.parameters():
        p.grad = None
    return pruned


def tp_prune(model: nn.Module, method: str, flops: float, example_input: torch.Tensor,
             gradient_batches=None, iterations: int = 14, global_pruning: bool = True, round_to: int = 1,
             pads_residual: bool = True) -> tuple[nn.Module, dict]:
    """Prune a copy of ``model`` with torch-pruning to at most ``flops`` of its MACs.

    ``global_pruning``: rank channels across layers (torch-pruning's global mode; finer MAC steps
    than one uniform per-layer ratio, so the budget is met more closely). No layer loses more
    than 95% of its channels. ``gradient_batches``: iterable of (x, y) whose summed cross-entropy gradient feeds the
    Taylor criterion (needed for tp-taylor). ``round_to``: torch-pruning's own rounding of
    each layer's kept channels to a multiple (1: none).
    """
    costs = CostModel(model, example_input)
    groups = find_groups(model, example_input, pads_residual)
    roots = {m.module for g in groups for m in g.layers("out")}
    ignored = [layer.name for layer in costs.weight_layers() if layer.name not in roots]
    grads = None
    if method == "tp-taylor":
        model.zero_grad(set_to_none=True)
        was = model.training
        model.eval()
        loss_fn = nn.CrossEntropyLoss()
        for x, y in gradient_batches:
            loss_fn(model(x), y).backward()
        model.train(was)
        grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    target = flops * costs.macs
    lo, hi = 0.0, 0.999     # ratio lo meets nothing yet (dense), hi assumed to meet the budget
    best = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        pruned = _prune_once(model, method, mid, example_input, ignored, grads, global_pruning, round_to, pads_residual)
        if costs.count(pruned).macs <= target:
            hi, best = mid, pruned
        else:
            lo = mid
    if best is None:
        best = _prune_once(model, method, hi, example_input, ignored, grads, global_pruning, round_to, pads_residual)
    return best, {"pruning_ratio": hi, "global_pruning": global_pruning, "round_to": round_to,
                  "residual_channels": pads_residual}
