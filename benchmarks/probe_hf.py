"""Probe: tiny HuggingFace transformers through prunekit (counting, weights methods, a channel method).

Builds each model from a config with random weights (no download), then:

* counts it with ``prunekit.costs.CostModel`` and against an independent count: forward hooks
  on every Linear-like module (tokens x in x out; GPT-2's Conv1D keeps its weight as (in, out)),
  the patch convolution (output positions x weights), plus attention's two activation products
  (2 x T_q x T_k x the query projection's width per layer: heads x head size, read from the
  weights, so an attention that lost heads is counted with the heads it has);
* prunes a fresh copy with each method (magnitude-flops and falcon at 50% of the MACs, autobot
  at 70% and 50%), ``loss=`` reading ``outputs.logits`` (a language model: next-token cross-entropy),
  and recounts the result independently;
* also calls ``prunekit.prune`` with no ``loss=`` (what a user tries first on a classifier).

Prints one row per model and method: outcome, MACs kept (prunekit's and the independent
count's), gradient path (per-layer hooks or the vmap fallback) and seconds.

    PYTHONPATH=src python benchmarks/probe_hf.py

Needs ``transformers`` (not a prunekit dependency): without it the probe prints one line and exits 0.
"""

from __future__ import annotations

import copy
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers
except ImportError:
    print("probe_hf: transformers is not installed; skipped (pip install transformers)")
    sys.exit(0)

import prunekit
from prunekit.costs import CostModel

TOKENS, SAMPLES, VOCAB, CLASSES, IMAGE = 16, 64, 500, 3, 32


def _models() -> dict[str, tuple[nn.Module, str, int]]:
    """name -> (model, task, layers); task 'lm' (input ids -> next-token logits), 'cls' (ids ->
    class logits) or 'image' (pixels -> class logits)."""
    t = transformers
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    return {
        "gpt2": (t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                                n_positions=64)), "lm", 2),
        "llama (GQA)": (t.LlamaForCausalLM(t.LlamaConfig(**small, num_key_value_heads=2, vocab_size=VOCAB,
                                                         max_position_embeddings=64)), "lm", 2),
        "bert": (t.BertForSequenceClassification(t.BertConfig(**small, vocab_size=VOCAB, num_labels=CLASSES,
                                                              max_position_embeddings=64)), "cls", 2),
        "distilbert": (t.DistilBertForSequenceClassification(t.DistilBertConfig(
            dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=VOCAB, num_labels=CLASSES,
            max_position_embeddings=64)), "cls", 2),
        "vit": (t.ViTForImageClassification(t.ViTConfig(**small, image_size=IMAGE, patch_size=8,
                                                         num_labels=CLASSES)), "image", 2),
    }


def _data(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if task == "image":
        return torch.randn(SAMPLES, 3, IMAGE, IMAGE, generator=g), torch.randint(CLASSES, (SAMPLES,), generator=g)
    ids = torch.randint(VOCAB, (SAMPLES, TOKENS), generator=g)
    return (ids, ids) if task == "lm" else (ids, torch.randint(CLASSES, (SAMPLES,), generator=g))


def lm_loss(outputs, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over each sequence's tokens then over the batch."""
    logits = outputs.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def logits_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.logits, labels)


# --- the independent count ---------------------------------------------------------------------

def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def query_width(model: nn.Module) -> int:
    """Summed over attention layers, the width of the query projection (heads x head size) from the
    weights: a ``query``/``q_proj``/``q_lin`` Linear's rows, a third of GPT-2's fused ``c_attn`` columns."""
    width = 0
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("query", "q_proj", "q_lin") and isinstance(m, nn.Linear):
            width += m.out_features
        elif leaf == "c_attn":
            width += m.weight.shape[1] // 3
    return width


def independent_macs(model: nn.Module, x: torch.Tensor, sequence: int) -> int:
    """MACs of one example by hooks: a Linear-like layer's tokens x nonzero weights, a Conv2d's
    output positions x nonzero weights, plus 2 x sequence² x the query width per attention layer
    (``query_width``: a layer's heads x head size)."""
    total = [0]

    def hook(m, inputs, out):
        nonzero = int(torch.count_nonzero(m.weight))
        if isinstance(m, nn.Conv2d):
            total[0] += out[0, 0].numel() * nonzero
        else:
            in_features = m.weight.shape[1] if isinstance(m, nn.Linear) else m.weight.shape[0]
            total[0] += inputs[0].numel() // in_features * nonzero

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if _is_linear_like(m) or isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total[0] + 2 * sequence * sequence * query_width(model)


# --- one run -------------------------------------------------------------------------------------

def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:150]


