"""Stage measures: ``StageMeter`` adds a measurement (accuracy, loss) to each stage's record
without a run folder, and ``layer_density`` gives the weights and MACs each layer keeps against
dense."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from torch import nn

from .costs import CostModel, padding_zeros
from .pipelines.stages import StageState


class StageMeter:
    """A ``StageCheckpointer`` that keeps nothing: it only adds ``measure(model)`` to each stage's
    record (per-stage accuracy without a run folder); ``on_saved(record)`` is told after each.
    ``measure_seconds``: as ``RunCheckpointer``'s."""

    def __init__(self, measure: Callable[[nn.Module], dict], on_saved: Callable[[dict], None] | None = None):
        self.measure, self.on_saved = measure, on_saved
        self.measure_seconds = 0.0

    def last(self) -> None:
        return None

    def save(self, state: StageState, model: nn.Module) -> None:
        if state.history:
            self.measure_seconds += _measure_into(state.history[-1], self.measure, model)
            if self.on_saved is not None:
                self.on_saved(state.history[-1])


def _measure_into(record: dict, measure: Callable[[nn.Module], dict], model: nn.Module) -> float:
    """Add ``measure(model)`` to ``record``; returns the seconds it took."""
    start = time.perf_counter()
    record.update(measure(model))
    return time.perf_counter() - start


def layer_density(costs: CostModel, model: nn.Module) -> list[dict]:
    """Per weight layer: weights kept (``params``, biases aside: its nonzero weights, an embedding's
    padding row counted as kept, as ``Counts.params`` counts it) and MACs kept against dense (from
    ``costs.count``, so it holds for masked and for shrunk models alike)."""
    counts = costs.count(model)
    padding = padding_zeros(model)
    rows = []
    for layer in costs.weight_layers():
        weights = math.prod(layer.weight_shape)
        params = counts.nonzeros_by_layer.get(layer.name, 0) + padding.get(layer.param_name, 0)
        macs = counts.macs_by_layer.get(layer.name, 0)
        rows.append({"name": layer.name, "kind": layer.kind, "dense_params": weights, "params": params,
                     "dense_macs": layer.macs, "macs": macs,
                     "params_kept": params / weights if weights else 1.0,
                     "macs_kept": macs / layer.macs if layer.macs else 1.0})
    return rows
