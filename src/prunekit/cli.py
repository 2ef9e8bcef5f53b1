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
from .commands import option_flags
from .commands.bench_latency import add_bench_latency_parser
from .commands.info_shrunk import shrunk_line, shrunk_summary
from .commands.option_flags import add_option_flags
from .executor import execute
from .methods import METHODS, lookup
from .options import OptionError, cli_message
from .record import save_pruned
from .request import PruneRequest
from .saving import atomic_write_json, read_meta
from . import recipes, report, runs
from .train import evaluate, train_epochs

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
    save_pruned(out, loaded.model, _describe(loaded), record, shrunk=False)


def _prune_lines(r: dict) -> list[str]:
    lines = []
    for one in [r, *r.get("snapshots", [])]:
        lines += [f"{one['model']} pruned with {one['method']} ({one['mode']}):",
                  f"  accuracy   {one['dense_accuracy']:.2f}% -> {one['accuracy']:.2f}%"]
        if one["sparsity"] is not None:
            lines.append(f"  sparsity   {100 * one['sparsity']:.2f}% ({one['nonzeros']:,} prunable weights kept)")
        lines += [f"  MACs kept  {100 * one['flops_kept']:.2f}% ({one['macs']:,} of {one['dense_macs']:,})",
                  f"  params     {100 * one['params_kept']:.2f}% kept ({one['params']:,})"]
        if "kept_channels" in one:
            lines.append(f"  channels   {sum(one['kept_channels']):,} of {sum(one['group_sizes']):,} "
                         f"in {one['groups']} groups")
    return lines + [f"  time       {r['seconds']:.2f} s pruning, peak RSS {r['peak_rss_mb']:.0f} MB"]


def _method_options(args) -> dict:
    """The method (and gradual) options given on the command line; None = not given."""
    return {name: getattr(args, name) for name in option_flags.OPTION_NAMES if getattr(args, name, None) is not None}


def _request(args, loaded: LoadedModel, method: str | None = None, budget: dict | None = None) -> PruneRequest:
    """The request of ``args`` (with ``method`` and ``budget``: one run of a sweep, which gives
    each method only the options it takes)."""
    row = lookup(method or args.method)
    exclude = loaded.prune_exclude if args.exclude is None and row.family == "weights" else args.exclude
    budget = budget or {k: getattr(args, k) for k in ("sparsity", "flops", "params")}
    options = _method_options(args)
    if method is not None:
        options = {k: v for k, v in options.items() if k in row.options.names() or args.gradual}
    return PruneRequest(loaded.model, loaded.example_input(), row.name, budget, args.include, exclude, args.seed,
                        bool(args.gradual), not args.no_bn_recalibration, options, loaded.name)


def _step_printer(args):
    if args.json:
        return None

    def show(step: dict) -> None:
        what = (f"stage {step['stage']}" if "stage" in step else f"event {step['event']}" if "event" in step
                else " ".join(str(step[k]) for k in ("phase", "flops", "epoch") if step.get(k)))
        acc = f", accuracy {step['accuracy']:.2f}%" if step.get("accuracy") is not None else ""
        print(f"{what}: MACs kept {100 * step.get('flops_kept', float('nan')):.2f}%{acc}", file=sys.stderr)
    return show


def cmd_prune(args) -> int:
    if args.train_samples is not None and args.train_samples < 1:
        raise PrunekitError("--train-samples must be at least 1 (leave it out to use every training image)")
    if args.onnx and not args.out:
        raise PrunekitError("--onnx writes into the run folder: add --out DIR")
    loaded = _loaded(args)
    eval_loader = _eval_data(args, loaded)
    plan = _request(args, loaded).plan()
    record = _prune_into(args, plan, loaded, eval_loader, _train_batches(args, loaded))
    _emit(args, record, _prune_lines(record) + ([f"  saved to   {args.out}"] if args.out else []))
    return 0


# --- run folders: prune --out/--resume, sweep, compare, export ------------------------------

RUN_ONLY = recipes.NOT_IN_RECIPES     # options about this invocation, not the run


