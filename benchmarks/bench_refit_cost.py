"""The cost of the least-squares re-fit (``prunekit.refit``) on a zoo model: cost only.

Random weights with half of each Conv2d / Linear's weights zeroed (by magnitude, per layer) and
random input batches, so accuracy means nothing here; the time and memory do not depend on the
values, except the conjugate gradients' iterations, which depend on the conditioning (random
weights and inputs condition worse than a trained network on images). One thread. Prints a line
per layer (inputs D, outputs K, rows, iterations, seconds of the solve, output error before and
after) and the totals: all, the solves, the moments (XᵀX, XᵀY); writes them as JSON.

    python benchmarks/bench_refit_cost.py --model resnet20-b --size 32 --batch 128 --batches 8
    python benchmarks/bench_refit_cost.py --model resnet50 --size 224 --batch 32 --batches 4 --out r50.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch import nn

import prunekit.refit as refit_module
from prunekit.process_memory import peak_usage
from prunekit.zoo import MODEL_NAMES, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="resnet20-b")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--batch", type=int, default=128, help="images per batch")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = load_model(args.model).eval()
    model = copy.deepcopy(dense)
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                w = module.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
                names.append(name)
    layers, totals = [], {"solve_seconds": 0.0, "moments_seconds": 0.0}
    fit, add = refit_module.fit_layer, refit_module.Moments.add

    def timed_fit(layer, moments, centred, ridge=refit_module.RIDGE):
        start = time.perf_counter()
        figures = fit(layer, moments, centred, ridge)
        seconds = time.perf_counter() - start
        totals["solve_seconds"] += seconds
        layers.append({"d": moments.xx.shape[1], "k": moments.xy.shape[2], "rows": moments.rows,
                       "iterations": figures["iterations"], "seconds": seconds,
                       "error_before": figures["error_before"], "error_after": figures["error_after"]})
        print("  D {d:5d}  K {k:5d}  rows {rows:8d}  iterations {iterations:4d}  {seconds:7.1f} s  "
              "error {error_before:.3f} -> {error_after:.3f}".format(**layers[-1]), flush=True)
        return figures

    def timed_add(self, layer, x, y):
        start = time.perf_counter()
        add(self, layer, x, y)
        totals["moments_seconds"] += time.perf_counter() - start

    refit_module.fit_layer, refit_module.Moments.add = timed_fit, timed_add
    batches = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(args.batches)]
    start = time.perf_counter()
    record = refit_module.refit(model, dense, names, batches)
    result = {"model": args.model, "weights": "random, half of each layer zeroed", "inputs": "random",
              "size": args.size, "batch": args.batch, "batches": args.batches, "threads": 1,
              "seconds": time.perf_counter() - start, **totals, "forwards": record["forwards"],
              "layers_refit": record["layers"], "max_iterations": record["max_iterations"],
              "peak_rss_mb": peak_usage() / 2**20, "layers": layers}
    print("{model}: {seconds:.1f} s in all, {solve_seconds:.1f} s solving, {moments_seconds:.1f} s of moments, "
          "peak RSS {peak_rss_mb:.0f} MB; {forwards}".format(**result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
