"""torch-pruning's own pruners (GroupMagnitudeImportance, GroupTaylorImportance) at a MAC budget.

Reference points for our methods: the same prunable channel groups (layers outside our groups
are passed to torch-pruning as ignored), after the same numeric check (``shrink.checked_groups``:
a group whose shrunk model differs from its gated one, e.g. across a channel shuffle, is ignored
too), and every norm layer ignored (our groups never resize one; torch-pruning would resize a
LayerNorm over the time axis whose length equals the channel count), so a baseline is always a
true pruning of the dense model. A pruned model that fails on the example input is refused naming
torch-pruning's cut, not the input. Option-A ResNets: with ``pads_residual=True`` (default)
the zero-pad shortcuts are handed to torch-pruning as layers (``dependency_trace.PadShortcutPruner``), so
it prunes the block outputs too; with ``False`` they stay dense (inner channels only). Global
ranking of channels (see ``tp_prune``), and the pruning ratio found by bisection
so that ``CostModel.count`` of the pruned model is the largest not above the budget.

GPT-2's Conv1D (weight (in, out)): torch-pruning traces it through ``dependency_trace.TransposedLinearPruner``,
takes it as a group root and scores it with the importances below (``Conv1DAware``): its own
importances pass over a layer type they do not know, so a model of Conv1D layers came back
unpruned. A model it cannot bring to the budget (a layer kind neither knows, no channel group) is
refused in one line naming autobot and taper, never returned above its budget.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch_pruning as tp
from torch import nn

from ..costs import CostModel, is_conv1d_style
from ..errors import PrunekitError
from ..zoo.layout import mark_cut_since_remembered, remember_dense_all
from .dependency_trace import TransposedLinearPruner, conv1d_pruners, pad_pruners
from .groups import find_groups
from .mixing_norms import NORM_LAYERS
from .shrink import checked_groups

TP_METHODS = ("tp-magnitude", "tp-taylor")


class Conv1DAware:
    """Mixin for a torch-pruning group importance: also scores the members of a group that are
    Conv1D-style layers (pruned by ``TransposedLinearPruner``), as the base scores an nn.Linear:
    channel i's output weights are column i of ``weight`` (in, out), its input weights row i
    (magnitude: ``sum |w|^p``; Taylor: ``sum |w * dw|``). The base class's own per-layer scores
    are taken as it computes them (its reduction and normalization are held back for the call,
    then applied to all of them together), so both kinds of layer share one reduction."""

    def _conv1d_score(self, w: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, group):
        parts: list = []
        self._reduce = lambda imps, idxs: parts.append((list(imps), list(idxs))) or imps  # noqa: E731
        self._normalize = lambda imp, normalizer: imp                                      # noqa: E731
        try:
            super().__call__(group)
        finally:
            del self._reduce, self._normalize          # the class's own methods again
        imps, idxs = parts[0] if parts else ([], [])
        for i, (dep, channels) in enumerate(group):
            layer, handler = dep.target.module, dep.handler
            if not (is_conv1d_style(layer) and isinstance(getattr(handler, "__self__", None), TransposedLinearPruner)):
                continue
            out = handler.__name__ == "prune_out_channels"
            pick = (lambda t: t[:, channels].t()) if out else (lambda t: t[channels])
            grad = layer.weight.grad
            imps.append(self._conv1d_score(pick(layer.weight.data), None if grad is None else pick(grad)))
            idxs.append(group[i].root_idxs)
        if not imps:
            return None
        return self._normalize(self._reduce(imps, idxs), self.normalizer)


class MagnitudeImportance(Conv1DAware, tp.importance.GroupMagnitudeImportance):
    """torch-pruning's ``GroupMagnitudeImportance`` (p=2), Conv1D layers scored too."""

    def _conv1d_score(self, w, grad):
        return w.abs().pow(self.p).sum(1)


class TaylorImportance(Conv1DAware, tp.importance.GroupTaylorImportance):
    """torch-pruning's ``GroupTaylorImportance``, Conv1D layers scored too (needs their gradients)."""

    def _conv1d_score(self, w, grad):
        if grad is None:
            raise PrunekitError("tp-taylor: a Conv1D layer has no gradient; give gradient batches that reach it")
        return (w * grad).abs().sum(1)


