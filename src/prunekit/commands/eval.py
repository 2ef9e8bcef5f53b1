"""``prunekit eval``: accuracy of a model on a data set."""

from __future__ import annotations

import time

from ..costs import CostModel
from ..train import check_finite_loss, check_finite_weights, evaluate_loss_accuracy
from ..record import peak_rss_mb
from .common import (add_data_args, add_device_arg, add_model_args, emit, eval_data, loaded_model,
                     show_progress, warn_if_random_weights)


def cmd_eval(args) -> int:
    loaded = loaded_model(args)
    check_finite_weights(loaded.model)      # as prune does: not an accuracy of nan outputs
    loader = eval_data(args, loaded)
    warn_if_random_weights(args)
    start = time.perf_counter()
    measured = evaluate_loss_accuracy(loaded.model, loader, progress=show_progress(args))
    seconds = time.perf_counter() - start
    check_finite_loss(measured["loss"])     # finite weights, nan or inf outputs: as prune refuses them
    counts = CostModel(loaded.model, loaded.example_input()).count(loaded.model)    # nonzero-aware
    data_file = getattr(getattr(loader, "dataset", None), "source", None)    # an .npz read as cifar10: its name
    payload = {"model": args.model, "data": args.data, "data_file": data_file, "split": args.eval_split,
               "accuracy": measured["accuracy"],
               "loss": measured["loss"], "macs": counts.macs, "params": counts.params,
               "nonzero_params": counts.nonzero_params,
               "images": len(loader.dataset) if hasattr(loader, "dataset") else None,
               "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    data = f"{data_file} (read as {args.data})" if data_file else args.data
    emit(args, payload, [f"{args.model} on {data} {args.eval_split}: {measured['accuracy']:.2f}% top-1, "
                         f"loss {measured['loss']:.4f} ({counts.macs:,} MACs per example, "
                         f"{params_text(counts)})"])
    return 0


def params_text(counts) -> str:
    """"N params" (README's count: every parameter, a tied tensor once, less the zeros of prunable
    weights), the model's own ``sum(p.numel())`` beside it where zero weights were left out
    (``counts`` from a cost model of this same model: ``dense_params`` is that sum), and the
    nonzero values of all parameters where they differ (zero biases, padding rows)."""
    text = f"{counts.params:,} params"
    if counts.params != counts.dense_params:
        text += f" (zero weights not counted; {counts.dense_params:,} with them)"
    if counts.nonzero_params is not None and counts.nonzero_params != counts.params:
        text += f", {counts.nonzero_params:,} of all parameter values nonzero"
    return text


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a model on a data set")
    add_model_args(p)
    add_data_args(p, seed=False)         # evaluation has no random choice
    add_device_arg(p)
    p.set_defaults(func=cmd_eval)
