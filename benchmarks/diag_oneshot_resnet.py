"""FALCON's solver variants on ONE gradient matrix of ResNet-20-B (issue 12, items 1 and 2).

    OMP_NUM_THREADS=1 python benchmarks/diag_oneshot_resnet.py --budgets 0.2 0.3

Cheap ablations, one process: the rows (n = 500 mini-batches of 16 augmented images, BatchNorm
on each mini-batch's statistics: what ``--fisher-bn batch --fisher-batch 16`` collects) are
computed once; then for each budget and variant: the quadratic model with that relative ridge,
FALCON with that solver and support score, BatchNorm recalibrated as ``prunekit prune`` does
(20 augmented batches of 128), test accuracy (1,017 images) and training accuracy and loss
(5,085). The dense weights and BatchNorm state are restored between variants. Each variant also
reports the ridge's share of Q at its solution and the share of its kept weights that FLOP-aware
magnitude (the ILP on w̄², no backsolve) keeps too: why the first-order method keeps the
magnitude support. The benchmark rows (bench_oneshot.py) each run in their own process.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from common import DEFAULT_DATA, write_json

from prunekit.budget import Budget
from prunekit.costs import CostModel
from prunekit.data.loaders import make_loader
from prunekit.fisher import collect_gradients, passes
from prunekit.loading import load_data, load_model
from prunekit.params import ParamSpace
from prunekit.solvers.falcon import falcon
from prunekit.solvers.quadratic import QuadraticModel
from prunekit.train import recalibrate_batchnorm

# name -> (relative ridge, falcon keyword arguments)
VARIANTS = {
    "ilp+backsolve r0.1": (0.1, {"variant": "magnitude"}),
    "ilp+backsolve r0.001": (0.001, {"variant": "magnitude"}),
    "dfo r0.1 (default)": (0.1, {"variant": "dfo"}),
    "dfo r0.001": (0.001, {"variant": "dfo"}),
    "saliency ilp+backsolve r0.1": (0.1, {"variant": "magnitude", "score": "saliency"}),
    "saliency dfo r0.1": (0.1, {"variant": "dfo", "score": "saliency"}),
}


def loss_accuracy(model: nn.Module, loader) -> dict:
    model.eval()
    loss, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += y.numel()
    return {"accuracy": 100 * correct / total, "loss": loss / total}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.3])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/diag_oneshot_resnet20-b.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = Path(args.data)
    loaded = load_model("resnet20-b", data / "checkpoints/resnet20_cifar10.pth.tar")
    model = loaded.model
    train = load_data("cifar10", data / "cifar10", "train")
    test = make_loader(load_data("cifar10", data / "cifar10", "test"), loaded.normalization, batch_size=512)
    train_plain = make_loader(train, loaded.normalization, batch_size=512)
    batches = lambda: make_loader(train, loaded.normalization, batch_size=128, shuffle=True, augment=True, seed=0)
    costs = CostModel(model, loaded.example_input())
    space = ParamSpace(model, exclude=loaded.prune_exclude, costs=costs)
    macs = space.macs_per_weight(costs)
    dense_state = copy.deepcopy(model.state_dict())
    w_bar = space.vector().clone()
    torch.manual_seed(0)
    start = time.perf_counter()
    X = collect_gradients(model, space, passes(batches()), args.n, batch=args.batch, chunk=args.batch,
                          progress=False, bn="batch")
    gradient_seconds = time.perf_counter() - start
    mean_diag = sum(float(row.double().square().sum()) for row in X) / X.numel()   # one row at a time
    rows = []
    for flops in args.budgets:
        budget = Budget.parse(None, flops).resolve(costs, space)
        k = min(budget.max_nonzeros, space.numel)
        reference = falcon(QuadraticModel(X, w_bar, 0.1 * mean_diag), macs, k, budget.max_macs, variant="magnitude")
        magnitude_support = reference.w != 0
        for name in args.variants:
            relative, kwargs = VARIANTS[name]
            q = QuadraticModel(X, w_bar, relative * mean_diag)
            t = time.perf_counter()
            sol = falcon(q, macs, k, budget.max_macs, **kwargs)
            solver_seconds = time.perf_counter() - t
            kept = sol.w != 0
            space.assign(sol.w)
            recalibrate_batchnorm(model, batches())
            te, tr = loss_accuracy(model, test), loss_accuracy(model, train_plain)
            model.load_state_dict(dense_state)
            row = {**{key: v for key, v in sol.info.items() if isinstance(v, (int, float, bool, str))},
                   "budget": flops, "name": name, "relative_ridge": relative, "test_accuracy": te["accuracy"],
                   "test_loss": te["loss"], "train_accuracy": tr["accuracy"], "train_loss": tr["loss"],
                   "Q": sol.objective, "solver_seconds": solver_seconds,
                   "shared_with_magnitude_support": float((kept & magnitude_support).sum()) / float(kept.sum())}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(args.out, {"benchmark": "diag_oneshot_resnet20-b", "threads": 1,
                                  "note": "one process; machine shared with other jobs", "n": args.n,
                                  "batch": args.batch, "gradient_seconds": gradient_seconds, "rows": rows})


if __name__ == "__main__":
    main()
