"""A pruning request, checked once: ``PruneRequest(...).plan()`` resolves everything later steps need.

``plan()`` looks the method up in the table, checks its options (and the gradual mode's) against
their declared constraints, traces the model once (``CostModel``), builds the ``ParamSpace``,
resolves the budget to integers and, for a channel method, finds the channel groups and checks
the budget against the smallest model they allow. Every refusal is a ``PrunekitError`` naming
the parameter, raised before any expensive work.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import distributed, model_fisher
from .budget import Budget, ResolvedBudget, structural_zeros
from .cost_cut import CutCheck
from .cost_inputs import AmbiguousBatchError
from .costs import CostModel
from .errors import PrunekitWarning, worded_warning
from .losses import LossFn
from .methods import Method, lookup
from .options import OptionError, Options
from .params import ParamSpace
from .pipelines.fisher_methods import check_shardable, plan_counts_the_data
from .pipelines.gradual import GradualOptions, check_start_keep
from .structured.family import ChannelContext
from .structured.left_dense import dense_groups_warning
from .structured.pipeline import channel_context
from .train import check_finite_weights
from .errors import warn as warn_ours

MODES = ("one-shot", "multi-stage", "gradual", "structured")


@dataclass
class PruneRequest:
    """What the user asked for.

    budget: {"sparsity": ..., "flops": ..., "params": ...} as given (0.9, "90%", "50k"; None = no limit).
    options: the method's options, and with ``gradual`` the gradual mode's (``events`` ...).
    name: the model's name in records (a zoo name, or the class name of your own model).
    loss: the user's loss (``prunekit.losses``); None: cross-entropy on class indices.
    data_to_load: bytes of data the run will decode and hold after the plan (the commands' image
        folders, scanned but not yet decoded): the memory plan counts them as held. 0: the data
        is in memory already (what the process holds counts it). Or a function returning them,
        called by ``plan()`` after every check that needs no data (options, budget, the method's
        own) and before the memory plan: the commands scan their image folders in it, so a bad
        value is refused before a huge folder's headers are read (it may set ``data_samples``).
    data_samples: the samples one pass of the training data holds (None: not known): a memory
        refusal then names no more per-sample gradient rows than the data can give.
    check_plan: a check of the finished plan (e.g. its gradient rows against the data), run by
        ``plan()`` before it gives its warnings (layers the trace never ran, groups left dense),
        so that a refusal comes alone.
    costs: the cost model's trace of ``model`` on ``example_input`` made before, or of a model equal
        to it (``copy.deepcopy`` of it: a sweep's runs over one model) on an example of the same shape:
        ``plan()`` takes a copy of it rather than tracing again (a sweep traced each of its runs three
        times). None: ``plan()`` traces the model and keeps that trace here (its plan's ``costs``).
    cut_check: the rows the trace's cut to one example is checked on and the example's name
        (``cost_cut.CutCheck``; ``prune``'s: its example's first two rows); None: ``example_input``.
    """

    model: nn.Module
    example_input: torch.Tensor
    method: str | Method
    budget: dict
    include: list[str] | None = None
    exclude: list[str] | None = None
    seed: int = 0
    gradual: bool = False
    recalibrate_bn: bool = True
    options: dict = field(default_factory=dict)
    name: str | None = None
    loss: LossFn | None = None
    data_to_load: int | Callable[[], int] = 0
    data_samples: int | None = None
    check_plan: Callable[["Plan"], None] | None = None
    costs: CostModel | None = None
    cut_check: CutCheck | None = None

    def resolved_options(self) -> tuple[Method, dict, "Options", GradualOptions | None]:
        """The method's row, its options as given, its options checked with its defaults filled in,
        and the gradual mode's options (None unless ``gradual``): what ``plan()`` starts from,
        without tracing the model (a caller deciding what data the run reads asks this first)."""
        method = lookup(self.method)
        method_options, gradual = _split_options(method, self.options, self.gradual)
        options = method.options.from_user(method_options, method.name, **method.defaults)
        return method, method_options, options, gradual

    def check_values(self) -> tuple[Method, dict, "Options", GradualOptions | None, Budget]:
        """The checks of ``plan()`` that need neither the model traced nor any data: the method and
        its options (the gradual mode's too), a channel method's budget kinds, the loss's options,
        the budget's values (``Budget.parse``), the seed, the method's own budget check
        (``check_budget``) and, under torchrun, what cannot be sharded. Returns what ``plan()`` goes
        on from: the method's row, its options as given, its options checked (with a user's loss,
        distillation off), the gradual mode's options (or None) and the parsed budget. The commands
        call it before they scan an image folder (a bad value refused in a fraction of a second, not
        after every image header is read); ``plan()`` calls it first."""
        method, method_options, options, gradual = self.resolved_options()
        asked = {k: self.budget.get(k) for k in ("sparsity", "flops", "params")}
        if method.family == "channels":
            _check_channel_request(method, asked, self.include if method.sparsify is None else None,
                                   self.exclude if method.sparsify is None else None)
            idle = [k for k in ("depth_batches", "depth_per") if k in method_options]
            if idle and method_options.get("depth_flops") is None:
                named = " and ".join(idle)
                raise OptionError(f"{named} shape{'s' if len(idle) == 1 else ''} the depth cut, which depth_flops "
                                  f"asks for: add depth_flops or leave {named} out", (*idle, "depth_flops"))
        if self.loss is not None:         # distillation softens a classifier's logits: not with the user's loss
            for name in ("finetune_distill", "taper_distill"):
                if getattr(gradual, name, 0) or method_options.get(name):
                    raise OptionError(f"{name} softens a classifier's logits: with loss= leave it at 0",
                                      (name, "loss"))
                if getattr(options, name, 0):          # the method's default (autobot's 0.9): off
                    options = replace(options, **{name: 0.0})
            if method_options.get("fisher_kind") == "model" and not model_fisher.supports(self.loss):
                raise OptionError(model_fisher.refusal(self.loss), ("fisher_kind", "loss"))
        if gradual is not None and getattr(options, "refit_batches", 0) not in (0, "auto"):
            raise OptionError("refit_batches re-fits a one-shot or multi-stage result; gradual pruning fine-tunes "
                              "instead: drop refit_batches or gradual", ("refit_batches", "gradual"))
        budget = Budget.parse(**asked)
        if not 0 <= self.seed < 2**63:                # torch.manual_seed's range
            raise OptionError(f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed}", ("seed",))
        if method.check_budget is not None:          # needs no model: before the trace (seconds on a ResNet)
            method.check_budget(budget, options)
        if distributed.current().distributed:      # under torchrun: refused before a run folder is written
            check_shardable(method.name == "woodfisher", options)          # (and before the trace)
        return method, method_options, options, gradual, budget

    def check(self) -> None:
        """Every check ``plan()`` makes before it asks for the data (``data_to_load``): those of
        ``check_values``, then the ones that need the model traced (the budget resolved against its
        weights and MACs, a channel method's groups, the gradual mode's start, the method's own
        ``check``). Neither ``data_to_load`` (a function: it is not called) nor the memory plan is
        run, and no warning is given (``plan()`` gives them). A sweep checks each of its runs so
        before the first one reads its data."""
        saved = self.data_to_load

        def stop() -> int:
            raise _BeforeTheData
        self.data_to_load = stop
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.plan()
        except _BeforeTheData:
            pass
        finally:
            self.data_to_load = saved

    def plan(self) -> "Plan":
        method, method_options, options, gradual, budget = self.check_values()
        check_finite_weights(self.model)
        if self.costs is None:
            try:
                costs = self.costs = CostModel(self.model, self.example_input,     # kept: a sweep's next runs'
                                               _check=self.cut_check or CutCheck(None))
            except AmbiguousBatchError as error:        # prune has no batched= to pass
                raise error.for_prune() from None
        else:
            costs = copy.deepcopy(self.costs)       # the plan's own (a copy: one run may not change another's)
            # but for its channel-group searches, shared: searched once for a sweep's runs (found_groups)
            costs.channel_groups = getattr(self.costs, "channel_groups", None)
            if costs.channel_groups is None:
                costs.channel_groups = self.costs.channel_groups = {}
        channels = None
        if method.family == "channels":
            space = ParamSpace(self.model, include=self.include, exclude=self.exclude, costs=costs)
            # a params budget counts every parameter the shrunk model keeps (biases and norms go with
            # their channels), not the weights methods' prunable nonzeros: resolved apart
            resolved = replace(budget, params=None).resolve(costs, space)
            max_params = None if budget.params is None else _channel_params(budget, costs)
            cut_params = max_params if method.sparsify is None else None     # the hybrid's weights phase meets it
            if max_params is not None and method.sparsify is not None:     # zeros count: the weights methods' floor
                Budget._params_keep(budget.params, costs.params, costs.params - space.numel + structural_zeros(space))
            if cut_params is not None and options.channel_multiple != 1:
                raise OptionError("params with channel_multiple above 1 is not supported: leave channel_multiple "
                                  "at 1 or leave params out", ("params", "channel_multiple"))
            shares = [_share(budget, resolved, costs), *(getattr(options, "snapshots", None) or [])]
            if any(not share > shares[0] for share in shares[1:]) or len(set(shares)) != len(shares):
                raise OptionError(f"snapshots must be distinct shares above flops {shares[0]:g} (taken on the way "
                                  f"down to it), got {shares[1:]}: pass the lowest share as flops",
                                  ("snapshots", "flops"))
            targets = options.channel_targets(shares)
            channels = channel_context(self.model, costs, self.example_input, shares, options.channel_multiple,
                                       batches=None, residual_channels=options.residual_channels, targets=targets,
                                       target_name="flops" if targets == shares else "structured_flops",
                                       max_params=cut_params)
            channels.max_params = max_params
            channels.include, channels.exclude = self.include, self.exclude
            if options.depth_flops is not None and not options.depth_flops > max(shares):
                above = (f"flops {max(shares):g}" if max(shares) == shares[0]
                         else f"the largest of snapshots {max(shares):g}")
                raise OptionError(f"depth_flops {options.depth_flops:g} must be above {above}: the depth "
                                  "cut keeps more MACs than the budget, the channel method removes the rest",
                                  ("depth_flops", "flops", "snapshots"))
        else:
            space = ParamSpace(self.model, include=self.include, exclude=self.exclude, costs=costs)
            resolved = budget.resolve(costs, space)
            shares = []
        # warned of (layers the trace never ran, groups left dense) once every check below has passed:
        # a refusal comes alone
        left = dense_groups_warning(channels.groups.skipped) if channels is not None else None
        if gradual is not None:
            check_start_keep(resolved, space.macs_summary(costs)[0], gradual)
        if method.check is not None:
            method.check(resolved, options)
        # what the run will prune to, in the model's integers: a sweep's two runs resolving alike (a
        # share and a count naming one budget: params 0.5 and 16180) would run the same pruning twice
        self.resolved_key = (method.name, resolved, tuple(shares), channels.max_params if channels else None)
        data_to_load = self.data_to_load() if callable(self.data_to_load) else self.data_to_load
        if method.plan_memory is not None:
            _plan_memory(method, self.model, space, self.example_input, resolved, options, data_to_load,
                         self.data_samples)
        stages = getattr(options, "stages", 1)          # "auto": 5 or 15 (falcon++)
        mode = ("structured" if method.family == "channels" else "gradual" if gradual is not None
                else "multi-stage" if stages == "auto" or stages > 1 else "one-shot")
        plan = Plan(self, method, options, gradual, mode, costs, space, resolved, shares, channels,
                    self.name or type(self.model).__name__)
        if self.check_plan is not None:
            self.check_plan(plan)
        from .api import _on_rank_0                 # (api imports this module)
        path = _on_rank_0(distributed.current(), lambda: costs.path_warning)   # may be random: rank 0's word
        if path is not None:
            warn_ours(worded_warning(*path))
        if space.not_run:
            warn_ours(not_run_warning(space.not_run))
        if left:
            warn_ours(PrunekitWarning(left))
        return plan


class _BeforeTheData(Exception):
    """Raised in place of ``PruneRequest.data_to_load`` by ``PruneRequest.check``: the checks that
    need no data are done."""


def takes_data_to_load(function) -> bool:
    """Whether ``function`` (a method's ``plan_memory``) takes the keyword ``data_to_load`` (named, or
    through ``**kwargs``): one written before it was added takes the five arguments only."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):            # no signature to read (a builtin): the five arguments
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "data_to_load" and p.kind is not p.POSITIONAL_ONLY)
               for p in parameters)


