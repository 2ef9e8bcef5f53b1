"""``prunekit export``: a run folder's model as ONNX, TorchScript, dense or sparse weights."""

from __future__ import annotations

from pathlib import Path

from .. import distributed, folders, run_lock, user_models, zoo
from .. import export
from ..errors import PrunekitError
from ..loading import load_model, python_saved_refusal
from ..saving import read_meta
from .common import emit, refuse_running


def cmd_export(args) -> int:
    if not distributed.is_main_process():   # under torchrun, rank 0 alone exports (nothing here is sharded)
        return 0
    formats = [f for f in ("onnx", "torchscript", "dense", "sparse") if getattr(args, f)]
    if not formats:
        raise PrunekitError("say what to export: --onnx, --torchscript, --dense and/or --sparse")
    path = Path(args.run) / "model.safetensors"
    if not Path(args.run).is_dir():
        raise PrunekitError(f"{args.run} is not a folder: pass a run folder of `prunekit prune --out`")
    if not path.exists() and (Path(args.run) / "config.toml").exists():
        refuse_running(Path(args.run))
        if folders.kind(args.run) == "training run":     # `prune --resume` refuses these: name what carries it on
            raise PrunekitError(f"{args.run} holds a training run that has not finished: carry it on first (run its "
                                "`prunekit train ... --out` command again), then export it")
        from ..cli import _is_python_config
        if _is_python_config(Path(args.run) / "config.toml"):
            raise PrunekitError(f"{args.run} holds a run started from Python that has not finished: carry it on "
                                f"first (call prunekit.prune again with the same arguments and out={args.run!r})")
        raise PrunekitError(f"{args.run} holds a run that has not finished: carry it on first "
                            f"(`prunekit prune --resume {args.run}`)")
    meta = read_meta(path) if path.exists() else {}
    saved = meta.get("model")
    if saved is None or (saved not in zoo.MODEL_NAMES and not user_models.is_model_file(saved) and not meta.get("custom")):
        raise PrunekitError(f"{args.run} holds no prunekit model (model.safetensors + model.json): pass a run "
                            "folder of `prunekit prune --out` or of `prunekit.prune(..., out=)`")
    if meta.get("custom") and args.model is None:
        raise PrunekitError(python_saved_refusal(args.run, meta))
    if user_models.is_model_file(saved) and args.model is None:
        raise PrunekitError(f"{args.run} holds a model built by {saved}: name its file again, --model "
                            f"path/to/{Path(user_models.parse(saved)[0]).name}:{user_models.function_name(saved)}")
    loaded = load_model(args.model or saved, path)
    graphs = [f for f in formats if f in ("onnx", "torchscript")]
    norm = loaded.normalization
    if args.normalize_in_graph and not graphs:
        raise PrunekitError("--normalize-in-graph is for the graphs: add --onnx and/or --torchscript, "
                            "or leave it out")
    if args.normalize_in_graph and norm is None:
        raise PrunekitError(f"--normalize-in-graph: {args.run} records no input normalization (model.json), so "
                            "there is none to build in: leave --normalize-in-graph out")
    with run_lock.held(args.run, "DIR"):    # not while a prune or train writes the folder, nor another export
        written = export.export_all(loaded.model, loaded.example_input(), Path(args.run) / "export", formats,
                                    normalization=norm, normalize_in_graph=args.normalize_in_graph)
    lines = [f"{f['format']:<12} {f['path']}  {f['bytes']:,} bytes"
             + (f"  ({f['note']})" if f.get("note") else "") for f in written]
    payload = {"files": written}
    if graphs and norm is not None:
        payload["normalization"] = export.normalization_record(norm, args.normalize_in_graph)
        lines.append(_input_line(graphs, norm, args.normalize_in_graph))
    emit(args, payload, lines)
    return 0


def _input_line(graphs: list[str], norm, in_graph: bool) -> str:
    """The line that says what inputs the exported graphs take (pixels in [0, 1], normalized or not)."""
    subject = f"the {' and '.join(graphs)} graph{'s take' if len(graphs) > 1 else ' takes'}"
    values = f"mean {','.join(f'{v:g}' for v in norm.mean)}, std {','.join(f'{v:g}' for v in norm.std)}"
    if all(m == 0 for m in norm.mean) and all(s == 1 for s in norm.std):
        return f"{subject} pixels scaled to [0, 1] (model.json: no normalization)"
    if in_graph:
        return f"{subject} pixels scaled to [0, 1] ((x - mean) / std with {values} is built in)"
    return (f"{subject} inputs normalized as in training: pixels scaled to [0, 1], then (x - mean) / std with "
            f"{values} (model.json; recorded in exported.json); --normalize-in-graph builds it in")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a run folder's model: ONNX, TorchScript, dense or sparse weights")
    p.add_argument("run", metavar="DIR", help="run folder (or a folder with model.safetensors + model.json)")
    p.add_argument("--model", metavar="NAME|FILE.py:FUNCTION", help="a zoo model (e.g. mlpnet) pruned from Python, "
                   "or the model file a model of your own was built by (never imported from the run folder's record)")
    p.add_argument("--onnx", action="store_true", help="write DIR/export/model.onnx")
    p.add_argument("--torchscript", action="store_true", help="write DIR/export/model.torchscript.pt (traced)")
    p.add_argument("--dense", action="store_true", help="write DIR/export/model-dense.safetensors (zeros kept)")
    p.add_argument("--sparse", action="store_true",
                   help="write DIR/export/model-sparse.safetensors (indices + values of pruned tensors)")
    p.add_argument("--normalize-in-graph", action="store_true",
                   help="build the model's input normalization (model.json) into the ONNX / TorchScript graph: it "
                   "then takes pixels scaled to [0, 1] instead of normalized inputs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)
