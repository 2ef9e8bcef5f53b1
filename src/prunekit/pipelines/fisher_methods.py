"""Methods built on the local quadratic model of the loss: CHITA, CHITA++ and WoodFisher.

Each stage: collect gradients at the current weights, build the quadratic model around them,
solve for the stage's budget, write the weights back, recalibrate BatchNorm. With one stage
this is one-shot CHITA; with a schedule of stages it is CHITA++.

"Pruned weights stay pruned" (the default) restricts each later stage to the weights still
nonzero; ``revive=True`` lets every weight take part again (a pruned weight sits at w̄ = 0 and
may come back if the quadratic model wants it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from ..errors import PrunekitError
from ..fisher import collect_gradients
from ..solvers.chita import chita
from ..solvers.obs import woodfisher
from ..solvers.quadratic import QuadraticModel
from ..train import recalibrate_batchnorm
from .oneshot import METHODS, PruneContext
from .schedule import keep_schedule


@dataclass
class FisherOptions:
    """Options of the quadratic-model methods (CLI: ``--fisher-samples`` etc.).

    fisher_samples: n, rows of the gradient matrix.
    fisher_batch:   samples averaged per row (1 = per-sample gradients).
    ridge:          λ of the quadratic model (also WoodFisher's damping).
    stages:         pruning stages (1 = one shot).
    schedule:       poly | exp | linear | const, the kept share per stage.
    revive:         let weights pruned in an earlier stage come back.
    solver:         CHITA's support choice: "iht" (IHT + backsolve) or "backsolve" (magnitude + backsolve).
    block_size:     backsolve in independent blocks of this many weights (None: exact).
    obs_block_size: WoodFisher's Fisher block size.
    """

    fisher_samples: int = 1000
    fisher_batch: int = 1
    ridge: float = 1e-4
    stages: int = 1
    schedule: str = "poly"
    revive: bool = False
    solver: str = "iht"
    block_size: int | None = None
    obs_block_size: int = 128

    @classmethod
    def from_dict(cls, options: dict, **defaults) -> "FisherOptions":
        known = {f.name for f in fields(cls)}
        values = {**defaults, **{k: v for k, v in options.items() if k in known and v is not None}}
        return cls(**values)


def _solve_stage_chita(q: QuadraticModel, k: int, opts: FisherOptions):
    return chita(q, k, method=opts.solver, block_size=opts.block_size)


def _solve_stage_woodfisher(q: QuadraticModel, k: int, opts: FisherOptions):
    return woodfisher(q.X, q.w_bar, k, block_size=opts.obs_block_size, damp=opts.ridge)


def run_stages(ctx: PruneContext, solve_stage, opts: FisherOptions) -> torch.Tensor:
    """Prune over ``opts.stages`` stages to ``ctx.budget.max_nonzeros``; returns the final w (p,)."""
    if ctx.train_batches is None:
        raise PrunekitError("this method needs training data for its gradients: pass --data/--data-dir "
                            "(the training split is used)")
    if ctx.budget.max_macs is not None:
        raise PrunekitError("CHITA and WoodFisher take a sparsity budget only: use --method falcon "
                            "(or magnitude-flops) for a FLOP budget")
    p = ctx.space.numel
    target = ctx.budget.max_nonzeros
    shares = keep_schedule(target / p, opts.stages, opts.schedule)
    history = ctx.options.setdefault("report", {}).setdefault("stages", [])
    w = ctx.space.vector()
    for stage, share in enumerate(shares, start=1):
        k = target if stage == len(shares) else max(target, round(share * p))
        start = time.perf_counter()
        grads = collect_gradients(ctx.model, ctx.space, ctx.train_batches(), opts.fisher_samples,
                                  batch=opts.fisher_batch, progress=ctx.options.get("progress", True))
        seconds_gradients = time.perf_counter() - start
        free = torch.ones(p, dtype=torch.bool) if opts.revive or stage == 1 else w != 0
        index = free.nonzero().squeeze(1)
        q = QuadraticModel(grads[:, index], w[index], opts.ridge)
        del grads
        solution = solve_stage(q, min(k, index.numel()), opts)
        w = torch.zeros(p, dtype=w.dtype)
        w[index] = solution.w.to(w.dtype)
        ctx.space.assign(w)
        # The pipeline recalibrates after the last stage; between stages it matters for the
        # next stage's gradients.
        recalibrated = (stage < len(shares) and ctx.options.get("recalibrate_bn", True)
                        and recalibrate_batchnorm(ctx.model, ctx.train_batches()))
        history.append({"stage": stage, "max_nonzeros": k, "nonzeros": int((w != 0).sum()),
                        "objective": solution.objective, "solver_seconds": solution.seconds,
                        "gradient_seconds": seconds_gradients, "bn_recalibrated": recalibrated,
                        "seconds": time.perf_counter() - start})
    return w


def _method(solve_stage, **defaults):
    def method(ctx: PruneContext) -> torch.Tensor:
        opts = FisherOptions.from_dict(ctx.options, **defaults)
        return run_stages(ctx, solve_stage, opts)
    return method


METHODS.update({
    "chita": _method(_solve_stage_chita),
    "chita++": _method(_solve_stage_chita, stages=15),
    "woodfisher": _method(_solve_stage_woodfisher),
})
