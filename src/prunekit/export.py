"""Export a pruned model: ONNX, TorchScript, dense weights with zeros, compact sparse weights.

The sparse form is a safetensors file: a tensor with at least half its entries zero is stored
as ``<name>.indices`` (int32 flat positions of the nonzeros) and ``<name>.values``, its shape in
the file's metadata; every other tensor is stored as is. ``load_sparse`` rebuilds the dense
state dict exactly (and a checkpoint reader reads it as that state dict). Loading either
safetensors file never executes code.

``export_all`` keeps a list of the files it wrote in the folder (``exported.json``) and never
replaces a file it did not write there: exporting again refreshes its own files only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from .cost_trace import get_mha_fastpath, set_mha_fastpath
from .errors import PrunekitError
from .saving import atomic_write_bytes

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "dense": "model-dense.safetensors",
           "sparse": "model-sparse.safetensors"}
MANIFEST = "exported.json"       # the files export_all wrote in its folder


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def export_dense(model: nn.Module, path: str | Path) -> Path:
    """The state dict, pruned weights as zeros (safetensors; metadata ``prunekit-export: dense``,
    which a checkpoint reader names when the file holds a shrunk model)."""
    atomic_write_bytes(path, save(_state(model), metadata={"format": "pt", "prunekit-export": "dense"}))
    return Path(path)


def export_sparse(model: nn.Module, path: str | Path) -> Path:
    """Tensors at least half zero as indices (int32) + values; the rest dense (safetensors)."""
    tensors, shapes = {}, {}
    for name, value in _state(model).items():
        flat = value.reshape(-1)
        if value.is_floating_point() and flat.numel() and int(torch.count_nonzero(flat)) * 2 <= flat.numel():
            if flat.numel() > 2**31 - 1:
                raise PrunekitError(f"{name} has more entries than int32 indices reach; export it dense")
            index = flat.nonzero().squeeze(1)
            tensors[f"{name}.indices"] = index.to(torch.int32)
            tensors[f"{name}.values"] = flat[index].clone()
            shapes[name] = list(value.shape)
        else:
            tensors[name] = value
    atomic_write_bytes(path, save(tensors, metadata={"format": "prunekit-sparse", "shapes": json.dumps(shapes)}))
    return Path(path)


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a file written by ``export_sparse``."""
    if not isinstance(path, (str, os.PathLike)):
        raise PrunekitError(f"load_sparse(path): path must be a file path, got {type(path).__name__}")
    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise PrunekitError(f"{path} {what}: pass the .safetensors file export_sparse wrote (a run folder's "
                            "export/model-sparse.safetensors)")
    try:
        handle = safe_open(str(path), "pt")
    except Exception as err:         # SafetensorError, and an OSError of the file's
        raise PrunekitError(f"{path} is not a safetensors file (it is truncated, damaged or another format: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}): pass the file "
                            "export_sparse wrote, or export it again") from None
    with handle:
        meta = handle.metadata() or {}
        if meta.get("format") != "prunekit-sparse":
            raise PrunekitError(f"{path} is not a prunekit sparse export")
        shapes = json.loads(meta["shapes"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    state = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in shapes}
    for name, shape in shapes.items():
        values = tensors[f"{name}.values"]
        dense = torch.zeros(torch.Size(shape).numel(), dtype=values.dtype)
        dense[tensors[f"{name}.indices"].long()] = values
        state[name] = dense.view(shape)
    return state


ONNX_OPSET = 17


def _traced_in_eval(export):
    """``export(model, ...)`` run with ``model`` in eval mode (a graph holds inference: BatchNorm's
    running statistics, no dropout), then every module put back in the mode it had (a model given
    in train mode, or with some modules frozen in eval, comes back as it was)."""
    @functools.wraps(export)
    def run(model: nn.Module, *args, **kwargs):
        modes = [(module, module.training) for module in model.modules()] if isinstance(model, nn.Module) else []
        if modes:
            model.eval()
        try:
            return export(model, *args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training
    return run


ONNX_INSTALL = "pip install 'prunekit[export]'"     # the extra that brings the onnx package (pyproject.toml)


def require_onnx() -> None:
    """Refuse ONNX export, before anything is written, when the onnx package torch's exporter needs
    is not installed, naming the install command."""
    try:
        importlib.import_module("onnx")
    except ImportError:
        raise PrunekitError(f"ONNX export needs the onnx package, which is not installed: {ONNX_INSTALL} "
                            "(or pip install onnx); nothing was written") from None


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path) -> Path:
    """ONNX graph at opset 17 with a dynamic batch dimension (TorchScript-based exporter: fast, no
    onnxscript), for masked and shrunk models alike; checked by ``onnx.checker``. Needs the onnx
    package (``pip install 'prunekit[export]'``): without it, a one-line ``PrunekitError`` saying so."""
    atomic_write_bytes(path, onnx_bytes(model, example_input))
    return Path(path)


@_traced_in_eval
def onnx_bytes(model: nn.Module, example_input: torch.Tensor) -> bytes:
    """``export_onnx``'s file in memory (``model`` is traced in eval mode, and each module is left
    in the mode it was given, ``_traced_in_eval``); an exporter failure is a
    one-line ``PrunekitError``, and the graph dump the exporter prints on stdout then is dropped."""
    require_onnx()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _no_exporter_log():
        warnings.simplefilter("ignore")     # the exporter's deprecation notes are not for our users
        try:
            torch.onnx.export(model, (example_input,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except Exception as err:  # noqa: BLE001 - report any exporter failure as one line
            first = str(err).splitlines()[0].split("  [Caused by")[0] if str(err) else type(err).__name__
            raise PrunekitError(f"ONNX export failed: {first}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(model, example_input, strict=False, check_trace=False)
        except Exception:  # noqa: BLE001 - the exporter traced it: a check that cannot trace again checks nothing
            traced = None
    if traced is not None:
        check_any_batch(traced, model, example_input, "ONNX")
    import onnx
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    return buffer.getvalue()


@contextlib.contextmanager
def _no_exporter_log():
    """Send file descriptor 1 to the null device meanwhile: on a failure the TorchScript exporter
    writes the whole graph to the C++ stdout (and turns its log on for good), which would
    break ``--json``'s one object on stdout. Its log setting is restored after."""
    log_was_on = torch._C._jit_is_onnx_log_enabled()
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:                  # no stdout to protect
        saved = None
    try:
        if saved is not None:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 1)
        yield
    finally:
        if saved is not None:
            _flush_c_stdout()        # the dump sits in C's stdout buffer: empty it into the null device
            os.dup2(saved, 1)
            os.close(saved)
        torch._C._jit_set_onnx_log_enabled(log_was_on)


def _flush_c_stdout() -> None:
    """fflush the C library's stdout (C++'s std::cout writes through it): what it holds would
    otherwise reach the real stdout when the process exits."""
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):    # no C library to reach (e.g. Windows): nothing buffered we can flush
        pass


@_traced_in_eval
def export_torchscript(model: nn.Module, example_input: torch.Tensor, path: str | Path) -> Path:
    """A traced TorchScript module (``torch.jit.load`` runs it without prunekit), traced in eval
    mode; each module is left in the mode it was given (``_traced_in_eval``).

    The fused fast path of ``nn.MultiheadAttention`` / ``TransformerEncoderLayer`` is off while
    tracing: torch takes it only without autograd, so the trace (with autograd) and its check
    (without) would record different graphs and the check would fail. The ordinary path is the
    same arithmetic, op by op.
    """
    buffer = io.BytesIO()
    fastpath = get_mha_fastpath()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            set_mha_fastpath(False)
            traced = torch.jit.trace(model, example_input)
            torch.jit.save(traced, buffer)
        except Exception as err:  # noqa: BLE001 - report any tracer failure as one line
            raise PrunekitError(f"TorchScript export failed: {str(err).splitlines()[0]}") from None
        finally:
            set_mha_fastpath(fastpath)
    check_any_batch(traced, model, example_input, "TorchScript")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def check_any_batch(traced, model: nn.Module, example_input, what: str) -> None:
    """Refuse a traced graph that holds the example's batch size as a constant (``len(x)``,
    ``x.view(1, ...)``): its file would claim a dynamic batch and be wrong at any other. The
    graph and the model are run on a batch one larger than the example."""
    if not isinstance(example_input, torch.Tensor) or example_input.ndim == 0:
        return
    x = torch.cat([example_input, example_input[:1]])
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(model(x))
        try:
            got = torch.utils._pytree.tree_leaves(traced(x))
            what_it_gives = f"gives outputs of shape {[tuple(t.shape) for t in got]}"
        except Exception as err:  # noqa: BLE001 - a graph that fails at another batch is the same fault
            got, what_it_gives = None, f"fails ({str(err).splitlines()[0][:120]})"
    if got is not None and len(got) == len(expected) and all(
            not isinstance(a, torch.Tensor) or (isinstance(b, torch.Tensor) and a.shape == b.shape
                                                and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5))
            for a, b in zip(expected, got)):
        return
    raise PrunekitError(f"{what} export refused: the model's forward turns the batch size into a constant "
                        f"(len(x), or x.view(N, ...) with N a number): at batch {len(x)} the exported graph "
                        f"{what_it_gives}, the model {[tuple(t.shape) for t in expected]}; write x.flatten(1) or "
                        "x.view(x.size(0), ...) (nothing was written)")


def export_all(model: nn.Module, example_input: torch.Tensor, out: str | Path, formats) -> list[dict]:
    """Write each of ``formats`` (keys of FORMATS, or one of them as a string) into folder ``out``;
    returns path, size per file. Refuses (``PrunekitError``, before writing anything) an unknown
    format, "onnx" without the onnx package installed, and to replace a file in ``out`` that an
    earlier ``export_all`` did not write. The
    graphs are traced in eval mode; ``model`` comes back in the mode it was given (each module's)."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise PrunekitError(f"formats: unknown export format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    if "onnx" in formats:
        require_onnx()          # before any format is written: not the others, then a failure
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"{out} is a file: exports go into a folder")
    ours = _written_before(out)
    for path in [out / FORMATS[fmt] for fmt in formats] + [out / MANIFEST]:
        if path.exists() and path.name not in ours:
            raise PrunekitError(f"{path} was not written by prunekit export: move it away or export "
                                "elsewhere (nothing was changed)")
    written, had_manifest, had_folder = [], (out / MANIFEST).exists(), out.exists()
    _remove_stray_temps(out, ours)
    for fmt in formats:
        path = out / FORMATS[fmt]
        ours.add(path.name)       # listed as pending before it is written: a kill right after the write
        _write_manifest(out, ours, pending=path.name)      # leaves it ours, and "files" names no missing file
        try:
            if fmt == "onnx":
                export_onnx(model, example_input, path)
            elif fmt == "torchscript":
                export_torchscript(model, example_input, path)
            elif fmt == "dense":
                export_dense(model, path)
            else:
                export_sparse(model, path)
        except BaseException:
            if not path.exists():   # not written: a file put there later is the user's, not to be replaced
                ours.discard(path.name)
                if had_manifest or ours - {MANIFEST}:
                    _write_manifest(out, ours)
                else:
                    (out / MANIFEST).unlink()
                    if not had_folder and not any(out.iterdir()):
                        out.rmdir()
            raise
        _write_manifest(out, ours)      # written (each file is written whole, then renamed): now listed
        written.append({"format": fmt, "path": str(path), "bytes": path.stat().st_size})
    sizes = {f["format"]: f["bytes"] for f in written}
    if "sparse" in sizes:
        dense_bytes = sizes.get("dense") or len(save(_state(model)))
        written[list(sizes).index("sparse")]["note"] = f"{sizes['sparse'] / dense_bytes:.1%} of the dense file's size"
    return written


def _write_manifest(out: Path, ours: set[str], pending: str | None = None) -> None:
    """The manifest: "files", the exported files that are there (each was written whole, then
    renamed); "pending", the one being written now, which a kill may leave missing (it stays ours:
    the next export may replace it)."""
    files = sorted(name for name in ours - {MANIFEST, pending} if (out / name).is_file())
    atomic_write_bytes(out / MANIFEST, json.dumps({"files": files, **({"pending": [pending]} if pending else {})}
                                                  ).encode())


def _written_before(out: Path) -> set[str]:
    """Names of the files an earlier export_all wrote (or was writing) in ``out``, its manifest
    included (empty when ``out`` has no manifest of ours)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        files, pending = manifest["files"], manifest.get("pending", [])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    if not all(isinstance(names, list) and all(f in FORMATS.values() for f in names) for names in (files, pending)):
        return set()
    return {*files, *pending, MANIFEST}


def _remove_stray_temps(out: Path, ours: set[str]) -> None:
    """The temporary files (``.NAME.*.tmp``) a killed export left beside the files it was writing."""
    if not out.is_dir():
        return
    for name in ours:
        for stray in out.glob(f".{name}.*.tmp"):
            stray.unlink(missing_ok=True)
