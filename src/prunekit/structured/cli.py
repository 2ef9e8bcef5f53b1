"""Command-line parts of structured pruning, kept apart from cli.py so both evolve separately:
``prunekit prune --method autobot|taper``, ``prunekit bench-latency``, the shrunk-model summary
of ``prunekit info``."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ..costs import CostModel, Counts
from ..data import make_loader
from ..errors import PrunekitError
from ..loading import LoadedModel, check_fits, load_data, load_model
from ..saving import atomic_write_json, read_meta
from ..train import evaluate
from .pipeline import (STRUCTURED_METHODS, StructuredResult, check_flops, check_structured_request,
                       prune_structured)
from .saving import export_onnx, save_shrunk

__all__ = ["STRUCTURED_METHODS", "add_structured_prune_args", "cmd_prune_structured", "add_bench_latency_parser",
           "shrunk_summary", "shrunk_line"]


def add_structured_prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured methods (autobot, taper): remove whole channels to a --flops budget")
    g.add_argument("--gate-batches", type=int, help="autobot: gate-training batches (default 200)")
    g.add_argument("--gate-batch-size", type=int, default=64, help="batch size for gate training (default 64)")
    g.add_argument("--beta", type=float, help="autobot: weight of the FLOP loss (default 6)")
    g.add_argument("--gamma", type=float, help="weight of the 0/1 polarization loss (autobot 0.4, taper 0.1)")
    g.add_argument("--gate-lr", type=float, help="Adam learning rate of the gates (autobot 0.6, taper 0.1)")
    g.add_argument("--taper-epochs", type=float, help="taper: planned length in epochs (default 4)")
    g.add_argument("--max-taper-rate", type=float,
                   help="taper: most dense-MAC share the budget may fall per epoch (default 2x the planned rate)")
    g.add_argument("--snapshots", type=float, nargs="+",
                   help="taper: also save models at these MAC shares (e.g. 0.7 0.5 0.3), from the same run")
    g.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune the shrunk model(s) this many epochs (default 0)")
    g.add_argument("--finetune-lr", type=float, default=0.01, help="peak SGD learning rate of the fine-tune (default 0.01)")
    g.add_argument("--channel-multiple", type=int, default=1,
                   help="keep a multiple of this many channels in every group (default 1: exact counts; "
                   "8 measured no faster on ResNet-56, see README)")
    g.add_argument("--onnx", action="store_true", help="also export the shrunk model to model.onnx (opset 17)")


def _structured_options(args) -> dict:
    if args.method == "autobot":
        return {"batches": args.gate_batches, "beta": args.beta, "gamma": args.gamma, "lr": args.gate_lr,
                "channel_multiple": args.channel_multiple}
    return {"epochs": args.taper_epochs, "max_rate": args.max_taper_rate, "gamma": args.gamma,
            "gate_lr": args.gate_lr, "channel_multiple": args.channel_multiple}


def _check_args(args) -> float:
    if args.sparsity is not None or args.params is not None:
        raise PrunekitError(f"--method {args.method} removes whole channels to a MAC budget: give --flops "
                            "(e.g. --flops 0.5), not --sparsity or --params")
    if args.flops is None:
        raise PrunekitError(f"--method {args.method} needs --flops, the share of MACs to keep (e.g. --flops 0.5)")
    try:
        flops = float(args.flops.rstrip("%")) / (100 if args.flops.endswith("%") else 1)
    except ValueError:
        raise PrunekitError(f"--flops {args.flops!r} is not a share: pass e.g. 0.5 or 50%") from None
    check_flops(flops)
    for share in args.snapshots or []:
        check_flops(share)
    if args.method == "autobot" and (args.snapshots or args.taper_epochs is not None or args.max_taper_rate is not None):
        raise PrunekitError("--snapshots, --taper-epochs and --max-taper-rate belong to --method taper")
    if args.method == "taper" and (args.gate_batches is not None or args.beta is not None):
        raise PrunekitError("--gate-batches and --beta belong to --method autobot")
    for name in ("gate_batches", "gate_batch_size", "taper_epochs", "max_taper_rate", "gate_lr", "channel_multiple"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise PrunekitError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.finetune_epochs < 0:
        raise PrunekitError("--finetune-epochs must be 0 or more")
    if args.train_samples is not None and args.train_samples < 1:
        raise PrunekitError("--train-samples must be at least 1 (leave it out to use every training image)")
    return flops


def cmd_prune_structured(args) -> int:
    flops = _check_args(args)
    loaded = load_model(args.model, args.checkpoint, dataset=args.data)
    test = load_data(args.data, args.data_dir, args.eval_split)
    check_fits(loaded, test, f"{args.data} {args.eval_split}")
    eval_loader = make_loader(test, loaded.normalization, batch_size=args.batch_size)
    train = load_data(args.data, args.data_dir, "train", limit=args.train_samples, seed=args.seed)
    check_fits(loaded, train, f"{args.data} train")
    # Augmented for cifar10, as the models were trained (see cli._train_batches); one loader object,
    # so that each pass is a new epoch (new order and crops).
    augment = args.data == "cifar10" and not args.no_train_augment
    loader = make_loader(train, loaded.normalization, batch_size=args.gate_batch_size, shuffle=True,
                         augment=augment, seed=args.seed)
    check_structured_request(loaded.model, args.method, flops, loaded.example_input(), args.snapshots,
                             args.channel_multiple)
    torch.manual_seed(args.seed)
    dense_accuracy = evaluate(loaded.model, eval_loader, progress=not args.json)
    result = prune_structured(loaded.model, args.method, flops, loaded.example_input(), lambda: loader,
                              _structured_options(args), snapshots=args.snapshots,
                              recalibrate_bn=not args.no_bn_recalibration, finetune_epochs=args.finetune_epochs,
                              finetune_lr=args.finetune_lr)
    records = {}
    for budget, res in sorted({result.flops: result, **result.snapshots}.items(), reverse=True):
        records[budget] = _record(loaded, res, dense_accuracy, evaluate(res.model, eval_loader))
    main = records[result.flops]
    if args.out:
        out = Path(args.out)
        for budget, res in {result.flops: result, **result.snapshots}.items():
            folder = out if budget == result.flops else out / f"snapshot-{budget:g}"
            _save(folder, loaded, res, records[budget], args.onnx)
        if result.snapshots:
            main["snapshots"] = {f"{b:g}": str(out / f"snapshot-{b:g}") for b in result.snapshots}
            atomic_write_json(out / "result.json", main)
    if args.json:
        import json
        print(json.dumps({**main, "snapshot_results": [r for b, r in records.items() if b != result.flops]}))
    else:
        for budget, r in records.items():
            print(f"{r['model']} shrunk with {r['method']} to {100 * budget:g}% of MACs:")
            print(f"  accuracy   {r['dense_accuracy']:.2f}% -> {r['accuracy']:.2f}%")
            print(f"  MACs kept  {100 * r['flops_kept']:.2f}% ({r['macs']:,} of {r['dense_macs']:,})")
            print(f"  params     {100 * r['params_kept']:.2f}% kept ({r['params']:,})")
            print(f"  channels   {sum(r['kept_channels']):,} of {sum(r['group_sizes']):,} in {r['groups']} groups")
        print(f"  time       {result.seconds:.1f} s pruning" + (f"; saved to {args.out}" if args.out else ""))
    return 0


def _record(loaded: LoadedModel, res: StructuredResult, dense_accuracy: float, accuracy: float) -> dict:
    c = res.counts
    return {"model": loaded.name, "method": res.method, "flops": res.flops, "flops_kept": c.flops_kept,
            "params_kept": c.params_kept, "macs": c.macs, "dense_macs": c.dense_macs, "params": c.params,
            "dense_params": c.dense_params, "dense_accuracy": dense_accuracy, "accuracy": accuracy,
            "seconds": res.seconds, "groups": res.groups, "kept_channels": res.info["kept_channels"],
            "group_sizes": res.info["group_sizes"], "skipped_groups": res.info["skipped_groups"]}


def _save(folder: Path, loaded: LoadedModel, res: StructuredResult, record: dict, onnx: bool) -> None:
    meta = {"model": loaded.name, "build_kwargs": loaded.build_kwargs, "input_shape": list(loaded.input_shape),
            "normalization": {"mean": list(loaded.normalization.mean), "std": list(loaded.normalization.std)},
            "result": record}
    save_shrunk(res.model, folder / "model.safetensors", meta)
    atomic_write_json(folder / "result.json", record)
    if onnx:
        export_onnx(res.model, loaded.example_input(), folder / "model.onnx")


# --- info ------------------------------------------------------------------------------------

def shrunk_summary(name: str, checkpoint, counts: Counts) -> dict | None:
    """For a shrunk model: its MACs and params against the zoo model it came from; else None."""
    if checkpoint is None or "channel_layout" not in read_meta(_model_file(checkpoint)):
        return None
    dense = load_model(name)
    costs = CostModel(dense.model, dense.example_input())
    return {"macs": counts.macs, "dense_macs": costs.macs, "flops_kept": counts.macs / costs.macs,
            "params": counts.params, "dense_params": costs.params, "params_kept": counts.params / costs.params}


def shrunk_line(s: dict) -> str:
    return (f"shrunk (channels removed): {100 * s['flops_kept']:.2f}% of the dense {s['dense_macs']:,} MACs, "
            f"{100 * s['params_kept']:.2f}% of its {s['dense_params']:,} params")


# --- bench-latency ---------------------------------------------------------------------------

def _model_file(path) -> Path:
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def add_bench_latency_parser(sub) -> None:
    p = sub.add_parser("bench-latency", help="CPU latency of a dense vs a pruned model")
    p.add_argument("--model", required=True, help="zoo model of both")
    p.add_argument("--checkpoint", help="weights of the dense model (default: fresh weights; timing does not care)")
    p.add_argument("--pruned", required=True, help="the pruned model: a run folder or its model.safetensors")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64],
                   help="batch sizes to time, each its own row (default 1 64)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs; the median is reported (default 30)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_latency)


def median_latency_ms(model, example: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median wall time of ``model(example)`` in ms over ``repeats`` runs after ``warmup`` runs."""
    model.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            model(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(example)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def cmd_bench_latency(args) -> int:
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        raise PrunekitError("--threads, --repeats and --batch-sizes must be positive, --warmup 0 or more")
    pruned_file = _model_file(args.pruned)
    if not pruned_file.exists():
        raise PrunekitError(f"no pruned model at {pruned_file}: pass the --out folder of `prunekit prune`")
    torch.set_num_threads(args.threads)
    dense = load_model(args.model, args.checkpoint)
    pruned = load_model(args.model, pruned_file)
    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, *dense.input_shape)
        d = median_latency_ms(dense.model, x, args.warmup, args.repeats)
        p = median_latency_ms(pruned.model, x, args.warmup, args.repeats)
        rows.append({"batch": batch, "dense_ms": d, "pruned_ms": p, "ratio": p / d})
    costs = CostModel(dense.model, dense.example_input())
    kept = costs.count(pruned.model).flops_kept
    if args.json:
        import json
        print(json.dumps({"model": args.model, "pruned": str(pruned_file), "threads": args.threads,
                          "warmup": args.warmup, "repeats": args.repeats, "flops_kept": kept, "rows": rows}))
        return 0
    print(f"{args.model}: dense vs {pruned_file} ({100 * kept:.1f}% of MACs), {args.threads} thread(s), "
          f"median of {args.repeats} runs after {args.warmup} warm-up")
    for r in rows:
        print(f"  batch {r['batch']:>4}: dense {r['dense_ms']:9.2f} ms   pruned {r['pruned_ms']:9.2f} ms   "
              f"({r['ratio']:.2f}x)")
    return 0
