"""Gradual pruning with and without distillation in its fine-tunes, over seeds: MLPNet on MNIST.

Each row is one `prunekit prune --gradual` process (its own seconds and peak RSS); the rows of a
seed differ only in `--finetune-distill` (the seed sets the fine-tunes' order). Accuracy on the
10,000 MNIST test images.

    python benchmarks/bench_gradual_distill.py --sparsity 0.95 0.98 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
from statistics import mean

from common import DEFAULT_DATA, print_table, prunekit, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    parser.add_argument("--checkpoint", default=None, help="MLPNet checkpoint (default: the shared one)")
    parser.add_argument("--methods", nargs="+", default=["magnitude"])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.95, 0.98])
    parser.add_argument("--distill", nargs="+", type=float, default=[0.0, 0.9])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--events", type=int, default=3)
    parser.add_argument("--epochs-per-event", type=int, default=1)
    parser.add_argument("--final-epochs", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/gradual_distill_mlpnet.json")
    args = parser.parse_args()
    checkpoint = args.checkpoint or f"{args.data}/checkpoints/mnist_25_epoch_93.97.ckpt"
    rows = []
    for method in args.methods:
        for sparsity in args.sparsity:
            for distill in args.distill:
                for seed in args.seeds:
                    r = prunekit("prune", "--model", "mlpnet", "--checkpoint", checkpoint, "--data", "mnist",
                                 "--data-dir", f"{args.data}/mnist", "--method", method, "--sparsity", str(sparsity),
                                 "--gradual", "--events", str(args.events), "--epochs-per-event",
                                 str(args.epochs_per_event), "--final-epochs", str(args.final_epochs),
                                 "--finetune-distill", str(distill), "--seed", str(seed))
                    rows.append({"method": method, "sparsity": sparsity, "distill": distill, "seed": seed,
                                 "dense_accuracy": r["dense_accuracy"], "accuracy": r["accuracy"],
                                 "sparsity_met": r["sparsity"], "seconds": r["seconds"],
                                 "peak_rss_mb": r["peak_rss_mb"], "events": r["events"]})
                    print(f"{method} {sparsity:g} distill {distill:g} seed {seed}: {r['accuracy']:.2f}%", flush=True)
    summary = []
    for key in dict.fromkeys((r["method"], r["sparsity"], r["distill"]) for r in rows):
        group = [r for r in rows if (r["method"], r["sparsity"], r["distill"]) == key]
        summary.append({"method": key[0], "sparsity": key[1], "distill": key[2], "seeds": len(group),
                        "accuracy": mean(r["accuracy"] for r in group),
                        "per_seed": " / ".join(f"{r['accuracy']:.2f}" for r in group),
                        "seconds": mean(r["seconds"] for r in group)})
    print(f"\nmlpnet on mnist, dense accuracy {rows[0]['dense_accuracy']:.2f}% (10,000 test images)")
    print_table(summary, [("method", "method", ">10"), ("sparsity", "sparsity", ".2f"), ("distill", "distill", ".1f"),
                          ("accuracy", "mean acc %", ".2f"), ("per_seed", "per seed", ">22"),
                          ("seconds", "seconds", ".1f")])
    write_json(args.out, {"benchmark": "gradual_distill", "checkpoint": checkpoint, "events": args.events,
                          "epochs_per_event": args.epochs_per_event, "final_epochs": args.final_epochs,
                          "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
