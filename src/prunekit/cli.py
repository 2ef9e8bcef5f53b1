"""The ``prunekit`` command line: info, eval, prune, sweep, compare, export, train, demo.

Every command turns bad input into a one-line error naming the fix and exit code 2
(``PrunekitError``); ``--json`` prints exactly one JSON object on stdout, progress goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
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
from .saving import atomic_write_json, read_meta, save_model
from . import recipes, report, runs
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
    loaded = load_model(args.model, args.checkpoint, dataset=getattr(args, "data", None))
    if getattr(args, "device", None):           # every tensor follows the model (solvers included)
        loaded.model.to(args.device)
    return loaded


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
    return {"fisher_samples": args.fisher_samples, "fisher_batch": args.fisher_batch,
            "fisher_dtype": args.fisher_dtype, "max_memory": args.max_memory, "ridge": args.ridge,
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
        if args.out:
            _save_run(args.out, loaded, record)
    elif args.out:
        record = _prune_into_folder(args, loaded, eval_loader, budget, _train_batches(args, loaded))
    else:
        record = run_prune(loaded, eval_loader, _train_batches(args, loaded), args.method, budget, args.seed,
                           include=args.include,
                           exclude=loaded.prune_exclude if args.exclude is None else args.exclude,
                           recalibrate_bn=not args.no_bn_recalibration, progress=not args.json,
                           options=_method_options(args))
    _emit(args, record, _prune_lines(record) + ([f"  saved to   {args.out}"] if args.out else []))
    return 0


# --- run folders: prune --out/--resume, sweep, compare, export ------------------------------

RUN_ONLY = recipes.NOT_IN_RECIPES     # options about this invocation, not the run


def _prune_into_folder(args, loaded: LoadedModel, eval_loader, budget: Budget, train_batches,
                       dense: dict | None = None) -> dict:
    """Prune into run folder ``args.out`` (resuming it with ``--resume``), then write its report."""
    folder = runs.RunFolder(args.out)
    config = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
    for key in ("checkpoint", "data_dir", "out"):     # a run folder's config works from any directory
        if config.get(key) is not None:
            config[key] = str(Path(config[key]).resolve())
    # The same command again carries on where it stopped (that is how a sweep resumes); a
    # different one must not mix its stages with this folder's.
    if folder.exists() and not getattr(args, "resume", None):
        old = folder.config.read_text() if folder.config.exists() else None
        if old != recipes.dump_recipe(config):
            raise PrunekitError(f"{args.out} already holds a run with other options: resume it with "
                                f"`prunekit prune --resume {args.out}`, or pick another --out")
    record = runs.execute(
        folder, loaded.model, name=loaded.name, method=args.method, budget=budget,
        example_input=loaded.example_input(), train_batches=train_batches, eval_loader=eval_loader,
        sidecar=_sidecar(loaded), include=args.include,
        exclude=loaded.prune_exclude if args.exclude is None else args.exclude, seed=args.seed,
        recalibrate_bn=not args.no_bn_recalibration, options=_method_options(args), progress=not args.json,
        dense=dense, request={k: getattr(args, k) for k in ("sparsity", "flops", "params")},
        config_text=recipes.dump_recipe(config))
    record["peak_rss_mb"] = peak_rss_mb()
    atomic_write_json(folder.path / "result.json", record)
    _write_report(lambda: report.write_run_report(folder.path), args.json)
    return record


def _write_report(write, quiet: bool) -> None:
    try:
        write()
    except report.MissingPlotting as err:      # the report is written, without its plots
        if not quiet:
            print(f"prunekit: warning: {err}", file=sys.stderr)


def _sidecar(loaded: LoadedModel) -> dict:
    return {"model": loaded.name, "build_kwargs": loaded.build_kwargs, "input_shape": list(loaded.input_shape),
            "normalization": {"mean": list(loaded.normalization.mean), "std": list(loaded.normalization.std)}}


def _sweep_plan(args) -> list[tuple[str, dict]]:
    """(method, {"sparsity": s, "flops": f, "params": p}) for every method and budget of a sweep;
    budget lists of equal length go together, a single value goes with every budget."""
    lists = {k: getattr(args, k) for k in ("sparsity", "flops", "params") if getattr(args, k)}
    if not lists:
        raise PrunekitError("a sweep needs budgets: e.g. --flops 0.6 0.4 0.3 or --sparsity 0.5 0.9")
    n = max(len(v) for v in lists.values())
    if any(len(v) not in (1, n) for v in lists.values()):
        raise PrunekitError("budget lists of a sweep must have the same length (or one value each): "
                            + ", ".join(f"--{k} has {len(v)}" for k, v in lists.items()))
    budgets = [{k: v[i] if len(v) > 1 else v[0] for k, v in lists.items()} for i in range(n)]
    return [(method, budget) for method in args.method for budget in budgets]


def _run_name(method: str, budget: dict) -> str:
    return method.replace("+", "p") + "".join(f"_{k}-{v}" for k, v in budget.items()).replace("%", "pct")


def cmd_sweep(args) -> int:
    plan = _sweep_plan(args)
    for method, budget in plan:           # refuse a bad method or budget before the first run
        if method not in METHODS:
            raise PrunekitError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        Budget.parse(budget.get("sparsity"), budget.get("flops"), budget.get("params"))
    dense_model = _loaded(args)
    eval_loader = _eval_data(args, dense_model)
    train_batches = _train_batches(args, dense_model)
    for method, budget in plan:
        check_request(dense_model.model, method, Budget.parse(**budget), dense_model.example_input(),
                      args.include, dense_model.prune_exclude if args.exclude is None else args.exclude,
                      _method_options(args))
    folders, dense = [], None
    for i, (method, budget) in enumerate(plan, start=1):
        run_args = argparse.Namespace(**{**vars(args), "method": method, "sparsity": None, "flops": None,
                                         "params": None, **budget,
                                         "out": str(Path(args.out) / _run_name(method, budget))})
        folder = runs.RunFolder(run_args.out)
        if not args.json:
            print(f"[{i}/{len(plan)}] {method} {budget} -> {folder.path}", file=sys.stderr)
        loaded = copy.deepcopy(dense_model)
        _prune_into_folder(run_args, loaded, eval_loader, Budget.parse(**budget), train_batches, dense)
        dense = dense or runs.RunFolder(run_args.out).read_metrics().get("dense")
        folders.append(folder.path)
    table = report.collect(folders)
    _write_report(lambda: report.write_comparison_report(args.out, table, title=f"Sweep: {args.model}"), args.json)
    _emit(args, {"runs": table, "report": str(Path(args.out) / "report.md")},
          report.table_lines(table) + [f"report: {Path(args.out) / 'report.md'}"])
    return 0


def cmd_compare(args) -> int:
    table = report.collect(report.find_runs(args.runs))
    if args.out:
        _write_report(lambda: report.write_comparison_report(args.out, table, title="Comparison"), args.json)
    _emit(args, {"runs": table, **({"report": str(Path(args.out) / "report.md")} if args.out else {})},
          report.table_lines(table) + ([f"report: {Path(args.out) / 'report.md'}"] if args.out else []))
    return 0


def cmd_export(args) -> int:
    from . import export
    formats = [f for f in ("onnx", "torchscript", "dense", "sparse") if getattr(args, f)]
    if not formats:
        raise PrunekitError("say what to export: --onnx, --torchscript, --dense and/or --sparse")
    path = Path(args.run) / "model.safetensors"
    meta = read_meta(path) if path.exists() else {}
    if meta.get("model") not in zoo.MODEL_NAMES:
        raise PrunekitError(f"{args.run} holds no zoo model (model.safetensors + model.json): pass a run "
                            "folder of `prunekit prune --out`; for your own model use prunekit.export in Python")
    loaded = load_model(meta["model"], path)
    written = export.export_all(loaded.model, loaded.example_input(), Path(args.run) / "export", formats)
    _emit(args, {"files": written}, [f"{f['format']:<12} {f['path']}  {f['bytes']:,} bytes"
                                     + (f"  ({f['note']})" if f.get("note") else "") for f in written])
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

def _add_prune_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """prune's options; a sweep takes several methods and budgets and needs --out."""
    many = {"nargs": "+"} if sweep else {}
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--method", default=["magnitude"] if sweep else "magnitude", **many,
                   help=f"one of {', '.join(METHODS if sweep else (*METHODS, *STRUCTURED_METHODS))}")
    p.add_argument("--sparsity", **many, help="share of prunable weights removed (0.9, 90%%) or count kept (50k)")
    p.add_argument("--flops", **many, help="share of dense MACs kept (0.3, 30%%) or MACs kept (20M); alone, it "
                   "leaves the count of weights free (falcon chooses it; count-budget methods prune to the "
                   "largest count that fits)")
    p.add_argument("--params", **many, help="share of all parameters kept (0.1) or count kept (200k)")
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
    p.add_argument("--out", required=sweep, help="run folder: config, log, metrics, stage checkpoints, model, "
                   "report" + (" (one run folder per method and budget inside)" if sweep else ""))
    p.add_argument("--recipe", help="TOML file of options (keys = option names); flags override it")
    g = p.add_argument_group("quadratic-model methods (chita, chita++, falcon, falcon++, woodfisher)")
    g.add_argument("--fisher-samples", type=recipes.int_or_auto, help="gradient rows n (default 1000; falcon++ 500 per stage), or auto: "
                   "the largest n <= 1000 that fits --max-memory")
    g.add_argument("--fisher-dtype", choices=("float32", "bfloat16", "float16"),
                   help="storage of the gradient matrix (default float32); products accumulate in float32")
    g.add_argument("--max-memory", help="refuse a request whose estimated peak exceeds this, e.g. 16G or 500M "
                   "(default: the memory available less a margin)")
    g.add_argument("--device", help="run on this torch device, e.g. cuda or cuda:1 (default: cpu)")
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
    if sweep:
        return
    g = p.add_argument_group("gradual pruning (prune events on the schedule, fine-tuning in between)")
    g.add_argument("--gradual", action="store_true", help="prune gradually with the method at each event")
    g.add_argument("--events", type=int, default=4, help="prune events (default 4)")
    g.add_argument("--epochs-per-event", type=int, default=1, help="fine-tuning epochs after each event (default 1)")
    g.add_argument("--final-epochs", type=int, default=2, help="fine-tuning epochs after the last event (default 2)")
    g.add_argument("--lr", type=float, default=0.01, help="peak learning rate of each cosine cycle (default 0.01)")
    add_structured_prune_args(p)


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
    _add_prune_args(p)
    p.add_argument("--resume", metavar="DIR", help="finish the run in DIR from its last completed stage")
    p.set_defaults(func=cmd_prune)

    add_bench_latency_parser(sub)

    p = sub.add_parser("sweep", help="prune with each method at each budget, then report and plot")
    _add_prune_args(p, sweep=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="one table (and plots with --out) of run folders")
    p.add_argument("runs", nargs="+", metavar="DIR", help="run folders, or sweep folders holding them")
    p.add_argument("--out", help="folder for report.md and its plots")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="export a run folder's model: ONNX, TorchScript, dense or sparse weights")
    p.add_argument("run", metavar="DIR", help="run folder (or a folder with model.safetensors + model.json)")
    p.add_argument("--onnx", action="store_true", help="write DIR/export/model.onnx")
    p.add_argument("--torchscript", action="store_true", help="write DIR/export/model.torchscript.pt (traced)")
    p.add_argument("--dense", action="store_true", help="write DIR/export/model-dense.safetensors (zeros kept)")
    p.add_argument("--sparse", action="store_true",
                   help="write DIR/export/model-sparse.safetensors (indices + values of pruned tensors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)

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


def build_parser_for(command: str) -> argparse.ArgumentParser:
    """The subparser of ``command`` in a fresh parser."""
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices[command]


def _apply_recipe(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--recipe FILE`` (prune, sweep) or ``--resume DIR`` (prune): their options become the
    subcommand's defaults before the real parse, so command-line flags override a recipe."""
    if not argv or argv[0] not in ("prune", "sweep"):
        return
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--recipe")
    peek.add_argument("--resume")
    known, _ = peek.parse_known_args(argv[1:])
    sub = parser._subparsers._group_actions[0].choices[argv[0]]
    if known.resume:
        others = [a for a in argv[1:] if a.startswith("-") and a.split("=")[0] not in ("--resume", "--json")]
        if others:
            raise PrunekitError(f"--resume takes every option from {Path(known.resume) / 'config.toml'}; "
                                f"leave out {', '.join(others)}")
        config = Path(known.resume) / "config.toml"
        if not config.exists():
            raise PrunekitError(f"{known.resume} is not a prunekit run folder (no config.toml): "
                                "pass the --out folder of a `prunekit prune` run")
        recipes.apply_recipe(sub, {**recipes.load_recipe(config, sub), "out": known.resume})
    elif known.recipe:
        recipes.apply_recipe(sub, recipes.load_recipe(known.recipe, sub))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        _apply_recipe(parser, argv)
    except PrunekitError as err:
        print(f"prunekit: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
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
