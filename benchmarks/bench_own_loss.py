"""A model that is not a classifier: an MNIST autoencoder pruned with its own loss (``loss=``).

    python benchmarks/bench_own_loss.py --data ../shared/data

An MLP autoencoder (784-256-32-256-784, ReLU) is trained here, seeded, on the MNIST training
images (mean squared error of the normalized pixels; 8 epochs of Adam), then pruned one shot at
each sparsity by magnitude (global, per-layer uniform) and by CHITA / CHITA++ (n = 500, 5 stages;
rows of the empirical Fisher, and "-model" rows: draws of the Gauss-Newton matrix of the MSE),
all with ``loss=nn.MSELoss()``, every row in its own process with one thread. Reported: the reconstruction error on the 10,000 test images and on the
first 10,000 training images, seconds. BatchNorm plays no part (there is none): what differs is
the quadratic model of the loss the user gave.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from common import DEFAULT_DATA, print_table, refuse, write_json

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
# row name -> (method, options); "-model" rows take draws of the Gauss-Newton matrix (session 29)
ROWS = {"magnitude": ("magnitude", {}), "magnitude-uniform": ("magnitude-uniform", {}),
        "chita": ("chita", {"fisher_samples": 500, "fisher_kind": "empirical"}),
        "chita++": ("chita++", {"fisher_samples": 500, "stages": 5, "fisher_kind": "empirical"}),
        "chita-model": ("chita", {"fisher_samples": 500, "fisher_kind": "model"}),
        "chita++-model": ("chita++", {"fisher_samples": 500, "stages": 5, "fisher_kind": "model"})}


def autoencoder() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 32), nn.ReLU(),
                         nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 784))


def images(data: str, split: str, limit: int | None = None) -> torch.Tensor:
    """(N, 1, 28, 28) MNIST images, normalized as MLPNet's inputs."""
    from prunekit.loading import DATASET_NORMALIZATION, load_data
    from prunekit.data import to_float
    ds = load_data("mnist", f"{data}/mnist", split)
    x = to_float(ds.images, DATASET_NORMALIZATION["mnist"])
    return x[:limit] if limit else x


def train(data: str, path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    x = images(data, "train")
    model = autoencoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(8):
        for index in torch.randperm(len(x), generator=generator).split(128):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x[index]), x[index].flatten(1)).backward()
            optimizer.step()
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(path))


def mse(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), x.flatten(1)))


def row(data: str, path: Path, name: str, sparsity: float, seed: int) -> dict:
    """One row, in this process: prune the trained autoencoder and measure it."""
    import prunekit
    from safetensors.torch import load_file
    torch.set_num_threads(1)
    model = autoencoder()
    model.load_state_dict(load_file(str(path)))
    train_x, test_x = images(data, "train"), images(data, "test")
    method, options = ROWS[name]
    start = time.perf_counter()
    result = prunekit.prune(model, (train_x, train_x.flatten(1)), method=method, sparsity=sparsity,
                            loss=nn.MSELoss(), seed=seed, batch_size=128, **options)
    return {"method": name, "sparsity": sparsity, "test_mse": mse(model, test_x),
            "train_mse": mse(model, train_x[:10000]), "seconds": time.perf_counter() - start,
            "nonzeros": result.nonzeros}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/prunekit-bench-own-loss", help="folder for the trained model")
    parser.add_argument("--out", default="benchmarks/results/own_loss_autoencoder.json")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--row", nargs=2, metavar=("METHOD", "SPARSITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not Path(args.data, "mnist").is_dir():
        refuse(f"--data {args.data} has no mnist folder: pass the shared data folder")
    path = Path(args.work) / f"autoencoder_seed{args.seed}.safetensors"
    if args.row:
        print(json.dumps(row(args.data, path, args.row[0], float(args.row[1]), args.seed)))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        train(args.data, path, args.seed)
    model = autoencoder()
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(path)))
    dense = {"test_mse": mse(model, images(args.data, "test")), "train_mse": mse(model, images(args.data, "train", 10000))}
    print(f"dense autoencoder: test MSE {dense['test_mse']:.4f}, train MSE {dense['train_mse']:.4f}")
    rows = []
    for sparsity in args.sparsities:
        for method in args.rows:
            done = subprocess.run([sys.executable, __file__, "--data", args.data, "--seed", str(args.seed),
                                   "--work", args.work, "--row", method, str(sparsity)],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:
                raise SystemExit(f"row {method} {sparsity} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
            write_json(args.out, {"benchmark": "own_loss_autoencoder", "seed": args.seed, "threads_per_row": 1,
                                  "dense": dense, "rows": rows})
    print_table(rows, [("method", "method", ">18"), ("sparsity", "sparsity", ".2f"), ("test_mse", "test MSE", ".4f"),
                       ("train_mse", "train MSE", ".4f"), ("seconds", "seconds", ".1f")])


if __name__ == "__main__":
    main()
