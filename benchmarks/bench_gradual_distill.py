"""Gradual pruning with and without distillation in its fine-tunes, over seeds: MLPNet on MNIST.

Each row is one `prunekit prune --gradual` process (its own seconds and peak RSS); the rows of a
seed differ only in `--finetune-distill` (the seed sets the fine-tunes' order). Accuracy on the
10,000 MNIST test images. Every row runs on one thread (OMP_NUM_THREADS=1 whatever the shell
set, as the documented figures); ``threads`` and the machine's 1-minute ``load_average`` as it
started are recorded per row, and the table says whether the machine was quiet.

    python benchmarks/bench_gradual_distill.py --sparsity 0.95 0.98 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
from statistics import mean

from pathlib import Path

from common import DEFAULT_DATA, load_average, print_table, prunekit, quiet_note, refuse, write_json

THREADS = 1          # per row: the figures in docs/benchmarks.md are one-thread rows


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
    # options checked before the first row (a bad one would otherwise fail after minutes of rows)
    if not Path(checkpoint).is_file():
        refuse(f"{checkpoint}: no such checkpoint; pass --data (the shared data folder) or --checkpoint")
    if args.events < 1 or args.final_epochs < 0 or args.epochs_per_event < 1:
        refuse("--events and --epochs-per-event must be 1 or more, --final-epochs 0 or more")
    if any(not 0 <= d < 1 for d in args.distill):
        refuse(f"--distill {args.distill}: each share must be in [0, 1)")
    # --epochs-per-event shapes a schedule of 2 or more events; a single event prunes straight to the budget
    schedule = ["--epochs-per-event", str(args.epochs_per_event)] if args.events > 1 else []
    started = load_average()
    rows = []
    for method in args.methods:
        for sparsity in args.sparsity:
            for distill in args.distill:
                for seed in args.seeds:
                    load = load_average()
                    r = prunekit("prune", "--model", "mlpnet", "--checkpoint", checkpoint, "--data", "mnist",
                                 "--data-dir", f"{args.data}/mnist", "--method", method, "--sparsity", str(sparsity),
                                 "--gradual", "--events", str(args.events), *schedule,
                                 "--final-epochs", str(args.final_epochs),
                                 "--finetune-distill", str(distill), "--seed", str(seed), threads=THREADS)
                    rows.append({"method": method, "sparsity": sparsity, "distill": distill, "seed": seed,
                                 "dense_accuracy": r["dense_accuracy"], "accuracy": r["accuracy"],
                                 "sparsity_met": r["sparsity"], "seconds": r["seconds"],
                                 "peak_rss_mb": r["peak_rss_mb"], "threads": THREADS, "load_average": load,
                                 "events": r["events"]})
                    print(f"{method} {sparsity:g} distill {distill:g} seed {seed}: {r['accuracy']:.2f}%", flush=True)
    summary = []
    for key in dict.fromkeys((r["method"], r["sparsity"], r["distill"]) for r in rows):
        group = [r for r in rows if (r["method"], r["sparsity"], r["distill"]) == key]
        summary.append({"method": key[0], "sparsity": key[1], "distill": key[2], "seeds": len(group),
                        "accuracy": mean(r["accuracy"] for r in group),
                        "per_seed": " / ".join(f"{r['accuracy']:.2f}" for r in group),
                        "seconds": mean(r["seconds"] for r in group)})
    print(f"\nmlpnet on mnist, dense accuracy {rows[0]['dense_accuracy']:.2f}% (10,000 test images); "
          + quiet_note(started, THREADS))
    print_table(summary, [("method", "method", ">10"), ("sparsity", "sparsity", ".2f"), ("distill", "distill", ".1f"),
                          ("accuracy", "mean acc %", ".2f"), ("per_seed", "per seed", ">22"),
                          ("seconds", "seconds", ".1f")])
    write_json(args.out, {"benchmark": "gradual_distill", "checkpoint": checkpoint, "events": args.events,
                          "epochs_per_event": args.epochs_per_event, "final_epochs": args.final_epochs,
                          "threads_per_row": THREADS, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
