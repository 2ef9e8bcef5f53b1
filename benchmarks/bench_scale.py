"""Cost of one-shot FALCON as the model and the number of gradient rows grow: seconds and memory.

    python benchmarks/bench_scale.py                                   # every row that fits
    python benchmarks/bench_scale.py --models resnet20-b resnet56 --n 64 256 1000
    python benchmarks/bench_scale.py --models resnet50 --n 256 --dtypes bfloat16   # needs ~16 GB free
    python benchmarks/bench_scale.py --models mobilenetv1 --n 1000 --dtypes bfloat16  # ~11 GB
    python benchmarks/bench_scale.py --models resnet50 --n 1000 --dtypes bfloat16 --device cuda
    python benchmarks/bench_scale.py --models mobilenetv1 resnet50 --n 8 --dtypes float32 --method chita

ResNet-20-B -> ResNet-56 (CIFAR layout, 32x32) -> MobileNetV1 -> ResNet-50 -> ViT-B/16 (224x224), one-shot
FALCON (default solver, DFO) to 30% of the MACs (``--models vit-tiny``, the zoo's 28x28 ViT, is
not in the default list), for n gradient rows stored in float32 or
bfloat16. Every row runs `prunekit.prune` in its own process, with RANDOM weights and RANDOM
inputs and labels (generated batch by batch, never held at once), recalibrate_bn=False: this
measures cost (time, memory), not accuracy. Per row: seconds for the gradients and for the solver,
the memory plan's estimate and the measured peak RSS of the process (VmHWM); with `--device
cuda` the model, X and the solver live on the GPU and the estimate is compared with the GPU's
peak allocation (torch.cuda.max_memory_allocated). A row whose plan does not fit the device's
available memory is reported as refused (that is the plan at work). ``--method chita`` or
``woodfisher`` prunes to ``--sparsity`` instead (their budget is a count of weights). Each row also
records the peak RSS at the end of the gradient phase and the plan's parts, to see which phase
decides the peak and which term misses.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import load_average, peak_rss_mb, print_table, quiet_note, read_rows, write_json

MODELS = {"resnet20-b": 32, "resnet56": 32, "mobilenetv1": 224, "resnet50": 224, "vit-b16": 224, "vit-tiny": 28}
CHANNELS = {"vit-tiny": 1}              # input channels where not 3


def build(model_name: str):
    """(model, classes): a zoo model, or ViT-B/16 (86M weights, the layout of Dosovitskiy et al.:
    16x16 patches, 12 blocks of width 768, 12 heads, MLP 3072, 1000 classes) from the zoo's
    VisionTransformer, which the zoo does not name (no checkpoint of ours loads into it)."""
    from prunekit import zoo
    from prunekit.zoo.vit import VisionTransformer

    if model_name == "vit-b16":
        return VisionTransformer(1000, 3, image=224, patch=16, dim=768, depth=12, heads=12, mlp_dim=3072), 1000
    return zoo.build(model_name), zoo.spec(model_name).num_classes


def run_row(model_name: str, n: int, dtype: str, flops: float, threads: int, device: str = "cpu",
            method: str = "falcon", sparsity: float = 0.7) -> dict:
    """One measurement, in this process. FALCON to ``flops`` of the MACs; CHITA and WoodFisher
    (weight budgets) to ``sparsity``. Besides the whole peak, the peak RSS at the end of the
    gradient phase (when the stage loop hands the freed heap back, before the solver) and the
    plan's parts are recorded."""
    import torch

    import prunekit
    from prunekit import memory_plan, process_memory
    from prunekit.errors import PrunekitError

    plans, gradient_peaks = [], []
    real_plan, real_release = memory_plan.plan, process_memory.release_freed_memory
    memory_plan.plan = lambda *a, **k: plans.append(real_plan(*a, **k)) or plans[-1]
    process_memory.release_freed_memory = lambda: (gradient_peaks.append(
        peak_rss_mb()), real_release())[1]

    torch.set_num_threads(threads)
    size, channels = MODELS[model_name], CHANNELS.get(model_name, 3)
    torch.manual_seed(0)
    model, classes = build(model_name)
    model = model.to(device)
    batch = 64

    def batches():
        gen = torch.Generator().manual_seed(1)
        for _ in range((n + batch - 1) // batch):
            yield torch.randn(batch, channels, size, size, generator=gen), torch.randint(0, classes, (batch,), generator=gen)

    start = time.perf_counter()
    row = {"model": model_name, "method": method, "n": n, "dtype": dtype, "threads": threads, "device": device,
           **({"flops": flops} if method == "falcon" else {"sparsity": sparsity}),
           "p": sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
           + sum(m.in_proj_weight.numel() for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention))}
    try:
        budget = {"flops": flops} if method == "falcon" else {"sparsity": sparsity}
        result = prunekit.prune(model, batches, method=method, **budget, fisher_samples=n, fisher_dtype=dtype,
                                example_input=torch.randn(1, channels, size, size, device=device), recalibrate_bn=False,
                                refit_batches=0)       # the method's own cost (bench_refit_cost.py: the re-fit's)
    except PrunekitError as error:
        return {**row, "refused": str(error), "peak_rss_mb": peak_rss_mb()}
    stage = result.history[0]
    info = stage.get("solver_info", {})
    return {**row, "flops_kept": result.flops_kept, "gradient_seconds": stage["gradient_seconds"],
            "solver_seconds": stage["solver_seconds"], "seconds": time.perf_counter() - start,
            "memory_estimate_mb": stage["memory_estimate_mb"],
            "peak_rss_mb": peak_rss_mb(),
            "dfo_accepted": info.get("accepted"), "dfo_trials": info.get("trials"),
            "gradient_peak_rss_mb": gradient_peaks[0] if gradient_peaks else None,
            **({f"plan_{part}_mb": getattr(plans[-1], part, 0) / 2**20 for part in
                ("resident", "gradients", "stage_vectors", "activations", "layer_gradients", "solver", "judge")}
               if plans else {}),
            **({"peak_device_mb": torch.cuda.max_memory_allocated() / 2**20} if device.startswith("cuda") else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=[m for m in MODELS if m != "vit-tiny"])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 128, 256, 512, 1000])
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16"),
                        default=["float32", "bfloat16"])
    parser.add_argument("--method", choices=("falcon", "chita", "woodfisher"), default="falcon")
    parser.add_argument("--flops", type=float, default=0.3, help="FALCON's budget (share of the MACs kept)")
    parser.add_argument("--sparsity", type=float, default=0.7, help="CHITA's and WoodFisher's budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the model, X and the solver on that device)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a row is abandoned")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    parser.add_argument("--row", help=argparse.SUPPRESS)       # internal: run one row, print JSON
    args = parser.parse_args()
    if args.row:
        spec = json.loads(args.row)
        print(json.dumps(run_row(spec["model"], spec["n"], spec["dtype"], spec["flops"], spec["threads"],
                                 spec.get("device", "cpu"), spec.get("method", "falcon"),
                                 spec.get("sparsity", 0.7))))
        return
    started = load_average()
    rows = read_rows(args.out, args.resume)
    done = {(r["model"], r.get("method", "falcon"), r["n"], r["dtype"]) for r in rows}
    for model_name in args.models:
        for n in args.n:
            for dtype in args.dtypes:
                if (model_name, args.method, n, dtype) in done:
                    continue
                spec = json.dumps({"model": model_name, "n": n, "dtype": dtype, "flops": args.flops,
                                   "method": args.method, "sparsity": args.sparsity,
                                   "threads": args.threads, "device": args.device})
                load = load_average()
                try:
                    out = subprocess.run([sys.executable, __file__, "--row", spec], capture_output=True, text=True,
                                         timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    rows.append({"model": model_name, "method": args.method, "n": n, "dtype": dtype,
                                 "error": f"over {args.timeout:.0f} s"})
                else:
                    if out.returncode != 0:
                        rows.append({"model": model_name, "method": args.method, "n": n, "dtype": dtype,
                                     "error": (out.stderr.strip().splitlines() or ["?"])[-1]})
                    else:
                        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                row = rows[-1]
                row.update(threads=args.threads, load_average=load)
                if "memory_estimate_mb" in row:
                    row["estimate_error"] = row["memory_estimate_mb"] / row.get("peak_device_mb", row["peak_rss_mb"]) - 1
                print(json.dumps(row), flush=True)
                write_json(args.out, {"benchmark": "scale", "rows": rows}, extends=args.resume)
    print("\nrandom weights and inputs: cost only; one process per row; " + quiet_note(started, args.threads))
    print_table([r for r in rows if "gradient_seconds" in r],
                [("model", "model", ">12"), ("method", "method", ">10"), ("p", "p", ",d"), ("n", "n", "d"), ("dtype", "X dtype", ">9"),
                 ("gradient_seconds", "grad s", ".0f"), ("solver_seconds", "solver s", ".0f"),
                 ("memory_estimate_mb", "est. MB", ".0f"), ("peak_rss_mb", "peak MB", ".0f"),
                 ("peak_device_mb", "GPU peak MB", ".0f"),
                 ("gradient_peak_rss_mb", "grad peak MB", ".0f"), ("estimate_error", "est/peak-1", "+.2f"), ("flops_kept", "MACs kept", ".3f")])
    for r in rows:
        if "refused" in r or "error" in r:
            print(f"{r['model']} n={r['n']} {r['dtype']}: {r.get('refused') or r.get('error')}")


if __name__ == "__main__":
    main()
