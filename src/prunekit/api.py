"""``prunekit.prune``: prune your own ``nn.Module`` in one call.

::

    result = prunekit.prune(net, train_loader, method="falcon", flops=0.3, eval_data=test_loader)
    print(result.summary())

``data`` (training batches, for gradients and BatchNorm recalibration) and ``eval_data`` may be
a ``torch.utils.data.DataLoader`` or any re-iterable of ``(x, y)`` batches, a map-style
``Dataset`` of ``(x, y)`` pairs, a pair of tensors ``(X, Y)``, or a function returning an
iterable of batches. Every stage of a multi-stage method reads the training data from the
start again (a prunekit loader at the epoch it was at when ``prune`` was called), so stages
see the same batches however many ran before, and a resumed run (``out=``) matches an
uninterrupted one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from . import recipes, runs
from .api_checks import check_arguments, check_data, check_labels, first_batch
from .budget import Budget
from .data.loaders import BatchLoader
from .errors import PrunekitError
from .pipelines.fisher_methods import FisherOptions
from .pipelines.oneshot import check_request
from .pipelines.oneshot import prune as prune_oneshot
from .runs import evaluate_loss_accuracy

OPTIONS = tuple(f.name for f in fields(FisherOptions))


@dataclass
class Result:
    """The outcome of ``prunekit.prune``.

    model: the pruned model (the one passed in, pruned in place). sparsity: share of prunable
    weights removed; flops_kept / params_kept: shares of the dense MACs / parameters kept (all
    in [0, 1]); macs: MACs per example; accuracy / dense_accuracy: top-1 % on ``eval_data``
    (None without it); history: one record per stage (budget asked, reached, loss, accuracy).
    """

    model: nn.Module
    method: str
    sparsity: float
    flops_kept: float
    params_kept: float
    nonzeros: int
    macs: int
    dense_macs: int
    seconds: float
    accuracy: float | None = None
    dense_accuracy: float | None = None
    loss: float | None = None
    history: list[dict] = field(default_factory=list)
    out: str | None = None

    def summary(self) -> str:
        acc = ("" if self.accuracy is None else
               f", accuracy {self.dense_accuracy:.2f}% -> {self.accuracy:.2f}%")
        return (f"{self.method}: sparsity {100 * self.sparsity:.2f}%, MACs kept {100 * self.flops_kept:.2f}% "
                f"({self.macs:,} of {self.dense_macs:,}){acc}, {self.seconds:.1f} s")


def prune(model: nn.Module, data=None, *, method: str = "magnitude", sparsity=None, flops=None, params=None,
          example_input: torch.Tensor | None = None, eval_data=None, include: list[str] | None = None,
          exclude: list[str] | None = None, seed: int = 0, recalibrate_bn: bool = True, batch_size: int = 128,
          out: str | None = None, progress: bool = False, **options) -> Result:
    """Prune ``model`` in place with ``method`` to the budget and return a ``Result``.

    Args:
        data: training data (see the module docstring); needed by the gradient methods and for
            BatchNorm recalibration, optional for magnitude pruning.
        sparsity, flops, params: the budget, as on the command line (0.9, "90%", "50k"; flops =
            share of dense MACs kept).
        example_input: one input batch for counting MACs; default: the first training (or
            evaluation) batch's first example.
        eval_data: evaluation data; gives accuracy and loss before, per stage and after.
        include, exclude: module-name patterns of the layers to prune (default: every Conv/Linear).
        batch_size: batch size used when ``data``/``eval_data`` are a Dataset or tensors.
        out: a run folder (config, log, metrics, stage checkpoints, model, report); calling again
            with the same arguments and folder resumes an interrupted run.
        options: the method's options, e.g. ``fisher_samples=500, stages=5`` (see ``FisherOptions``).
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise PrunekitError(f"unknown option(s) {', '.join(unknown)}: the method options are {', '.join(OPTIONS)}")
    check_arguments(model, {"method": method, "seed": seed, "batch_size": batch_size, "recalibrate_bn": recalibrate_bn,
                            "progress": progress, "include": include, "exclude": exclude, "out": out}, options)
    check_data(data, "data")
    check_data(eval_data, "eval_data")
    budget = Budget.parse(sparsity, flops, params)
    train_batches = _batches(data, batch_size, shuffle=True, seed=seed, what="data")
    eval_batches = _batches(eval_data, batch_size, shuffle=False, seed=seed, what="eval_data")
    if example_input is None:
        source, what = (train_batches, "data") if train_batches is not None else (eval_batches, "eval_data")
        if source is None:
            raise PrunekitError("pass example_input (one input batch) when there is no data to take it from")
        example_input = first_batch(source, what)[0][:1]
    check_labels(model, example_input, data, train_batches, "data")
    check_labels(model, example_input, eval_data, eval_batches, "eval_data")
    eval_loader = eval_batches() if eval_batches is not None else None
    if out is not None:
        return _prune_into_folder(model, out, method=method, budget=budget, example_input=example_input,
                                  train_batches=train_batches, eval_loader=eval_loader, include=include,
                                  exclude=exclude, seed=seed, recalibrate_bn=recalibrate_bn, options=options,
                                  progress=progress, request={"sparsity": sparsity, "flops": flops, "params": params})
    costs, space, _ = check_request(model, method, budget, example_input, include, exclude, options)
    dense = evaluate_loss_accuracy(model, eval_loader) if eval_loader is not None else {}
    meter = None if eval_loader is None else runs.StageMeter(lambda m: runs.measure(m, costs, space, eval_loader))
    result = prune_oneshot(model, method, budget, example_input, train_batches, include=include, exclude=exclude,
                           seed=seed, recalibrate_bn=recalibrate_bn, options={"progress": progress, **options},
                           checkpointer=meter)
    final = evaluate_loss_accuracy(model, eval_loader) if eval_loader is not None else {}
    return Result(model=model, method=method, sparsity=result.sparsity, flops_kept=result.counts.flops_kept,
                  params_kept=result.counts.params_kept, nonzeros=result.nonzeros, macs=result.counts.macs,
                  dense_macs=result.counts.dense_macs, seconds=result.seconds, accuracy=final.get("accuracy"),
                  dense_accuracy=dense.get("accuracy"), loss=final.get("loss"),
                  history=result.info.get("stages", []))


