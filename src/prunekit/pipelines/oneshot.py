"""One-shot pruning: pick a method, prune once to the budget, recalibrate BatchNorm, count.

A *method* is a function of a ``PruneContext`` that returns the new flat weight vector (p,)
(zeros where pruned) meeting ``ctx.budget``. Methods register in ``METHODS``; the pipeline
checks the result against the budget with the CostModel, independently of the method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..budget import Budget, ResolvedBudget
from ..costs import CostModel, Counts
from ..errors import PrunekitError
from ..params import ParamSpace
from ..solvers.magnitude import fit_k_to_macs, magnitude_flops, magnitude_global, magnitude_uniform
from ..train import recalibrate_batchnorm
from .stages import StageCheckpointer


@dataclass
class PruneContext:
    """Everything a method may use. ``train_batches()`` yields (x, y) training batches
    (None when no training data was given). ``checkpointer`` (optional) saves and restores
    completed stages of multi-stage methods, see ``pipelines.stages``."""

    model: nn.Module
    space: ParamSpace
    costs: CostModel
    budget: ResolvedBudget
    train_batches: Callable[[], Iterable] | None
    seed: int = 0
    options: dict = field(default_factory=dict)
    checkpointer: StageCheckpointer | None = None

    def layer_macs(self) -> list[int]:
        return [self.costs.layer(e.module_name).macs_per_weight for e in self.space.entries]


Method = Callable[[PruneContext], torch.Tensor]


def _magnitude(ctx: PruneContext) -> torch.Tensor:
    w = ctx.space.vector()
    macs = ctx.space.macs_per_weight(ctx.costs)
    keep = fit_k_to_macs(lambda k: magnitude_global(w, k), macs, ctx.budget.max_nonzeros, ctx.budget.max_macs)
    return w * keep


def _magnitude_uniform(ctx: PruneContext) -> torch.Tensor:
    w = ctx.space.vector()
    macs = ctx.space.macs_per_weight(ctx.costs)
    slices = ctx.space.layer_slices()
    keep = fit_k_to_macs(lambda k: magnitude_uniform(w, slices, k), macs,
                         ctx.budget.max_nonzeros, ctx.budget.max_macs)
    return w * keep


def _magnitude_flops(ctx: PruneContext) -> torch.Tensor:
    w = ctx.space.vector()
    keep, ilp = magnitude_flops(w, ctx.space.layer_slices(), ctx.layer_macs(),
                                ctx.budget.max_nonzeros, ctx.budget.max_macs)
    if ilp is not None:
        ctx.options.setdefault("report", {})["ilp_gap"] = ilp.gap
    return w * keep


# Optional cheap checks of a request, run before any expensive work: (budget, options) -> None.
CHECKS: dict[str, Callable[..., None]] = {}     # (budget, options, model=, space=, example_input=)

METHODS: dict[str, Method] = {
    "magnitude": _magnitude,
    "magnitude-uniform": _magnitude_uniform,
    "magnitude-flops": _magnitude_flops,
}


def method_names() -> list[str]:
    return list(METHODS)


@dataclass
class PruneResult:
    """A pruned model and how it got there.

    ``counts`` come from the CostModel over the model's actual weights, not from the method.
    """

    model: nn.Module
    method: str
    budget: ResolvedBudget
    counts: Counts
    nonzeros: int
    sparsity: float
    seconds: float
    info: dict = field(default_factory=dict)


def check_budget(space: ParamSpace, costs: CostModel, budget: ResolvedBudget) -> tuple[Counts, int]:
    """Count the model as it is and fail loudly if it breaks the budget."""
    counts = costs.count(space.model)
    nonzeros = int(torch.count_nonzero(space.vector()))
    prunable_macs = counts.macs - budget.fixed_macs
    if nonzeros > budget.max_nonzeros or (budget.max_macs is not None and prunable_macs > budget.max_macs):
        raise RuntimeError(f"internal error: the pruned model breaks its budget ({nonzeros} nonzeros "
                           f"for {budget.max_nonzeros} allowed, {prunable_macs} MACs for "
                           f"{budget.max_macs} allowed); please report this")
    return counts, nonzeros


def check_request(model: nn.Module, method: str, budget: Budget, example_input: torch.Tensor,
                  include: list[str] | None = None, exclude: list[str] | None = None,
                  options: dict | None = None) -> tuple[CostModel, ParamSpace, ResolvedBudget]:
    """Validate a pruning request without doing it: the method, the budget against this model,
    and the method's options. Raises PrunekitError; returns what ``prune`` needs."""
    if method not in METHODS:
        raise PrunekitError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    costs = CostModel(model, example_input)
    space = ParamSpace(model, include=include, exclude=exclude)
    resolved = budget.resolve(costs, space)
    if method in CHECKS:
        CHECKS[method](resolved, options or {}, model=model, space=space, example_input=example_input)
    return costs, space, resolved


def prune(model: nn.Module, method: str, budget: Budget, example_input: torch.Tensor,
          train_batches: Callable[[], Iterable] | None = None, *, include: list[str] | None = None,
          exclude: list[str] | None = None, seed: int = 0, recalibrate_bn: bool = True,
          options: dict | None = None, checkpointer: StageCheckpointer | None = None) -> PruneResult:
    """Prune ``model`` in place with ``method`` to ``budget`` and return the result.

    Args:
        example_input: one batch shaped like the model's input, for the CostModel.
        train_batches: a function returning an iterable of (x, y) training batches; needed
            by methods that use gradients, and for BatchNorm recalibration.
        include, exclude: module-name patterns of the prunable layers (see ParamSpace).
        checkpointer: a ``pipelines.stages.StageCheckpointer``; multi-stage methods save each
            completed stage to it and resume from its last one.
    """
    costs, space, resolved = check_request(model, method, budget, example_input, include, exclude, options)
    torch.manual_seed(seed)
    start = time.perf_counter()
    ctx = PruneContext(model, space, costs, resolved, train_batches, seed,
                       {"recalibrate_bn": recalibrate_bn, **(options or {})}, checkpointer)
    space.assign(METHODS[method](ctx))
    recalibrated = bool(recalibrate_bn and train_batches is not None
                        and recalibrate_batchnorm(model, train_batches()))
    seconds = time.perf_counter() - start
    counts, nonzeros = check_budget(space, costs, resolved)
    return PruneResult(model=model, method=method, budget=resolved, counts=counts, nonzeros=nonzeros,
                       sparsity=1 - nonzeros / space.numel, seconds=seconds,
                       info={"bn_recalibrated": recalibrated, **ctx.options.get("report", {})})
