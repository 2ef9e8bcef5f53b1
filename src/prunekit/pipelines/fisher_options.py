"""The options of the quadratic-model methods (CHITA(++), FALCON(++), WoodFisher), declared once
with their constraints; ``pipelines.fisher_methods`` runs them."""

from __future__ import annotations

from dataclasses import dataclass

from .. import memory_plan
from ..fisher import BN_MODES
from ..model_fisher import FISHER_KINDS
from ..options import Flag, Integer, IntegerOrAuto, Memory, OneOf, OptionError, Real
from ..solvers.falcon import SCORES
from .schedule import KINDS
from .weights import RefitOptions

SEARCH_MODES = ("stage", "ahead", "first")
FINAL_PICKS = ("judge", "last")
# a multi-stage run solves once per stage: more stages than this run practically forever for nothing (the
# benchmarks use at most 15; docs/benchmarks.md)
MAX_STAGES = 100


@dataclass
class QuadraticOptions(RefitOptions):
    """Options shared by the quadratic-model methods (and ``RefitOptions``'s, with refit_batches
    "auto" by default: measured on ResNet-20-B, ResNet-20-A, ResNet-56 and MLPNet, docs/benchmarks.md
    sessions 30-33).

    fisher_samples: n, rows of the gradient matrix, or "auto": the largest n ≤ 1000 that fits max_memory
                    (and, rows of one sample each, the samples of the training data).
    fisher_dtype:   storage of the gradient matrix: float32, bfloat16 or float16 (half the memory;
                    products still accumulate in float32).
    max_memory:     refuse a request whose estimated peak exceeds this (bytes, or "16G", "1.5GiB", "500MB");
                    None: the memory available less a margin. See ``prunekit.memory_plan``.
    fisher_batch:   samples averaged per row (1 = per-sample gradients). Mini-batch rows read the
                    training data pass after pass (reshuffled, re-augmented) until n·fisher_batch
                    samples are seen.
    fisher_bn:      BatchNorm in the rows: "frozen" (running statistics) or "batch" (each mini-batch
                    row on its own statistics, as the model is after BatchNorm recalibration;
                    needs fisher_batch >= 2). See ``prunekit.fisher``.
    fisher_kind:    "model": row = one draw of the model's own Fisher (softmax cross-entropy's
                    Gauss-Newton matrix: every image weighed by its predictive uncertainty, not
                    only the misclassified ones; the default loss, or a user's nn.MSELoss() or
                    nn.BCEWithLogitsLoss(): draws of its Gauss-Newton matrix; no first_order);
                    "empirical": row = gradient of the loss at the sample's label; "auto"
                    (default): "model" for per-sample rows (fisher_batch 1) under the default
                    loss without first_order, else "empirical" (measured: docs/benchmarks.md,
                    session 28). See ``prunekit.model_fisher``.
    ridge:          λ of the quadratic model (also WoodFisher's damping), absolute, as in the papers.
    relative_ridge: when ``ridge`` is None, λ = relative_ridge × the mean diagonal of the empirical
                    Fisher XᵀX/n of the stage: scale-free, so one default fits every model and
                    every stage (gradients grow as pruning goes on).
    stages:         pruning stages (1 = one shot).
    schedule:       poly | exp | linear | const, the kept share per stage.
    revive:         let weights pruned in an earlier stage come back.
    fresh_samples:  each stage's gradient rows from training images the earlier stages did not use
                    (the stream of shuffled training batches, pass after pass, continued where the
                    previous stage stopped) instead of the same first n·fisher_batch images at
                    every stage. A multi-stage run then models the loss on more of the data.
    first_order:    add the loss gradient g (mean of the rows) as the linear term of the quadratic
                    model. Off by default: with a small ridge the model then trusts long steps
                    along g, which we measured to hurt (ResNet-20-B at 40% MACs).
    final_pick:     what a multi-stage run ends with. "judge": stage 1 also solves at the final
                    budget (the one-shot solution; with a layer search judged at the final budget,
                    every stage's searched candidates count too: ILP + backsolve, and FALCON's
                    own solver with the searched multipliers), and the run ends with the last
                    stage's result or the best of those, whichever has the lower loss after
                    BatchNorm re-estimation on held training batches (the layer search's judge);
                    "last": the last stage's result. Under torchrun the ranks average their
                    judged losses, so every rank makes the same choice.
    """

    refit_batches: int | str = "auto"
    fisher_samples: int | str = 1000
    fisher_dtype: str = "float32"
    max_memory: int | str | None = None
    fisher_batch: int = 1
    fisher_bn: str = "frozen"
    fisher_kind: str = "auto"
    ridge: float | None = None
    relative_ridge: float = 0.1
    stages: int = 1
    schedule: str = "poly"
    revive: bool = False
    fresh_samples: bool = False
    first_order: bool = False
    final_pick: str = "judge"
    constraints = {**RefitOptions.constraints, "final_pick": OneOf(FINAL_PICKS), "fisher_samples": IntegerOrAuto(1), "fisher_dtype": OneOf(tuple(memory_plan.STORAGE_DTYPES)),
                   "max_memory": Memory(), "fisher_batch": Integer(1), "ridge": Real(0, open_low=True),
                   "relative_ridge": Real(0, open_low=True), "stages": Integer(1, MAX_STAGES), "schedule": OneOf(KINDS),
                   "revive": Flag(), "fresh_samples": Flag(), "first_order": Flag(), "fisher_bn": OneOf(BN_MODES),
                   "fisher_kind": OneOf(("auto", *FISHER_KINDS))}

    def __post_init__(self):
        if self.fisher_bn == "batch" and self.fisher_batch < 2:
            raise OptionError("fisher_bn batch needs mini-batch rows: set fisher_batch to 2 or more "
                              "(16 measured well), or fisher_bn frozen", ("fisher_bn", "fisher_batch"))
        if self.fisher_kind == "model" and self.first_order:
            raise OptionError("first_order needs the loss gradient, which rows of the model's Fisher do not average "
                              "to: drop first_order or use fisher_kind empirical", ("first_order", "fisher_kind"))

    def check_given(self) -> None:
        super().check_given()
        if "relative_ridge" in self.given and self.ridge is not None:
            raise OptionError(f"relative_ridge sets λ when ridge is not given, and ridge is {self.ridge:g}: "
                              "give one of them, not both", ("relative_ridge", "ridge"))
        idle = [name for name in ("schedule", "revive", "fresh_samples", "final_pick") if name in self.given]
        if idle and self.stages == 1:
            named = ", ".join(idle)
            raise OptionError(f"{named} shape{'s' if len(idle) == 1 else ''} the stages of a multi-stage run, and "
                              f"stages is 1: give stages (e.g. 5) or leave {named} out (a gradual run's events "
                              "follow event_schedule)", (*idle, "stages"))

    def rows_kind(self, default_loss: bool) -> str:
        """The kind of gradient rows this run takes ("model" or "empirical"), ``fisher_kind``
        with "auto" resolved; ``default_loss``: no user loss (cross-entropy on class indices)."""
        if self.fisher_kind != "auto":
            return self.fisher_kind
        return "model" if default_loss and self.fisher_batch == 1 and not self.first_order else "empirical"


