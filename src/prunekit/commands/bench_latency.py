"""``prunekit bench-latency``: CPU latency of a pruned model against its dense original, dense and
pruned calls alternated in one process (``prunekit.latency``), at each batch size and thread count."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from ..costs import CostModel
from ..errors import PrunekitError, PrunekitWarning
from ..latency import MIN_REPEATS, NOISE_LIMIT, check_batch_sizes, latency_table
from ..loading import load_dense_of, load_model
from ..methods import lookup
from ..saving import read_meta
from ..zoo.checkpoints import check_checkpoint_path
from .common import model_file, refuse_unfinished, resolve_model
from .info import input_shape
from ..errors import warn as warn_ours


def add_bench_latency_parser(sub) -> None:
    p = sub.add_parser("bench-latency", help="CPU latency of a pruned model against the dense one")
    p.add_argument("--model", help="model of both: a zoo name or net.py:FUNCTION (may be left out when the "
                   "pruned one is of a zoo model)")
    p.add_argument("--checkpoint", help="weights of the dense model (default: fresh weights; timing does not care)")
    p.add_argument("--pruned", required=True, help="the pruned model: a run folder or its model.safetensors")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64],
                   help="batch sizes to time, each >= 1 and its own row (default 1 64)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch CPU thread counts, each >= 1 and its own rows (default 1 2)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls of each model first (default 5)")
    p.add_argument("--repeats", type=int, default=30,
                   help=f"timed (dense, pruned) pairs, alternated; medians are reported (default 30, at least {MIN_REPEATS})")
    p.add_argument("--input-shape", type=input_shape, metavar="SHAPE",
                   help="one example's shape, for a model of your own whose folder does not record it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench_latency)


def median_latency_ms(model, example: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median wall time of ``model(example)`` in ms over ``repeats`` runs after ``warmup`` runs
    (one model alone; for a ratio to dense use ``prunekit.latency.paired_latency``)."""
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


def duration(ms: float) -> str:
    """A time to 3 significant digits, in µs below a millisecond: "41.2 µs", "2.00 ms", "1234 ms"
    (two decimals of a millisecond left a small model's 0.04 ms and 0.03 ms beside a ratio of 0.98x)."""
    value, unit = (1000 * ms, "µs") if 1000 * ms < 999.5 else (ms, "ms")     # 999.7 µs reads 1.00 ms
    return f"{value:.0f} {unit}" if value >= 99.95 else f"{value:#.3g} {unit}"


def same_shapes(dense: torch.nn.Module, pruned: torch.nn.Module) -> bool:
    """Whether every tensor of ``pruned`` has its dense shape (pruned weights zeroed in place, no channel removed)."""
    ours, theirs = dense.state_dict(), pruned.state_dict()
    return ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity where the OS says, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def max_threads(cpus: int) -> int:
    """The most --threads timed for ``cpus`` cores: 16 per core, at least 64 (oversubscription
    is timed with a warning up to there; far past it is a typo, and past 2**31 - 1 torch fails)."""
    return max(64, 16 * cpus)