def run_method(model, data, method, flops, loss, indep, options) -> dict:
    net = copy.deepcopy(model)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = prunekit.prune(net, data, method=method, flops=flops, loss=loss, **options)
        except Exception as err:  # noqa: BLE001 - the probe records every failure
            return {"outcome": _first_line(err), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    vmap = any("vmap" in str(w.message) for w in caught)
    pruned = result.model
    kept = indep(pruned) / indep(model)
    heads = [int(getattr(m, "num_attention_heads", getattr(m, "n_heads", 0))) for m in pruned.modules()
             if any(isinstance(getattr(m, q, None), nn.Linear) for q in ("query", "q_lin", "q_proj"))]
    outcome = "ok" + (f" (heads kept {' '.join(map(str, heads))})" if method == "autobot" and heads else "")
    return {"outcome": outcome, "kept": result.flops_kept, "indep_kept": kept, "seconds": seconds,
            "path": ("vmap" if vmap else "hooks") if method in ("falcon", "chita") else "-",
            "warnings": sorted({str(w.message).splitlines()[0][:120] for w in caught})}


def probe(name, model, task, layers) -> list[dict]:
    x, y = _data(task)
    sequence = TOKENS if task != "image" else (IMAGE // 8) ** 2 + 1
    indep = lambda m: independent_macs(m, x, sequence)  # noqa: E731
    params = sum(p.numel() for p in model.parameters())
    row = {"model": name, "params": params, "hand": indep(model)}
    try:
        row["counted"] = CostModel(model, x[:1]).macs
    except Exception as err:  # noqa: BLE001
        row["counted"] = _first_line(err)
    rows = [row]
    loss = lm_loss if task == "lm" else logits_loss
    falcon = {"fisher_samples": 16}
    runs = [("magnitude-flops", 0.5, None, {"eval_data": (x[:16], y[:16])}),
            ("falcon", 0.5, None, falcon),
            ("magnitude-flops", 0.5, loss, {"eval_data": (x[:16], y[:16])}),
            ("falcon", 0.5, loss, falcon),
            ("autobot", 0.7, loss, {"gate_batches": 5, "finetune_epochs": 0}),
            ("autobot", 0.5, loss, {"gate_batches": 5, "finetune_epochs": 0})]
    for method, flops, fn, options in runs:
        torch.manual_seed(0)
        result = run_method(model, (x, y), method, flops, fn, indep, options)
        rows.append({"method": f"{method} {flops}" + ("" if fn is not None else " (no loss=)"), **result})
    return rows


def main() -> None:
    torch.manual_seed(0)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; {TOKENS} tokens, "
          f"{SAMPLES} samples")
    print("| model | params | MACs counted | independent count | method | outcome | MACs kept "
          "(prunekit / independent) | gradient path | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (model, task, layers) in _models().items():
        rows = probe(name, model, task, layers)
        head = rows[0]
        counted = f"{head['counted']:,}" if isinstance(head["counted"], int) else head["counted"]
        for i, r in enumerate(rows[1:]):
            kept = f"{r['kept']:.4f} / {r['indep_kept']:.4f}" if "kept" in r else "-"
            lead = (f"| {name} | {head['params']:,} | {counted} | {head['hand']:,} " if i == 0
                    else "| | | | ")
            print(f"{lead}| {r['method']} | {r['outcome']} | {kept} | {r.get('path', '-')} | "
                  f"{r['seconds']:.1f} |", flush=True)
            for w in r.get("warnings", []):
                print(f"  warning: {w}", file=sys.stderr)


if __name__ == "__main__":
    main()
