"""A small vision transformer pruned to 50% and 30% of its MACs: FLOP-aware magnitude, FALCON
and AutoBot, one shot and after a one-epoch fine-tune, Fashion-MNIST (10,000 test images).

The reference model is the zoo's ``vit-tiny`` (7x7 patches, 17 tokens, width 64, 4 heads, two
pre-norm blocks with nn.MultiheadAttention, MLP 128), trained by the shipped recipe:

    prunekit train --model vit-tiny --data fashion-mnist --data-dir ../shared/data/fashion-mnist \\
        --epochs 3 --lr 0.05 --batch-size 128 --out runs/fmnist-vit-tiny

MACs are counted by the CostModel: every projection of the attention layers (in_proj, out_proj),
the attention products QKᵀ and AV (never prunable), the patch embedding, MLPs and head. Each row
runs in its own process (`prunekit prune ... --json`).

    OMP_NUM_THREADS=1 python benchmarks/bench_vit_fmnist.py --checkpoint runs/fmnist-vit-tiny/model.safetensors

Every row runs on one thread (OMP_NUM_THREADS=1 whatever the shell set); ``threads`` and the
machine's 1-minute ``load_average`` as it started are recorded per row; ``machine_quiet`` in the
JSON says whether the machine was quiet when the script started.
"""

from __future__ import annotations

import argparse
import json

from pathlib import Path

from common import DEFAULT_DATA, load_average, print_table, prunekit, quiet_note, refuse, write_json

THREADS = 1          # per row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    parser.add_argument("--checkpoint", required=True, help="the trained vit-tiny (prunekit .safetensors)")
    parser.add_argument("--flops", nargs="+", default=["0.5", "0.3"])
    parser.add_argument("--methods", nargs="+", default=["magnitude-flops", "falcon", "autobot"])
    parser.add_argument("--fisher-samples", default="500")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--out", default="benchmarks/results/vit_fmnist.json")
    args = parser.parse_args()
    # options checked before the first row (a bad one would otherwise fail after minutes of rows)
    if not Path(args.checkpoint).is_file():
        refuse(f"{args.checkpoint}: no such checkpoint; pass --checkpoint (a vit-tiny trained by the recipe above)")
    if args.finetune_epochs < 1:
        refuse(f"--finetune-epochs {args.finetune_epochs}: pass 1 or more (the fine-tuned column needs a fine-tune)")
    if not (Path(args.data) / "fashion-mnist").is_dir():
        refuse(f"{args.data}/fashion-mnist: no such folder; pass --data (the shared data folder)")
    started = load_average()
    common = ["--model", "vit-tiny", "--checkpoint", args.checkpoint, "--data", "fashion-mnist",
              "--data-dir", f"{args.data}/fashion-mnist"]
    rows = []
    for flops in args.flops:
        for method in args.methods:
            base = [*common, "--method", method, "--flops", flops]
            if method == "falcon":
                base += ["--fisher-samples", args.fisher_samples]
            load = load_average()
            one_shot = prunekit("prune", *base, threads=THREADS)
            if method == "autobot":
                tuned = prunekit("prune", *base, "--finetune-epochs", str(args.finetune_epochs),
                                 "--finetune-lr", str(args.lr), threads=THREADS)
            else:
                tuned = prunekit("prune", *base, "--gradual", "--events", "1", "--final-epochs",
                                 str(args.finetune_epochs), "--lr", str(args.lr), threads=THREADS)
            rows.append({"flops": float(flops), "method": method, "flops_kept": one_shot["flops_kept"],
                         "macs": one_shot["macs"], "dense_macs": one_shot["dense_macs"],
                         "sparsity": one_shot.get("sparsity"), "params_kept": one_shot.get("params_kept"),
                         "dense_accuracy": one_shot["dense_accuracy"], "one_shot": one_shot["accuracy"],
                         "fine_tuned": tuned["accuracy"], "tuned_flops_kept": tuned["flops_kept"],
                         "seconds": one_shot["seconds"], "seconds_fine_tuned": tuned["seconds"],
                         "peak_rss_mb": max(one_shot.get("peak_rss_mb", 0), tuned.get("peak_rss_mb", 0)),
                         "threads": THREADS, "load_average": load})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nvit-tiny on fashion-mnist, dense accuracy {rows[0]['dense_accuracy']:.2f}% (10,000 test images), "
          f"{rows[0]['dense_macs']:,} MACs; " + quiet_note(started, THREADS))
    print_table(rows, [("flops", "budget", ".2f"), ("method", "method", ">15"), ("flops_kept", "MACs kept", ".4f"),
                       ("params_kept", "params kept", ".3f"), ("one_shot", "one-shot %", ".2f"),
                       ("fine_tuned", "+1 epoch %", ".2f"), ("seconds", "seconds", ".1f"),
                       ("seconds_fine_tuned", "s (tuned)", ".0f")])
    write_json(args.out, {"benchmark": "vit_fmnist", "checkpoint": args.checkpoint, "fisher_samples": args.fisher_samples,
                          "finetune_epochs": args.finetune_epochs, "lr": args.lr,
                          "threads_per_row": THREADS, "machine_quiet": "machine quiet at start" in quiet_note(started, THREADS),
                          "rows": rows})


if __name__ == "__main__":
    main()