def _prune_once(model, method, ratio, example_input, ignored_names, grads, global_pruning, round_to,
                pads_residual=True):
    pruned = copy.deepcopy(model).eval()
    remember_dense_all(pruned)          # each layer's counts before torch-pruning's cut, which the saved layout needs
    if grads is not None:
        for p, g in zip(pruned.parameters(), grads):
            p.grad = None if g is None else g.clone()
    modules = dict(pruned.named_modules())
    importance = MagnitudeImportance(p=2) if method == "tp-magnitude" else TaylorImportance()
    conv1d = conv1d_pruners(pruned)
    pruners = {**(pad_pruners(pruned) if pads_residual else {}), **conv1d}
    with warnings.catch_warnings():
        # torch-pruning prunes bare parameters itself (their last axis) and says so; a baseline
        # run is its behaviour by definition, so its notice is not for our users.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(pruned, example_input, importance=importance, pruning_ratio=ratio,
                                      ignored_layers=[modules[n] for n in ignored_names if n in modules],
                                      global_pruning=global_pruning, max_pruning_ratio=0.95,
                                      round_to=round_to if round_to > 1 else None,
                                      customized_pruners=pruners or None,
                                      root_module_types=[tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM,
                                                         *conv1d])
        pruner.step()
    for p in pruned.parameters():
        p.grad = None
    mark_cut_since_remembered(pruned)
    return pruned


def _pruned_macs(costs: CostModel, pruned: nn.Module, method: str) -> float:
    """MACs of torch-pruning's ``pruned`` model; its failure on the example input (which the dense
    model ran, counted by ``costs``) is torch-pruning's cut, refused in one line that says so."""
    try:
        return costs.count(pruned).macs
    except PrunekitError as err:
        said = str(err).split(": ", 1)[-1].split("; ")[0]
        raise PrunekitError(f"{method}: the model torch-pruning pruned fails on the example input the dense "
                            f"model runs on ({said}): torch-pruning resized a layer our channel groups keep; "
                            "use method autobot or taper") from None


def tp_prune(model: nn.Module, method: str, flops: float, example_input: torch.Tensor,
             gradient_batches=None, iterations: int = 14, global_pruning: bool = True, round_to: int = 1,
             pads_residual: bool = True) -> tuple[nn.Module, dict]:
    """Prune a copy of ``model`` with torch-pruning to at most ``flops`` of its MACs.

    ``global_pruning``: rank channels across layers (torch-pruning's global mode; finer MAC steps
    than one uniform per-layer ratio, so the budget is met more closely). No layer loses more
    than 95% of its channels. ``gradient_batches``: iterable of (x, y) whose summed cross-entropy gradient feeds the
    Taylor criterion (needed for tp-taylor). ``round_to``: torch-pruning's own rounding of
    each layer's kept channels to a multiple (1: none). The model returned carries the marks of
    prunekit's own channel surgery (each cut layer's counts before the cut: ``zoo.layout``), so that
    ``save_model`` records a layout that ``load_pruned`` applies to a fresh model.
    """
    costs = CostModel(model, example_input)
    # the groups whose shrunk model computes the gated one (as our methods prune them): a group
    # the numeric check rejects (a channel shuffle torch-pruning reads as elementwise) is left to
    # torch-pruning as ignored, so the baseline is always a true pruning of the dense model
    try:
        found = find_groups(model, example_input, pads_residual)
        groups = checked_groups(model, found, example_input)
    except PrunekitError as err:       # no group left: the baseline has nothing it may cut
        raise PrunekitError(f"{method} (torch-pruning's baseline, which cuts only the channel groups prunekit's "
                            f"own channel methods can prune) cannot run on this model: {err}") from None
    kept = {(g.root, tuple(g.members)) for g in groups}
    rejected = {m.module for g in found if (g.root, tuple(g.members)) not in kept for m in g.layers("out")}
    roots = {m.module for g in groups for m in g.layers("out")} - rejected
    # every layer torch-pruning could take as a group root outside our groups is left to it as
    # ignored: the cost model's weight layers, and by module any Conv, Linear, LSTM or Conv1D (a
    # head tied to an embedding is traced under the embedding's name, so is named here only);
    # and every norm layer (LayerNorm, GroupNorm, RMSNorm), which our groups never resize: a group
    # holding one is then not pruned by torch-pruning either (it would resize a LayerNorm over the
    # time axis whose length equals the channel count along with the channels)
    rootable = (nn.modules.conv._ConvNd, nn.Linear, nn.LSTM)
    layers = {layer.name for layer in costs.weight_layers()} | \
        {name for name, m in model.named_modules() if isinstance(m, rootable) or is_conv1d_style(m)}
    norms = {name for name, m in model.named_modules() if isinstance(m, NORM_LAYERS)}
    ignored = sorted((layers - roots) | norms)
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
        if _pruned_macs(costs, pruned, method) <= target:
            hi, best = mid, pruned
        else:
            lo = mid
    if best is None:
        best = _prune_once(model, method, hi, example_input, ignored, grads, global_pruning, round_to, pads_residual)
    reached = _pruned_macs(costs, best, method)
    if reached > target:
        raise PrunekitError(f"{method}: torch-pruning cannot bring this model to {flops:g} of its MACs (its "
                            f"deepest cut keeps {reached / costs.macs:.1%} of them, over {len(groups)} channel "
                            "group(s)): use method autobot or taper")
    return best, {"pruning_ratio": hi, "global_pruning": global_pruning, "round_to": round_to,
                  "residual_channels": pads_residual}
