"""Issue 16, session 56 experiment: the taper's cut on the dense weights ("rewind") against the
taper's own trained weights, same cut, same BatchNorm re-estimation and fine-tune data.

One taper run (bench_structured.py's call, same seed and loader) gives, per budget, the taper's
model (its weights trained with the gates, as bench_structured's taper rows) and the same channels
cut from the dense model's weights. Every row (and the tp rows) then gets BN re-estimation and the
3-epoch fine-tune on a fresh loader seeded 1000 + seed: identical data for every row of one seed
(paired A/B). Training loss: mean cross-entropy over the 5,085 training images, no augmentation,
eval mode.

    python harness.py --mode taper --budgets 0.5 0.3 --seed 0 --out X.json --models-dir D
    python harness.py --mode tp --budgets 0.5 --seed 0 --out X.json --models-dir D
"""

from __future__ import annotations

import argparse
import copy
import glob
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, unused_path, write_json  # noqa: E402
from prunekit.costs import CostModel  # noqa: E402
from prunekit.data import make_loader  # noqa: E402
from prunekit.loading import load_data, load_model  # noqa: E402
from prunekit.record import save_pruned  # noqa: E402
from prunekit.structured import taper as taper_mod  # noqa: E402
from prunekit.structured.baselines import tp_prune  # noqa: E402
from prunekit.structured.shrink import shrink  # noqa: E402
import prunekit  # noqa: E402
from prunekit.train import evaluate, recalibrate_batchnorm, sgd, train_epochs  # noqa: E402

REWOUND: dict[float, torch.nn.Module] = {}
_original = taper_mod.taper_snapshots


def capturing_snapshots(model, groups, counter, budgets, batches, example_input, options, *a, **k):
    """taper_snapshots, plus each snapshot's channels cut from the weights the taper started from."""
    dense_ref = copy.deepcopy(model).eval()         # untrained at entry: run_taper passes a copy of ctx.model
    try:
        return _original(model, groups, counter, budgets, batches, example_input, options, *a, **k)
    finally:
        for s in SHOTS.values():
            REWOUND[s.budget] = shrink(copy.deepcopy(dense_ref), groups, s.masks, example_input)


taper_mod.taper_snapshots = capturing_snapshots
_original_snapshot = taper_mod._snapshot
STOP_AT: list[float] = []          # stop the taper once the snapshot at this budget is taken
SHOTS: dict = {}


class Stop(Exception):
    pass


def stopping_snapshot(*a, **k):
    """taper's _snapshot; once the snapshot at STOP_AT is taken the taper stops (the later steps
    cannot change a snapshot already taken: it is a copy)."""
    shot = _original_snapshot(*a, **k)
    SHOTS[shot.budget] = shot
    if STOP_AT and shot.budget <= STOP_AT[0] + 1e-9:
        raise Stop()
    return shot


