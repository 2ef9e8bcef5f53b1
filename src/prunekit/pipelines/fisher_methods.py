"""Methods built on the local quadratic model of the loss: CHITA(++), FALCON(++), WoodFisher.

Each stage: collect gradients at the current weights, build the quadratic model around them,
solve for the stage's budget, write the weights back, recalibrate BatchNorm. With one stage
this is one-shot CHITA or FALCON; with a schedule of stages it is CHITA++ or FALCON++ (both
budgets, the count and the MACs, follow the schedule).

"Pruned weights stay pruned" (the default) restricts each later stage to the weights still
nonzero; ``revive=True`` lets every weight take part again (a pruned weight sits at w̄ = 0 and
may come back if the quadratic model wants it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from ..budget import ResolvedBudget
from ..errors import PrunekitError
from .. import memory_plan
from ..fisher import collect_gradients
from ..solvers.chita import chita
from ..solvers.falcon import falcon
from ..solvers.woodfisher import woodfisher
from ..solvers.quadratic import QuadraticModel
from ..solvers.search import largest_fitting_k
from ..train import recalibrate_batchnorm
from .oneshot import CHECKS, METHODS, PruneContext
from .schedule import keep_schedule
from .stages import resume_stages, stage_completed


@dataclass
class FisherOptions:
    """Options of the quadratic-model methods (CLI: ``--fisher-samples`` etc.).

    fisher_samples: n, rows of the gradient matrix, or "auto": the largest n ≤ 1000 that fits max_memory.
    fisher_dtype:   storage of the gradient matrix: float32, bfloat16 or float16 (half the memory;
                    products still accumulate in float32).
    max_memory:     refuse a request whose estimated peak exceeds this (bytes, or "16G", "500M");
                    None: the memory available less a margin. See ``prunekit.memory_plan``.
    fisher_batch:   samples averaged per row (1 = per-sample gradients).
    ridge:          λ of the quadratic model (also WoodFisher's damping), absolute, as in the papers.
    relative_ridge: when ``ridge`` is None, λ = relative_ridge × the mean diagonal of the empirical
                    Fisher XᵀX/n of the stage: scale-free, so one default fits every model and
                    every stage (gradients grow as pruning goes on).
    stages:         pruning stages (1 = one shot).
    schedule:       poly | exp | linear | const, the kept share per stage.
    revive:         let weights pruned in an earlier stage come back.
    solver:         CHITA's support choice: "iht" (IHT + backsolve) or "backsolve" (magnitude + backsolve);
                    FALCON's: "dfo" (discrete first-order method) or "magnitude" (ILP on w̄², backsolve).
    block_size:     backsolve in independent blocks of this many weights (None: exact).
    obs_block_size: WoodFisher's Fisher block size.
    first_order:    add the loss gradient g (mean of the rows) as the linear term of the quadratic
                    model. Off by default: with a small ridge the model then trusts long steps
                    along g, which we measured to hurt (ResNet-20-B at 40% MACs).
    """

    fisher_samples: int | str = 1000
    fisher_dtype: str = "float32"
    max_memory: int | str | None = None
    fisher_batch: int = 1
    ridge: float | None = None
    relative_ridge: float = 0.1
    stages: int = 1
    schedule: str = "poly"
    revive: bool = False
    solver: str | None = None
    block_size: int | None = None
    obs_block_size: int = 128
    first_order: bool = False

    @classmethod
    def from_dict(cls, options: dict, **defaults) -> "FisherOptions":
        known = {f.name for f in fields(cls)}
        values = {**defaults, **{k: v for k, v in options.items() if k in known and v is not None}}
        return cls(**values)


def _fit_macs(solve, k: int, max_macs, macs: torch.Tensor):
    """Methods with a count budget only meet a FLOP budget at the largest k whose solution
    fits it (found to within 0.2% of k: each trial is a full solve)."""
    if max_macs is None:
        return solve(k)
    k_fit, solution, solves = largest_fitting_k(solve, lambda s: float(macs[s.w != 0].sum()), k, max_macs,
                                                tolerance=max(1, k // 500))
    solution.info.update(fitted_k=k_fit, fit_solves=solves)
    return solution


def _solve_stage_chita(q: QuadraticModel, k: int, max_macs, macs, opts: FisherOptions):
    return _fit_macs(lambda kk: chita(q, kk, variant=opts.solver or "iht", block_size=opts.block_size),
                     k, max_macs, macs)


def _solve_stage_woodfisher(q: QuadraticModel, k: int, max_macs, macs, opts: FisherOptions):
    return _fit_macs(lambda kk: woodfisher(q.X, q.w_bar, kk, block_size=opts.obs_block_size, damp=q.ridge),
                     k, max_macs, macs)


def _solve_stage_falcon(q: QuadraticModel, k: int, max_macs, macs, opts: FisherOptions):
    return falcon(q, macs, k, max_macs, variant=opts.solver or "dfo", block_size=opts.block_size)


SOLVERS = {"chita": ("iht", "backsolve"), "falcon": ("dfo", "magnitude"), "woodfisher": ()}


def check_options(family: str, budget: ResolvedBudget, opts: FisherOptions, model=None, space=None,
                  example_input=None) -> None:
    """Refuse a request the method cannot serve, before any gradient is collected (with the
    model: also one that does not fit in memory, see ``prunekit.memory_plan``)."""
    if family == "falcon" and budget.max_macs is None:
        raise PrunekitError("FALCON needs a FLOP budget: pass --flops (e.g. 0.3), or use chita for "
                            "a sparsity budget alone")
    if opts.solver is not None and opts.solver not in SOLVERS[family]:
        raise PrunekitError(f"--solver {opts.solver} is not one of {family}'s: "
                            f"{', '.join(SOLVERS[family]) or 'it has no --solver choice'}")
    if opts.stages < 1 or opts.fisher_batch < 1:
        raise PrunekitError("--stages and --fisher-batch must be at least 1")
    if opts.fisher_samples != "auto" and (isinstance(opts.fisher_samples, bool) or not isinstance(opts.fisher_samples, int)
                                          or opts.fisher_samples < 1):
        raise PrunekitError(f"--fisher-samples must be at least 1 or auto, got {opts.fisher_samples!r}")
    memory_plan.storage_dtype(opts.fisher_dtype)
    if opts.max_memory is not None:
        memory_plan.parse_memory(opts.max_memory)
    if space is not None:
        _memory_plan(family, budget, opts, model, space, example_input)


def _memory_plan(family: str, budget: ResolvedBudget, opts: FisherOptions, model, space, example_input):
    """The plan of the first stage (the largest: later stages have fewer free weights)."""
    return memory_plan.plan(model, space, example_input, n=opts.fisher_samples, dtype=opts.fisher_dtype,
                            family=family, max_memory=opts.max_memory, fisher_batch=opts.fisher_batch,
                            obs_block_size=opts.obs_block_size, keep_share=budget.max_nonzeros / space.numel)


def run_stages(ctx: PruneContext, solve_stage, opts: FisherOptions, family: str = "falcon") -> torch.Tensor:
    """Prune over ``opts.stages`` stages to the context's budget; returns the final w (p,)."""
    if ctx.train_batches is None:
        raise PrunekitError("this method needs training data for its gradients: pass --data/--data-dir "
                            "(the training split is used)")
    p = ctx.space.numel
    plan = _memory_plan(family, ctx.budget, opts, ctx.model, ctx.space, ctx.costs.example_input)
    ctx.options.setdefault("report", {}).update(memory_estimate_mb=round(plan.total_mb, 1), fisher_samples=plan.n,
                                                 fisher_dtype=opts.fisher_dtype)
    macs = ctx.space.macs_per_weight(ctx.costs)           # solvers work where the model is
    dense_macs = int(macs.sum())
    target = ctx.budget.max_nonzeros
    target_macs = ctx.budget.max_macs
    shares = keep_schedule(target / p, opts.stages, opts.schedule)
    mac_shares = (keep_schedule(target_macs / dense_macs, opts.stages, opts.schedule)
                  if target_macs is not None else [None] * opts.stages)
    history = ctx.options.setdefault("report", {}).setdefault("stages", [])
    done = resume_stages(ctx)       # stages completed by an earlier, interrupted run (0: none)
    w = ctx.space.vector()
    for stage, (share, mac_share) in enumerate(zip(shares, mac_shares), start=1):
        if stage <= done:
            continue
        last = stage == len(shares)
        k = target if last else max(target, round(share * p))
        max_macs = None if mac_share is None else (target_macs if last else max(target_macs, int(mac_share * dense_macs)))
        start = time.perf_counter()
        grads = collect_gradients(ctx.model, ctx.space, ctx.train_batches(), plan.n, batch=opts.fisher_batch,
                                  chunk=plan.chunk, dtype=plan.dtype, progress=ctx.options.get("progress", True))
        seconds_gradients = time.perf_counter() - start
        free = torch.ones(p, dtype=torch.bool, device=w.device) if opts.revive or stage == 1 else w != 0
        index = free.nonzero().squeeze(1)
        rows = grads if index.numel() == p else _keep_columns(grads, index)
        del grads
        ridge = opts.ridge if opts.ridge is not None else opts.relative_ridge * _mean_fisher_diagonal(rows)
        q = QuadraticModel(rows, w[index], ridge)
        if opts.first_order:                           # g = the mean of the rows
            q = QuadraticModel(rows, w[index], ridge, q.rmatvec(torch.full((q.n,), 1 / q.n, device=w.device)))
        solution = solve_stage(q, min(k, index.numel()), max_macs, macs[index], opts)
        w = torch.zeros(p, dtype=w.dtype, device=w.device)
        w[index] = solution.w.to(w.dtype)
        ctx.space.assign(w)
        # The pipeline recalibrates after the last stage; between stages it matters for the
        # next stage's gradients.
        recalibrated = (stage < len(shares) and ctx.options.get("recalibrate_bn", True)
                        and recalibrate_batchnorm(ctx.model, ctx.train_batches()))
        history.append({"stage": stage, "memory_estimate_mb": round(plan.total_mb, 1), "max_nonzeros": k, "nonzeros": int((w != 0).sum()),
                        "max_macs": max_macs, "macs": int(macs[w != 0].sum()),
                        "ridge": ridge, "objective": solution.objective, "solver_seconds": solution.seconds,
                        "gradient_seconds": seconds_gradients, "bn_recalibrated": recalibrated,
                        "seconds": time.perf_counter() - start,
                        "solver_info": {key: value for key, value in solution.info.items()
                                        if isinstance(value, (bool, int, float, str))}})
        stage_completed(ctx, stage)
    return w


def _keep_columns(grads: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """grads[:, index] (n, m) without a second n×p matrix: each row is compacted in place and the
    result is a view of the first m columns (row stride p)."""
    for row in grads:
        row[:index.numel()] = row[index]
    return grads[:, :index.numel()]


def _mean_fisher_diagonal(rows: torch.Tensor) -> float:
    """mean_j (XᵀX/n)_jj for X = rows (n, p), accumulated in float64, one row at a time."""
    total = sum(float(row.double().square().sum()) for row in rows)
    return total / rows.numel() or 1.0


def _register(name: str, family: str, solve_stage, **defaults) -> None:
    def options(raw: dict) -> FisherOptions:
        return FisherOptions.from_dict(raw, **defaults)

    def method(ctx: PruneContext) -> torch.Tensor:
        opts = options(ctx.options)
        check_options(family, ctx.budget, opts)
        return run_stages(ctx, solve_stage, opts, family)

    METHODS[name] = method
    CHECKS[name] = lambda budget, raw, **request: check_options(family, budget, options(raw), **request)


_register("chita", "chita", _solve_stage_chita)
_register("chita++", "chita", _solve_stage_chita, stages=15)
_register("woodfisher", "woodfisher", _solve_stage_woodfisher)
_register("falcon", "falcon", _solve_stage_falcon)
_register("falcon++", "falcon", _solve_stage_falcon, stages=5, fisher_samples=500)   # as benchmarked on ResNet-20-B
