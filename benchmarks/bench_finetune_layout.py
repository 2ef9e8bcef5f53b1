"""Fine-tuning epochs on NCHW against channels-last batches (``layout.model_input``), A/B.

    python benchmarks/bench_finetune_layout.py --data ../shared/data --model resnet56 --repeats 3

One process, one thread (OMP_NUM_THREADS=1 is set for you), the two layouts alternating epoch by
epoch on the same model (a dense reference checkpoint: the cost is the same for a pruned one of the
same shape), CIFAR-10's training images (the shared 5,085), batch 64, crop + flip, lr 0.001:
what a structured fine-tune epoch does. Prints the medians and their ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import prunekit.train as train  # noqa: E402
from common import DEFAULT_DATA, print_table, refuse, write_json  # noqa: E402
from prunekit.data import make_loader  # noqa: E402
from prunekit.loading import load_data, load_model  # noqa: E402

LAYOUTS = {"nchw": lambda model, x, device: x.to(device), "channels_last": train.model_input}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    parser.add_argument("--model", default="resnet56", help="a CIFAR ResNet of the zoo with a reference checkpoint")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per layout")
    parser.add_argument("--out", default="benchmarks/results/finetune_layout.json")
    args = parser.parse_args()
    checkpoints = sorted(glob.glob(f"{args.data}/checkpoints/{args.model}-*.th"))
    if not checkpoints:
        refuse(f"no {args.model}-*.th under {args.data}/checkpoints: pass --data the shared data folder")
    torch.set_num_threads(1)
    loaded = load_model(args.model, checkpoints[0])
    images = load_data("cifar10", f"{args.data}/cifar10", "train")
    loader = make_loader(images, loaded.normalization, batch_size=64, shuffle=True, augment=True, seed=0)
    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(args.repeats):
        for name, layout in LAYOUTS.items():
            train.model_input = layout
            optimizer = train.sgd(loaded.model, 0.001)
            start = time.perf_counter()
            train.train_epoch(loaded.model, loader, optimizer, train.cosine(optimizer, len(loader)), progress=False)
            seconds[name].append(time.perf_counter() - start)
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    rows = [{"layout": name, "median_seconds": statistics.median(times), "epochs": times} for name, times in seconds.items()]
    ratio = rows[1]["median_seconds"] / rows[0]["median_seconds"]
    print_table(rows, [("layout", "layout", ">14"), ("median_seconds", "epoch s", ".1f")])
    print(f"channels-last / NCHW: {ratio:.3f}  (one thread, {os.getloadavg()[0]:.2f} load average at the end)")
    write_json(args.out, {"benchmark": "finetune_layout", "model": args.model, "images": len(images), "batch": 64,
                          "threads": 1, "load_average_end": os.getloadavg()[0], "ratio": ratio, "rows": rows})


if __name__ == "__main__":
    main()
