"""One-shot CHITA against magnitude and WoodFisher, on the papers' reference checkpoints.

    python benchmarks/bench_chita.py --model mlpnet
    python benchmarks/bench_chita.py --model resnet20-b --sparsities 0.5 0.7 0.9

Every row is a separate `prunekit prune --json` process on one thread (OMP_NUM_THREADS=1 whatever
the shell set), so its seconds and peak RSS are its own; ``threads`` and the machine's 1-minute
``load_average`` as it started are recorded per row. Rows are written to --out as they finish;
``--resume`` keeps the rows already there and runs only the missing ones. MLPNet: gradients from the MNIST training images, accuracy on the full MNIST test set.
ResNet-20-B: gradients from the 5,085 CIFAR-10 training images, accuracy on the 1,017 test
images and on the 5,085 training images.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from common import DEFAULT_DATA, load_average, print_table, prunekit, quiet_note, read_rows, write_json

THREADS = 1          # per row

SETUPS = {
    "mlpnet": {"checkpoint": "checkpoints/mnist_25_epoch_93.97.ckpt", "data": "mnist", "dir": "mnist"},
    "resnet20-b": {"checkpoint": "checkpoints/resnet20_cifar10.pth.tar", "data": "cifar10", "dir": "cifar10"},
}
# name -> extra CLI arguments
METHODS = {
    "magnitude": ["--method", "magnitude"],
    "woodfisher": ["--method", "woodfisher"],
    "chita-iht": ["--method", "chita", "--solver", "iht"],
    "chita-bso": ["--method", "chita", "--solver", "backsolve"],
    "chita++": ["--method", "chita++"],
    "chita++-revive": ["--method", "chita++", "--revive"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=SETUPS, default="mlpnet")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more `prunekit prune` arguments for every row (e.g. --fisher-samples 500)")
    parser.add_argument("--plus-stages", type=int, help="stages of the chita++ rows (default: the method's)")
    parser.add_argument("--plus-fisher-samples", type=int, help="gradient rows of the chita++ rows")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/chita_MODEL.json)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and run only the missing ones")
    args = parser.parse_args()
    started = load_average()
    args.out = args.out or f"benchmarks/results/chita_{args.model}.json"
    setup = SETUPS[args.model]
    common = ["--model", args.model, "--checkpoint", f"{args.data}/{setup['checkpoint']}",
              "--data", setup["data"], "--data-dir", f"{args.data}/{setup['dir']}"]
    rows = read_rows(args.out, args.resume)
    done = {(row["method"], row["sparsity"]) for row in rows}
    for sparsity in args.sparsities:
        for name in args.methods:
            if (name, sparsity) in done:
                continue
            load = load_average()
            with tempfile.TemporaryDirectory() as tmp:
                plus = []
                if name.startswith("chita++"):
                    plus += ["--stages", str(args.plus_stages)] if args.plus_stages else []
                    plus += ["--fisher-samples", str(args.plus_fisher_samples)] if args.plus_fisher_samples else []
                r = prunekit("prune", *common, *METHODS[name], "--sparsity", str(sparsity), "--out", tmp,
                             *plus, *args.extra, threads=THREADS)
                row = {"method": name, "sparsity": sparsity, "accuracy": r["accuracy"],
                       "nonzeros": r["nonzeros"], "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                       "dense_accuracy": r["dense_accuracy"], "stages": len(r.get("stages", [])) or None,
                       "threads": THREADS, "load_average": load}
                if setup["data"] == "cifar10":
                    saved = ["--model", args.model, "--checkpoint", f"{tmp}/model.safetensors",
                             "--data", setup["data"], "--data-dir", f"{args.data}/{setup['dir']}"]
                    row["train_accuracy"] = prunekit("eval", *saved, "--eval-split", "train",
                                                     threads=THREADS)["accuracy"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(args, rows)                 # after every row: an interrupted run loses at most one
    if not rows:
        return
    print(f"\n{args.model}, dense accuracy {rows[0]['dense_accuracy']:.2f}%; " + quiet_note(started, THREADS))
    print_table(rows, [("method", "method", ">12"), ("sparsity", "sparsity", ".2f"),
                       ("accuracy", "test acc %", ".2f"), ("train_accuracy", "train acc %", ".2f"),
                       ("seconds", "seconds", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
                       ("stages", "stages", "")])
    save(args, rows)


def save(args, rows: list[dict]) -> None:
    write_json(args.out, {"benchmark": f"chita_{args.model}", "extra_args": args.extra, "plus_stages": args.plus_stages,
                          "plus_fisher_samples": args.plus_fisher_samples, "threads_per_row": THREADS, "rows": rows},
               extends=args.resume)


if __name__ == "__main__":
    main()
