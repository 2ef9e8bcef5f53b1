"""Structured pruning's shape and speed on models without a trained checkpoint here
(MobileNetV1-CIFAR; option-A and option-B ResNet-56/20): every channel group cut to a MAC
share by the L2 norm of its producing weights (one global threshold, ``threshold_to_budget``),
shrunk, outputs compared with the gated model, and the latency against the dense model
measured with dense and pruned calls alternated (``prunekit.latency``).

Random weights with non-trivial BatchNorm statistics: this measures the surgery and the speed,
not accuracy (no checkpoint of these models is on this machine).

    OMP_NUM_THREADS=1 python benchmarks/bench_structured_shapes.py --model mobilenetv1-cifar --flops 0.5
    OMP_NUM_THREADS=1 python benchmarks/bench_structured_shapes.py --model resnet56 --flops 0.5 0.3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common import load_average, machine, quiet_note, write_json
from prunekit import zoo
from prunekit.costs import CostModel
from prunekit.latency import latency_table
from prunekit.structured.gates import GatedMacs, GateHooks
from prunekit.structured.groups import find_groups
from prunekit.structured.shrink import shrink
from prunekit.structured.threshold import threshold_to_budget

RESULTS = Path(__file__).resolve().parent / "results"


def channel_norms(model, groups) -> list[torch.Tensor]:
    """Per group channel, the L2 norm of the weights producing it (its "out" members)."""
    modules = dict(model.named_modules())
    scores = []
    for g in groups:
        total = torch.zeros(g.size)
        for m in g.layers("out"):
            w = getattr(modules[m.module], "weight", None)
            if w is not None:
                rows = w.detach().flatten(1).pow(2).sum(1)[m.offset:m.offset + g.size * g.segments]
                total += rows.view(g.segments, g.size).sum(0)
        scores.append(total.sqrt())
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv1-cifar")
    parser.add_argument("--flops", type=float, nargs="+", default=[0.5])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", help="JSON file (default results/structured_shapes_MODEL.json)")
    args = parser.parse_args()
    started = load_average()
    torch.manual_seed(0)
    model = zoo.build(args.model).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    shape = tuple(zoo.spec(args.model).input_shape)
    shape = (shape[0], 32, 32) if "cifar" in args.model or args.model.startswith("resnet") else shape
    x = torch.randn(8, *shape)
    costs = CostModel(model, x[:1])
    groups = find_groups(model, x[:1])
    counter = GatedMacs(model, groups, costs)
    payload = {"model": args.model, "input_shape": list(shape), "dense_macs": costs.macs, "groups": len(groups),
               "skipped": [f"{r}: {why}" for r, why in groups.skipped], "machine": machine(),
               "note": "random weights: shape and speed, not accuracy; machine shared with other jobs", "rows": []}
    for share in args.flops:
        masks, _ = threshold_to_budget(channel_norms(model, groups), counter, share * costs.macs)
        small = shrink(model, groups, masks, x[:1])
        with torch.no_grad(), GateHooks(model, groups) as hooks:
            hooks.values = [m.float() for m in masks]
            gated = model(x)
            out = small(x)
        rel = float((out - gated).abs().max() / gated.abs().max())
        counts = costs.count(small)
        start, load = time.perf_counter(), load_average()
        table = latency_table(model, small, shape, args.batch_sizes, args.threads, args.warmup, args.repeats)
        row = {"flops": share, "flops_kept": counts.flops_kept, "params_kept": counts.params_kept,
               "max_rel_diff_vs_gated": rel, "latency": table, "latency_seconds": time.perf_counter() - start,
               "threads": args.threads, "load_average": load,
               "widths": [m.out_channels for m in small.modules() if isinstance(m, torch.nn.Conv2d)]}
        payload["rows"].append(row)
        print(f"{args.model} @ {share:g}: MACs kept {counts.flops_kept:.4f}, params kept {counts.params_kept:.4f}, "
              f"max |shrunk - gated| / max |gated| = {rel:.1e}; latency on "
              + quiet_note(started, "/".join(map(str, args.threads))), flush=True)
        for t in table:
            print(f"  {t['threads']} thread(s) batch {t['batch']:>3}: dense {t['dense_ms']:8.2f} ms, pruned "
                  f"{t['pruned_ms']:8.2f} ms, ratio {t['ratio']:.3f} [{t['ratio_q1']:.3f}, {t['ratio_q3']:.3f}]"
                  f" = {t['ratio'] / counts.flops_kept:.2f}x the MAC share", flush=True)
        write_json(args.out or RESULTS / f"structured_shapes_{args.model}.json", payload)


if __name__ == "__main__":
    sys.exit(main())