def cmd_bench_latency(args) -> int:
    for flag, values in (("--batch-sizes", args.batch_sizes), ("--threads", args.threads)):
        bad = [v for v in values if v < 1]
        if bad:
            raise PrunekitError(f"{flag} {bad[0]}: {flag} must be positive (1 or more)")
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise PrunekitError(f"{flag} gives {twice} twice: give each once (each is its own row)")
    most = max_threads(available_cpus())
    if max(args.threads) > most:     # torch takes a C int; thousands of threads per core time nothing useful
        raise PrunekitError(f"--threads {max(args.threads)} is far more than the {available_cpus()} CPU core(s) this "
                            f"process may use: give at most {most}")
    if args.warmup < 0:
        raise PrunekitError(f"--warmup {args.warmup}: --warmup must be 0 or more (untimed calls of each model)")
    if args.repeats < MIN_REPEATS:
        raise PrunekitError(f"--repeats {args.repeats}: --repeats must be at least {MIN_REPEATS} (a median of fewer runs is not trustworthy)")
    pruned_file = model_file(args.pruned)
    if not pruned_file.exists():
        refuse_unfinished(args.pruned)
        raise PrunekitError(f"no pruned model at {pruned_file}: pass the --out folder of `prunekit prune`")
    check_checkpoint_path(pruned_file, hint="pass a run folder of `prunekit prune` or its model.safetensors")
    resolve_model(args, pruned_file)
    if args.checkpoint is not None and Path(args.checkpoint).is_file() and Path(args.checkpoint).samefile(pruned_file):
        raise PrunekitError(f"--checkpoint {args.checkpoint} is the pruned model itself: --checkpoint must be the "
                            "dense weights it was pruned from (or leave it out: fresh weights time the same)")
    pruned = load_model(args.model, pruned_file, input_shape=args.input_shape)
    pruned.example_input()         # refuses an input shape that neither the folder nor --input-shape gives
    if args.input_shape is not None and tuple(args.input_shape) != tuple(pruned.input_shape):
        raise PrunekitError(f"--input-shape {','.join(map(str, args.input_shape))} is not the input of {args.model}, "
                            f"{','.join(map(str, pruned.input_shape))} ({pruned_file}'s sidecar or the zoo entry "
                            "records it): leave --input-shape out")
    dense = load_dense_of(args.model, pruned, args.checkpoint)
    dtype = getattr(torch, pruned.input_dtype)
    check_batch_sizes(dense.model, dense.input_shape, args.batch_sizes, dtype=dtype)  # the dense model is the larger
    cpus = available_cpus()
    if max(args.threads) > cpus:
        warn_ours(PrunekitWarning(f"--threads {max(args.threads)} is more than the {cpus} CPU core(s) this "
                                      "process may use: threads past that share cores and time the contention"))
    rows = latency_table(dense.model, pruned.model, dense.input_shape, args.batch_sizes, args.threads,
                         args.warmup, args.repeats, dtype=dtype)
    costs = CostModel(dense.model, dense.example_input())
    kept = costs.count(pruned.model).flops_kept
    masked = kept < 1 and same_shapes(dense.model, pruned.model)
    # what the kernels compute: the pruned model's tensors whole (zeros included); for a shrunk
    # model that also has zeros (hybrid: channels removed, then single weights) the time follows this
    structure = 1.0 if masked else CostModel(pruned.model, pruned.example_input()).macs / costs.macs
    zeros_in_shrunk = not masked and structure != kept
    judged = structure if zeros_in_shrunk else kept
    for r in rows:
        r["ratio_to_macs_kept"] = r["ratio"] / judged if judged else None     # a model that keeps no MAC
    if args.json:
        print(json.dumps({"model": args.model, "pruned": str(pruned_file), "threads": args.threads,
                          "warmup": args.warmup, "repeats": args.repeats, "flops_kept": kept, "masked": masked,
                          "structure_flops_kept": structure, "zeros_in_shrunk": zeros_in_shrunk,
                          "ratio_to_macs_kept_of": "structure_flops_kept" if zeros_in_shrunk else "flops_kept",
                          "rows": rows}))
        return 0
    share = (f"{100 * structure:.1f}% of MACs as shrunk, {100 * kept:.1f}% counting only nonzero weights"
             if zeros_in_shrunk else f"{100 * kept:.1f}% of MACs")
    print(f"{args.model}: dense vs {pruned_file} ({share}); dense and pruned alternated, "
          f"median of {args.repeats} pairs after {args.warmup} warm-up")
    for r in rows:
        print(f"  {r['threads']} thread(s) batch {r['batch']:>4}: dense {duration(r['dense_ms']):>9}   "
              f"pruned {duration(r['pruned_ms']):>9}   ratio {r['ratio']:.2f}x (quartiles {r['ratio_q1']:.2f}-"
              f"{r['ratio_q3']:.2f}" + (f"; {r['ratio_to_macs_kept']:.2f}x the {'shrunk ' if zeros_in_shrunk else ''}MAC share kept)"
                                         if r["ratio_to_macs_kept"] is not None else ")")
              + ("   noisy" if r["noisy"] else ""))
    noisy = sum(r["noisy"] for r in rows)
    if noisy:
        print(f"warning: {noisy} of {len(rows)} row(s) noisy (a model's call times or the per-pair ratios spread "
              f"past {NOISE_LIMIT:.0%} of their median, or the fastest calls' ratio is {NOISE_LIMIT:.0%} off the "
              "median ratio): the machine's load changed while timing, so those ratios cannot be trusted; time on "
              "a quiet machine, or with more --repeats")
    if zeros_in_shrunk:
        print(f"note: the pruned model is shrunk to {100 * structure:.1f}% of the dense MACs (channels removed) and "
              f"its kept layers also hold zeroed weights ({100 * kept:.1f}% counting only nonzeros): the zeros run "
              "at dense cost, so the ratios above are judged against the shrunk share")
    if (hint := channel_multiple_hint(dense.model, pruned.model, rows, masked,
                                      read_meta(pruned_file).get("result"))) is not None:
        print(hint)
    if masked:
        print("note: the pruned model is masked, not shrunk (its zeroed weights stay in tensors of the dense shapes), "
              "so dense kernels take about the same time: channel methods (--method autobot, taper, hybrid), "
              "which remove channels, make it faster")
    return 0