taper_mod._snapshot = stopping_snapshot


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def train_loss(model, loader):
    model.eval()
    total, n = 0.0, 0
    for x, y in loader:
        total += float(F.cross_entropy(model(x), y, reduction="sum"))
        n += len(y)
    return total / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["taper", "tp"], required=True)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out", required=True)
    p.add_argument("--models-dir", required=True)
    p.add_argument("--taper-epochs", type=float, default=4.0)
    p.add_argument("--ft-epochs", type=int, default=3)
    p.add_argument("--stop-after", type=float, help="taper: stop once the snapshot at this budget is taken")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    checkpoint = sorted(glob.glob(f"{args.data_dir}/checkpoints/resnet56-*.th"))[0]
    loaded = load_model("resnet56", checkpoint)
    dense = loaded.model
    train = load_data("cifar10", f"{args.data_dir}/cifar10", "train")
    test = load_data("cifar10", f"{args.data_dir}/cifar10", "test")
    test_loader = make_loader(test, loaded.normalization, batch_size=256)
    plain_train = make_loader(train, loaded.normalization, batch_size=256)
    train_loader = make_loader(train, loaded.normalization, batch_size=64, shuffle=True, augment=True, seed=args.seed)
    batches = lambda: train_loader  # noqa: E731   (as bench_structured: the taper reads this loader's epochs)
    example = loaded.example_input()
    costs = CostModel(dense, example)
    models_dir = Path(args.models_dir)
    meta = {"model": "resnet56", "build_kwargs": loaded.build_kwargs, "input_shape": list(loaded.input_shape),
            "normalization": {"mean": list(loaded.normalization.mean), "std": list(loaded.normalization.std)}}
    payload = {"model": "resnet56", "dense_accuracy": evaluate(dense, test_loader),
               "dense_train_loss": train_loss(dense, plain_train), "settings": vars(args), "rows": [],
               "protocol": "BN re-estimation + 3-epoch fine-tune (lr 0.01 cosine) on a fresh loader seeded 1000+seed"}

    def finish(method, budget, small, seconds, info):
        counts = costs.count(small)
        assert counts.macs <= budget * costs.macs
        ft_loader = make_loader(train, loaded.normalization, batch_size=64, shuffle=True, augment=True,
                                seed=1000 + args.seed)          # the same data for every row of this seed
        ft_batches = lambda: ft_loader  # noqa: E731
        recalibrate_batchnorm(small, ft_batches())
        pruned_acc, loss_before = evaluate(small, test_loader), train_loss(small, plain_train)
        start = time.perf_counter()
        train_epochs(small, ft_batches(), args.ft_epochs, lr=0.01, optimizer=sgd(small, 0.01), progress=False)
        ft_seconds = time.perf_counter() - start
        assert costs.count(small).macs == counts.macs
        ft_acc, loss_after = evaluate(small, test_loader), train_loss(small, plain_train)
        models_dir.mkdir(parents=True, exist_ok=True)
        path = save_pruned(unused_path(models_dir / f"{method}-{budget:g}-seed{args.seed}"), small,
                           {**meta, "method": method, "flops": budget}, {}, shrunk=True)
        row = {"method": method, "budget": budget, "flops_kept": counts.flops_kept, "params_kept": counts.params_kept,
               "macs": counts.macs, "params": counts.params, "accuracy_pruned_bn": pruned_acc,
               "accuracy_finetuned": ft_acc, "train_loss_pruned_bn": loss_before, "train_loss_finetuned": loss_after,
               "prune_seconds": seconds, "finetune_seconds": ft_seconds, "saved": str(path),
               "kept_channels": [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)],
               "info": info, "load_average": load_average()}
        payload["rows"].append(row)
        log(f"{method} @ {budget:g}: MACs {counts.flops_kept:.4f} params {counts.params_kept:.4f} pruned+BN "
            f"{pruned_acc:.2f}% (train loss {loss_before:.4f}) fine-tuned {ft_acc:.2f}% (train loss {loss_after:.4f}) "
            f"ft {ft_seconds:.0f} s")
        write_json(args.out, payload)

    if args.mode == "taper":
        STOP_AT[:] = [args.stop_after] if args.stop_after else []
        start = time.perf_counter()
        others = sorted(set(args.budgets) - {min(args.budgets)}, reverse=True)
        try:
            prunekit.prune(copy.deepcopy(dense), batches, method="taper", flops=min(args.budgets),
                                example_input=example, recalibrate_bn=False, taper_epochs=args.taper_epochs,
                                max_taper_rate=None, channel_multiple=1, taper_distill=0.0,
                                residual_channels="keep", reconstruct_batches=0, reconstruct_ridge=None,
                                snapshots=others or None)
        except Stop:
            pass
        seconds = time.perf_counter() - start
        for budget in sorted(SHOTS, reverse=True):
            shot = SHOTS[budget]
            info = {"snapshot_step": shot.step, "on_schedule": shot.reached_by_schedule, "cut": shot.cut,
                    "seconds_note": "taper seconds up to the last snapshot taken"}
            trained = shot.model
            rewound = REWOUND[min(REWOUND, key=lambda b: abs(b - budget))]
            same = [m.out_channels for m in trained.modules() if isinstance(m, torch.nn.Conv2d)] == \
                   [m.out_channels for m in rewound.modules() if isinstance(m, torch.nn.Conv2d)]
            assert same, "rewound model's widths differ from the taper's"
            finish("taper-inner", budget, trained, seconds, info)
            finish("taper-inner+rewind", budget, rewound, seconds, info)
    else:
        for budget in sorted(args.budgets, reverse=True):
            start = time.perf_counter()
            grads = [b for _, b in zip(range(10), train_loader)]
            small, info = tp_prune(dense, "tp-magnitude", budget, example, grads, round_to=1, pads_residual=False)
            finish("tp-magnitude-inner", budget, small, time.perf_counter() - start, info)


if __name__ == "__main__":
    main()
