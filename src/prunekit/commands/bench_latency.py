"""``prunekit bench-latency``: CPU latency of a dense vs a pruned model (median of timed runs)."""

from __future__ import annotations

import json
import statistics
import time

import torch

from ..costs import CostModel
from ..errors import PrunekitError
from ..loading import load_model
from .common import model_file


def add_bench_latency_parser(sub) -> None:
    p = sub.add_parser("bench-latency", help="CPU latency of a dense vs a pruned model")
    p.add_argument("--model", required=True, help="zoo model of both")
    p.add_argument("--checkpoint", help="weights of the dense model (default: fresh weights; timing does not care)")
    p.add_argument("--pruned", required=True, help="the pruned model: a run folder or its model.safetensors")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64],
                   help="batch sizes to time, each its own row (default 1 64)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs; the median is reported (default 30)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_latency)


def median_latency_ms(model, example: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median wall time of ``model(example)`` in ms over ``repeats`` runs after ``warmup`` runs."""
    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            model(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def cmd_bench_latency(args) -> int:
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        raise PrunekitError("--threads, --repeats and --batch-sizes must be positive, --warmup 0 or more")
    pruned_file = model_file(args.pruned)
    if not pruned_file.exists():
        raise PrunekitError(f"no pruned model at {pruned_file}: pass the --out folder of `prunekit prune`")
    torch.set_num_threads(args.threads)
    dense = load_model(args.model, args.checkpoint)
    pruned = load_model(args.model, pruned_file)
    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, *dense.input_shape)
        d = median_latency_ms(dense.model, x, args.warmup, args.repeats)
        p = median_latency_ms(pruned.model, x, args.warmup, args.repeats)
        rows.append({"batch": batch, "dense_ms": d, "pruned_ms": p, "ratio": p / d})
    costs = CostModel(dense.model, dense.example_input())
    kept = costs.count(pruned.model).flops_kept
    if args.json:
        print(json.dumps({"model": args.model, "pruned": str(pruned_file), "threads": args.threads,
                          "warmup": args.warmup, "repeats": args.repeats, "flops_kept": kept, "rows": rows}))
        return 0
    print(f"{args.model}: dense vs {pruned_file} ({100 * kept:.1f}% of MACs), {args.threads} thread(s), "
          f"median of {args.repeats} runs after {args.warmup} warm-up")
    for r in rows:
        print(f"  batch {r['batch']:>4}: dense {r['dense_ms']:9.2f} ms   pruned {r['pruned_ms']:9.2f} ms   "
              f"({r['ratio']:.2f}x)")
    return 0