def _plan_memory(method: Method, model: nn.Module, space, example_input, resolved, options, data_to_load: int,
                 data_samples: int | None = None):
    """Run ``method.plan_memory``, telling it ``data_to_load`` (bytes of data still to decode, held
    during the run) where it takes it. A plan_memory of the earlier five-argument form is called
    with those five; where data is still to load on a CPU (where the data is held too), a
    ``memory_plan.MemoryPlan`` it returns has the data added to its resident set and is refused
    as the method's own plan would be when it no longer fits; one returning anything else cannot
    be corrected, and a warning says its estimate leaves the data out. ``data_samples`` (the samples
    one pass of the training data holds) goes to a plan_memory that names that parameter."""
    if takes_data_to_load(method.plan_memory):
        extra = {"data_samples": data_samples} if plan_counts_the_data(method) else {}
        return method.plan_memory(model, space, example_input, resolved, options, data_to_load=data_to_load, **extra)
    planned = method.plan_memory(model, space, example_input, resolved, options)
    device = next(iter(model.parameters()), torch.empty(0)).device
    if data_to_load <= 0 or device.type != "cpu":
        return planned
    from .memory_plan import MiB, MemoryPlan
    if not isinstance(planned, MemoryPlan):
        warn_ours(PrunekitWarning(
            f"method {method.name}'s plan_memory takes no data_to_load: its memory estimate leaves out the "
            f"{data_to_load / MiB:,.0f} MB of data still to decode that the run will hold (add a data_to_load=0 "
            "parameter to plan_memory to count it)"))
        return planned
    counted = replace(planned, resident=planned.resident + int(data_to_load))
    refusal = None
    if not counted.fits():
        refusal = OptionError(
            f"method {method.name}'s memory plan ({planned.total / MiB:,.0f} MB peak) plus the "
            f"{data_to_load / MiB:,.0f} MB of data still to decode needs about {counted.total / MiB:,.0f} MB, over "
            f"the limit of {counted.limit / MiB:,.0f} MB: use fewer images, or free memory")
    distributed.agree_refusal(refusal)
    return counted


