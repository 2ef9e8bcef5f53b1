"""The ``prunekit`` command line: info, eval, prune, train, demo.

Every command turns bad input into a one-line error naming the fix and exit code 2
(``PrunekitError``); ``--json`` prints exactly one JSON object on stdout, progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from . import zoo
from .budget import Budget
from .costs import CostModel
from .data import DATASET_NAMES, load_dataset, make_loader
from .errors import PrunekitError
from .loading import LoadedModel, check_fits, load_data, load_model
from .params import ParamSpace
from .pipelines.gradual import GradualOptions, prune_gradual
from .pipelines.oneshot import METHODS, check_request, prune
from .pipelines.schedule import KINDS
from .saving import save_model, atomic_write_json
from .train import evaluate, train_epochs
from .structured.cli import (STRUCTURED_METHODS, add_bench_latency_parser, add_structured_prune_args,
                             cmd_prune_structured, shrunk_line, shrunk_summary)

ASSETS = Path(__file__).parent / "assets"
DEMO_METHOD = "chita++"
DEMO_SPARSITY = 0.95
DEMO_OPTIONS = {"stages": 5, "fisher_samples": 500}   # a short CHITA++ run, about a minute on 2 cores


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), naming the command's --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- shared option groups --------------------------------------------------------------------

def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=f"zoo model: {', '.join(zoo.MODEL_NAMES)}")
    p.add_argument("--checkpoint", help="weights to load (.pth/.th/.ckpt/.pth.tar or a prunekit .safetensors)")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, choices=DATASET_NAMES, help="data set")
    p.add_argument("--data-dir", required=required, help="folder with the data files (IDX, CIFAR batches or .npz)")
    p.add_argument("--eval-split", default="test", choices=("test", "train"), help="split to evaluate on")
    p.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _loaded(args) -> LoadedModel:
    return load_model(args.model, args.checkpoint, dataset=getattr(args, "data", None))


def _eval_data(args, loaded: LoadedModel):
    ds = load_data(args.data, args.data_dir, args.eval_split)
    check_fits(loaded, ds, f"{args.data} {args.eval_split}")
    return make_loader(ds, loaded.normalization, batch_size=args.batch_size)


def _emit(args, payload: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload))
    else:
        print("\n".join(lines))


# --- info ------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    loaded = load_model(args.model, args.checkpoint)
    costs = CostModel(loaded.model, loaded.example_input())
    counts = costs.count(loaded.model)
    rows = []
    for layer in costs.layers:
        macs = counts.macs_by_layer.get(layer.name, layer.macs)
        rows.append({"name": layer.name, "type": layer.kind,
                     "shape": list(layer.weight_shape) if layer.weight_shape else None,
                     "params": layer.params, "nonzeros": counts.nonzeros_by_layer.get(layer.name),
                     "macs": macs, "other_ops": layer.other_ops,
                     "share": macs / counts.macs if counts.macs else 0.0})
    space = ParamSpace(loaded.model, exclude=loaded.prune_exclude)
    prunable_macs = int(space.macs_per_weight(costs).sum())
    totals = {"params": counts.params, "dense_params": costs.params, "macs": counts.macs,
              "dense_macs": costs.macs, "other_ops": costs.other_ops, "prunable_weights": space.numel,
              "prunable_macs": prunable_macs, "prunable_excluded": loaded.prune_exclude,
              "unknown_modules": costs.unknown}
    shrunk = shrunk_summary(args.model, args.checkpoint, counts)
    if shrunk:
        totals["shrunk"] = shrunk
    if args.json:
        print(json.dumps({"model": args.model, "input_shape": list(loaded.input_shape),
                          "layers": rows, **totals}))
        return 0
    print(f"{args.model}: input {tuple(loaded.input_shape)}, MACs per example")
    header = f"{'layer':<28} {'type':<18} {'shape':<20} {'params':>10} {'MACs':>13} {'share':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if not r["params"] and not r["macs"] and not r["other_ops"]:
            continue
        shape = "x".join(map(str, r["shape"])) if r["shape"] else ""
        macs = f"{r['macs']:,}" if r["shape"] else (f"({r['other_ops']:,} ops)" if r["other_ops"] else "")
        share = f"{100 * r['share']:.1f}%" if r["shape"] else ""
        print(f"{r['name'][:28]:<28} {r['type'][:18]:<18} {shape:<20} {r['params']:>10,} {macs:>13} {share:>7}")
    print("-" * len(header))
    print(f"total: {counts.params:,} params, {counts.macs:,} MACs in weight layers "
          f"({counts.macs / 1e6:.2f}M), {costs.other_ops:,} other ops (BN, pooling, adds)")
    print(f"prunable: {space.numel:,} weights, {prunable_macs:,} MACs ({prunable_macs / 1e6:.2f}M)"
          + (f", leaving dense {', '.join(loaded.prune_exclude)}" if loaded.prune_exclude else ""))
    if counts.macs != costs.macs:
        print(f"nonzero-aware: {100 * counts.flops_kept:.2f}% of dense MACs, "
              f"{100 * counts.params_kept:.2f}% of dense params")
    if shrunk:
        print(shrunk_line(shrunk))
    if costs.unknown:
        print(f"warning: no counting rule for {len(costs.unknown)} module(s), counted as 0: "
              f"{', '.join(costs.unknown[:5])}")
    return 0


# --- eval ------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    loaded = _loaded(args)
    loader = _eval_data(args, loaded)
    start = time.perf_counter()
    accuracy = evaluate(loaded.model, loader, progress=not args.json)
    payload = {"model": args.model, "data": args.data, "split": args.eval_split, "accuracy": accuracy,
               "images": len(loader.dataset) if hasattr(loader, "dataset") else None,
               "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
    _emit(args, payload, [f"{args.model} on {args.data} {args.eval_split}: {accuracy:.2f}% top-1"])
    return 0


# --- prune -----------------------------------------------------------------------------------

def run_prune(loaded: LoadedModel, eval_loader, train_ds_loader, method: str, budget: Budget,
              seed: int, include=None, exclude=None, recalibrate_bn: bool = True,
              progress: bool = True, options: dict | None = None) -> dict:
    """Evaluate, prune, evaluate again; returns the flat record the CLI prints and saves."""
    options = {"progress": progress, **(options or {})}
    check_request(loaded.model, method, budget, loaded.example_input(), include, exclude, options)
    dense_accuracy = evaluate(loaded.model, eval_loader, progress=progress)
    result = prune(loaded.model, method, budget, loaded.example_input(), train_ds_loader,
                   include=include, exclude=exclude, seed=seed, recalibrate_bn=recalibrate_bn,
                   options=options)
    accuracy = evaluate(loaded.model, eval_loader, progress=progress)
    return {"model": loaded.name, "method": method, "sparsity": result.sparsity,
            "flops_kept": result.counts.flops_kept, "params_kept": result.counts.params_kept,
            "nonzeros": result.nonzeros, "macs": result.counts.macs, "dense_macs": result.counts.dense_macs,
            "params": result.counts.params, "budget_max_nonzeros": result.budget.max_nonzeros,
            "budget_max_macs": None if result.budget.max_macs is None
            else result.budget.max_macs + result.budget.fixed_macs,
            "dense_accuracy": dense_accuracy, "accuracy": accuracy, "seconds": result.seconds,
            "peak_rss_mb": peak_rss_mb(), **result.info}


def run_gradual(loaded: LoadedModel, eval_loader, train_ds_loader, method: str, budget: Budget,
                seed: int, opts: GradualOptions, include=None, exclude=None, progress: bool = True,
                options: dict | None = None) -> dict:
    """Evaluate, prune gradually (fine-tuning between events), evaluate; the record to print and save."""
    dense_accuracy = evaluate(loaded.model, eval_loader, progress=progress)

    def report(event):
        if progress:
            print(f"event {event['event']}/{opts.events}: {event['nonzeros']:,} weights, "
                  f"{100 * event['flops_kept']:.2f}% MACs, accuracy {event['accuracy']:.2f}%", file=sys.stderr)

    result = prune_gradual(loaded.model, method, budget, loaded.example_input(), train_ds_loader, opts,
                           eval_loader=eval_loader, include=include, exclude=exclude, seed=seed,
                           options=options, on_event=report, progress=progress)
    return {"model": loaded.name, "method": method, "gradual": True, "sparsity": result.sparsity,
            "flops_kept": result.counts.flops_kept, "params_kept": result.counts.params_kept,
            "nonzeros": result.nonzeros, "macs": result.counts.macs, "dense_macs": result.counts.dense_macs,
            "params": result.counts.params,
            "budget_max_nonzeros": result.budget.max_nonzeros,
            "budget_max_macs": None if result.budget.max_macs is None
            else result.budget.max_macs + result.budget.fixed_macs,
            "dense_accuracy": dense_accuracy, "accuracy": result.events[-1]["accuracy"],
            "seconds": result.seconds, "peak_rss_mb": peak_rss_mb(), "options": vars(opts),
            "events": result.events}


def _train_batches(args, loaded: LoadedModel):
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


def _save_run(out: str, loaded: LoadedModel, record: dict) -> None:
    out_dir = Path(out)
    save_model(loaded.model, out_dir / "model.safetensors",
               {"model": loaded.name, "build_kwargs": loaded.build_kwargs,
                "input_shape": list(loaded.input_shape),
                "normalization": {"mean": list(loaded.normalization.mean), "std": list(loaded.normalization.std)},
                "result": record})
    atomic_write_json(out_dir / "result.json", record)


def _prune_lines(r: dict) -> list[str]:
    return [f"{r['model']} pruned with {r['method']}:",
            f"  accuracy   {r['dense_accuracy']:.2f}% -> {r['accuracy']:.2f}%",
            f"  sparsity   {100 * r['sparsity']:.2f}% ({r['nonzeros']:,} prunable weights kept)",
            f"  MACs kept  {100 * r['flops_kept']:.2f}% ({r['macs']:,} of {r['dense_macs']:,})",
            f"  params     {100 * r['params_kept']:.2f}% kept",
            f"  time       {r['seconds']:.2f} s pruning, peak RSS {r['peak_rss_mb']:.0f} MB"]


def _method_options(args) -> dict:
    """The method options given on the command line (None = the method's default)."""
    return {"fisher_samples": args.fisher_samples, "fisher_batch": args.fisher_batch, "ridge": args.ridge,
            "relative_ridge": args.relative_ridge,
            "stages": args.stages, "schedule": args.schedule, "revive": args.revive or None,
            "solver": args.solver, "block_size": args.block_size, "first_order": args.first_order}


def cmd_prune(args) -> int:
    if args.method in STRUCTURED_METHODS:
        return cmd_prune_structured(args)
    if args.train_samples is not None and args.train_samples < 1:
        raise PrunekitError("--train-samples must be at least 1 (leave it out to use every training image)")
    budget = Budget.parse(args.sparsity, args.flops, args.params)
    loaded = _loaded(args)
    eval_loader = _eval_data(args, loaded)
    exclude = loaded.prune_exclude if args.exclude is None else args.exclude
    if args.gradual:
        opts = GradualOptions(events=args.events, epochs_per_event=args.epochs_per_event,
                              final_epochs=args.final_epochs, lr=args.lr)
        opts.check()
        check_request(loaded.model, args.method, budget, loaded.example_input(), args.include, exclude,
                      _method_options(args))
        record = run_gradual(loaded, eval_loader, _train_batches(args, loaded), args.method, budget,
                             args.seed, opts, include=args.include, exclude=exclude, progress=not args.json,
                             options=_method_options(args))
    else:
        record = run_prune(loaded, eval_loader, _train_batches(args, loaded), args.method, budget, args.seed,
                           include=args.include, exclude=exclude,
                           recalibrate_bn=not args.no_bn_recalibration, progress=not args.json,
                           options=_method_options(args))
    if args.out:
        _save_run(args.out, loaded, record)
    _emit(args, record, _prune_lines(record) + ([f"  saved to   {args.out}"] if args.out else []))
    return 0


# --- train -----------------------------------------------------------------------------------

def cmd_train(args) -> int:
    train_ds = load_dataset(args.data, args.data_dir, "train")
    test_ds = load_dataset(args.data, args.data_dir, "test")
    torch.manual_seed(args.seed)            # before building: the seed picks the initial weights
    loaded = load_model(args.model, args.checkpoint, num_classes=len(train_ds.classes),
                        in_channels=train_ds.image_shape[0], dataset=args.data)
    loaded.input_shape = tuple(train_ds.image_shape)
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
    record = {"model": args.model, "data": args.data, "epochs": args.epochs, "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed, "accuracy": accuracy,
              "seconds": time.perf_counter() - start, "history": history, "peak_rss_mb": peak_rss_mb()}
    if args.out:
        _save_run(args.out, loaded, record)
    _emit(args, record, [f"{args.model} trained on {args.data}: {accuracy:.2f}% test accuracy "
                         f"({record['seconds']:.0f} s)"] + ([f"saved to {args.out}"] if args.out else []))
    return 0


# --- demo ------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    loaded = load_model("mlpnet", ASSETS / "mlpnet.safetensors")
    test = load_dataset("mnist", ASSETS / "mnist", "test")
    train = load_dataset("mnist", ASSETS / "mnist", "train")
    eval_loader = make_loader(test, loaded.normalization, batch_size=1000)
    train_batches = lambda: make_loader(train, loaded.normalization, batch_size=128, shuffle=True, seed=0)
    if not args.json:
        print(f"prunekit demo: MLPNet 784-40-20-10 (bundled), {len(train)} MNIST training images for "
              f"the method, {len(test)} test images; method {DEMO_METHOD} ({DEMO_OPTIONS['stages']} stages), "
              f"sparsity {DEMO_SPARSITY}")
    record = run_prune(loaded, eval_loader, train_batches, DEMO_METHOD, Budget.parse(DEMO_SPARSITY),
                       seed=0, progress=not args.json, options=DEMO_OPTIONS)
    _emit(args, record, _prune_lines(record))
    return 0


# --- parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prunekit", description="Prune neural networks to a budget.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="per-layer parameters and MACs of a model")
    p.add_argument("model", help=f"zoo model: {', '.join(zoo.MODEL_NAMES)}")
    p.add_argument("--checkpoint", help="count this checkpoint (nonzero-aware for pruned models)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="accuracy of a model on a data set")
    _add_model_args(p)
    _add_data_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="prune a model to a budget")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--method", default="magnitude", help=f"one of {', '.join((*METHODS, *STRUCTURED_METHODS))}")
    p.add_argument("--sparsity", help="share of prunable weights removed (0.9, 90%%) or count kept (50k)")
    p.add_argument("--flops", help="share of dense MACs kept (0.3, 30%%) or MACs kept (20M); alone, it leaves "
                   "the count of weights free (falcon chooses it; count-budget methods prune to the "
                   "largest count that fits)")
    p.add_argument("--params", help="share of all parameters kept (0.1) or count kept (200k)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="training images used for gradients and BN recalibration (default: all)")
    p.add_argument("--include", nargs="+", help="module-name patterns to prune (default: all Conv/Linear)")
    p.add_argument("--exclude", nargs="*", help="module-name patterns to leave dense (default: the "
                   "model's paper convention, e.g. resnet20-b's 1x1 projections; pass none to prune all)")
    p.add_argument("--no-bn-recalibration", action="store_true",
                   help="keep the BatchNorm statistics of the dense model")
    p.add_argument("--no-train-augment", action="store_true",
                   help="use plain training images for gradients and BN (default for cifar10: crop + flip, "
                        "as the models were trained)")
    p.add_argument("--out", help="folder for the pruned model (safetensors + JSON) and result.json")
    g = p.add_argument_group("quadratic-model methods (chita, chita++, falcon, falcon++, woodfisher)")
    g.add_argument("--fisher-samples", type=int, help="gradient rows n (default 1000; falcon++ 500 per stage)")
    g.add_argument("--fisher-batch", type=int, help="samples averaged per row m (default 1: per-sample)")
    g.add_argument("--ridge", type=float, help="absolute ridge λ of the quadratic model (the papers' setting)")
    g.add_argument("--relative-ridge", type=float,
                   help="λ as a multiple of the mean Fisher diagonal, used without --ridge (default 0.1)")
    g.add_argument("--stages", type=int, help="pruning stages (default: chita/falcon 1, chita++ 15, falcon++ 5)")
    g.add_argument("--schedule", choices=KINDS, help="kept share per stage (default poly)")
    g.add_argument("--revive", action="store_true", help="let weights pruned in earlier stages come back")
    g.add_argument("--solver", choices=("iht", "backsolve", "dfo", "magnitude"),
                   help="chita: iht (IHT + backsolve, default) or backsolve (magnitude + backsolve); "
                        "falcon: dfo (first-order method, default) or magnitude (ILP on w², backsolve)")
    g.add_argument("--first-order", action="store_true", default=None,
                   help="add the loss gradient as the linear term of the quadratic model")
    g.add_argument("--block-size", type=int, help="backsolve in blocks of this many weights (large models)")
    g = p.add_argument_group("gradual pruning (prune events on the schedule, fine-tuning in between)")
    g.add_argument("--gradual", action="store_true", help="prune gradually with the method at each event")
    g.add_argument("--events", type=int, default=4, help="prune events (default 4)")
    g.add_argument("--epochs-per-event", type=int, default=1, help="fine-tuning epochs after each event (default 1)")
    g.add_argument("--final-epochs", type=int, default=2, help="fine-tuning epochs after the last event (default 2)")
    g.add_argument("--lr", type=float, default=0.01, help="peak learning rate of each cosine cycle (default 0.01)")
    add_structured_prune_args(p)
    p.set_defaults(func=cmd_prune)

    add_bench_latency_parser(sub)

    p = sub.add_parser("train", help="train a zoo model on a data set")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR-style)")
    p.add_argument("--out", help="folder for the trained model (safetensors + JSON)")
    p.set_defaults(func=cmd_train, batch_size=128)

    p = sub.add_parser("demo", help="prune the bundled MLPNet on bundled MNIST (offline)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PrunekitError as err:
        print(f"prunekit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunekit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `prunekit info resnet50 | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:   # unwritable --out, full disk, unreadable data
        print(f"prunekit: error: {err.strerror or err}: {err.filename or ''} "
              "(check the path and its permissions)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
