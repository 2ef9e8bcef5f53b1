"""Methods built on the local quadratic model of the loss: CHITA(++), FALCON(++), WoodFisher.

Each stage: collect gradients at the current weights, build the quadratic model around them,
solve for the stage's budget, write the weights back, recalibrate BatchNorm. With one stage
this is one-shot CHITA or FALCON; with a schedule of stages it is CHITA++ or FALCON++ (both
budgets, the count and the MACs, follow the schedule).

"Pruned weights stay pruned" (the default) restricts each later stage to the weights still
nonzero; ``revive=True`` lets every weight take part again (a pruned weight sits at w̄ = 0 and
may come back if the quadratic model wants it). Their options: ``pipelines.fisher_options``.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import replace

import torch

from ..api_checks import first_batch
from ..budget import Budget, ResolvedBudget
from ..errors import PrunekitError, PrunekitWarning
from .. import memory_plan, process_memory
from ..options import OptionError
from .. import distributed
from ..fisher import (collect_gradients, float16_loss_scale, float16_probe_top, float16_scale_for, keep_columns, passes,
                      skip_samples)
from ..data.loaders import samples_per_pass
from ..fisher_batches import check_enough_samples, check_sample_count
from ..distributed.gradients import collect_sharded_gradients
from ..solvers.backsolve import GramCache
from ..solvers.chita import chita
from ..solvers.falcon import falcon
from ..solvers.woodfisher import woodfisher
from ..solvers.quadratic import QuadraticModel
from ..solvers.sharded_quadratic import ShardedQuadraticModel
from ..solvers.layer_search import layer_index
from ..solvers.search import largest_fitting_k
from ..train import recalibrate_batchnorm
from .allocation import (SEARCH_CALIBRATION_BATCHES, SEARCH_JUDGE_BATCHES, RecalibratedLoss,
                         search_allocation)
from .fisher_options import ChitaOptions, FalconOptions, QuadraticOptions, WoodFisherOptions
from .schedule import keep_schedule
from .stages import resume_stages, stage_completed
from .weights import PruneContext, Pruned
from ..errors import warn as warn_ours


# Training batches BatchNorm is re-estimated on between stages (1,024 images at the usual 128):
# statistics for the next stage's gradient rows, themselves an estimate from a few hundred
# samples. The final model gets the pipeline's full recalibration. Between stages this was 20
# batches, a fifth of a default FALCON++ run on ResNet-20-B (CPU).
BETWEEN_STAGES_BATCHES = 8


def _fit_macs(solve, k: int, max_macs, macs: torch.Tensor):
    """Methods with a count budget only meet a FLOP budget at the largest k whose solution
    fits it (found to within 0.2% of k: each trial is a full solve)."""
    if max_macs is None:
        return solve(k)
    k_fit, solution, solves = largest_fitting_k(solve, lambda s: float(macs[s.w != 0].sum()), k, max_macs,
                                                tolerance=max(1, k // 500))
    solution.info.update(fitted_k=k_fit, fit_solves=solves)
    return solution


def _solve_stage_chita(q: QuadraticModel, k: int, max_macs, macs, opts: ChitaOptions, score_weights=None):
    return _fit_macs(lambda kk: chita(q, kk, variant=opts.solver, block_size=opts.block_size),
                     k, max_macs, macs)


def _solve_stage_woodfisher(q: QuadraticModel, k: int, max_macs, macs, opts: WoodFisherOptions,
                            score_weights=None):
    return _fit_macs(lambda kk: woodfisher(q.X, q.w_bar, kk, block_size=opts.obs_block_size, damp=q.ridge),
                     k, max_macs, macs)


def _solve_stage_falcon(q: QuadraticModel, k: int, max_macs, macs, opts: FalconOptions, score_weights=None,
                        variant: str | None = None, gram_cache: GramCache | None = None):
    return falcon(q, macs, k, max_macs, variant=variant or opts.solver, block_size=opts.block_size,
                  score=opts.support_score, score_weights=score_weights, gram_cache=gram_cache)


def _whole(max_macs, ctx: PruneContext) -> int | None:
    """A MAC budget of the prunable weights as the whole model's MACs (what a record shows)."""
    return None if max_macs is None else int(max_macs) + ctx.budget.fixed_macs


