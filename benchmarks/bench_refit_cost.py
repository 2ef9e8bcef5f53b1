"""The cost of the least-squares re-fit (``prunekit.refit``) on a zoo model, on 1 or more ranks: cost only.

Random weights with half of each Conv2d / Linear's weights zeroed (by magnitude, per layer) and
random input batches, so accuracy means nothing here; the time and memory do not depend on the
values, except the conjugate gradients' iterations, which depend on the conditioning (random
weights and inputs condition worse than a trained network on images). One thread per rank. Every
row (a rank count) is its own process group under torchrun (gloo); the ranks share the batches and
the output channels. Prints a line per layer (inputs D, outputs K, rows, iterations, seconds of
the solve, output error before and after) and the totals: all, the solves, the moments (XᵀX, XᵀY),
each rank's peak RSS; checks that the ranks hold the same weights and how far they are from the
first row's (1 rank); writes the rows as JSON.

    python benchmarks/bench_refit_cost.py --model resnet20-b --size 32 --batch 128 --batches 8
    python benchmarks/bench_refit_cost.py --model resnet50 --size 224 --batch 128 --batches 4 --ranks 1 2 --out r50.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import print_table, write_json
from prunekit.zoo import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]


def worker(model_name: str, size: int, batch: int, batches: int, weights_out: str) -> None:
    """One rank (under torchrun): prune half of each layer, re-fit, print rank 0's row as JSON."""
    import copy

    from torch import nn

    import prunekit.refit as refit_module
    from prunekit import distributed
    from prunekit.process_memory import peak_usage
    from prunekit.zoo import load_model

    distributed.init_from_env()
    collective = distributed.current()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = load_model(model_name).eval()
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

    # the patches pass every argument through unchanged, so they keep working when refit's own
    # signatures gain one (Moments.add's batch index and image subset, session 51)
    def timed_fit(layer, moments, *args, **kwargs):
        start = time.perf_counter()
        figures = fit(layer, moments, *args, **kwargs)
        seconds = time.perf_counter() - start
        totals["solve_seconds"] += seconds
        fitted_on = moments.fit if isinstance(moments, refit_module.SplitMoments) else moments
        layers.append({"d": fitted_on.xx.shape[1], "k": fitted_on.xy.shape[2], "rows": fitted_on.rows,
                       "iterations": figures["iterations"], "seconds": seconds,
                       "error_before": figures["error_before"], "error_after": figures["error_after"],
                       "step": figures.get("step")})
        if collective.rank == 0:                # the worker's own collective (rank 0 prints)
            print("  D {d:5d}  K {k:5d}  rows {rows:8d}  iterations {iterations:4d}  {seconds:7.1f} s  "
                  "held-out error {error_before:.3f} -> {error_after:.3f}  step {step:.3f}".format(**layers[-1]),
                  file=sys.stderr, flush=True)
        return figures

    def timed_add(self, *args, **kwargs):
        start = time.perf_counter()
        add(self, *args, **kwargs)
        totals["moments_seconds"] += time.perf_counter() - start

    refit_module.fit_layer, refit_module.Moments.add = timed_fit, timed_add
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(batch, 3, size, size, generator=generator) for _ in range(batches)]
    start = time.perf_counter()
    record = refit_module.refit(model, dense, names, inputs, collective=collective)
    seconds = time.perf_counter() - start
    fitted = torch.cat([model.get_submodule(n).weight.detach().flatten() for n in names])
    peaks = collective.all_gather(torch.tensor([peak_usage() / 2**20], dtype=torch.float64))
    digests = collective.all_gather(torch.tensor([distributed.digest(fitted)], dtype=torch.int64))
    if collective.rank == 0:
        torch.save(fitted, weights_out)
        print(json.dumps({"model": model_name, "weights": "random, half of each layer zeroed", "inputs": "random",
                          "size": size, "batch": batch, "batches": batches, "ranks": collective.size,
                          "threads_per_rank": 1, "seconds": seconds, **totals, "forwards": record["forwards"],
                          "layers_refit": record["layers"], "max_iterations": record["max_iterations"],
                          "peak_rss_mb_per_rank": [round(float(v), 1) for v in peaks],
                          "ranks_hold_the_same_weights": len(set(digests.tolist())) == 1, "layers": layers}))
    distributed.shutdown()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(args: argparse.Namespace, ranks: int, weights_out: str) -> dict:
    """One row: ``ranks`` processes under torchrun, one thread each; rank 0's JSON row."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master-port",
               str(_port()), str(Path(__file__).resolve()),
               f"--worker={args.model},{args.size},{args.batch},{args.batches},{weights_out}"]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="resnet20-b")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--batch", type=int, default=128, help="images per batch")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1], help="a row per rank count")
    parser.add_argument("--note", default="one thread per rank on the 2-core machine",
                        help="how the machine was (load, other jobs), stored with the rows")
    parser.add_argument("--out", help="JSON file to write (never overwritten)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, size, batch, batches, weights_out = args.worker.split(",")
        worker(model, int(size), int(batch), int(batches), weights_out)
        return
    rows, scratch = [], tempfile.mkdtemp(prefix="bench-refit-")
    try:
        for ranks in args.ranks:
            row = run_row(args, ranks, os.path.join(scratch, f"ranks{ranks}.pt"))
            fitted = torch.load(os.path.join(scratch, f"ranks{ranks}.pt"), weights_only=True)
            first = torch.load(os.path.join(scratch, f"ranks{args.ranks[0]}.pt"), weights_only=True)
            row["max_difference_to_first_row"] = float((fitted - first).abs().max() / first.abs().max())
            rows.append(row)
            print("{model}, {ranks} rank(s): {seconds:.1f} s in all, {solve_seconds:.1f} s solving, {moments_seconds:.1f} "
                  "s of moments (rank 0), peak RSS per rank {peak_rss_mb_per_rank} MB; {forwards}".format(**row), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print_table(rows, [("ranks", "ranks", "d"), ("seconds", "seconds", ".1f"), ("solve_seconds", "solve s", ".1f"),
                       ("moments_seconds", "moments s", ".1f"), ("max_iterations", "max CG it", "d"),
                       ("ranks_hold_the_same_weights", "same weights", ""),
                       ("max_difference_to_first_row", "vs 1st row", ".1e")])
    if args.out:
        write_json(args.out, {"note": args.note, "rows": rows})


if __name__ == "__main__":
    main()
