"""``prunekit info``: per-layer parameters and MACs of a model (nonzero-aware; shrunk models
against the zoo model they came from)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from torch import nn

from ..costs import CostModel, Counts
from ..loading import LoadedModel, load_dense_of, load_model
from ..params import ParamSpace
from ..saving import read_meta
from ..user_models import CODE, EITHER, NO_FORWARD, error_line, forward_fault, is_model_file, no_forward_text, parse
from ..zoo import MODEL_NAMES
from ..errors import PrunekitError
from .common import MODEL_HELP, names_run_folder, model_file, resolve_model
from .eval import params_text


CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".tar", ".th", ".ckpt")


def cmd_info(args) -> int:
    if _names_checkpoint_file(args.model):      # `info runs/x/model.safetensors`: the file is the checkpoint
        if args.checkpoint is not None and Path(args.checkpoint).resolve() != Path(args.model).resolve():
            raise PrunekitError(f"{args.model} is a checkpoint and --checkpoint {args.checkpoint} another: "
                                "give one of them")
        args.checkpoint, args.model = args.model, args.model_flag
    if args.model is not None and args.model_flag not in (None, args.model):
        if not (names_run_folder(args.model) and args.checkpoint is None):
            raise PrunekitError(f"two models named: {args.model} and --model {args.model_flag}; name one")
        # `info RUNDIR --model net.py:build`: the folder is the weights, the flag the code that builds them
        args.checkpoint, args.model = args.model, None
    args.model = args.model or args.model_flag      # `info MODEL`, or `--model MODEL` as other commands take it
    resolve_model(args)
    loaded = load_model(args.model, args.checkpoint, input_shape=args.input_shape)
    if args.input_shape is not None and tuple(args.input_shape) != tuple(loaded.input_shape):
        raise PrunekitError(f"--input-shape {','.join(map(str, args.input_shape))} is not the input of {args.model}, "
                            f"{','.join(map(str, loaded.input_shape))} (its zoo entry or checkpoint records it): "
                            "leave --input-shape out")
    try:
        costs = CostModel(loaded.model, loaded.example_input())
    except PrunekitError as err:
        if args.input_shape is None or not str(err).startswith("the model failed on one example"):
            raise
        raise PrunekitError(input_shape_refusal(args.model, loaded.model, tuple(args.input_shape), str(err),
                                                err.__context__)) from None
    if args.checkpoint is None and args.model in MODEL_NAMES:
        # fresh random weights: an exact zero the initialisation happens to draw is no pruning
        counts = Counts(costs.macs, costs.macs, costs.params, costs.params)
    else:
        counts = costs.count(loaded.model)
    space = ParamSpace(loaded.model, exclude=loaded.prune_exclude, costs=costs)
    pruned_layers = {e.module for e in space.entries} | {e.name for e in space.entries}
    rows = []
    for layer in costs.layers:
        macs = counts.macs_by_layer.get(layer.name, layer.macs)
        nonzeros = counts.nonzeros_by_layer.get(layer.name)
        rows.append({"name": layer.name, "type": layer.kind,
                     "shape": list(layer.weight_shape) if layer.weight_shape else None,
                     "params": layer.params, "nonzeros": nonzeros,
                     "params_kept": counts.params_by_layer.get(layer.name, layer.params),
                     "macs": macs, "other_ops": layer.other_ops,
                     "share": macs / counts.macs if counts.macs else 0.0,
                     "prunable": layer.name in pruned_layers})
    prunable_macs = space.macs_summary(costs)[0]
    totals = {"params": counts.params, "dense_params": costs.params, "nonzero_params": counts.nonzero_params,
              "macs": counts.macs,
              "dense_macs": costs.macs, "other_ops": costs.other_ops, "prunable_weights": space.numel,
              "prunable_macs": prunable_macs, "prunable_excluded": loaded.prune_exclude,
              "unknown_modules": costs.unknown}
    shrunk = shrunk_summary(args.model, args.checkpoint, counts, loaded, costs)
    if shrunk:
        totals["shrunk"] = shrunk
    if args.json:
        print(json.dumps({"model": args.model, "input_shape": list(loaded.input_shape),
                          "layers": rows, **totals}))
        return 0
    print(f"{args.model}: input {tuple(loaded.input_shape)}, MACs per example"
          + (", params and MACs of the nonzero weights" if counts.macs != costs.macs else ""))
    shown = [r for r in rows if r["params"] or r["macs"] or r["other_ops"]]
    name_width = max([28, *(len(r["name"] or "(model)") for r in shown)])
    kind_width = max([18, *(len(_kind(r)) for r in shown)])
    header = f"{'layer':<{name_width}} {'type':<{kind_width}} {'shape':<20} {'params':>10} {'MACs':>13} {'share':>7}"
    print(header)
    print("-" * len(header))
    for r in shown:
        shape = "x".join(map(str, r["shape"])) if r["shape"] else ""
        kind = _kind(r)
        counted = r["shape"] or r["macs"]        # weight layers, products of two activations
        macs = f"{r['macs']:,}" if counted else (f"({r['other_ops']:,} ops)" if r["other_ops"] else "")
        share = f"{100 * r['share']:.1f}%" if counted else ""
        print(f"{r['name'] or '(model)':<{name_width}} {kind:<{kind_width}} {shape:<20} {r['params_kept']:>10,} "
              f"{macs:>13} {share:>7}")
    print("-" * len(header))
    print(f"total: {params_text(counts)}, {counts.macs:,} MACs{_millions(counts.macs)}"
          + (f", of which {costs.activation_macs:,} in products of two activations (attention's QKᵀ and AV, say: "
             "no weight to prune)" if costs.activation_macs else "")
          + f", {costs.other_ops:,} other ops (BN, pooling, adds)")
    print(f"prunable: {space.numel:,} weights, {prunable_macs:,} MACs{_millions(prunable_macs)}"
          + _excluded_text(loaded.prune_exclude, shown))
    if counts.macs != costs.macs:
        of = "of the shrunk model's" if shrunk else "of dense"
        print(f"nonzero-aware: {100 * counts.flops_kept:.2f}% {of} MACs, {100 * counts.params_kept:.2f}% {of} params")
    if shrunk:
        print(shrunk_line(shrunk))
    if costs.unknown:
        names = [name or "(model)" for name in costs.unknown]       # the root module's name is ""
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        print(f"note: no element-wise rule for {len(names)} module(s) (their MACs are counted, "
              f"their other ops not): {', '.join(names[:5])}{more}")
    return 0


def input_shape_refusal(name: str, model, shape: tuple[int, ...], message: str,
                        error: BaseException | None = None) -> str:
    """The line for a model that failed on an example of ``--input-shape`` ``shape``: the model's
    own words (from ``message``, CostModel's refusal), then the shape to give, channels first, from
    the model's first convolution (its in_channels; the spatial sizes given, or 32 each) or first
    Linear layer (its in_features). Where that shape is the one given, or ``error`` (the exception
    the model raised) is no shape error (``user_models.forward_fault``: a TypeError, an
    AttributeError) and no other shape can be named, the line names the exception and the model
    file's line it passed, and points at the model's code (for a shape error with the channels
    right: the height and width, or the code). An AssertionError (``assert x.shape[-1] == 32``)
    names its line and both causes (the shape, or the forward); a model without a forward says
    so. For a model whose input reached an
    ``nn.Embedding`` (an embedding's dtype or index error), that it takes integer token ids and
    the route that gives them."""
    reason = message.split("): ", 1)[-1].rsplit("; ", 1)[0]
    given = ",".join(map(str, shape))
    if any(text in reason for text in _EMBEDDING_ERRORS):      # the input reached an nn.Embedding: token ids
        return token_ids_refusal(name, given, reason)
    fault = forward_fault(error) if error is not None else CODE
    if fault == NO_FORWARD:
        return no_forward_text(name, error)
    wanted = _wanted_shape(model, shape)
    if wanted == given or fault == EITHER or (wanted is None and fault == CODE):
        kind = type(error).__name__ if error is not None else "an error"
        where = ""
        if error is not None and is_model_file(name):
            where = error_line(error, parse(name)[0])
        fits = (" (its first convolution takes those channels)" if wanted == given else "")
        other = f", e.g. {wanted}" if wanted is not None and wanted != given else ""
        fix = ("either that is not the shape the model was made for (give that one as --input-shape, channels "
               f"first{other}) or its forward is wrong (fix it)" if fault == EITHER else
               "the fault is in the model's code, not the input: fix its forward (or what it calls) and run again"
               if fault == CODE else
               "give the height and width the model was made for (--input-shape C,H,W), or fix "
               "its forward if those are right")
        return (f"{name}'s forward raised {kind} on an input of --input-shape {given}{fits}"
                f"{f', at {where}' if where else ''}: {reason}; {fix}")
    first = next(((n, m) for n, m in model.named_modules()
                  if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
    if first is None:
        fix = "give --input-shape as one example's shape as the model takes it (C,H,W for images)"
    elif isinstance(first[1], nn.Linear):
        fix = (f"give --input-shape as one example's shape as the model takes it: its first layer, {first[0]}, "
               f"takes {first[1].in_features} features")
    else:
        conv = first[1]
        dims = len(conv.kernel_size)
        spatial = shape[-dims:] if len(shape) in (dims, dims + 1) else (32,) * dims
        wanted = ",".join(map(str, (conv.in_channels, *spatial)))
        fix = (f"give --input-shape {wanted} (channels first: its first convolution, {first[0]}, takes "
               f"{conv.in_channels} channel{'s' if conv.in_channels != 1 else ''})")
    return f"{name} fails on an input of --input-shape {given}: {reason}; {fix}"


_EMBEDDING_ERRORS = ("for embedding)", "'indices' to have one of the following scalar types",
                     "index out of range in self")


def token_ids_refusal(name: str, given: str, reason: str) -> str:
    """The line for a model taking integer token ids given --input-shape (float inputs only)."""
    return (f"{name} fails on an input of --input-shape {given}: {reason}; the model takes integer token ids, "
            "which no --input-shape gives (it makes float inputs): prune it from Python on token ids "
            "(prunekit.prune(model, (ids, labels), ..., out='runs/X'); the run folder remembers the ids' shape "
            f"and dtype), then run `prunekit info runs/X --model {name}`")


def _zeros(row: dict) -> int:
    """Zero weights of a layer the pruning leaves out (an older version pruned some of them)."""
    if not row["shape"] or row["prunable"] or row["nonzeros"] is None:
        return 0
    return math.prod(row["shape"]) - row["nonzeros"]


def _kind(row: dict) -> str:
    """The type column: a layer left out of pruning is "dense", or "excluded, N zeros" if it holds zeros."""
    if not row["shape"] or row["prunable"]:
        return row["type"]
    zeros = _zeros(row)
    return f"{row['type']}, excluded, {zeros:,} zeros" if zeros else f"{row['type']}, dense"


def _excluded_text(exclude: list[str], rows: list[dict]) -> str:
    """The end of the "prunable:" line: the layers pruning leaves out, and how they are marked."""
    if not exclude:
        return ""
    zeroed = [r for r in rows if _zeros(r)]
    if not zeroed:
        return f", leaving dense {', '.join(exclude)} (marked dense above)"
    which = "they hold" if len(zeroed) == sum(1 for r in rows if r["shape"] and not r["prunable"]) else "some hold"
    return f", leaving out {', '.join(exclude)} (marked excluded above; {which} zeros, e.g. an older version's pruning)"


def _names_checkpoint_file(model) -> bool:
    """Whether the positional MODEL is a checkpoint file (by its name: a zoo name or net.py:FUNCTION never is)."""
    return (model is not None and model not in MODEL_NAMES and not is_model_file(model)
            and Path(model).name.lower().endswith(CHECKPOINT_SUFFIXES))


def _millions(count: int) -> str:
    """" (4.09M)" beside a count of a million or more, else nothing (a small model's 0.00M said nothing)."""
    return f" ({count / 1e6:.2f}M)" if count >= 10**6 else ""


def shrunk_summary(name: str, checkpoint, counts: Counts, loaded: LoadedModel,
                   structure: CostModel | None = None) -> dict | None:
    """For a shrunk model (``loaded``): its MACs and params against the dense model it came from
    (same input shape and dtype); else None. ``macs``/``flops_kept``/``params``/``params_kept``
    count only nonzero weights (``counts``); ``structure_macs``/``structure_flops_kept``/
    ``structure_params``/``structure_params_kept`` count the shrunk tensors whole (``structure``,
    the shrunk model's own cost model: what dense kernels compute), and ``zeros_in_shrunk`` says
    whether the two differ (a hybrid run: channels removed, then single weights zeroed)."""
    if checkpoint is None or "channel_layout" not in read_meta(model_file(checkpoint)):
        return None
    dense = load_dense_of(name, loaded)
    costs = CostModel(dense.model, dense.example_input())
    structure = structure or CostModel(loaded.model, loaded.example_input())
    return {"macs": counts.macs, "dense_macs": costs.macs, "flops_kept": counts.macs / costs.macs,
            "params": counts.params, "dense_params": costs.params, "params_kept": counts.params / costs.params,
            "structure_macs": structure.macs, "structure_flops_kept": structure.macs / costs.macs,
            "structure_params": structure.params, "structure_params_kept": structure.params / costs.params,
            "zeros_in_shrunk": counts.macs != structure.macs}


def shrunk_line(s: dict) -> str:
    if not s.get("zeros_in_shrunk"):
        return (f"shrunk (channels removed): {100 * s['flops_kept']:.2f}% of the dense {s['dense_macs']:,} MACs, "
                f"{100 * s['params_kept']:.2f}% of its {s['dense_params']:,} params")
    return (f"shrunk to {100 * s['structure_flops_kept']:.2f}% of the dense {s['dense_macs']:,} MACs and "
            f"{100 * s['structure_params_kept']:.2f}% of its {s['dense_params']:,} params (channels removed); "
            f"{100 * s['flops_kept']:.2f}% and {100 * s['params_kept']:.2f}% counting only nonzero weights "
            "(the zeros inside the shrunk layers run at dense cost)")




def add_parser(sub) -> None:
    p = sub.add_parser("info", help="per-layer parameters and MACs of a model")
    p.add_argument("model", nargs="?", help=MODEL_HELP + " (or --model; may be left out with a prunekit "
                   "checkpoint of a zoo model), or a run folder (its model.safetensors), or a checkpoint file "
                   "(the same as --checkpoint FILE)")
    p.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same as the positional MODEL")
    p.add_argument("--checkpoint", help="count this checkpoint (nonzero-aware for pruned models)")
    p.add_argument("--input-shape", type=input_shape, metavar="SHAPE",
                   help="for a model file without a prunekit checkpoint: the shape of one input example "
                   "(C,H,W for images, e.g. 3,32,32; 2,100 for two channels of 100 samples)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def input_shape(text: str) -> tuple[int, ...]:
    """One example's shape, without the batch: positive integers, e.g. 3,32,32 (C,H,W)."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: positive integers separated by commas "
                                         "(C,H,W for images, e.g. 3,32,32)")
    return shape


def _wanted_shape(model, shape: tuple[int, ...]) -> str | None:
    """The ``--input-shape`` the model's first convolution takes (its in_channels, the spatial sizes
    of ``shape`` or 32 each), as written on the command line; None when its first layer is no
    convolution."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)
    if first is None or isinstance(first, nn.Linear):
        return None
    dims = len(first.kernel_size)
    spatial = shape[-dims:] if len(shape) in (dims, dims + 1) else (32,) * dims
    return ",".join(map(str, (first.in_channels, *spatial)))
