"""The one record of a pruning run, and the one way a pruned model is written to disk.

``build_record`` makes the flat dict that every consumer reads: the CLI's ``--json`` output,
``prunekit.prune``'s ``Result``, a run folder's ``result.json``, ``metrics.json["final"]`` and
the model sidecar's ``result``, and so the reports. ``save_pruned`` writes a model with its
sidecar (and, for a shrunk model, its channel layout) plus ``result.json``.

Record keys: model, method, family, mode (one-shot | multi-stage | gradual | structured),
request (the budget as asked), sparsity, nonzeros (weights methods), flops_kept, params_kept,
macs, dense_macs, params, dense_params, budget_max_nonzeros (weights methods), budget_max_macs,
budget_max_params (a channel method's params budget: all parameters kept; with it, bound: the
budget that bound, "params" or "flops", or the hybrid's "channels" where its channel cut met both), dense_sparsity (the share of
prunable weights already zero in the model given: weights methods), dense_accuracy,
accuracy, dense_loss, loss (None without evaluation data; accuracy None with the user's ``loss``,
named in loss_function), seconds (pruning, BatchNorm included; the evaluations of each stage's
record are not: their time is the stage's ``eval_seconds``), peak_rss_mb (this process's peak
resident memory when the record was made), options (the method's, resolved), then the method's own facts (``ilp_gap``, ``kept_channels`` ...;
a quadratic method's ``memory_estimate_mb``, its memory plan's estimated peak RSS in MB, counts what the
process held when it planned, so like seconds and peak_rss_mb it is a measurement that differs from run to
run, a resumed one's too: a comparison of records leaves the three out) and
its history: ``stages`` (weights), ``events`` (gradual), ``phases`` (structured). A history
entry's ``macs`` / ``max_macs`` count the whole model's MACs as ``macs`` / ``budget_max_macs``
do (fixed ones such as attention products included); its ``loss`` / ``accuracy`` are the
evaluation's (None without stage evaluation), an event's or fine-tune phase's ``finetune_loss`` the
mean training loss of its last fine-tune epoch; an event's ``first_epoch`` the run's training epoch (from 0,
counted across events) its fine-tune started at: the loader's shuffle it read first. A gradual run has ``gradual``
(True) and ``gradual_options`` (events, epochs_per_event, final_epochs, lr, momentum, weight_decay,
event_schedule, start_keep, finetune_distill, finetune_temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .losses import loss_name
from .pipelines.weights import Outcome
from .process_memory import peak_usage
from .saving import atomic_write_json, save_model
from .zoo.checkpoints import unwrap_parallel
from .zoo.layout import channel_layout

HISTORY_KEY = {"one-shot": "stages", "multi-stage": "stages", "gradual": "events", "structured": "phases"}


def finite(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (``process_memory.peak_usage``)."""
    return peak_usage() / 2**20


def budget_max_params(plan) -> int | None:
    """A channel method's params budget (all the parameters the result may keep, ``--params`` with
    autobot or hybrid); None for a weights method (its params budget is ``budget_max_nonzeros``,
    prunable weights left nonzero) and where none was asked."""
    channels = getattr(plan, "channels", None)
    return None if plan.method.family != "channels" or channels is None else channels.max_params


def build_record(plan, outcome: Outcome, dense: dict, final: dict, seconds: float) -> dict:
    """The record of ``outcome``, the result of request ``plan`` (a ``request.Plan``).

    dense / final: measurements of the model before / after (``executor.measure``).
    seconds: pruning time, including stages restored from an earlier, interrupted run.
    """
    c, budget = outcome.counts, plan.budget
    record = {"model": plan.name, "method": plan.method.name, "family": plan.method.family, "mode": plan.mode,
              "request": dict(plan.request.budget), "sparsity": outcome.sparsity, "nonzeros": outcome.nonzeros,
              "flops_kept": c.flops_kept, "params_kept": c.params_kept, "macs": c.macs,
              "dense_macs": c.dense_macs, "params": c.params, "dense_params": c.dense_params,
              "nonzero_params": c.nonzero_params,
              "budget_max_nonzeros": budget.max_nonzeros if plan.method.family == "weights" else None,
              "budget_max_macs": None if budget.max_macs is None else budget.max_macs + budget.fixed_macs,
              "budget_max_params": budget_max_params(plan),
              "dense_sparsity": dense.get("sparsity") if plan.method.family == "weights" else None,
              "dense_accuracy": dense.get("accuracy"), "accuracy": final.get("accuracy"),
              "dense_loss": dense.get("loss"), "loss": final.get("loss"),
              "seconds": seconds, "peak_rss_mb": peak_rss_mb(), "options": plan.options.to_dict(), **outcome.info,
              HISTORY_KEY[plan.mode]: outcome.history}
    if plan.method.family == "weights":
        empty = [e.name for e in plan.space.entries if c.nonzeros_by_layer.get(e.name, 1) == 0]
        if empty:
            record["empty_layers"] = empty
    if plan.request.loss is not None:
        record["loss_function"] = loss_name(plan.request.loss)
    if plan.mode == "gradual":
        record["gradual"] = True
    if plan.mode == "structured":
        record["flops"] = plan.shares[0]
    return finite(record)