def not_run_warning(layers: list[str]) -> PrunekitWarning:
    """What a user is told of prunable layers the cost model's trace never saw multiplied: in
    Python, give an ``example_input`` that runs them; on the command line (which takes its example
    from the data, and has no example input to give), data whose images take that branch, or
    ``--exclude`` them."""
    shown = ", ".join(layers[:6]) + (f" and {len(layers) - 6} more" if len(layers) > 6 else "")
    what = (f"{shown} did not run on the example input's first example, the one counted (or "
            f"{'its' if len(layers) == 1 else 'their'} weights were made into other tensors before the product): left "
            "dense, MACs not counted in the budget; ")
    return worded_warning(
        what + "give an example_input that runs every layer to prune (a branch only some inputs take cannot be "
        "counted from one example), or exclude them",
        what.replace("the example input's first example, the one counted", "the data's first example")
        + f"leave them out with "
        f"--exclude {' '.join(layers)} (dense as now, without this warning), or prune with --data whose examples take "
        "the branch they are in")


@dataclass
class Plan:
    """A checked request: the method's row and options, the mode, the cost model, the prunable
    weights, the budget in integers and, for channel methods, the shares of dense MACs to keep
    (the asked one first) and the channel groups."""

    request: PruneRequest
    method: Method
    options: Options
    gradual: GradualOptions | None
    mode: str
    costs: CostModel
    space: ParamSpace
    budget: ResolvedBudget
    shares: list[float]
    channels: ChannelContext | None
    name: str


