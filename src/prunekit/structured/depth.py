"""Depth pruning: whole blocks removed before a channel method thins what is left (``depth_flops``).

Thinning channels lowers MACs much faster than time on a CPU: a thin convolution's time follows
its activations, and BatchNorm, ReLU and the residual adds of kept block outputs keep their
cost (ResNet-56 at 30% of the MACs by the taper alone ran at 0.55x dense). Removing a block
removes all of its work. So a channel method can be given a depth cut first: blocks are removed
down to ``depth_flops`` of the dense MACs, then the method prunes channels of the rest to the
final budget (the MACs of both counted by the same ``CostModel``).

What a block is: a module that holds a Conv/Linear layer, whose output has the shape of its input
on the example input, and that is either a residual block (its forward, read by ``torch.fx``, adds
its own input to something computed from it: removing it leaves the identity shortcut) or a child
of an ``nn.Sequential`` (a shape-keeping layer of a plain net). A module inside a residual block
or inside a residual branch (the ``f`` of an ``x + f(x)`` anywhere) is never a block unless it is
itself a residual block: replacing one conv of ``relu(x + self.body(x))`` by the identity is not
removing a block. Where blocks nest, only the innermost count. Each removal is recorded with its
kind (``"residual block"`` or ``"layer"``) and the summary says which.
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
import operator
import statistics
import time
import warnings

import torch
from torch import fx, nn

from ..costs import CostModel
from ..layers import RemovedBlock
from ..zoo.layout import remember_dense_all
from ..losses import LossFn, summed_loss

_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADDS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def _through_identity(node, module: nn.Module):
    """``node``, or what it passes on unchanged where it is a call of an ``nn.Identity`` (an
    option-A ResNet's identity shortcut is a module)."""
    while isinstance(node, fx.Node) and node.op == "call_module" and node.args and \
            isinstance(module.get_submodule(node.target), nn.Identity):
        node = node.args[0]
    return node


def _residual_structure(model: nn.Module) -> tuple[set[str], set[str]]:
    """``(residual, in_branch)`` found by tracing each module of ``model`` with ``torch.fx``:
    ``residual`` names the modules with an identity shortcut (their forward adds its own input to
    something computed from it, ``x + f(x)``); ``in_branch`` names the modules called on the path
    of some ``a + f(a)`` inside a forward (the ``f``: a residual branch, e.g. ``self.res`` in
    ``relu(x + self.res(x))``). A module whose forward cannot be traced adds nothing."""
    residual: set[str] = set()
    in_branch: set[str] = set()
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            continue                                        # a layer: no forward of ours to read
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                 # fx's own notes on what it cannot trace
                graph = fx.symbolic_trace(module).graph
        except Exception:                                   # data-dependent control flow and the like
            continue
        ancestors: dict[fx.Node, set[fx.Node]] = {}
        for node in graph.nodes:
            ancestors[node] = set().union(*[{a} | ancestors[a] for a in node.all_input_nodes])
            if not _is_add(node) or len(node.args) < 2:
                continue
            a, b = (_through_identity(arg, module) for arg in node.args[:2])
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            for short, long in ((a, b), (b, a)):
                if short not in ancestors[long]:
                    continue
                if short.op == "placeholder" and name:
                    residual.add(name)
                for step in ancestors[long] | {long}:          # the branch: after short, up to long
                    if step.op == "call_module" and short in ancestors[step]:
                        in_branch.add(f"{name}.{step.target}" if name else str(step.target))
    return residual, in_branch


def _inside(name: str, others: set[str]) -> bool:
    """Whether module ``name`` is one of ``others`` or lies inside one of them."""
    return any(name == o or name.startswith(o + ".") for o in others)


def removable_blocks(model: nn.Module, example_input: torch.Tensor, kinds: dict | None = None) -> list[str]:
    """Names of the blocks of ``model`` (module docstring), in module order. ``kinds``, when
    given, is filled with each block's kind: ``"residual block"`` (a module with an identity
    shortcut) or ``"layer"`` (a shape-keeping child of an ``nn.Sequential`` outside any residual
    branch)."""
    shapes: dict[str, bool] = {}
    handles = []
    residual, in_branch = _residual_structure(model)
    sequential_children = set()
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.Sequential):
            sequential_children |= {f"{parent_name}.{c}" if parent_name else c for c, _ in parent.named_children()}
    for name, child in model.named_modules():
        if not name or (name not in sequential_children and name not in residual):
            continue
        if isinstance(child, RemovedBlock) or not any(isinstance(m, _WEIGHTED) for m in child.modules()):
            continue

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
    # A layer inside a residual branch or a residual block is not a block: replacing it by the
    # identity keeps the shortcut and mangles the branch. The whole residual block is the unit.
    blocks = [b for b in blocks if b in residual or not (_inside(b, in_branch) or
                                                          any(b.startswith(r + ".") for r in residual))]
    blocks = [b for b in blocks if not any(other.startswith(b + ".") for other in blocks)]
    if kinds is not None:
        kinds.update({b: "residual block" if b in residual else "layer" for b in blocks})
    return blocks


def remove_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named blocks of ``model`` in place by ``RemovedBlock``; returns ``model`` (its
    layers' counts kept first: ``zoo.layout.remember_dense_all``)."""
    remember_dense_all(model)
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
    kinds: dict[str, str] = {}
    blocks = removable_blocks(model, costs.example_input, kinds)
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
            "rounds": rounds, "kinds": {name: kinds[name] for name in (r["removed"] for r in rounds)}}
    if seconds:
        info["block_seconds"] = seconds
    info["candidates"] = len(kinds)
    if not kinds:
        info["note"] = ("no block to remove: no residual block with an identity shortcut and no shape-keeping "
                        "layer outside a residual branch")
    elif not rounds:
        info["note"] = "no block could be removed within depth_flops"
    return cut, info
