"""Magnitude pruning of the MLPNet reference checkpoint (93.97%) on the full MNIST test set.

    python benchmarks/bench_magnitude_mlpnet.py --data ../shared/data

Global and per-layer-uniform magnitude, one shot, at the CHITA paper's sparsities, all rows in
this process (torch's threads: ``threads`` per row, with the machine's 1-minute ``load_average``).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import DEFAULT_DATA, load_average, print_table, quiet_note, write_json

import prunekit
from prunekit.data import make_loader
from prunekit.loading import load_data, load_model
from prunekit.train import evaluate

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
METHODS = ("magnitude", "magnitude-uniform")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    parser.add_argument("--out", default="benchmarks/results/magnitude_mlpnet.json")
    args = parser.parse_args()
    started = load_average()

    dense = load_model("mlpnet", f"{args.data}/checkpoints/mnist_25_epoch_93.97.ckpt")
    test = make_loader(load_data("mnist", f"{args.data}/mnist", "test"), dense.normalization, batch_size=1000)
    dense_accuracy = evaluate(dense.model, test)
    rows = []
    for sparsity in SPARSITIES:
        for method in METHODS:
            load = load_average()
            model = copy.deepcopy(dense.model)
            start = time.perf_counter()
            result = prunekit.prune(model, method=method, sparsity=sparsity, example_input=dense.example_input())
            rows.append({"method": method, "sparsity": sparsity, "accuracy": evaluate(model, test),
                         "nonzeros": result.nonzeros, "flops_kept": result.flops_kept,
                         "seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
                         "load_average": load})
    print(f"MLPNet reference checkpoint, dense accuracy {dense_accuracy:.2f}% on {len(test.dataset)} MNIST test images; "
          + quiet_note(started, torch.get_num_threads()))
    print_table(rows, [("method", "method", ">18"), ("sparsity", "sparsity", ".2f"),
                       ("accuracy", "accuracy %", ".2f"), ("nonzeros", "nonzeros", "d"),
                       ("flops_kept", "MACs kept", ".4f"), ("seconds", "seconds", ".3f")])
    write_json(args.out, {"benchmark": "magnitude_mlpnet", "dense_accuracy": dense_accuracy, "rows": rows})


if __name__ == "__main__":
    main()
