"""Channel pruning (autobot) of real-size HuggingFace transformers: cost and speed, not accuracy.

BERT-base (``BertConfig()``: 12 layers, hidden 768, 12 heads of 64, intermediate 3072; 128 tokens)
and ViT-B/16 (``ViTConfig()``: the same widths, 224x224 images in 16x16 patches, 197 tokens), built
from configs with RANDOM weights (no download) and random token ids / images with random labels:
nothing here says anything about accuracy. AutoBot (``flops``, default 0.5) trains its gates for a
few batches only (``--gate-batches`` x ``--gate-batch-size``) and does not fine-tune: the point is
the pruning's seconds and memory and the shrunk model's cost and speed.

Each row runs in a process of its own (``--row``; the script without it runs every row that way)
and records: pruning seconds; prunekit's warnings during pruning (a group left dense is named there); peak resident memory of the process (VmHWM) after the model is built
and after pruning; attention heads and MLP hidden units kept per layer; the share of the MACs kept
by a fresh ``CostModel`` of the shrunk model (one example); dense vs shrunk latency at each batch
size, 1 thread, calls alternated in one process after a warm-up (``prunekit.latency.paired_latency``,
median of the per-pair ratios); and the ONNX export of the shrunk model (``prunekit.export.export_onnx``
of a wrapper returning ``.logits``, BERT's passing ``attention_mask=torch.ones_like(ids)``) run in
onnxruntime (1 thread) against the PyTorch shrunk model, the largest difference over the output's
largest magnitude.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_hf_structured.py
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_hf_structured.py --row bert-base --gate-batches 2

Needs ``transformers`` (not a prunekit dependency), and onnx + onnxruntime for the export check:
without transformers the script prints one line and exits 0; without onnxruntime the export
column says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

try:
    import transformers
except ImportError:
    print("bench_hf_structured: transformers is not installed; skipped (pip install transformers)")
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, one_thread_env, peak_rss_mb, refuse, write_json  # noqa: E402

import prunekit  # noqa: E402
import prunekit.errors  # noqa: E402
from prunekit.costs import CostModel  # noqa: E402
from prunekit.latency import paired_latency  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("bert-base", "vit-b16")
TOKENS, IMAGE, CLASSES = 128, 224, 2


def build(row: str) -> tuple[nn.Module, str]:
    """(model in eval mode, task): 'text' takes (B, TOKENS) int64 ids, 'image' (B, 3, IMAGE, IMAGE)."""
    torch.manual_seed(0)
    if row == "bert-base":
        config = transformers.BertConfig(num_labels=CLASSES)         # bert-base-uncased's shape
        return transformers.BertForSequenceClassification(config).eval(), "text"
    config = transformers.ViTConfig(image_size=IMAGE, patch_size=16, num_labels=CLASSES)   # ViT-B/16
    return transformers.ViTForImageClassification(config).eval(), "image"


def inputs(task: str, n: int, seed: int, vocab: int = 30522) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if task == "text":
        return torch.randint(vocab, (n, TOKENS), generator=gen)
    return torch.randn(n, 3, IMAGE, IMAGE, generator=gen)


class Logits(nn.Module):
    """model(x).logits; token ids get ``attention_mask=torch.ones_like(ids)`` (what ONNX export needs)."""

    def __init__(self, model: nn.Module, text: bool):
        super().__init__()
        self.model, self.text = model, text

    def forward(self, x):
        if self.text:
            return self.model(x, attention_mask=torch.ones_like(x)).logits
        return self.model(x).logits


def shape_per_layer(model: nn.Module) -> tuple[list[int], list[int]]:
    """(attention heads per layer, MLP hidden units per layer), read from the modules themselves:
    each module with a ``num_attention_heads`` and a query Linear (BERT's ``query``, ViT's ``q_proj``);
    each MLP's first Linear (BERT's ``intermediate.dense``, ViT's ``mlp.fc1``)."""
    heads = [int(m.num_attention_heads) for m in model.modules() if hasattr(m, "num_attention_heads")
             and any(isinstance(getattr(m, q, None), nn.Linear) for q in ("query", "q_proj"))]
    units = [m.out_features for name, m in model.named_modules()
             if name.endswith(("intermediate.dense", "mlp.fc1")) and isinstance(m, nn.Linear)]
    return heads, units


