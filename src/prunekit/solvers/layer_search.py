"""Per-layer allocation search: how much of the budget each layer gets, judged by a real loss.

A support chosen by a score ranked across layers (|w|², or the quadratic model's) is only as good
as the score's scale from layer to layer. With BatchNorm re-estimated after pruning, that scale
is not what the loss sees (a layer's weights can be rescaled freely ahead of a BatchNorm). This
search keeps the selection within each layer and changes only the exchange rate between layers:
layer l's scores are multiplied by 2^θ_l before the selection (the FLOP + count ILP keeps both
budgets exact for any θ), and θ (L,) is searched to minimise a loss the caller measures, e.g. the
network's loss after BatchNorm recalibration on held training batches.

The search is a random local search in θ (in the spirit of SPDY, Frantar & Alistarh 2022):
start at θ = 0 (the plain score), then each trial perturbs a few layers' θ by a Gaussian step and
keeps the move if the loss goes down. Early trials move many layers by long steps, later ones few
layers by short steps. The result is never worse than the start on the caller's loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import PrunekitError


@dataclass
class LayerSearch:
    """The outcome of :func:`search_layer_scales`.

    scales:     (L,) float64, 2^θ per layer (1 = the plain score).
    loss:       the caller's loss at ``scales``; start_loss: at the start (scales = 1 by default).
    trials:     losses measured after the start; accepted: moves kept.
    history:    (trial, loss) after each accepted move, trial 0 = the start.
    """

    scales: torch.Tensor
    loss: float
    start_loss: float
    trials: int
    accepted: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)


def search_layer_scales(loss_of: Callable[[torch.Tensor], float], n_layers: int, trials: int, *,
                        seed: int = 0, first_step: float = 1.0, last_step: float = 0.125,
                        start: torch.Tensor | None = None,
                        on_trial: Callable[[int, float, float], None] | None = None) -> LayerSearch:
    """Search per-layer score multipliers that lower ``loss_of``.

    loss_of(scales): the loss (lower is better, finite) with layer l's scores multiplied by
                     scales[l]; scales is (n_layers,) float64 > 0.
    trials:          losses to measure after the start (each one costs one ``loss_of``).
    start:           (n_layers,) scales to start from (None: all 1), e.g. an earlier stage's.
    first_step, last_step: standard deviation of a move in θ = log2(scale), decaying
                     geometrically from the first trial to the last (1.0 = up to about a factor 2).
    on_trial(trial, loss, best_loss): told after every trial (progress).
    """
    if n_layers < 1:
        raise PrunekitError("the layer search needs at least one layer")
    if trials < 0:
        raise PrunekitError(f"trials must be >= 0, got {trials}")
    began = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    theta = torch.zeros(n_layers, dtype=torch.float64) if start is None else start.to(torch.float64).log2()
    if theta.shape != (n_layers,) or not bool(torch.isfinite(theta).all()):
        raise PrunekitError(f"start scales must be ({n_layers},) and > 0")
    best = start_loss = _finite(loss_of(torch.exp2(theta)))
    history, accepted = [(0, best)], 0
    for trial in range(1, trials + 1):
        progress = (trial - 1) / max(1, trials - 1)
        step = first_step * (last_step / first_step) ** progress
        # how many layers move: up to a quarter of them early on, one at the end
        most = max(1, math.ceil(n_layers / 4 * (1 - progress)))
        moved = torch.randperm(n_layers, generator=generator)[:int(torch.randint(1, most + 1, (1,), generator=generator))]
        candidate = theta.clone()
        candidate[moved] += step * torch.randn(moved.numel(), generator=generator, dtype=torch.float64)
        loss = _finite(loss_of(torch.exp2(candidate)))
        if loss < best:
            theta, best, accepted = candidate, loss, accepted + 1
            history.append((trial, best))
        if on_trial is not None:
            on_trial(trial, loss, best)
    return LayerSearch(torch.exp2(theta), best, start_loss, trials, accepted, time.perf_counter() - began, history)


def _finite(loss) -> float:
    loss = float(loss)
    if not math.isfinite(loss):
        raise PrunekitError(f"the layer search's loss must be finite, got {loss}")
    return loss


def layer_index(layer_slices: list[slice], p: int) -> torch.Tensor:
    """(p,) long: the layer of each weight, for slices that tile [0, p) in order."""
    out = torch.empty(p, dtype=torch.long)
    covered = 0
    for layer, s in enumerate(layer_slices):
        if s.start != covered:
            raise PrunekitError("layer slices must tile the weight vector in order")
        out[s] = layer
        covered = s.stop
    if covered != p:
        raise PrunekitError(f"layer slices cover {covered} of {p} weights")
    return out