def _prune_into(args, plan, loaded: LoadedModel, eval_loader, train_batches, dense: dict | None = None) -> dict:
    """Prune as ``plan`` says, into run folder ``args.out`` when given (resuming it with
    ``--resume``, clearing it first with ``--force``), then write its report."""
    folder = None
    if args.out:
        folder = runs.RunFolder(args.out)
        config = {k: v for k, v in vars(args).items() if k not in RUN_ONLY}
        for key in ("checkpoint", "data_dir", "out"):     # a run folder's config works from any directory
            if config.get(key) is not None:
                config[key] = str(Path(config[key]).resolve())
        runs.claim(folder, recipes.dump_recipe(config), resume=bool(getattr(args, "resume", None)),
                   force=bool(getattr(args, "force", False)))
    record, model, _ = execute(plan, train_batches, eval_loader, folder=folder, describe=_describe(loaded),
                            dense=dense, progress=not args.json, on_step=_step_printer(args))
    record = {**record, "peak_rss_mb": peak_rss_mb()}
    if folder is not None:
        atomic_write_json(folder.path / "result.json", record)
        if args.onnx:
            from .export import export_onnx
            record["onnx"] = str(export_onnx(model, loaded.example_input(), folder.path / "model.onnx"))
        _write_report(lambda: report.write_run_report(folder.path), args.json)
    return record


def _write_report(write, quiet: bool) -> None:
    try:
        write()
    except report.MissingPlotting as err:      # the report is written, without its plots
        if not quiet:
            print(f"prunekit: warning: {err}", file=sys.stderr)


def _describe(loaded: LoadedModel) -> dict:
    """How to rebuild the zoo model: what its saved sidecar holds besides the result."""
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
    dense_model = _loaded(args)
    taken = {n for m in args.method for n in lookup(m).options.names()}
    unused = [k for k in _method_options(args) if k not in taken and not args.gradual]
    if unused:
        raise OptionError(f"no method of this sweep takes {unused[0]}", (unused[0],))
    for method, budget in plan:           # refuse a bad method, option or budget before the first run
        _request(args, dense_model, method, budget).plan()
    eval_loader = _eval_data(args, dense_model)
    train_batches = _train_batches(args, dense_model)
    folders, dense = [], None
    for i, (method, budget) in enumerate(plan, start=1):
        run_args = argparse.Namespace(**{**vars(args), "method": method, "sparsity": None, "flops": None,
                                         "params": None, **budget,
                                         "out": str(Path(args.out) / _run_name(method, budget))})
        if not args.json:
            print(f"[{i}/{len(plan)}] {method} {budget} -> {run_args.out}", file=sys.stderr)
        loaded = copy.deepcopy(dense_model)
        _prune_into(run_args, _request(run_args, loaded, method, budget).plan(), loaded, eval_loader, train_batches,
                    dense)
        dense = dense or runs.RunFolder(run_args.out).read_metrics().get("dense")
        folders.append(Path(run_args.out))
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
    plan = PruneRequest(loaded.model, loaded.example_input(), DEMO_METHOD, {"sparsity": DEMO_SPARSITY},
                        exclude=loaded.prune_exclude, options=DEMO_OPTIONS, name=loaded.name).plan()
    record, _, _ = execute(plan, train_batches, eval_loader, progress=not args.json)
    _emit(args, {**record, "peak_rss_mb": peak_rss_mb()}, _prune_lines({**record, "peak_rss_mb": peak_rss_mb()}))
    return 0


# --- parser ----------------------------------------------------------------------------------

def _add_prune_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """prune's options; a sweep takes several methods and budgets and needs --out."""
    many = {"nargs": "+"} if sweep else {}
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--method", default=["magnitude"] if sweep else "magnitude", **many,
                   help=f"one of {', '.join(METHODS)}")
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
    p.add_argument("--onnx", action="store_true", help="also export the pruned model to DIR/model.onnx")
    add_option_flags(p)
    if not sweep:
        p.add_argument("--force", action="store_true",
                       help="--out holds another run: clear that run's files first")


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


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option of every command, by its Python name (the dest of its flag)."""
    commands = parser._subparsers._group_actions[0].choices.values()
    return {a.dest for p in commands for a in p._actions if a.option_strings} | {"data"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        _apply_recipe(parser, argv)
    except PrunekitError as err:
        print(f"prunekit: error: {cli_message(err, _flags(parser))}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PrunekitError as err:
        print(f"prunekit: error: {cli_message(err, _flags(parser))}", file=sys.stderr)
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