def onnx_check(small: nn.Module, task: str, scratch: Path) -> dict:
    """Export the shrunk model's logits wrapper, run it in onnxruntime (1 thread) on 2 fresh examples,
    compare with PyTorch relative to the output's scale."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"onnx": "onnxruntime is not installed"}
    from prunekit.export import export_onnx
    wrapper = Logits(small, task == "text").eval()
    x = inputs(task, 2, seed=7)
    path = scratch / "shrunk.onnx"
    start = time.perf_counter()
    try:
        export_onnx(wrapper, x[:1], path)
    except Exception as err:  # noqa: BLE001 - recorded, not raised: the row's other figures stand
        return {"onnx": f"export failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = wrapper(x)
    rel = float((torch.from_numpy(got) - ref).abs().max() / ref.abs().max())
    return {"onnx": "ok", "onnx_export_s": export_s, "onnx_mb": path.stat().st_size / 2**20,
            "onnx_rel_diff": rel, "onnx_batch_checked": 2}


def run_row(row: str, args) -> dict:
    torch.set_num_threads(args.threads)
    load = load_average()
    model, task = build(row)
    samples = args.gate_batches * args.gate_batch_size
    x, y = inputs(task, samples, seed=1), torch.randint(CLASSES, (samples,), generator=torch.Generator().manual_seed(2))
    dense_macs = CostModel(model, x[:1]).macs
    dense_params = sum(p.numel() for p in model.parameters())
    rss_built = peak_rss_mb()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", prunekit.errors.PrunekitWarning)
        result = prunekit.prune(copy.deepcopy(model), (x, y), method="autobot", flops=args.flops,
                                gate_batches=args.gate_batches, gate_batch_size=args.gate_batch_size,
                                batch_size=args.gate_batch_size, finetune_epochs=0)
    prune_s = time.perf_counter() - start
    rss_pruned = peak_rss_mb()
    small = result.model.eval()
    heads, units = shape_per_layer(small)
    macs = CostModel(small, x[:1]).macs
    out = {"row": row, "task": task, "flops": args.flops, "gate_batches": args.gate_batches,
           "gate_batch_size": args.gate_batch_size, "samples": samples, "threads": args.threads,
           "load_average_at_start": load, "dense_macs": dense_macs, "dense_params": dense_params,
           "macs": macs, "macs_kept": macs / dense_macs, "record_flops_kept": result.flops_kept,
           "params": sum(p.numel() for p in small.parameters()),
           "heads_dense": shape_per_layer(model)[0], "units_dense": shape_per_layer(model)[1],
           "heads": heads, "units": units, "prune_s": prune_s, "rss_built_mb": rss_built,
           "rss_after_prune_mb": rss_pruned,
           "prunekit_warnings": sorted({str(w.message).splitlines()[0][:300] for w in caught
                                        if issubclass(w.category, prunekit.errors.PrunekitWarning)})}
    out["params_kept"] = out["params"] / dense_params
    latency = []
    for batch in args.batch_sizes:
        example = inputs(task, batch, seed=3)
        timed = paired_latency(model, small, example, warmup=args.warmup, repeats=args.repeats)
        latency.append({"batch": batch, **timed.as_dict()})
    out["latency"] = latency
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        out.update(onnx_check(small, task, Path(scratch)))
    out["rss_peak_mb"] = peak_rss_mb()
    return out


def table(rows: list[dict]) -> None:
    print("| model | prune s | peak RSS MB (built / after prune / end) | heads kept per layer | MLP units kept per layer "
          "| MACs kept (fresh CostModel) | params kept | latency batch: dense ms, shrunk ms, ratio | ONNX (onnxruntime vs shrunk) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['row']} | {r['error']} | | | | | | | |")
            continue
        lat = "; ".join(f"{t['batch']}: {t['dense_ms']:.0f}, {t['pruned_ms']:.0f}, {t['ratio']:.2f}"
                        + (" (noisy)" if t["noisy"] else "") for t in r["latency"])
        onnx = (f"{r['onnx_rel_diff']:.1e} x scale, {r['onnx_mb']:.0f} MB, export {r['onnx_export_s']:.0f} s"
                if r.get("onnx") == "ok" else r.get("onnx"))
        print(f"| {r['row']} | {r['prune_s']:.0f} | {r['rss_built_mb']:.0f} / {r['rss_after_prune_mb']:.0f} / "
              f"{r['rss_peak_mb']:.0f} | {' '.join(map(str, r['heads']))} (of {max(r['heads_dense'], default='?')}) | "
              f"{' '.join(map(str, r['units']))} (of {max(r['units_dense'], default='?')}) | {r['macs_kept']:.4f} "
              f"(record {r['record_flops_kept']:.4f}) | {r['params_kept']:.4f} | {lat} | {onnx} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", choices=ROWS, help="run one row in this process (default: each row in its own)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--gate-batches", type=int, default=3)
    parser.add_argument("--gate-batch-size", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scratch", default=tempfile.gettempdir(), help="folder for the ONNX file (removed after)")
    parser.add_argument("--json", help="a row's JSON (with --row; default: printed)")
    parser.add_argument("--out", help="JSON of all rows (default results/hf_structured_s51.json, never overwritten)")
    args = parser.parse_args()
    if not 0 < args.flops < 1:
        refuse(f"--flops must be a share of the MACs between 0 and 1, got {args.flops}")
    if args.repeats < 5:
        refuse(f"--repeats must be at least 5 for a median, got {args.repeats}")
    if min(args.gate_batches, args.gate_batch_size, args.threads, *args.batch_sizes) < 1 or args.warmup < 0:
        refuse("--gate-batches, --gate-batch-size, --threads and --batch-sizes must be 1 or more, --warmup 0 or more")
    if not Path(args.scratch).is_dir():
        refuse(f"--scratch {args.scratch} is not a folder: give an existing one")
    if args.row:
        row = run_row(args.row, args)
        text = json.dumps(row, indent=1)
        if args.json:
            Path(args.json).write_text(text)
        else:
            print(text)
        return
    rows = []
    for name in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "row.json"
            cmd = [sys.executable, __file__, "--row", name, "--json", str(part)] + [
                a for a in sys.argv[1:] if a not in ("--rows", *ROWS)]
            done = subprocess.run(cmd, env=one_thread_env(args.threads), capture_output=True, text=True)
            if done.returncode != 0 or not part.exists():
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"row": name, "error": f"exit {done.returncode}: {last[:200]}"})
            else:
                rows.append(json.loads(part.read_text()))
        print(f"{name} done", file=sys.stderr, flush=True)
    path = write_json(args.out or RESULTS / "hf_structured_s51.json",
                      {"transformers": transformers.__version__, "args": vars(args), "rows": rows})
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; random weights and data "
          f"(cost and speed only); {args.threads} thread(s); written to {path}")
    table(rows)


if __name__ == "__main__":
    main()
