"""Gradual FALCON against gradual FLOP-aware magnitude at the same MACs, ResNet-20 on Fashion-MNIST.

The reference model is our own, trained on the complete Fashion-MNIST training set and shipped in
benchmarks/checkpoints/fmnist-resnet20 (its README has the recipe):

    prunekit train --model resnet20 --data fashion-mnist --data-dir ../shared/data/fashion-mnist \\
        --epochs 8 --lr 0.1 --batch-size 128 --out runs/fmnist-resnet20

then, for each method, `prunekit prune --gradual` to the FLOP budget (default 20% of MACs kept)
with the same events, fine-tuning epochs and seed; accuracy on the 10,000 test images.

    python benchmarks/bench_gradual_fmnist.py            # or --checkpoint runs/fmnist-resnet20/model.safetensors

Every row runs on one thread (OMP_NUM_THREADS=1 whatever the shell set); ``threads`` and the
machine's 1-minute ``load_average`` as it started are recorded per row.
"""

from __future__ import annotations

import argparse
import json

from pathlib import Path

from common import (DEFAULT_DATA, FMNIST_CHECKPOINT, load_average, print_table, prunekit, quiet_note, refuse,
                    write_json)

THREADS = 1          # per row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    parser.add_argument("--checkpoint", default=str(FMNIST_CHECKPOINT),
                        help="the trained ResNet-20 (prunekit .safetensors; default: the shipped one)")
    parser.add_argument("--flops", default="0.2")
    parser.add_argument("--methods", nargs="+", default=["falcon", "magnitude-flops"])
    parser.add_argument("--events", type=int, default=3)
    parser.add_argument("--epochs-per-event", type=int, default=1)
    parser.add_argument("--final-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", default="benchmarks/results/gradual_fmnist.json")
    args = parser.parse_args()
    if not Path(args.checkpoint).is_file():
        refuse(f"{args.checkpoint}: no such checkpoint; pass --checkpoint (a trained resnet20 .safetensors)")
    started = load_average()
    rows = []
    for method in args.methods:
        load = load_average()
        r = prunekit("prune", "--model", "resnet20", "--checkpoint", args.checkpoint, "--data", "fashion-mnist",
                     "--data-dir", f"{args.data}/fashion-mnist", "--method", method, "--flops", args.flops,
                     "--gradual", "--events", str(args.events), "--epochs-per-event", str(args.epochs_per_event),
                     "--final-epochs", str(args.final_epochs), "--lr", str(args.lr), threads=THREADS)
        rows.append({"method": method, "dense_accuracy": r["dense_accuracy"], "accuracy": r["accuracy"],
                     "flops_kept": r["flops_kept"], "sparsity": r["sparsity"], "seconds": r["seconds"],
                     "peak_rss_mb": r["peak_rss_mb"], "threads": THREADS, "load_average": load,
                     "events": r["events"]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "events"}), flush=True)
    print(f"\nresnet20 on fashion-mnist, dense accuracy {rows[0]['dense_accuracy']:.2f}% (10,000 test images); "
          + quiet_note(started, THREADS))
    print_table(rows, [("method", "method", ">15"), ("flops_kept", "MACs kept", ".4f"),
                       ("sparsity", "sparsity", ".3f"), ("accuracy", "test acc %", ".2f"),
                       ("seconds", "seconds", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f")])
    for row in rows:
        print(f"{row['method']} per event: " + ", ".join(
            f"{100 * e['flops_kept']:.1f}% MACs -> {e['accuracy']:.2f}%" for e in row["events"]))
    write_json(args.out, {"benchmark": "gradual_fmnist", "checkpoint": args.checkpoint, "flops": args.flops,
                          "events": args.events, "epochs_per_event": args.epochs_per_event,
                          "final_epochs": args.final_epochs, "lr": args.lr, "threads_per_row": THREADS,
                          "rows": rows})


if __name__ == "__main__":
    main()