def _searched_score_weights(ctx: PruneContext, q: QuadraticModel, index: torch.Tensor, k: int, max_macs,
                            macs: torch.Tensor, opts: FalconOptions, trials: int, record: dict,
                            layer_scales: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(m,) per-weight score multipliers (one per layer) from the allocation search, and the (L,)
    per-layer scales (the next stage starts from them): each trial is FALCON's "magnitude"
    variant (ILP + backsolve) with the trial's multipliers at the budget (k, max_macs), judged by
    the loss after BatchNorm recalibration. Adds the search's figures to ``record``."""
    p = ctx.space.numel
    nearby = GramCache()      # a trial moves a few layers' budgets: its Gram matrix is an update

    def candidate(score_weights: torch.Tensor) -> torch.Tensor:
        w = torch.zeros(p, dtype=q.w_bar.dtype, device=index.device)
        w[index] = _solve_stage_falcon(q, k, max_macs, macs, opts, score_weights.to(index.device),
                                       variant="magnitude", gram_cache=nearby).w.to(w.dtype)
        return w

    weights, layer_scales, found = search_allocation(ctx.model, ctx.space, ctx.train_batches(), trials,
                                                     candidate, index, seed=ctx.seed, progress=ctx.progress,
                                                     start=layer_scales, loss_fn=ctx.loss_fn)
    record.update(layer_search_start_loss=found.start_loss, layer_search_loss=found.loss,
                  layer_search_accepted=found.accepted, layer_search_seconds=found.seconds,
                  layer_search_judged_at=k, layer_search_judged_at_macs=_whole(max_macs, ctx),
                  layer_scales=[float(s) for s in layer_scales])
    return weights.to(index.device), layer_scales


# layer_search "auto": the search is worth its trials wherever it is cheap (MLPNet, three seeds:
# at sparsity 0.98 FALCON++ 79.69 -> 83.49%, one-shot FALCON 63.17 -> 80.64%; +0.1 / +0.7 at 0.95,
# a tie at 0.9; 2-8 s more per run), and costly on a network of real size (100 trials on
# ResNet-20-B: minutes per search). A trial costs forward passes (BatchNorm re-estimation and
# judge batches) and a solve (ILP + backsolve over the free weights); "auto" runs the search
# where, over all of a run's trials, both stay small: the forward passes under
# AUTO_LAYER_SEARCH_MACS (as many as 100 trials over 650k MACs per example at batches of 128;
# MLPNet's FALCON++ needs 2.5e10 in 5 stages, 7.5e10 in the 15 of stages "auto") and trials x
# prunable weights under AUTO_LAYER_SEARCH_WEIGHTS (MLPNet's FALCON++: 1.6e7 in 5 stages, its whole
# search about 4.5 s of one core; 4.85e7 in 15, 97% of the limit; an embedding of 1.9M
# weights read by 640 MACs per example took 0.48 s a trial: 48 s one shot, so off).
AUTO_LAYER_SEARCH_TRIALS = 100
AUTO_LAYER_SEARCH_MACS = 1e11
AUTO_LAYER_SEARCH_WEIGHTS = 5e7


def resolve_layer_search(ctx: PruneContext, opts: FalconOptions) -> tuple[FalconOptions, dict]:
    """``opts`` with layer_search "auto" replaced by AUTO_LAYER_SEARCH_TRIALS or 0, and the
    figures of that choice for the record ({} when layer_search was given)."""
    if opts.layer_search != "auto":
        return opts, {}
    cost = _search_cost(_sizes(ctx), replace(opts, layer_search=AUTO_LAYER_SEARCH_TRIALS))
    trials = AUTO_LAYER_SEARCH_TRIALS if cost["cheap"] else 0
    chosen = replace(opts, layer_search=trials)
    chosen.given = opts.given         # (replace builds anew: what the user set is kept, as resolve_stages does)
    return chosen, {"trials": trials, **_without_verdict(cost)}


def _sizes(ctx: PruneContext) -> tuple[int, int, int]:
    """(samples of the first training batch, dense MACs per example, prunable weights): what the
    "auto" choices weigh."""
    return int(first_batch(ctx.train_batches, "data")[1].shape[0]), ctx.costs.macs, ctx.space.numel


def _search_cost(sizes: tuple[int, int, int], opts: FalconOptions) -> dict:
    """What all of a run's layer searches cost under ``opts`` (an integer layer_search and
    stages): their forward MACs and trials x prunable weights, the limits of "auto", and whether
    both are within them ("cheap"). ``sizes``: ``_sizes``."""
    batch, model_macs, numel = sizes
    all_trials = sum(_search_plan(opts, stage, stage == opts.stages)[0] for stage in range(1, opts.stages + 1))
    macs = all_trials * (SEARCH_CALIBRATION_BATCHES + SEARCH_JUDGE_BATCHES) * batch * model_macs
    weights = all_trials * numel
    return {"forward_macs": macs, "limit_macs": AUTO_LAYER_SEARCH_MACS, "weight_trials": weights,
            "limit_weight_trials": AUTO_LAYER_SEARCH_WEIGHTS,
            "cheap": macs <= AUTO_LAYER_SEARCH_MACS and weights <= AUTO_LAYER_SEARCH_WEIGHTS}


def _without_verdict(cost: dict) -> dict:
    return {key: value for key, value in cost.items() if key != "cheap"}


# stages "auto" (falcon++'s default). Where the layer search is cheap, FALCON++ is worth a longer
# schedule: 15 stages of 1,000 rows, each stage on images the earlier stages did not read. Test
# accuracy at sparsity 0.9 / 0.95 / 0.98, three seeds each, against the 5-stage default: MNIST
# MLPNet 93.10 / 91.64 / 88.36 against 92.97 / 91.08 / 83.49, and an MLPNet trained on
# Fashion-MNIST 85.81 / 83.27 / 77.41 against 85.60 / 80.58 / 69.44 (docs/benchmarks.md, session
# 40, with the forms weighed against it: 8-image rows, session 8's form). The schedule is
# thorough only where the search over all its stages runs (it is the search that pays at these
# sparsities, and its cost outweighs the rows'), within the search's own limits; elsewhere 5
# stages.
THOROUGH_SCHEDULE = {"stages": 15, "fisher_samples": 1000, "fresh_samples": True}
AUTO_STAGES_OTHERWISE = 5


def resolve_stages(ctx: PruneContext, opts: FalconOptions) -> tuple[FalconOptions, dict]:
    """``opts`` with stages "auto" replaced by the thorough schedule (THOROUGH_SCHEDULE, the
    options the user gave kept) or AUTO_STAGES_OTHERWISE stages, and the figures of that choice
    for the record ({} when stages was given)."""
    if opts.stages != "auto":
        return opts, {}
    return auto_stages(opts, _sizes(ctx))


def auto_stages(opts: FalconOptions, sizes: tuple[int, int, int]) -> tuple[FalconOptions, dict]:
    """``resolve_stages`` for stages "auto", from ``sizes`` (``_sizes``): also before the run, to
    check the rows the chosen schedule takes against the training data."""
    thorough = replace(opts, **{key: value for key, value in THOROUGH_SCHEDULE.items()
                                if key == "stages" or key not in opts.given})
    trials = AUTO_LAYER_SEARCH_TRIALS if opts.layer_search == "auto" else opts.layer_search
    cost = _search_cost(sizes, replace(thorough, layer_search=trials)) if trials else None
    chosen = thorough if cost and cost["cheap"] else replace(opts, stages=AUTO_STAGES_OTHERWISE)
    chosen.given = opts.given
    return chosen, {"stages": chosen.stages, "thorough": chosen is thorough,
                    **{key: getattr(chosen, key) for key in ("fisher_samples", "fisher_batch", "fresh_samples")},
                    "search_trials": trials, **(_without_verdict(cost) if cost else {})}


def check_planned_rows(plan, available: int | None, first_batch_size) -> None:
    """Refuse, before any work and before a run folder is made, a ``plan`` (``request.Plan``)
    whose per-sample gradient rows from one pass of the training data outnumber its ``available``
    samples (None: not known; checked again before the first gradient). Stages "auto" is resolved
    as the run will resolve it (``first_batch_size()``: the samples of the first training batch),
    so the 5-stage schedule's rows are checked and the thorough one's, read pass after pass, are
    not; the hybrid's FALCON phase chooses on the shrunk model, so there only given rows are."""
    opts = plan.options
    if available is None or "fisher_samples" not in opts.names():
        return
    if getattr(opts, "stages", 1) == "auto":
        if plan.method.family != "weights":
            if "fisher_samples" not in opts.given:
                return
        else:
            opts, _ = auto_stages(opts, (first_batch_size(), plan.costs.macs, plan.space.numel))
    if _rows_from_one_pass(opts):
        check_sample_count(available, opts.fisher_samples, "fisher_samples" not in opts.given)


def plan_counts_the_data(method) -> bool:
    """Whether ``method``'s memory plan takes the training data's count (its ``plan_memory`` names
    the parameter ``data_samples``, as the built-in ``plan_memory`` does): its refusal then names
    no more per-sample rows than the data holds, and is the data's own where the data's count fits
    (``memory_plan.plan``), so the rows need no check before it (``check_rows_before_plan``)."""
    if method.plan_memory is None:
        return False
    try:
        parameter = inspect.signature(method.plan_memory).parameters.get("data_samples")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def check_rows_before_plan(method, opts, available: int | None) -> None:
    """Refuse, before the request is planned, a fisher_samples the user gave that asks more
    per-sample rows from one pass than the ``available`` training samples (None: not known): the
    memory plan would otherwise refuse first, naming a fisher_samples that fits the memory but not
    the data, and following it would meet this refusal. ``opts``: ``method``'s options
    (``PruneRequest.resolved_options``). The command line's ``_check_rows_fit_the_data`` does the
    same with its flags; a method's default rows, and stages "auto" of a weights method (which
    chooses its schedule on the traced model), are checked after the plan (``check_planned_rows``).
    A method whose plan counts the data (``plan_counts_the_data``) is left to its plan: where the
    data's count does not fit the memory either, the plan's refusal names an n that does (one
    refusal, not the data's and then the memory's)."""
    if available is None or "fisher_samples" not in opts.names() or "fisher_samples" not in opts.given:
        return
    if plan_counts_the_data(method):
        return
    if getattr(opts, "stages", 1) == "auto" and method.family == "weights":
        return
    if _rows_from_one_pass(opts):
        check_sample_count(available, opts.fisher_samples)


def _rows_from_one_pass(opts) -> bool:
    """True if ``opts.fisher_samples`` (a number) per-sample rows are all read from one pass of the
    training data. A user's own options class may have fisher_samples without fisher_batch or
    fresh_samples: read as their defaults (1 sample per row, no fresh samples), as the built-in
    methods' options default them."""
    return (isinstance(opts.fisher_samples, int) and getattr(opts, "fisher_batch", 1) == 1
            and not getattr(opts, "fresh_samples", False))


def _fresh_stages(ctx: PruneContext, opts: QuadraticOptions, rows: int, stages: int) -> int | None:
    """With fresh_samples, how many stages read images no earlier stage read (the rest read the
    data again from its start), where the data's size is known; a warning when not all of them and
    the user asked for fresh_samples (the auto schedule's choice is said in the record's summary)."""
    if not opts.fresh_samples or stages == 1:
        return None
    available = samples_per_pass(ctx.train_batches())
    if available is None:
        return None
    fresh = min(stages, max(1, available // (rows * opts.fisher_batch)))
    if fresh < stages and "fresh_samples" in opts.given:
        warn_ours(PrunekitWarning(
            f"fresh_samples: {stages} stages of {rows:,} rows take {stages * rows * opts.fisher_batch:,} images and "
            f"the training data holds {available:,}: stages after {fresh} read images an earlier stage read "
            "(more training samples, or fewer fisher_samples, keep them all fresh)"))
    return fresh


def _search_plan(opts, stage: int, last: bool) -> tuple[int, bool]:
    """(trials of this stage's allocation search (0: none), whether its trials are judged at the
    final budget rather than the stage's own)."""
    trials, mode = getattr(opts, "layer_search", 0), getattr(opts, "layer_search_mode", "ahead")
    if not trials or mode != "first":
        return trials, mode == "ahead"
    return (trials if stage == 1 else opts.layer_search_refine if last else 0), True


def needs_flops(budget: Budget, opts) -> None:
    """FALCON's check of the budget as asked (before the model is traced): it solves under a FLOP budget."""
    if budget.flops is None:
        plus = "++" if getattr(opts, "stages", 1) != 1 else ""      # falcon++'s defaults: stages "auto"
        given = [name for name in ("sparsity", "params") if getattr(budget, name) is not None]
        alone = f"a {given[0]} budget alone" if len(given) == 1 else f"{' and '.join(given)} budgets without flops"
        raise OptionError(f"falcon{plus} needs a flops budget (e.g. flops=0.3); for {alone} use chita{plus}",
                          ("flops", *given))


def plan_memory(family: str):
    """The memory check of a family ("chita", "falcon", "woodfisher": their solvers' work arrays
    differ), for the method table: refuses a request that does not fit before any work (``data_to_load``:
    bytes of data not yet decoded that the run will hold, counted as held; ``data_samples``: the
    samples one pass of the training data holds, None if not known: a refusal names no more
    per-sample rows than that, ``memory_plan.plan``). Under
    torchrun every rank takes the first refusing rank's verdict (each rank's memory differs)."""
    def check(model, space, example_input, budget: ResolvedBudget, opts: QuadraticOptions, judge_batch: int = 0,
              refit_samples: int = 0, refit_batch: int = 0, most_rows: int = 1000, data_batch: int = 0,
              data_to_load: int = 0, data_samples: int | None = None):
        plan, refusal = None, None
        # the data's count bounds the rows a refusal names (stages "auto" may choose fresh passes)
        one_pass = _rows_from_one_pass(opts) and getattr(opts, "stages", 1) != "auto"
        try:
            plan = memory_plan.plan(model, space, example_input, n=opts.fisher_samples, dtype=opts.fisher_dtype,
                                    family=family, max_memory=opts.max_memory, fisher_batch=opts.fisher_batch,
                                    fisher_bn=opts.fisher_bn,
                                    obs_block_size=getattr(opts, "obs_block_size", 128),
                                    keep_share=budget.max_nonzeros / space.numel, ranks=distributed.current().size,
                                    ranks_here=distributed.ranks_on_this_machine(), judge_batch=judge_batch,
                                    refit_samples=refit_samples, refit_batch=refit_batch, most_rows=most_rows,
                                    data_batch=data_batch, data_to_load=data_to_load,
                                    data_samples=data_samples if one_pass else None,
                                    n_default="fisher_samples" not in opts.given)
        except PrunekitError as err:
            refusal = err
        distributed.agree_refusal(refusal)
        return plan
    return check


def _judge_batch(ctx: PruneContext, opts: QuadraticOptions) -> int:
    """Samples per training batch when this run judges candidates by their loss (the layer
    search, a multi-stage run's final pick: the judge holds such batches), else 0."""
    judged = getattr(opts, "layer_search", 0) > 0 or (opts.final_pick == "judge" and opts.stages > 1)
    return int(first_batch(ctx.train_batches, "data")[1].shape[0]) if judged else 0


def run_chita(ctx: PruneContext, opts: ChitaOptions) -> Pruned:
    return run_stages(ctx, _solve_stage_chita, opts, plan_memory("chita"))


def run_woodfisher(ctx: PruneContext, opts: WoodFisherOptions) -> Pruned:
    return run_stages(ctx, _solve_stage_woodfisher, opts, plan_memory("woodfisher"))


def run_falcon(ctx: PruneContext, opts: FalconOptions) -> Pruned:
    if ctx.train_batches is None:
        return run_stages(ctx, _solve_stage_falcon, opts, plan_memory("falcon"))    # which refuses it
    opts, stages_auto = resolve_stages(ctx, opts)
    opts, search_auto = resolve_layer_search(ctx, opts)
    pruned = run_stages(ctx, _solve_stage_falcon, opts, plan_memory("falcon"))
    for key, auto in (("stages_auto", stages_auto), ("layer_search_auto", search_auto)):
        if auto:
            pruned.info[key] = auto
    return pruned


def run_stages(ctx: PruneContext, solve_stage, opts: QuadraticOptions, memory) -> Pruned:
    """Prune over ``opts.stages`` stages to the context's budget; returns the final w (p,) and
    the memory plan's figures. ``memory``: the family's ``plan_memory`` check."""
    if ctx.train_batches is None:
        raise OptionError("this method needs training data for its gradients: pass data (the training "
                          "split is used)", ("data",))
    p = ctx.space.numel
    one_pass = not (opts.fisher_batch > 1 or opts.fresh_samples)     # per-sample rows from one pass of the data
    # fisher_samples "auto": at most the samples one pass holds (where its loader knows them)
    available = samples_per_pass(ctx.train_batches())
    most_rows = min(1000, available or 1000) if one_pass else 1000
    # The plan of the first stage (the largest: later stages have fewer free weights).
    plan = memory(ctx.model, ctx.space, ctx.costs.example_input, ctx.budget, opts, _judge_batch(ctx, opts),
                  *ctx.refit_images, most_rows=most_rows, data_samples=available,
                  data_batch=int(first_batch(ctx.train_batches, "data")[1].shape[0]))
    if distributed.current().distributed:    # "auto" n fits each rank's own free memory: all take the least
        least = distributed.current().all_reduce_max(torch.tensor([-plan.n], device=ctx.space.weights()[0].device))
        plan = replace(plan, n=-int(least.item()))
    macs = _compact_macs(ctx.space.macs_per_weight(ctx.costs))    # solvers work where the model is
    dense_macs = int(macs.sum())
    target = ctx.budget.max_nonzeros
    target_macs = ctx.budget.max_macs
    shares = keep_schedule(target / p, opts.stages, opts.schedule)
    mac_shares = (keep_schedule(target_macs / dense_macs, opts.stages, opts.schedule)
                  if target_macs is not None else [None] * opts.stages)
    history = ctx.history
    collective = distributed.current()     # one process: a no-op communicator, the code path of old
    if collective.distributed:
        _check_shardable(solve_stage, opts)
    if one_pass:
        check_enough_samples(ctx.train_batches(), plan.n,     # every rank reads the one stream
                             opts.fisher_samples != "auto" and "fisher_samples" not in opts.given)
    fresh_stages = _fresh_stages(ctx, opts, plan.n, len(shares))
    pick = opts.final_pick == "judge"
    kind = opts.rows_kind(ctx.loss_fn is None)
    kept: dict[str, torch.Tensor] = {}    # the best final-budget candidate so far (see below)
    done = resume_stages(ctx, kept)  # stages completed by an earlier, interrupted run (0: none)
    layer_scales = _resumed_layer_scales(history)
    w = ctx.space.vector()
    # a run resumed after its last stage: that stage's re-fit is in its record (and its weights)
    refitted = history[-1].get("refit") if done == len(shares) and history else None
    for stage, (share, mac_share) in enumerate(zip(shares, mac_shares), start=1):
        if stage <= done:
            continue
        last = stage == len(shares)
        k = target if last else max(target, round(share * p))
        max_macs = None if mac_share is None else (target_macs if last else max(target_macs, int(mac_share * dense_macs)))
        process_memory.release_freed_memory()    # the last stage's re-estimation and evaluation: freed heap
        start = time.perf_counter()
        free = torch.ones(p, dtype=torch.bool, device=w.device) if opts.revive or stage == 1 else w != 0
        index = free.nonzero().squeeze(1)
        # fresh_samples: skip the samples the earlier stages' rows were taken from
        skip = (stage - 1) * plan.n * opts.fisher_batch if opts.fresh_samples else 0
        repeat = opts.fisher_batch > 1 or opts.fresh_samples      # read the training data pass after pass
        if collective.distributed:
            q, ridge, scale = _sharded_model(ctx, plan, opts, w, index, collective, skip, repeat)
        else:
            def stream():
                batches = passes(ctx.train_batches()) if repeat else ctx.train_batches()
                return skip_samples(batches, skip) if skip else batches
            options = dict(batch=opts.fisher_batch, chunk=plan.chunk, bn=opts.fisher_bn, loss_fn=ctx.loss_fn,
                           kind=kind, seed=ctx.seed)
            # float16 rows of a tiny loss: the loss scaled (a power of two) before they are rounded
            stored = float16_loss_scale(ctx.model, ctx.space, stream(), plan.n, **options) \
                if plan.dtype == torch.float16 else 1.0
            grads = collect_gradients(ctx.model, ctx.space, stream(), plan.n, dtype=plan.dtype,
                                      progress=ctx.progress, loss_scale=stored, **options)
            if stored > 1.0 and not gradients_finite(grads):   # a row the probe did not see overflowed
                _say_float16_overflow(stored)
                del grads
                stored = 1.0
                grads = collect_gradients(ctx.model, ctx.space, stream(), plan.n, dtype=plan.dtype,
                                          progress=ctx.progress, **options)
            check_finite_gradients(grads)
            rows = grads if index.numel() == p else keep_columns(grads, index)
            del grads
            mean_diagonal = _mean_fisher_diagonal(rows) / stored**2       # of the unscaled gradients
            ridge = opts.ridge if opts.ridge is not None else opts.relative_ridge * mean_diagonal
            scale = normalising_scale(mean_diagonal, rows.dtype)
            if scale != 1.0:
                rows.mul_(scale)                           # exact: a power of two (the stage's own X)
            scale *= stored                                # rows = scale x the gradients
            q = QuadraticModel(rows, _free(w, index), ridge * scale**2)
            if opts.first_order:                           # g = the mean of the rows (scale² g, as Q is scaled)
                q = QuadraticModel(rows, _free(w, index), ridge * scale**2,
                                   q.rmatvec(torch.full((q.n,), 1 / q.n, device=w.device)) * scale)
        process_memory.release_freed_memory()      # the gradient phase's freed heap, before the solver's arrays
        seconds_gradients = time.perf_counter() - start
        exchanged = collective.bytes_sent
        searched, score_weights = {}, None
        trials, judged_at_final = _search_plan(opts, stage, last)
        if trials:      # each stage starts from the previous stage's scales
            judge_k, judge_macs = (target, target_macs) if judged_at_final else (min(k, index.numel()), max_macs)
            score_weights, layer_scales = _searched_score_weights(ctx, q, index, judge_k, judge_macs, _free(macs, index),
                                                                  opts, trials, searched, layer_scales)
        if pick and not last and trials and judged_at_final:    # the search judged its candidate already
            _keep_if_best(kept, stage, searched["layer_search_loss"], lambda: _final_candidate(
                solve_stage, q, index, p, target, target_macs, macs, opts, score_weights, w))
            if solve_stage is _solve_stage_falcon and opts.solver != "magnitude":
                # FALCON's own solver with the searched multipliers (what the one-shot search ends with)
                candidate = _final_candidate(solve_stage, q, index, p, target, target_macs, macs, opts,
                                             score_weights, w, variant=opts.solver)
                _keep_if_best(kept, stage, _judge_losses(ctx, candidate)[0], lambda: candidate)
        elif pick and stage == 1 and not last:                    # the one-shot solution, judged here
            candidate = _final_candidate(solve_stage, q, index, p, target, target_macs, macs, opts, score_weights, w)
            _keep_if_best(kept, stage, _judge_losses(ctx, candidate)[0], lambda: candidate)
        elif layer_scales is not None:     # "first": the stage prunes with the multipliers searched before
            score_weights = layer_scales[layer_index(ctx.space.layer_slices(), p)[index.cpu()]].to(index.device)
            searched["layer_scales"] = [float(s) for s in layer_scales]
        solution = solve_stage(q, min(k, index.numel()), max_macs, _free(macs, index), opts, score_weights)
        was_pruned = w == 0
        w = torch.zeros(p, dtype=w.dtype, device=w.device)
        w[index] = solution.w.to(w.dtype)
        # weights zero before this stage and nonzero after its solve (only ``revive`` allows any)
        revived = int((was_pruned & (w != 0)).sum()) if stage > 1 else 0
        if last and kept:
            w = _best_of_last_and_kept(ctx, w, kept, searched)
        ctx.space.assign(w)
        x_mb = q.X.numel() * q.X.element_size() / 2**20
        q = rows = None      # this stage's X goes before the re-fit and the next stage's X
        refitted = None
        if ctx.refit is not None and (last or ctx.refit_every_stage):   # the next stage's gradients at the re-fit
            refitted = ctx.refit(judged=last)     # only the result's re-fit is judged (refit_pruned)
            w = ctx.space.vector()
        # After the last stage the final model's full recalibration (the default 20 batches), so
        # that its record measures the final model; between stages it matters for the next
        # stage's gradients only.
        recalibrated = ctx.recalibrate_bn and recalibrate_batchnorm(
            ctx.model, ctx.train_batches(), **({} if last else {"max_batches": BETWEEN_STAGES_BATCHES}))
        history.append({"stage": stage, "memory_estimate_mb": round(plan.total_mb, 1), "max_nonzeros": k, "nonzeros": int((w != 0).sum()),
                        # the whole model's MACs, as the record's top level counts them: the fixed
                        # ones (attention products, layers outside the space) included
                        "max_macs": _whole(max_macs, ctx), "macs": int(macs[w != 0].sum()) + ctx.budget.fixed_macs,
                        "revived": revived,
                        "ridge": ridge, "objective": solution.objective / scale**2, "solver_seconds": solution.seconds,
                        "gradient_seconds": seconds_gradients, "bn_recalibrated": recalibrated,
                        "seconds": time.perf_counter() - start, **searched,
                        **({"refit": {key: refitted[key] for key in ("layers", "centred", "skipped", "mean_error_before",
                                                                     "mean_error_after", "mean_step", "shrunk", "kept",
                                                                     "judged_loss_before", "judged_loss_after", "judge_seconds", "seconds")
                                       if key in refitted}} if refitted else {}),
                        "solver_info": {key: value for key, value in solution.info.items()
                                        if isinstance(value, (bool, int, float, str))}})
        if collective.distributed:      # per rank: its share of X and what it sent
            history[-1]["distributed"] = {
                "ranks": collective.size, "gradient_matrix_mb": x_mb,
                "gradient_exchange_bytes": exchanged, "solver_bytes": collective.bytes_sent - exchanged,
                "solver_collectives": collective.calls}
            collective.bytes_sent, collective.calls = 0, 0
        stage_completed(ctx, stage, kept)
    return Pruned(w, {"memory_estimate_mb": round(plan.total_mb, 1), "fisher_samples": plan.n,
                      **({"fresh_stages": fresh_stages} if fresh_stages is not None else {}),
                      "fisher_dtype": opts.fisher_dtype, "fisher_kind": kind,
                      **({"refit": refitted} if refitted else {})},
                  bn_recalibrated=bool(history and history[-1]["bn_recalibrated"]))


# ``final_pick="judge"``: later stages prune from a network whose quadratic model can mislead
# (Fashion-MNIST at 10% MACs: default FALCON++ 54.05% against one-shot FALCON's 65.41%; the
# look-ahead search's final-budget candidates were judged 0.822, 0.579, 0.650, 0.770, 0.889 over
# five stages), so the run keeps the best final-budget candidate it has seen and ends with
# whichever of it and the last stage's result the judge prefers. Stage 1's candidates stand for
# one shot: without a search, ILP + backsolve on stage 1's rows (cheap; not one-shot FALCON's
# first-order method on its own n); with a search, also FALCON's own solver with the searched
# multipliers, which is the one-shot search's result to the last digit (same rows and seed), so
# on the judge's images such a run is never worse than the one-shot search.

def _final_candidate(solve_stage, q, index: torch.Tensor, p: int, k: int, max_macs, macs: torch.Tensor,
                     opts: QuadraticOptions, score_weights, like: torch.Tensor,
                     variant: str = "magnitude") -> torch.Tensor:
    """(p,) this stage's solution at the final budget (k, max_macs) over its free weights ``index``;
    macs: (p,) per weight. FALCON's candidates are ILP + backsolve (``variant``), as the layer
    search judges them."""
    free_macs = _free(macs, index)
    if solve_stage is _solve_stage_falcon:
        solution = _solve_stage_falcon(q, min(k, index.numel()), max_macs, free_macs, opts, score_weights,
                                       variant=variant)
    else:
        solution = solve_stage(q, min(k, index.numel()), max_macs, free_macs, opts, score_weights)
    w = torch.zeros(p, dtype=like.dtype, device=like.device)
    w[index] = solution.w.to(w.dtype)
    return w


def _judge_losses(ctx: PruneContext, *weights: torch.Tensor) -> list[float]:
    """The loss of each weight vector (p,) after BatchNorm re-estimation (when the run
    recalibrates) on the layer search's held training batches; the model is left as it was.
    Under torchrun the ranks share the batches and every rank gets the same losses
    (:class:`RecalibratedLoss`), so they all make the same choice."""
    judge = RecalibratedLoss.from_batches(ctx.model, ctx.space, ctx.train_batches(),
                                          calibration=4 if ctx.recalibrate_bn else 0, loss_fn=ctx.loss_fn)
    try:
        return [judge(w) for w in weights]
    finally:
        judge.restore()


def _keep_if_best(kept: dict, stage: int, loss: float, candidate) -> None:
    """Keep ``candidate()`` (p,) from ``stage`` if its judged ``loss`` is below the kept one's."""
    if "candidate" in kept and float(kept["candidate_loss_stage"][0]) <= loss:
        return
    kept["candidate"] = candidate().cpu()
    kept["candidate_loss_stage"] = torch.tensor([loss, stage], dtype=torch.float64)


def _best_of_last_and_kept(ctx: PruneContext, w: torch.Tensor, kept: dict, record: dict) -> torch.Tensor:
    """The last stage's weights w (p,) or the kept candidate, whichever the judge prefers; both
    losses go into ``record``."""
    candidate = kept["candidate"].to(device=w.device, dtype=w.dtype)
    last_loss, kept_loss = _judge_losses(ctx, w, candidate)
    use_kept = kept_loss < last_loss
    record["final_choice"] = {"last_stage_loss": last_loss, "kept_candidate_loss": kept_loss,
                              "kept_candidate_stage": int(kept["candidate_loss_stage"][1]),
                              "used": "kept candidate" if use_kept else "last stage"}
    return candidate if use_kept else w


def _resumed_layer_scales(history: list[dict]) -> torch.Tensor | None:
    """The layer search's per-layer scales of the last completed stage (None: no search yet)."""
    found = [h["layer_scales"] for h in history if "layer_scales" in h]
    return torch.tensor(found[-1], dtype=torch.float64) if found else None


def _free(v: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """v[index], or v itself when ``index`` is every weight (stage 1, ``revive``): no p-long copy.
    The solvers read such a vector (the free weights' w̄ and MACs) and never write it."""
    return v if index.numel() == v.numel() else v[index]


def _compact_macs(macs: torch.Tensor) -> torch.Tensor:
    """The MACs per weight (p,) in int32 when every value fits (half of int64's bytes, held
    through every stage; sums of an int32 tensor are int64 in torch, so totals do not overflow)."""
    if macs.numel() and macs.dtype == torch.int64 and 0 <= int(macs.min()) and int(macs.max()) < 2**31:
        return macs.to(torch.int32)
    return macs


def gradients_finite(rows: torch.Tensor) -> bool:
    """Whether every entry of ``rows`` is finite: their float64 sum, over blocks of columns (a sum of
    float32 values cannot overflow float64, so it is non-finite exactly when an entry is)."""
    width = max(1, (8 << 20) // (4 * max(rows.shape[0], 1)))
    return math.isfinite(sum(float(block.sum(dtype=torch.float64)) for block in rows.split(width, dim=1)))


def check_finite_gradients(rows: torch.Tensor | None) -> None:
    """Refuse gradient rows holding nan or inf (``None``: known to hold them), naming the cause:
    the model's outputs or loss on the training data are not finite numbers (else the ridge,
    a multiple of their mean square, would be nan and be blamed)."""
    if rows is None or not gradients_finite(rows):
        raise PrunekitError("the model's gradients on the training data hold nan or inf: its outputs (or loss) on "
                            "them are not finite numbers; check its forward, weights and input normalization")


TINY_FISHER, HUGE_FISHER = 2.0**-40, 2.0**40     # mean Fisher diagonals solved as they are


def normalising_scale(mean_diagonal: float, dtype: torch.dtype) -> float:
    """The power of two s by which the stage's gradient rows X (and with them Q: the ridge by s², a
    first-order term by s²) are scaled before the solve, so that the mean Fisher diagonal of sX is
    about 1: 1 where it lies within [TINY_FISHER, HUGE_FISHER] (the solve as ever, bit for bit).
    A model with random weights (MobileNetV1 at 224 px: a mean diagonal of 1e-37) otherwise made
    float32 products and curvatures of about 1e-38 and below, subnormal numbers: slower, and
    flushed to zero wherever denormals are (a solve at a mean diagonal of 1e-39 kept another 15 % of
    the weights with denormals flushed). Being a power of two, the scaling changes no rounding: the
    solution is the one of the unscaled problem where that one stays in float range. A float16 X is
    left as it is (its range leaves no room to scale)."""
    if dtype == torch.float16 or not mean_diagonal > 0 or TINY_FISHER <= mean_diagonal <= HUGE_FISHER:
        return 1.0
    return 2.0 ** round(-math.log2(mean_diagonal) / 2)


def _mean_fisher_diagonal(rows: torch.Tensor) -> float:
    """mean_j (XᵀX/n)_jj for X = rows (n, p)."""
    return _sum_of_squares(rows) / rows.numel() or 1.0


def _sum_of_squares(rows: torch.Tensor) -> float:
    """Σ X_ij² in float64, over blocks of columns converted to float32 about 8 MB at a time (whole
    rows in float64 would allocate 8p bytes per row: 2 minutes of page faults on ResNet-50)."""
    width = max(1, (8 << 20) // (4 * max(rows.shape[0], 1)))
    total = sum(float(block.to(torch.float32).square().sum(dtype=torch.float64))
                for block in rows.split(width, dim=1))
    if total < 2.0**-60 * rows.numel():      # float32 squares this small are subnormal or zero: in float64
        total = sum(float(block.to(torch.float64).square().sum()) for block in rows.split(width // 2 or 1, dim=1))
    return total


# --- several processes (torchrun): the gradient matrix sharded by columns ------------------------

def _check_shardable(solve_stage, opts) -> None:
    check_shardable(solve_stage is _solve_stage_woodfisher, opts)


def check_shardable(woodfisher: bool, opts) -> None:
    """Refuse what needs every column of X in one process (also when a run is planned under
    torchrun, before its run folder is written)."""
    if woodfisher or getattr(opts, "block_size", None) is not None:
        raise OptionError("woodfisher and block_size need every column of the gradient matrix on one process: "
                          "run them without torchrun (one process)", ("method", "block_size"))


def _sharded_model(ctx: PruneContext, plan, opts: QuadraticOptions, w: torch.Tensor, index: torch.Tensor,
                   collective, skip: int, repeat: bool) -> tuple[ShardedQuadraticModel, float]:
    """This rank's columns of the stage's gradient matrix (the weights ``index``) as a sharded
    quadratic model (scaled by ``normalising_scale`` where the ridge is relative), the ridge (its mean
    Fisher diagonal summed over the ranks; unscaled) and the scale. ``skip``,
    ``repeat``: where the rows start in the training stream and whether it is read pass after pass.

    Float16 rows of a tiny loss are stored at the one process's loss scale (``float16_loss_scale``):
    every rank probes the same first rows of the same stream, the ranks take the largest entry
    (all_reduce MAX: one scale on all of them, whatever rounding a device adds) and scale the loss by
    the same power of two; if any rank's rows overflow, every rank collects them again unscaled."""
    columns = None if index.numel() == ctx.space.numel else index
    options = dict(batch=opts.fisher_batch, chunk=plan.chunk, bn=opts.fisher_bn, loss_fn=ctx.loss_fn,
                   kind=opts.rows_kind(ctx.loss_fn is None), seed=ctx.seed)
    device = w.device
    stored = 1.0
    if plan.dtype == torch.float16:
        stream = passes(ctx.train_batches()) if repeat else ctx.train_batches()
        top = float16_probe_top(ctx.model, ctx.space, skip_samples(stream, skip) if skip else stream, plan.n, **options)
        top = torch.tensor([top if math.isfinite(top) else 0.0], dtype=torch.float64, device=device)
        stored = float16_scale_for(float(collective.all_reduce_max(top)))

    def collect(loss_scale: float):
        return collect_sharded_gradients(ctx.model, ctx.space, ctx.train_batches, plan.n, collective, columns,
                                         dtype=plan.dtype, progress=ctx.progress, skip=skip, repeat=repeat,
                                         loss_scale=loss_scale, **options)

    def any_broken(rows) -> bool:
        broken = torch.tensor([0.0 if gradients_finite(rows) else 1.0], dtype=torch.float64, device=rows.device)
        return bool(float(collective.all_reduce(broken)))   # every rank decides alike, none waits on the others

    rows, offset = collect(stored)
    if stored > 1.0 and any_broken(rows):               # a row the probe did not see overflowed (on some rank)
        _say_float16_overflow(stored)
        del rows
        stored = 1.0
        rows, offset = collect(stored)
    if any_broken(rows):            # every rank refuses, none waits on the others
        check_finite_gradients(None)
    ridge, scale = opts.ridge, 1.0       # a ridge given: no exchange for the diagonal, X as it is
    if ridge is None:
        local = _sum_of_squares(rows)
        total = float(collective.all_reduce(torch.tensor([local], dtype=torch.float64, device=rows.device)))
        mean_diagonal = total / (rows.shape[0] * index.numel()) / stored**2 or 1.0    # of the unscaled gradients
        ridge = opts.relative_ridge * mean_diagonal
        scale = normalising_scale(mean_diagonal, rows.dtype)      # the same on every rank: from the same total
    if scale != 1.0:
        rows.mul_(scale)
    scale *= stored                                # rows = scale x the gradients
    q = ShardedQuadraticModel(rows, _free(w, index), ridge * scale**2, None, collective, offset)
    if opts.first_order:
        q = ShardedQuadraticModel(rows, _free(w, index), ridge * scale**2,
                                  q.rmatvec(torch.full((q.n,), 1 / q.n, device=w.device)) * scale, collective, offset)
    return q, ridge, scale


def _say_float16_overflow(scale: float) -> None:
    """Warn (rank 0 alone) that float16 rows overflowed at loss ``scale`` and were collected again
    unscaled."""
    warn_ours(PrunekitWarning(
        f"float16 gradient rows overflowed at loss scale {scale:g} (a row far larger than the first ones): "
        "collected again unscaled, where tiny entries are subnormal or zero; fisher_dtype='bfloat16' or "
        "'float32' keeps them"))
