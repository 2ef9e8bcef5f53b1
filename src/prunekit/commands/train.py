"""``prunekit train``: train a zoo model (or a model file) on a data set (SGD, cosine learning rate)."""

from __future__ import annotations

import sys
import time

import torch

from ..api_checks import check_out
from ..costs import CostModel
from ..distributed import is_main_process
from ..errors import PrunekitError
from ..data import load_dataset, make_loader
from ..loading import check_fits, check_normalized, load_model
from ..record import save_pruned
from ..train import evaluate, train_epochs
from ..record import peak_rss_mb
from .common import add_data_args, add_model_args, describe, emit


def cmd_train(args) -> int:
    check_train_args(args)
    check_out(args.out, "--out")
    train_ds = load_dataset(args.data, args.data_dir, "train")
    test_ds = train_ds if args.eval_split == "train" else load_dataset(args.data, args.data_dir, "test")
    torch.manual_seed(args.seed)            # before building: the seed picks the initial weights
    loaded = load_model(args.model, args.checkpoint, num_classes=len(train_ds.classes),
                        in_channels=train_ds.image_shape[0], dataset=args.data,
                        input_shape=tuple(train_ds.image_shape), normalization=args.normalize)
    loaded.input_shape = tuple(train_ds.image_shape)
    check_normalized(loaded)
    CostModel(loaded.model, loaded.example_input())   # refuses images the model cannot take
    check_fits(loaded, train_ds, f"{args.data} train")
    loader = make_loader(train_ds, loaded.normalization, batch_size=args.batch_size, shuffle=True,
                         augment=args.augment, seed=args.seed, drop_last=True)
    test_loader = make_loader(test_ds, loaded.normalization, batch_size=512)
    start = time.perf_counter()
    history = []

    def report(epoch, loss):
        history.append({"epoch": epoch + 1, "loss": loss})
        if not args.json:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}", file=sys.stderr)

    train_epochs(loaded.model, loader, args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                 on_epoch_end=report, progress=not args.json)
    accuracy = evaluate(loaded.model, test_loader)
    record = {"model": args.model, "data": args.data, "split": args.eval_split, "epochs": args.epochs, "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed, "accuracy": accuracy,
              "seconds": time.perf_counter() - start, "history": history, "peak_rss_mb": peak_rss_mb()}
    if args.out and is_main_process():     # under torchrun, rank 0 alone writes
        save_pruned(args.out, loaded.model, describe(loaded), record, shrunk=False)
    emit(args, record, [f"{args.model} trained on {args.data}: {accuracy:.2f}% {args.eval_split} accuracy "
                         f"({record['seconds']:.0f} s)"] + ([f"saved to {args.out}"] if args.out else []))
    return 0


def check_train_args(args) -> None:
    """Refuse training settings that would silently do nothing or fail deep in the optimizer."""
    if args.epochs < 1:
        raise PrunekitError(f"--epochs must be at least 1, got {args.epochs}: 0 epochs would save an "
                            "untrained model")
    if not args.lr > 0:
        raise PrunekitError(f"--lr must be a positive learning rate (e.g. 0.1), got {args.lr}")
    if not args.weight_decay >= 0:
        raise PrunekitError(f"--weight-decay must be 0 or more (e.g. 5e-4), got {args.weight_decay}")
    if args.batch_size < 1:
        raise PrunekitError(f"--batch-size must be at least 1, got {args.batch_size}")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a zoo model (or your own: --model net.py:FUNCTION) on a data set")
    add_model_args(p)
    add_data_args(p, batch_size=128, batch_help="training batch size (evaluation uses 512)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training split (default 10)")
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate, cosine schedule (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default 5e-4)")
    p.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR-style)")
    p.add_argument("--out", help="folder for the trained model (safetensors + JSON)")
    p.set_defaults(func=cmd_train)
