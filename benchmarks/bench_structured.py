"""Structured pruning to a MAC budget on option-A ResNet-56 (CIFAR-10): AutoBot and the tapering
Lagrangian against torch-pruning's GroupMagnitude/GroupTaylor pruners at the same MACs.

    python benchmarks/bench_structured.py --data-dir ../shared/data            # accuracy part, then latency
    python benchmarks/bench_structured.py --data-dir ../shared/data --latency-only
    python benchmarks/bench_structured.py --data-dir ../shared/data --methods autobot --channel-multiple 8 \
        --models-dir benchmarks/results/structured_models_m8 --out benchmarks/results/structured_resnet56_rounded.json
    python benchmarks/bench_structured.py --data-dir ../shared/data --methods taper --budgets 0.3 \
        --depth-flops 0.36 --depth-per time --no-latency      # blocks removed first (structured/depth.py)

Gradients, gate training, BN recalibration and the fine-tune use the 5,085 exact CIFAR-10 training
images (random crop + flip); accuracy is on the 1,017 exact test images (about +-0.8 points, one
standard error). The accuracy part runs on one thread. Every pruned model is counted by our
CostModel and saved (safetensors + channel layout) under --models-dir (default: structured_models/
beside --out, made when the first model is saved), which the latency part reads:
median of --repeats timed forward passes after --warmup, at --batch-sizes (1 64) on --threads (1 2)
(dense and pruned alternated in one process, prunekit.latency). --channel-multiple M rounds every group's
kept channels to a multiple of M (structured/rounding.py; torch-pruning's round_to for tp-*).
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import sys
import time
from pathlib import Path

import torch

from common import DEFAULT_DATA, load_average, print_table, quiet_note, refuse, unused_path, write_json
from prunekit.costs import CostModel
from prunekit.data import make_loader
from prunekit.loading import load_data, load_model
from prunekit.structured.baselines import TP_METHODS, tp_prune
import prunekit
from prunekit.latency import latency_table
from prunekit.record import save_pruned
from prunekit.masks import MaskHold, masks_from_weights
from prunekit.params import ParamSpace
from prunekit.train import evaluate, recalibrate_batchnorm, sgd, train_epochs

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def shrunk_widths(model) -> list[int]:
    """Output channels of every conv of the shrunk model, in order (shows the rounding)."""
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def _depth_options(args, depth_flops: float | None) -> dict:
    """prunekit.prune's depth-cut options for one budget: none where the budget has no depth cut
    (``prunekit.prune`` refuses ``depth_batches`` / ``depth_per`` without ``depth_flops``)."""
    if depth_flops is None:
        return {}
    return {"depth_flops": depth_flops, "depth_batches": args.depth_batches, "depth_per": args.depth_per}


def accuracy_part(args) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    checkpoint = args.checkpoint or sorted(glob.glob(f"{args.data_dir}/checkpoints/{args.model}-*.th"))[0]
    loaded = load_model(args.model, checkpoint)
    dense = loaded.model
    train = load_data("cifar10", f"{args.data_dir}/cifar10", "train")
    test = load_data("cifar10", f"{args.data_dir}/cifar10", "test")
    test_loader = make_loader(test, loaded.normalization, batch_size=256)
    # One loader object: each iter() is a new epoch (new order and augmentation).
    train_loader = make_loader(train, loaded.normalization, batch_size=64, shuffle=True, augment=True,
                               seed=args.seed)
    batches = lambda: train_loader  # noqa: E731
    example = loaded.example_input()
    costs = CostModel(dense, example)
    dense_acc = evaluate(dense, test_loader)
    log(f"{args.model} dense: {dense_acc:.2f}% on {len(test)} test images, {costs.macs:,} MACs, "
        f"{costs.params:,} params; {len(train)} training images")
    models_dir = Path(args.models_dir)      # made when the first model is saved, not before
    meta_base = {"model": args.model, "build_kwargs": loaded.build_kwargs, "input_shape": list(loaded.input_shape),
                 "normalization": {"mean": list(loaded.normalization.mean), "std": list(loaded.normalization.std)}}
    payload = {"model": args.model, "checkpoint": Path(checkpoint).name, "dense_accuracy": dense_acc,
               "dense_macs": costs.macs, "dense_params": costs.params, "train_images": len(train),
               "test_images": len(test), "settings": vars(args), "rows": []}

    recon = "+recon" if args.reconstruct_batches else ""
    # BatchNorm is re-estimated below for every row; a channel method's reconstruction must be told
    # (it then fits for re-estimated statistics), so those rows let prunekit re-estimate it too, and
    # the re-estimation below replaces that one
    refits = bool(args.reconstruct_batches)
    recon += f"{args.reconstruct_ridge:g}" if recon and args.reconstruct_ridge != 1e-3 else ""

    def finish(method, budget, small, seconds, info, shrunk=True, record=None):
        load = load_average()
        method += recon if method not in ("dense", "falcon") and not method.startswith("tp-") else ""
        if record is not None and "reconstruct" in record:       # this budget's consumers re-fit
            info = {**info, "reconstruct": record["reconstruct"].get(f"{budget:g}")}
        counts = costs.count(small)
        assert counts.macs <= budget * costs.macs, (method, budget, counts.macs)
        recalibrate_batchnorm(small, batches())
        pruned_acc = evaluate(small, test_loader)
        start = time.perf_counter()
        optimizer = sgd(small, args.finetune_lr)
        space = ParamSpace(small)                  # zeros (falcon, hybrid) held through the fine-tune
        with MaskHold(space, masks_from_weights(space), optimizer):
            train_epochs(small, batches(), args.finetune_epochs, lr=args.finetune_lr, optimizer=optimizer,
                         progress=False, teacher=dense, distill=args.finetune_distill,
                         temperature=args.finetune_temperature)
        assert costs.count(small).macs == counts.macs
        ft_seconds = time.perf_counter() - start
        ft_acc = evaluate(small, test_loader)
        models_dir.mkdir(parents=True, exist_ok=True)
        path = save_pruned(unused_path(models_dir / f"{method}-{budget:g}"), small, {**meta_base, "method": method, "flops": budget},
                           {}, shrunk=shrunk)
        row = {"method": method, "budget": budget, "flops_kept": counts.flops_kept, "params_kept": counts.params_kept,
               "macs": counts.macs, "params": counts.params, "accuracy_pruned_bn": pruned_acc,
               "accuracy_finetuned": ft_acc, "prune_seconds": seconds, "finetune_seconds": ft_seconds,
               "finetune_distill": args.finetune_distill, "channel_multiple": args.channel_multiple,
               "kept_channels": shrunk_widths(small),
               "saved": str(path), "info": info, "threads": torch.get_num_threads(), "load_average": load}
        payload["rows"].append(row)
        log(f"{method} @ {budget:g}: MACs {counts.flops_kept:.4f}, params {counts.params_kept:.4f}, "
            f"pruned+BN {pruned_acc:.2f}%, fine-tuned {ft_acc:.2f}%, prune {seconds:.0f} s, fine-tune {ft_seconds:.0f} s")
        write_json(args.out, payload)

    depth_of = dict(zip(args.budgets, args.depth_flops)) if args.depth_flops else {}
    distilled = "+distill" if args.taper_distill else ""
    for method in args.methods:
        if method == "dense":                    # the reference: nothing removed, the same fine-tune
            finish("dense", 1.0, copy.deepcopy(dense), 0.0, {}, shrunk=False)
            continue
        if method == "taper" and depth_of:       # a depth cut per budget: one taper run each
            for budget in sorted(args.budgets, reverse=True):
                start = time.perf_counter()
                result = prunekit.prune(copy.deepcopy(dense), batches, method="taper", flops=budget,
                                        example_input=example, recalibrate_bn=refits, taper_epochs=args.taper_epochs,
                                        max_taper_rate=args.max_taper_rate, channel_multiple=args.channel_multiple,
                                        taper_distill=args.taper_distill,
                                        residual_channels=args.residual_channels,
                                        reconstruct_batches=args.reconstruct_batches,
                                        reconstruct_ridge=args.reconstruct_ridge if args.reconstruct_batches else None, **_depth_options(args, depth_of[budget]))
                info = {k: result.record[k] for k in ("taper_steps", "planned_steps", "snapshot_steps",
                                                      "snapshot_cuts", "on_schedule", "final_lambda", "history")}
                name = ("taper-inner+depth" if args.residual_channels == "keep" else "taper+depth") + distilled
                finish(name, budget, result.model, time.perf_counter() - start, {**info, "depth": result.record["depth"]},
                       record=result.record)
            continue
        if method == "taper":
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            others = sorted(set(args.budgets) - {min(args.budgets)}, reverse=True)
            result = prunekit.prune(model, batches, method="taper", flops=min(args.budgets), example_input=example,
                                    recalibrate_bn=refits, taper_epochs=args.taper_epochs,
                                    max_taper_rate=args.max_taper_rate, channel_multiple=args.channel_multiple,
                                    taper_distill=args.taper_distill,
                                    residual_channels=args.residual_channels,
                                    reconstruct_batches=args.reconstruct_batches,
                                    reconstruct_ridge=args.reconstruct_ridge if args.reconstruct_batches else None, snapshots=others or None)
            seconds = time.perf_counter() - start
            shots = {min(args.budgets): result, **result.snapshots}
            info = {k: result.record[k] for k in ("taper_steps", "planned_steps", "snapshot_steps", "snapshot_cuts",
                                                  "on_schedule", "final_lambda")}
            info["history"] = result.record["history"]
            info["seconds_note"] = "one taper run gives every budget; seconds are the whole run"
            for budget in sorted(args.budgets, reverse=True):
                name = ("taper-inner" if args.residual_channels == "keep" else "taper") + distilled
                finish(name, budget, shots[budget].model, seconds, info, record=result.record)
            continue
        for budget in sorted(args.budgets, reverse=True):
            start = time.perf_counter()
            if method == "hybrid":
                result = prunekit.prune(copy.deepcopy(dense), batches, method="hybrid", flops=budget,
                                        structured_flops=args.structured_flops, example_input=example,
                                        recalibrate_bn=refits, gate_batches=args.gate_batches,
                                        fisher_samples=args.fisher_samples, reconstruct_batches=args.reconstruct_batches,
                                        reconstruct_ridge=args.reconstruct_ridge if args.reconstruct_batches else None)
                small = result.model
                info = {k: result.record.get(k) for k in ("structured_macs", "sparsify", "nonzeros", "sparsity")}
                info["structured_flops"] = args.structured_flops
            elif method == "falcon":              # pure unstructured: a masked dense-shaped model
                small = copy.deepcopy(dense)
                result = prunekit.prune(small, batches, method="falcon", flops=budget, example_input=example,
                                        recalibrate_bn=False, fisher_samples=args.fisher_samples,
                                        refit_batches=0)       # as the hybrid's FALCON phase: the fine-tune follows
                info = {k: result.record.get(k) for k in ("nonzeros", "sparsity")}
                finish(method, budget, result.model, time.perf_counter() - start, info, shrunk=False)
                continue
            elif method == "autobot":
                result = prunekit.prune(copy.deepcopy(dense), batches, method="autobot", flops=budget,
                                        example_input=example, recalibrate_bn=refits, gate_batches=args.gate_batches,
                                        gate_bn=args.gate_bn, channel_multiple=args.channel_multiple,
                                        residual_channels=args.residual_channels,
                                        reconstruct_batches=args.reconstruct_batches,
                                        reconstruct_ridge=args.reconstruct_ridge if args.reconstruct_batches else None,
                                        **_depth_options(args, depth_of.get(budget)))
                small = result.model
                info = {k: result.record[k] for k in ("threshold_gate", "gate_steps", "gate_estimate_flops_kept",
                                                      "history")}
                if depth_of:
                    info["depth"] = result.record["depth"]
            else:
                grads = [b for _, b in zip(range(args.taylor_batches), train_loader)]
                inner = method.endswith("-inner")        # torch-pruning with option-A block outputs kept dense
                small, info = tp_prune(dense, method.removesuffix("-inner"), budget, example, grads,
                                       round_to=args.channel_multiple, pads_residual=not inner)
            name = f"{method}+bn-batch" if method == "autobot" and args.gate_bn == "batch" else method
            name += "-inner" if method == "autobot" and args.residual_channels == "keep" else ""
            finish(f"{name}+depth" if depth_of and method == "autobot" else name, budget, small,
                   time.perf_counter() - start, info, record=result.record if method in ("autobot", "hybrid") else None)
    return payload


def threads_run(args) -> str:
    """The thread counts of the parts this run ran, for the table's header: the accuracy part runs
    on one thread, the latency part on --threads; --no-latency and --latency-only leave one out."""
    parts = [] if args.latency_only else ["1 (accuracy part)"]
    if not args.no_latency:
        parts.append(", ".join(map(str, args.threads)) + " (latency)")
    return " / ".join(parts) or "no"


def latency_part(args, payload: dict) -> None:
    """Every saved model against the dense one, dense and pruned calls alternated in one process
    (``prunekit.latency``): per thread count and batch, medians of --repeats pairs after --warmup,
    the ratio the median of the per-pair ratios."""
    checkpoint = args.checkpoint or sorted(glob.glob(f"{args.data_dir}/checkpoints/{args.model}-*.th"))[0]
    dense = load_model(args.model, checkpoint)
    shape = tuple(dense.input_shape)
    payload["latency"] = {"threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
                          "batch_sizes": args.batch_sizes, "method": "dense and pruned alternated, paired ratios"}
    for row in payload["rows"]:
        model = load_model(args.model, row["saved"]).model
        table = latency_table(dense.model, model, shape, args.batch_sizes, args.threads, args.warmup, args.repeats)
        row["latency"] = table
        for t in table:
            t["target_met"] = t["ratio"] <= 1.25 * row["flops_kept"]
            log(f"{row['method']} @ {row['budget']:g}: {t['threads']} thread(s) batch {t['batch']}: dense "
                f"{t['dense_ms']:.2f} ms, pruned {t['pruned_ms']:.2f} ms, ratio {t['ratio']:.3f} "
                f"[{t['ratio_q1']:.3f}, {t['ratio_q3']:.3f}] vs MACs {row['flops_kept']:.3f} "
                f"(target <= {1.25 * row['flops_kept']:.3f}: {'met' if t['target_met'] else 'MISSED'})")
        write_json(args.out, payload)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", "--data", dest="data_dir", default=str(DEFAULT_DATA),
                        help="the shared data folder (--data: the same, as the other scripts name it)")
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--checkpoint", help="default: DATA_DIR/checkpoints/MODEL-*.th")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3], help="shares of MACs kept")
    tp_inner = [f"{m}-inner" for m in TP_METHODS]     # torch-pruning, option-A block outputs kept dense
    parser.add_argument("--methods", nargs="+", default=["autobot", "taper", *TP_METHODS],
                        choices=["autobot", "taper", "hybrid", "falcon", "dense", *TP_METHODS, *tp_inner],
                        help="dense: the unpruned model through the same recalibration and fine-tune (a ceiling for "
                             "the fine-tune protocol; one row at budget 1)")
    parser.add_argument("--structured-flops", type=float, default=0.5, help="hybrid: MAC share after the channel cut")
    parser.add_argument("--fisher-samples", type=int, default=500, help="hybrid and falcon: gradient rows")
    parser.add_argument("--gate-batches", type=int, default=200, help="AutoBot gate-training batches of 64")
    parser.add_argument("--gate-bn", choices=["frozen", "batch"], default="frozen",
                        help="AutoBot: BatchNorm on the running statistics (default, rows named autobot) or on each "
                             "batch's own (rows named autobot+bn-batch) while the gates train")
    parser.add_argument("--taper-epochs", type=float, default=4.0, help="planned taper length in epochs")
    parser.add_argument("--max-taper-rate", type=float, default=None, help="share of dense MACs per epoch")
    parser.add_argument("--taper-distill", type=float, default=0.0,
                        help="taper: weight of the dense model's outputs while the weights train with the gates "
                             "(rows named taper...+distill; the taper's default temperature, 1)")
    parser.add_argument("--taylor-batches", type=int, default=10, help="batches of 64 for the Taylor gradients")
    parser.add_argument("--depth-flops", type=float, nargs="+",
                        help="autobot, taper: remove whole blocks first down to this share of the dense MACs, one "
                             "per --budgets entry (rows named autobot+depth, taper+depth; taper runs once per budget)")
    parser.add_argument("--depth-batches", type=int, default=4, help="training batches that score each block")
    parser.add_argument("--depth-per", choices=["macs", "time"], default="macs",
                        help="a block's loss rise per MAC or per second of its measured time")
    parser.add_argument("--residual-channels", choices=["prune", "keep"], default="prune",
                        help="autobot, taper: prune option-A block outputs as one group per stage, or keep them "
                             "(inner channels only, as tp-*-inner)")
    parser.add_argument("--reconstruct-batches", type=int, default=0,
                        help="autobot, taper, hybrid: after the cut, re-fit each layer that reads cut channels to the "
                             "dense model's outputs on this many training batches (rows named ...+recon; 0: off)")
    parser.add_argument("--reconstruct-ridge", type=float, default=1e-3,
                        help="ridge of the re-fit, a multiple of the mean diagonal of XᵀX (rows named ...+recon<r> "
                             "unless 0.001)")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--finetune-distill", type=float, default=0.0,
                        help="weight of the dense model's outputs in every method's fine-tune (0: labels only)")
    parser.add_argument("--finetune-temperature", type=float, default=4.0)
    parser.add_argument("--channel-multiple", type=int, default=1,
                        help="round every group's kept channels to a multiple of this (1: no rounding)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-only", action="store_true", help="time the saved models of a previous run")
    parser.add_argument("--inputs", nargs="+", help="with --latency-only: merge the rows of these result files "
                        "(e.g. methods run as separate processes) into --out")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts for the latency part")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="batch sizes for the latency part")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30, help="timed (dense, pruned) pairs per row (>= 5)")
    parser.add_argument("--models-dir", help="where the pruned models are saved (default: structured_models/ "
                        "in --out's folder; made only when a model is saved)")
    parser.add_argument("--out", default=str(RESULTS / "structured_resnet56.json"))
    args = parser.parse_args()
    started = load_average()
    if args.models_dir is None:
        args.models_dir = str(Path(args.out).resolve().parent / "structured_models")
    if args.depth_flops and len(args.depth_flops) != len(args.budgets):
        parser.error("--depth-flops needs one share per --budgets entry")
    read = (args.inputs or [args.out]) if args.latency_only else []
    if args.latency_only:
        missing = [p for p in read if not Path(p).is_file()]
        if missing:
            refuse(f"{missing[0]} is not a file: --latency-only reads the results of an earlier run (--inputs or --out)")
        parts = [json.loads(Path(p).read_text()) for p in read]
        payload = parts[0]
        payload["machines"] = [p.pop("machine", None) for p in parts]
        payload["settings"] = [p["settings"] for p in parts]
        payload["rows"] = [row for p in parts for row in p["rows"]]
    else:
        payload = accuracy_part(args)
    if not args.no_latency:
        latency_part(args, payload)
    rows = []
    for r in payload["rows"]:
        lat = {(t["threads"], t["batch"]): t["ratio"] for t in r.get("latency", [])}
        rows.append({**r, "m": r.get("channel_multiple", 1),
                     **{f"r{n}_{b}": lat.get((n, b)) for n in (1, 2) for b in (1, 64)}})
    print(f"\n{payload['model']} dense {payload['dense_accuracy']:.2f}% ({payload['dense_macs']:,} MACs); "
          + quiet_note(started, threads_run(args)))
    print_table(rows, [("method", "method", ">12"), ("m", "multiple", "d"), ("budget", "budget", ".2f"), ("flops_kept", "MACs kept", ".4f"),
                       ("params_kept", "params kept", ".4f"), ("accuracy_pruned_bn", "pruned+BN %", ".2f"),
                       ("accuracy_finetuned", "fine-tuned %", ".2f"), ("prune_seconds", "prune s", ".0f"),
                       ("r1_1", "1t b1 ratio", ".2f"), ("r1_64", "1t b64 ratio", ".2f"),
                       ("r2_1", "2t b1 ratio", ".2f"), ("r2_64", "2t b64 ratio", ".2f")])
    # --latency-only over --out itself adds latency to the rows it read
    write_json(args.out, payload, extends=Path(args.out).resolve() in {Path(p).resolve() for p in read})


if __name__ == "__main__":
    try:
        sys.exit(main())
    except prunekit.errors.PrunekitError as error:     # a refusal (a baseline with no group to cut): one line
        print(f"bench_structured: error: {error}", file=sys.stderr)
        sys.exit(2)