@dataclass
class ChitaOptions(QuadraticOptions):
    """solver: "iht" (IHT + backsolve) or "backsolve" (magnitude support + backsolve);
    block_size: backsolve in independent blocks of this many weights (None: exact)."""

    solver: str = "iht"
    block_size: int | None = None
    constraints = {**QuadraticOptions.constraints, "solver": OneOf(("iht", "backsolve")),
                   "block_size": Integer(1)}


@dataclass
class FalconOptions(QuadraticOptions):
    """solver: "dfo" (discrete first-order method) or "magnitude" (ILP on the score, backsolve);
    block_size: backsolve in independent blocks of this many weights (None: exact);
    support_score: what the ILP keeps most of: "magnitude" (w²) or "saliency" (diag(XᵀX/n + λ)·w²,
    the quadratic model's cost of removing each weight alone; see ``solvers.falcon``);
    layer_search: trials of the per-layer allocation search (0 = off): each trial is an ILP +
    backsolve with per-layer score multipliers, judged by the loss after BatchNorm recalibration
    on held training batches (see ``pipelines.allocation``); "auto" (default): 100 trials where
    the searches' forward passes and solves are cheap (``fisher_methods.resolve_layer_search``:
    MLPNet, not a CIFAR ResNet), else off;
    layer_search_mode: where the search runs in a multi-stage run (one stage: all the same):
        "ahead" (default): at every stage, each trial judged by the candidate at the *final* budget
                 solved from this stage's quadratic model; the multipliers found prune to this
                 stage's budget (at least as good as "stage" in the mean of every comparison
                 measured, for the same number of searches; docs/benchmarks.md);
        "stage": at every stage, each trial judged at that stage's own budget, starting from the
                 previous stage's multipliers;
        "first": once, at stage 1 (the dense model), judged at the final budget, as one shot
                 searches; every later stage prunes with those multipliers ("allocation first");
    layer_search_refine: with "first", trials of a second search at the last stage, starting from
        the first stage's multipliers (0 = none);
    stages: as for every quadratic method, or "auto" (falcon++'s default): the thorough schedule
        (15 stages of 1,000 rows, each stage on fresh images) where the layer search over it is
        cheap by the search's own limits, else 5 stages; fisher_samples or fresh_samples given by
        the user are kept (``fisher_methods.resolve_stages``)."""

    solver: str = "dfo"
    block_size: int | None = None
    support_score: str = "magnitude"
    layer_search: int | str = "auto"
    layer_search_mode: str = "ahead"
    layer_search_refine: int = 0
    constraints = {**QuadraticOptions.constraints, "stages": IntegerOrAuto(1, MAX_STAGES), "solver": OneOf(("dfo", "magnitude")),
                   "block_size": Integer(1), "support_score": OneOf(SCORES),
                   "layer_search": IntegerOrAuto(0),
                   "layer_search_mode": OneOf(SEARCH_MODES), "layer_search_refine": Integer(0)}
    requires = {"layer_search_mode": ("layer_search", "trials, e.g. 100")}

    def __post_init__(self):
        super().__post_init__()
        if self.layer_search_refine and self.layer_search_mode != "first":
            raise OptionError("layer_search_refine refines the search of layer_search_mode first: set "
                              "layer_search_mode first, or drop layer_search_refine",
                              ("layer_search_refine", "layer_search_mode"))


@dataclass
class WoodFisherOptions(QuadraticOptions):
    """obs_block_size: size of the diagonal blocks of the inverse Fisher."""

    obs_block_size: int = 128
    constraints = {**QuadraticOptions.constraints, "obs_block_size": Integer(1)}