def _split_options(method: Method, options: dict, gradual: bool) -> tuple[dict, GradualOptions | None]:
    """The method's options, and the gradual mode's options when ``gradual``."""
    mode_names = set(GradualOptions.names()) - set(method.options.names())
    given = {k: v for k, v in options.items() if v is not None}
    mode_given = {k: v for k, v in given.items() if k in mode_names}
    if gradual and method.family != "weights":
        raise OptionError(f"method {method.name} removes whole channels; gradual is for the weights methods",
                          ("gradual",))
    if not gradual and mode_given:
        key = next(iter(mode_given))
        raise OptionError(f"{key} is a setting of step-by-step pruning with fine-tuning: add gradual, or leave {key} out",
                          (key, "gradual"))
    plan = GradualOptions.from_user(mode_given, "gradual") if gradual else None
    return {k: v for k, v in given.items() if k not in mode_names}, plan


def _check_channel_request(method: Method, budget: dict, include, exclude) -> None:
    takes_params = getattr(method.options, "takes_params", False)
    if budget["sparsity"] is not None:
        raise OptionError(f"method {method.name} removes whole channels to a MAC budget: give flops "
                          f"(e.g. flops=0.5){' and params' if takes_params else ''}, not sparsity",
                          ("flops", "sparsity", "params"))
    if budget["params"] is not None and not takes_params:
        raise OptionError(f"method {method.name} cuts channels to a MAC budget alone and takes no params: for a MAC "
                          "and a params budget with a real speedup use method autobot (channels cut until both "
                          "are met, e.g. flops=0.5 params=0.4), or method hybrid (channels to structured_flops, "
                          "then FALCON's zeros to flops and params)", ("flops", "params", "structured_flops"))
    if budget["flops"] is None:
        raise OptionError(f"method {method.name} needs flops, the share of MACs to keep (e.g. flops=0.5)",
                          ("flops",))
    if include is not None or exclude is not None:
        raise OptionError(f"method {method.name} cuts channels wherever the model allows; include and exclude "
                          "choose layers for the weights methods (and the hybrid's weights phase)",
                          ("include", "exclude"))


def _channel_params(budget: Budget, costs: CostModel) -> int:
    """The most parameters (all of them, biases and norms too) a channel method's shrunk model may keep."""
    amount = budget.params
    if amount.absolute:
        if amount.value >= costs.params:
            raise OptionError(f"params {amount.value:,.0f} keeps every parameter: the model has {costs.params:,}; "
                              "ask for fewer (e.g. params=0.5)", ("params",))
        return int(amount.value)
    if not 0 < amount.value < 1:
        raise OptionError(f"params {amount.value:g} is out of range: for a channel method the share of all "
                          "parameters kept must be in (0, 1), e.g. params=0.5", ("params",))
    return math.floor(amount.value * costs.params)


def _share(budget: Budget, resolved: ResolvedBudget, costs: CostModel) -> float:
    """The asked share of dense MACs (a count like 20M as its share)."""
    share = budget.flops.value if not budget.flops.absolute else (resolved.max_macs + resolved.fixed_macs) / costs.macs
    if not 0 < share < 1:
        raise OptionError(f"flops {budget.flops.value:g} keeps every MAC: a channel method needs a share "
                          "below 1 (e.g. flops=0.5)", ("flops",))
    return share
