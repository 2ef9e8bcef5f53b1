"""``prunekit eval``: accuracy of a model on a data set."""

from __future__ import annotations

import time

from ..train import evaluate
from ..record import peak_rss_mb
from .common import add_data_args, add_device_arg, add_model_args, emit, eval_data, loaded_model


def cmd_eval(args) -> int:
    loaded = loaded_model(args)
    loader = eval_data(args, loaded)
    start = time.perf_counter()
    accuracy = evaluate(loaded.model, loader, progress=not args.json)
    payload = {"model": args.model, "data": args.data, "split": args.eval_split, "accuracy": accuracy,
               "images": len(loader.dataset) if hasattr(loader, "dataset") else None,
               "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
    emit(args, payload, [f"{args.model} on {args.data} {args.eval_split}: {accuracy:.2f}% top-1"])
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a model on a data set")
    add_model_args(p)
    add_data_args(p, seed=False)         # evaluation has no random choice
    add_device_arg(p)
    p.set_defaults(func=cmd_eval)
