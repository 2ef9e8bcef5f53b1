"""The gradient phase's memory and time against the plan, on a vision transformer.

    python benchmarks/bench_gradient_phase.py                         # ViT-B/16, n = 24, chunks: the plan's, 19
    python benchmarks/bench_gradient_phase.py --model vit-mid --n 64 --chunks plan 8 32
    python benchmarks/bench_gradient_phase.py --model vit-mid-slim --n 64 --chunks plan   # heads removed

ViT-B/16 (224x224; until the attention's packed projection got per-layer rows, its rows were
per-sample gradients of the whole model through torch.func.vmap), a mid-size ViT (64x64, width
384, 6 blocks) or the zoo's vit-tiny, either of the two ViTs with every other head removed as
structured pruning removes heads ("-slim": prunekit's SlimAttention, its in_proj_weight prunable
through the cost trace), an M5-like audio net of Conv1d layers on 8,000 samples ("conv1d-audio"),
cross-attention whose keys/values have their own width ("xattn": nn.MultiheadAttention's
separate q/k/v weights), or a clip net whose Conv2d sees 4 frames folded into the batch
("clip-frames": the per-layer hooks fall back to vmap at run time), RANDOM weights and inputs:
cost, not accuracy. Each row, in its own process:
the memory plan for n bfloat16 rows, then ``fisher.collect_gradients`` with the chunk given ("plan":
the plan's). Reported: seconds, the plan's activations and layer-gradient terms, and the measured
gradient phase: peak RSS less what the process held before, less X (n x p x 2 bytes). 19 is the
chunk the plan chose for ViT-B/16 before it counted vmap's chunk x p float32 gradients.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import load_average, peak_rss_mb, print_table, quiet_note, write_json

MB = 2**20


ZOO = {"resnet20-b": 32, "mobilenetv1": 224, "resnet50": 224}


def build(name: str):
    """(model, input shape, classes)."""
    from prunekit import zoo
    from prunekit.zoo.vit import VisionTransformer
    if name.endswith("-slim"):
        model, shape, classes = build(name[:-len("-slim")])
        return slim_heads(model), shape, classes
    if name == "conv1d-audio":
        return audio_net(), (1, 8000), 35
    if name == "xattn":
        return cross_attention(), (64, 128), 10
    if name == "clip-frames":
        return clip_frames(), (4, 3, 32, 32), 10
    if name in ZOO:
        return zoo.build(name), (3, ZOO[name], ZOO[name]), zoo.spec(name).num_classes
    if name == "vit-tiny":
        return zoo.build(name), zoo.spec(name).input_shape, zoo.spec(name).num_classes
    if name == "vit-b16":
        return VisionTransformer(1000, 3, image=224, patch=16, dim=768, depth=12, heads=12, mlp_dim=3072), (3, 224, 224), 1000
    return VisionTransformer(100, 3, image=64, patch=8, dim=384, depth=6, heads=6, mlp_dim=1536), (3, 64, 64), 100


def slim_heads(model):
    """``model`` with every nn.MultiheadAttention replaced by a SlimAttention of its even heads."""
    import torch
    from torch import nn

    from prunekit.structured.attention import slim_copy
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, slim_copy(m, torch.arange(m.num_heads) % 2 == 0))
    return model


def audio_net():
    """M5-like keyword spotting on 8,000 raw samples: four Conv1d blocks, a Linear head."""
    from torch import nn

    def block(cin, cout, kernel, stride=1):
        return [nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2), nn.BatchNorm1d(cout), nn.ReLU(),
                nn.MaxPool1d(4)]
    return nn.Sequential(*block(1, 64, 80, 4), *block(64, 64, 3), *block(64, 128, 3), *block(128, 256, 3),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(256, 35))


def clip_frames():
    """A clip of 4 frames of 3x32x32: a Conv2d on the frames folded into the batch (B·4 inputs, so
    the per-layer hooks fall back to vmap at run time), then 8 Linear layers of 512 x 512."""
    from torch import nn

    class ClipFrames(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)       # (B·4, 8, 8, 8)
            self.pool = nn.AdaptiveAvgPool2d(4)                         # (B·4, 8, 4, 4): 128 per frame
            self.body = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(512, 512), nn.ReLU())])
            self.head = nn.Linear(512, 10)

        def forward(self, x):                                            # (B, 4, 3, 32, 32)
            frames = self.pool(self.conv(x.flatten(0, 1)).relu())
            return self.head(self.body(frames.reshape(x.shape[0], 512)))
    return ClipFrames()


def cross_attention():
    """64 query tokens of 128 attending to 32 memory tokens of 96 (separate q/k/v weights)."""
    from torch import nn

    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.memory = nn.Linear(128, 96)
            self.attn = nn.MultiheadAttention(128, 4, kdim=96, vdim=96, batch_first=True)
            self.head = nn.Linear(128, 10)

        def forward(self, x):                                  # (B, 64, 128)
            memory = self.memory(x[:, ::2])
            return self.head(self.attn(x, memory, memory, need_weights=False)[0].mean(1))
    return CrossAttention()


def run_row(name: str, n: int, chunk: str, threads: int, dtype: str = "bfloat16", batch: int = 16) -> dict:
    import torch

    from prunekit.costs import CostModel
    from prunekit.fisher import collect_gradients
    from prunekit.memory_plan import current_usage, plan
    from prunekit.params import ParamSpace

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, shape, classes = build(name)
    # a SlimAttention's in_proj_weight is prunable through the trace (as in the hybrid method)
    space = ParamSpace(model, costs=CostModel(model, torch.zeros(1, *shape))) if name.endswith("-slim") \
        else ParamSpace(model)
    storage = getattr(torch, dtype)
    planned = plan(model, space, torch.randn(1, *shape), n=n, dtype=dtype, max_memory="1000G")
    used_chunk = planned.chunk if chunk == "plan" else int(chunk)
    gen = torch.Generator().manual_seed(1)

    def batches():          # generated one at a time, as a data loader gives them (not held at once)
        for _ in range(-(-n // batch)):
            yield torch.randn(batch, *shape, generator=gen), torch.randint(0, classes, (batch,), generator=gen)

    before = current_usage(torch.device("cpu"))
    start, cpu_start = time.perf_counter(), time.process_time()
    collect_gradients(model, space, batches(), n=n, chunk=used_chunk, dtype=storage, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_rss_mb() * 2**20
    x_bytes = n * space.numel * storage.itemsize
    estimate = planned.activations + planned.layer_gradients
    measured = peak - before - x_bytes
    return {"model": name, "p": space.numel, "n": n, "dtype": dtype, "batch": batch, "chunk": used_chunk,
            "plan_chunk": planned.chunk, "input_batch_mb": batch * planned_input_bytes(shape) / MB,
            "threads": threads, "seconds": seconds, "cpu_seconds": cpu_seconds, "plan_activations_mb": planned.activations / MB,
            "plan_layer_gradients_mb": planned.layer_gradients / MB, "phase_estimate_mb": estimate / MB,
            "phase_measured_mb": measured / MB, "estimate_error": estimate / measured - 1}


def planned_input_bytes(shape) -> int:
    """One sample's float32 input."""
    size = 4
    for d in shape:
        size *= d
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("vit-b16", "vit-mid", "vit-tiny", "vit-b16-slim", "vit-mid-slim",
                                                  "vit-tiny-slim", "conv1d-audio", "xattn", "clip-frames", *ZOO), default="vit-b16")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--batch", type=int, default=16, help="samples per data batch (generated one at a time)")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--chunks", nargs="+", default=["plan", "19"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/gradient_phase.json")
    parser.add_argument("--row", help=argparse.SUPPRESS)       # internal: run one row, print JSON
    args = parser.parse_args()
    if args.row:
        spec = json.loads(args.row)
        print(json.dumps(run_row(spec["model"], spec["n"], spec["chunk"], spec["threads"], spec.get("dtype", "bfloat16"),
                                 spec.get("batch", 16))))
        return
    started = load_average()
    rows = []
    for chunk in args.chunks:
        load = load_average()
        spec = json.dumps({"model": args.model, "n": args.n, "chunk": chunk, "threads": args.threads,
                           "dtype": args.dtype, "batch": args.batch})
        out = subprocess.run([sys.executable, __file__, "--row", spec], capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"chunk": chunk, "error": (out.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows[-1].update(threads=args.threads, load_average=load)
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out, {"benchmark": "gradient_phase", "rows": rows})
    print("\nrandom weights and inputs: cost only; one process per row; " + quiet_note(started, args.threads))
    print_table([r for r in rows if "seconds" in r],
                [("model", "model", ""), ("n", "n", ""), ("chunk", "chunk", ""), ("seconds", "seconds", ".1f"),
                 ("phase_estimate_mb", "estimate MB", ".0f"), ("phase_measured_mb", "measured MB", ".0f"),
                 ("estimate_error", "estimate/measured-1", "+.2f")])


if __name__ == "__main__":
    main()