FAR_ABOVE_SHARE = 1.5     # a ratio to dense this many times the MAC share kept (or more) earns the hint


def channel_multiple_hint(dense: nn.Module, pruned: nn.Module, rows: list[dict], masked: bool,
                          record: dict | None = None) -> str | None:
    """The hint to prune with ``--channel-multiple 8`` when a quiet row's ratio is at least
    ``FAR_ABOVE_SHARE`` times the MAC share kept and convolutions were cut to channel counts that
    are not a multiple of 8 (CPU kernels, depthwise and grouped ones most, run slower at such
    counts); None otherwise (a masked model, counts already multiples of 8). ``record``: the run's
    (its model file's sidecar "result"; None where it has none): a channel method's run with a
    params budget, which --channel-multiple above 1 is refused with (``_params_takes_no_multiple``),
    is told to prune without it."""
    worst = max((r["ratio_to_macs_kept"] for r in rows if not r["noisy"] and r["ratio_to_macs_kept"] is not None),
                default=None)
    if masked or worst is None or worst < FAR_ABOVE_SHARE:
        return None
    fresh = dict(dense.named_modules())
    odd = [(name, m) for name, m in pruned.named_modules()
           if isinstance(m, nn.modules.conv._ConvNd) and isinstance(fresh.get(name), nn.modules.conv._ConvNd)
           and m.out_channels != fresh[name].out_channels and m.out_channels % 8]
    if not odd:
        return None
    grouped = [(name, m) for name, m in odd if m.groups > 1]
    name, first = (grouped or odd)[0]
    kind = "depthwise or grouped " if grouped else ""
    head = (f"hint: the pruned model runs at up to {worst:.2f}x its MAC share kept, and {len(odd)} convolution(s) "
            f"were cut to channel counts that are not a multiple of 8 (e.g. {kind}{name}: {first.out_channels}), "
            "at which CPU kernels run slower: ")
    if _params_takes_no_multiple(record):
        return head + ("--channel-multiple 8 rounds them, but not with a params budget such as this run's: prune "
                       "again without --params (its --flops alone) and with --channel-multiple 8, and time that")
    return head + "prune again with --channel-multiple 8 and time that"


def _params_takes_no_multiple(record: dict | None) -> bool:
    """Whether the run of ``record`` (a prune record) had a params budget that --channel-multiple
    above 1 is refused with: a channel method's without a weights phase (``Method.sparsify``: the
    hybrid's meets the params budget there, and takes a channel multiple)."""
    if not isinstance(record, dict) or record.get("family") != "channels":
        return False
    if not isinstance(record.get("request"), dict) or record["request"].get("params") is None:
        return False
    try:
        return lookup(str(record.get("method"))).sparsify is None
    except (PrunekitError, KeyError, ValueError):
        return True          # a method not known here: not told to add what it may refuse
