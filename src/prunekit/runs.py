"""Run folders: one pruning run on disk, readable by people and resumable after any kill.

Layout of ``DIR`` (every file but the log is written atomically)::

    config.toml                 the resolved options (a recipe: ``prunekit prune --recipe`` reads it)
    run.log                     what happened, one timestamped line per event (append-only)
    metrics.json                status, dense model, per stage (budget asked, sparsity and MACs
                                reached, loss, accuracy, seconds), final result, per-layer density
    checkpoints/stage-NNN.safetensors   model state + RNG states + stage history after stage NNN
    model.safetensors, model.json       the final model and its sidecar
    report.md, plots/*.png              written by ``report.write_run_report``

``execute`` runs a prune into a folder, resuming from the newest stage checkpoint if there is
one (see ``pipelines.stages`` for the protocol the pipeline follows).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors
from torch import nn

from .budget import Budget
from .costs import CostModel
from .errors import PrunekitError
from .params import ParamSpace
from .pipelines.oneshot import check_request, prune
from .pipelines.stages import StageState
from .saving import atomic_write_bytes, atomic_write_json, save_model

METRICS = "metrics.json"


class RunFolder:
    """Paths and small I/O helpers of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.toml")
    metrics_path = property(lambda self: self.path / METRICS)
    checkpoints = property(lambda self: self.path / "checkpoints")
    model_path = property(lambda self: self.path / "model.safetensors")
    report_path = property(lambda self: self.path / "report.md")

    def exists(self) -> bool:
        return self.metrics_path.exists() or self.config.exists()

    def log(self, message: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path / "run.log", "a") as log:
            log.write(f"{stamp} {message}\n")

    def read_metrics(self) -> dict:
        if not self.metrics_path.exists():
            return {}
        try:
            return json.loads(self.metrics_path.read_text())
        except json.JSONDecodeError as err:
            raise PrunekitError(f"{self.metrics_path} is not valid JSON ({err}); restore or delete it") from None

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.metrics_path, _finite(metrics))


def is_run(path: str | Path) -> bool:
    return (Path(path) / METRICS).exists()


def _finite(obj):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class RunCheckpointer:
    """A ``StageCheckpointer`` writing ``checkpoints/stage-NNN.safetensors`` in a run folder.

    One file per stage holds the model state (``model/<key>``), the torch RNG state
    (``rng/torch``) and, in the safetensors metadata, the stage number, history and the numpy /
    ``random`` RNG states as JSON; one atomic write, so a file is complete or absent.
    ``measure(model) -> dict`` (optional) adds measurements (accuracy, loss, counts) to the
    stage's record before it is written; ``on_saved(history)`` is told after each write.
    """

    def __init__(self, folder: RunFolder, measure: Callable[[nn.Module], dict] | None = None,
                 on_saved: Callable[[list[dict]], None] | None = None):
        self.folder, self.measure, self.on_saved = folder, measure, on_saved
        self.restored_seconds = 0.0     # time the stages restored by ``last`` took in earlier runs

    def path(self, stage: int) -> Path:
        return self.folder.checkpoints / f"stage-{stage:03d}.safetensors"

    def save(self, state: StageState, model: nn.Module) -> None:
        if self.measure is not None and state.history:
            state.history[-1].update(self.measure(model))
        tensors = {f"model/{k}": v.contiguous() for k, v in state.model_state.items()}
        tensors["rng/torch"] = state.rng["torch"]
        meta = {"stage": str(state.stage), "history": json.dumps(_finite(state.history)),
                "rng": json.dumps({k: v for k, v in state.rng.items() if k != "torch"})}
        atomic_write_bytes(self.path(state.stage), save_tensors(tensors, metadata=meta))
        self.folder.log(f"stage {state.stage} saved to {self.path(state.stage).name}")
        if self.on_saved is not None:
            self.on_saved(state.history)

    def last(self) -> StageState | None:
        for path in sorted(self.folder.checkpoints.glob("stage-*.safetensors"), reverse=True):
            try:
                with safe_open(str(path), "pt") as handle:
                    meta = handle.metadata()
                    tensors = {k: handle.get_tensor(k) for k in handle.keys()}
                rng = {**json.loads(meta["rng"]), "torch": tensors.pop("rng/torch")}
                model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
                state = StageState(int(meta["stage"]), model_state, json.loads(meta["history"]), rng)
            except (SafetensorError, KeyError, ValueError, OSError) as err:
                self.folder.log(f"skipping unreadable checkpoint {path.name}: {err}")
                continue
            self.folder.log(f"resuming after stage {state.stage} from {path.name}")
            self.restored_seconds = sum(h.get("seconds") or 0.0 for h in state.history)
            return state
        return None


class StageMeter:
    """A ``StageCheckpointer`` that keeps nothing: it only adds ``measure(model)`` to each stage's
    record (per-stage accuracy without a run folder)."""

    def __init__(self, measure: Callable[[nn.Module], dict]):
        self.measure = measure

    def last(self) -> None:
        return None

    def save(self, state: StageState, model: nn.Module) -> None:
        if state.history:
            state.history[-1].update(self.measure(model))


