"""What the commands share: the model and data options, loading them, printing the result."""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path

from .. import zoo
from ..data import DATASET_NAMES, make_loader
from .. import report
from ..loading import LoadedModel, check_fits, load_data, load_model


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"zoo model: {', '.join(zoo.MODEL_NAMES)}")
    p.add_argument("--checkpoint", help="weights to load (.pth/.th/.ckpt/.pth.tar or a prunekit .safetensors)")


def add_data_args(p: argparse.ArgumentParser, required: bool = True, *, seed: bool = True,
                  batch_size: int = 256, batch_help: str = "evaluation batch size") -> None:
    p.add_argument("--data", required=required, choices=DATASET_NAMES, help="data set")
    p.add_argument("--data-dir", required=required, help="folder with the data files (IDX, CIFAR batches or .npz)")
    p.add_argument("--eval-split", default="test", choices=("test", "train"),
                   help="split the accuracy is measured on (default test)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"{batch_help} (default {batch_size})")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def loaded_model(args) -> LoadedModel:
    loaded = load_model(args.model, args.checkpoint, dataset=getattr(args, "data", None))
    if getattr(args, "device", None):           # every tensor follows the model (solvers included)
        loaded.model.to(args.device)
    return loaded


def eval_data(args, loaded: LoadedModel):
    ds = load_data(args.data, args.data_dir, args.eval_split)
    check_fits(loaded, ds, f"{args.data} {args.eval_split}")
    return make_loader(ds, loaded.normalization, batch_size=args.batch_size)


def training_batches(args, loaded: LoadedModel):
    """A function giving training batches, loading the training split on first use only."""

    @lru_cache(maxsize=1)
    def dataset():
        ds = load_data(args.data, args.data_dir, "train", limit=args.train_samples, seed=args.seed)
        check_fits(loaded, ds, f"{args.data} train")
        return ds

    # CIFAR models are trained on randomly cropped and flipped images, so their BatchNorm
    # statistics are those of augmented data: recalibrating on plain images costs ResNet-20-B
    # 3 points dense (90.86% -> 87.81%), on augmented ones it keeps 91.15%.
    augment = args.data == "cifar10" and not args.no_train_augment
    return lambda: make_loader(dataset(), loaded.normalization, batch_size=128, shuffle=True,
                               augment=augment, seed=args.seed)


def describe(loaded: LoadedModel) -> dict:
    """How to rebuild the zoo model: what its saved sidecar holds besides the result."""
    return {"model": loaded.name, "build_kwargs": loaded.build_kwargs, "input_shape": list(loaded.input_shape),
            "normalization": {"mean": list(loaded.normalization.mean), "std": list(loaded.normalization.std)}}


def model_file(path) -> Path:
    """A run folder's model.safetensors, or the path itself."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def emit(args, payload: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload))
    else:
        print("\n".join(lines))


def write_report(write, quiet: bool) -> None:
    try:
        write()
    except report.MissingPlotting as err:      # the report is written, without its plots
        if not quiet:
            print(f"prunekit: warning: {err}", file=sys.stderr)
