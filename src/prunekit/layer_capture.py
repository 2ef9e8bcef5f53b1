"""Run a model up to one layer and keep that layer's input or output; the order layers are called in.

Used by the least-squares re-fits (``prunekit.refit`` after one-shot pruning,
``structured.reconstruct`` after a channel cut): each needs one layer's inputs in the pruned
model and its outputs in the dense one, batch by batch, without running the rest of the network.
"""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the forward is not needed."""


def capture(model: nn.Module, module: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """``module``'s input (``what`` = "input") or output ("output") when ``model`` runs on ``x``;
    the forward stops right after ``module``."""
    seen: list[torch.Tensor] = []

    def hook(_, args, out):
        seen.append(args[0] if what == "input" else out)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise LookupError("the layer was not called")
    return seen[0].detach()


def forward_order(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[list[str], dict[str, str]]:
    """``names`` in the order ``model`` first calls them on ``x``, and those skipped: not called,
    or called more than once (shared weights)."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    order: list[str] = []
    handles = []
    for name in names:
        def hook(_module, _args, _out, name=name):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
        handles.append(modules[name].register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    skipped = {n: "not called on the calibration batches" for n in names if n not in calls}
    skipped.update({n: "called more than once per forward (shared weights)" for n, c in calls.items() if c > 1})
    return [n for n in order if n not in skipped], skipped