@torch.no_grad()
def evaluate_loss_accuracy(model: nn.Module, loader: Iterable) -> dict:
    """Mean cross-entropy loss and top-1 accuracy (%) of ``model`` on ``loader`` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = correct = total = 0.0
    for x, y in loader:
        out = model(x.to(device))
        y = y.to(device)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        total += y.numel()
    model.train(was_training)
    return {"loss": loss / max(total, 1), "accuracy": 100.0 * correct / max(total, 1)}


def layer_density(costs: CostModel, model: nn.Module) -> list[dict]:
    """Per weight layer: nonzero weights (``params``, biases aside) and MACs kept against dense
    (from ``costs.count``, so it holds for masked and for shrunk models alike)."""
    counts = costs.count(model)
    rows = []
    for layer in costs.weight_layers():
        weights = math.prod(layer.weight_shape)
        params = counts.nonzeros_by_layer.get(layer.name, 0)
        macs = counts.macs_by_layer.get(layer.name, 0)
        rows.append({"name": layer.name, "kind": layer.kind, "dense_params": weights, "params": params,
                     "dense_macs": layer.macs, "macs": macs,
                     "params_kept": params / weights if weights else 1.0,
                     "macs_kept": macs / layer.macs if layer.macs else 1.0})
    return rows


def execute(folder: RunFolder, model: nn.Module, *, name: str, method: str, budget: Budget,
            example_input: torch.Tensor, train_batches: Callable[[], Iterable] | None,
            eval_loader: Iterable | None, sidecar: dict, include=None, exclude=None, seed: int = 0,
            recalibrate_bn: bool = True, options: dict | None = None, progress: bool = True,
            dense: dict | None = None, request: dict | None = None, config_text: str | None = None) -> dict:
    """Prune ``model`` in place into run folder ``folder``, resuming if it holds stage checkpoints.

    Args:
        name: the model's name for records; sidecar: the model sidecar's content (architecture,
            normalization) to which the result is added.
        dense: the dense model's measurements, if already known (a sweep measures them once).
        request: what the user asked for (budget strings etc.), kept in ``metrics.json``.
        config_text: the resolved options as a TOML recipe, written to ``config.toml`` once the
            request is known to be valid.
    Returns the final record (also ``metrics.json["final"]``). A finished run is not redone.
    """
    metrics = folder.read_metrics()
    if metrics.get("status") == "done":
        folder.log("already complete; nothing to do")
        return metrics["final"]
    options = {"progress": progress, **(options or {})}
    costs, space, resolved = check_request(model, method, budget, example_input, include, exclude, options)
    if config_text is not None and not folder.config.exists():
        atomic_write_bytes(folder.config, config_text.encode())
    folder.log(f"{'resume' if metrics else 'start'}: {name}, method {method}, budget {request or {}}")
    if dense is None:
        dense = metrics.get("dense") or measure(model, costs, space, eval_loader)
    metrics = {"status": "running", "model": name, "method": method, "request": request or {},
               "budget": {"max_nonzeros": resolved.max_nonzeros,
                          "max_macs": None if resolved.max_macs is None else resolved.max_macs + resolved.fixed_macs},
               "prunable_weights": space.numel, "dense_macs": costs.macs, "fixed_macs": resolved.fixed_macs,
               "dense": dense, "stages": metrics.get("stages", [])}
    folder.write_metrics(metrics)

    def on_saved(history: list[dict]) -> None:
        metrics["stages"] = [dict(h) for h in history]
        folder.write_metrics(metrics)

    checkpointer = RunCheckpointer(folder, lambda m: measure(m, costs, space, eval_loader), on_saved)
    result = prune(model, method, budget, example_input, train_batches, include=include, exclude=exclude,
                   seed=seed, recalibrate_bn=recalibrate_bn, options=options, checkpointer=checkpointer)
    final = measure(model, costs, space, eval_loader)
    record = {"model": name, "method": method, "sparsity": result.sparsity,
              "flops_kept": result.counts.flops_kept, "params_kept": result.counts.params_kept,
              "nonzeros": result.nonzeros, "macs": result.counts.macs, "dense_macs": result.counts.dense_macs,
              "params": result.counts.params, "budget_max_nonzeros": metrics["budget"]["max_nonzeros"],
              "budget_max_macs": metrics["budget"]["max_macs"], "dense_accuracy": dense.get("accuracy"),
              "accuracy": final.get("accuracy"), "loss": final.get("loss"),
              "seconds": result.seconds + checkpointer.restored_seconds,   # pruning, BN recalibration included
              **result.info}
    save_model(model, folder.model_path, {**sidecar, "result": _finite(record)})
    metrics.update(status="done", final=record, stages=result.info.get("stages", []),
                   layers=layer_density(costs, model))
    folder.write_metrics(metrics)
    folder.log(f"done: sparsity {record['sparsity']:.4f}, MACs kept {record['flops_kept']:.4f}, "
               f"accuracy {record['accuracy']}")
    return record


def measure(model: nn.Module, costs: CostModel, space: ParamSpace, eval_loader) -> dict:
    """Counts of the model as it is, and its loss and accuracy if there is evaluation data."""
    start = time.perf_counter()
    counts = costs.count(model)
    nonzeros = int(torch.count_nonzero(space.vector()))
    out = {"model_macs": counts.macs, "flops_kept": counts.flops_kept, "params_kept": counts.params_kept,
           "sparsity": 1 - nonzeros / space.numel}
    if eval_loader is not None:
        out.update(evaluate_loss_accuracy(model, eval_loader))
        out["eval_seconds"] = time.perf_counter() - start
    return out