def save_pruned(folder: str | Path, model: nn.Module, describe: dict, record: dict, shrunk: bool) -> Path:
    """Write ``folder/model.safetensors`` + ``model.json`` (``describe``: how to rebuild the model,
    e.g. zoo name and build arguments; ``result``: the record; a shrunk model's channel layout)
    and ``folder/result.json``."""
    folder = Path(folder)
    # named as save_model names the weights: an nn.DataParallel's module's names (no "module.")
    meta = {**describe, "result": record,
            **({"channel_layout": channel_layout(unwrap_parallel(model))} if shrunk else {})}
    save_model(model, folder / "model.safetensors", meta, replace_sidecar=True)
    atomic_write_json(folder / "result.json", record)
    return folder / "model.safetensors"


@dataclass
class Result:
    """The outcome of ``prunekit.prune``.

    model: the pruned model (for weights methods the one passed in, pruned in place; for channel
    methods a new, smaller one). sparsity: share of prunable weights removed (weights methods);
    flops_kept / params_kept: shares of the dense MACs / parameters kept (all in [0, 1]);
    params / dense_params: the parameters kept (``sum(p.numel())``, a tied tensor once, less
    the zeros of prunable weights, an embedding's padding row never counted as removed) and the
    dense model's ``sum(p.numel())``; nonzero_params: the nonzero values of every parameter (each
    zero alike; None for a record older than it);
    macs: MACs per example; accuracy / dense_accuracy: top-1 % on ``eval_data`` (None without
    it, or with the user's ``loss``); loss / dense_loss: the mean loss on ``eval_data``; history:
    the record's ``stages``, ``events`` or ``phases`` list: one entry per stage of chita,
    woodfisher or falcon (one in a one-shot run, one per stage in their multi-stage forms), per
    event of a gradual run, per phase of a channel method (gates, BatchNorm, sparsify, each
    fine-tune epoch); empty for a magnitude method run at once; record: everything, as the CLI's
    ``--json`` prints it; snapshots: taper's other budgets (share -> Result).
    """

    model: nn.Module
    method: str
    mode: str
    sparsity: float | None
    flops_kept: float
    params_kept: float
    nonzeros: int | None
    macs: int
    dense_macs: int
    seconds: float
    accuracy: float | None = None
    dense_accuracy: float | None = None
    loss: float | None = None
    dense_loss: float | None = None
    history: list[dict] = field(default_factory=list)
    out: str | None = None
    record: dict = field(default_factory=dict)
    snapshots: dict = field(default_factory=dict)
    params: int | None = None
    dense_params: int | None = None
    nonzero_params: int | None = None

    @classmethod
    def from_record(cls, record: dict, model: nn.Module, out: str | None = None) -> "Result":
        return cls(model=model, method=record["method"], mode=record["mode"], sparsity=record["sparsity"],
                   flops_kept=record["flops_kept"], params_kept=record["params_kept"], nonzeros=record["nonzeros"],
                   macs=record["macs"], dense_macs=record["dense_macs"], seconds=record["seconds"],
                   accuracy=record.get("accuracy"), dense_accuracy=record.get("dense_accuracy"),
                   loss=record.get("loss"), dense_loss=record.get("dense_loss"),
                   history=record.get(HISTORY_KEY[record["mode"]], []), out=out,
                   record=record, params=record.get("params"), dense_params=record.get("dense_params"),
                   nonzero_params=record.get("nonzero_params"))

    def summary(self) -> str:
        from .report import seconds_text        # as the comparison tables show them
        acc = ("" if self.accuracy is None else
               f", accuracy {self.dense_accuracy:.2f}% -> {self.accuracy:.2f}%")
        if self.accuracy is None and self.loss is not None and self.dense_loss is not None:   # loss= given
            acc = f", loss {self.dense_loss:.4g} -> {self.loss:.4g}"
        sparsity = "" if self.sparsity is None else f"sparsity {100 * self.sparsity:.2f}%, "
        return (f"{self.method}: {sparsity}MACs kept {100 * self.flops_kept:.2f}% "
                f"({self.macs:,} of {self.dense_macs:,}), {self.params_text()}{acc}, {seconds_text(self.seconds)} s"
                f"{self.finetune_hint()}")

    def params_text(self) -> str:
        """The summary's parameters: "params kept 41.20% (1,234 of 2,995)", all the model's parameters
        (biases and BatchNorm included, a prunable weight exactly zero not counted, an embedding's
        padding row counted as kept: README "Counting"), the record's ``params`` /
        ``dense_params``: the cost model's recount of the returned model that the CLI's ``params`` line
        prints. The share alone where a Result was built without a record."""
        params, dense = self.record.get("params"), self.record.get("dense_params")
        counts = "" if params is None or dense is None else f" ({params:,} of {dense:,})"
        return f"params kept {100 * self.params_kept:.2f}%{counts}"

    def finetune_hint(self) -> str:
        """The summary's second line after a channel method run with no fine-tune (finetune_epochs 0),
        the CLI's ``fine-tune`` line in Python terms: the two ways to run one (``finetune_epochs=3``,
        or ``prunekit.train.train_epochs`` on ``result.model``; the hybrid's zeros held with
        ``zeros="keep"``), at the run's ``finetune_lr``. "" otherwise."""
        options = self.record.get("options") or {}
        if self.record.get("family") != "channels" or options.get("finetune_epochs", 0):
            return ""
        keep = ', zeros="keep"' if self.sparsity is not None else ""      # the hybrid's FALCON zeros stay zero
        return ("\nfine-tune: none (finetune_epochs=0): a channel-pruned model regains most of its accuracy when "
                "fine-tuned: prune again with finetune_epochs=3 (a few epochs on the training data), or fine-tune "
                f"this one: prunekit.train.train_epochs(result.model, TRAIN_DATA, epochs=1, "
                f"lr={options.get('finetune_lr', 0.01):g}{keep})")