def _prune_into_folder(model, out, *, method, budget, example_input, train_batches, eval_loader, include,
                       exclude, seed, recalibrate_bn, options, progress, request) -> Result:
    folder = runs.RunFolder(out)
    config = {"model_class": type(model).__name__, "method": method, **request, "include": include,
              "exclude": exclude, "seed": seed, "recalibrate_bn": recalibrate_bn, **options}
    text = recipes.dump_recipe(config)
    if folder.config.exists() and folder.config.read_text() != text:
        raise PrunekitError(f"{out} holds a run with other arguments: pick another out folder")
    start = time.perf_counter()
    record = runs.execute(folder, model, name=type(model).__name__, method=method, budget=budget,
                          example_input=example_input, train_batches=train_batches, eval_loader=eval_loader,
                          sidecar={"model": type(model).__name__, "custom": True}, include=include,
                          exclude=exclude, seed=seed, recalibrate_bn=recalibrate_bn, options=options,
                          progress=progress, request=request, config_text=text)
    _load_final(model, folder)              # a finished run is not redone: its model is in the folder
    try:
        from . import report
        report.write_run_report(folder.path)
    except PrunekitError:                   # no matplotlib: report.md without plots
        pass
    metrics = folder.read_metrics()
    return Result(model=model, method=method, sparsity=record["sparsity"], flops_kept=record["flops_kept"],
                  params_kept=record["params_kept"], nonzeros=record["nonzeros"], macs=record["macs"],
                  dense_macs=record["dense_macs"], seconds=time.perf_counter() - start,
                  accuracy=record.get("accuracy"), dense_accuracy=record.get("dense_accuracy"),
                  loss=record.get("loss"), history=metrics.get("stages", []), out=str(folder.path))


def _load_final(model: nn.Module, folder: runs.RunFolder) -> None:
    from safetensors.torch import load_file
    model.load_state_dict(load_file(folder.model_path))


def _batches(data, batch_size: int, shuffle: bool, seed: int, what: str) -> Callable[[], Iterable] | None:
    """A function returning a fresh iterable of (x, y) batches over ``data``, the same each call."""
    if data is None:
        return None
    if isinstance(data, BatchLoader):        # restart at the epoch it is at now, every time
        epoch = data.epoch

        def again():
            loader = copy.copy(data)
            loader.epoch = epoch
            return loader
        return again
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        data = torch.utils.data.TensorDataset(*data)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        dataset = data
        return lambda: torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None)
    if callable(data):
        return data
    if isinstance(data, Iterable):
        if iter(data) is data:
            raise PrunekitError(f"{what} is a one-pass iterator: pass a DataLoader, a Dataset, (X, Y) tensors "
                                "or a function returning batches, so every stage can read it again")
        return lambda: data
    raise PrunekitError(f"{what} must be a DataLoader, a Dataset, (X, Y) tensors or a function returning "
                        f"batches, got {type(data).__name__}")
