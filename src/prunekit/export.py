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
import re
import sys
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .cost_trace import get_mha_fastpath, set_mha_fastpath
from .errors import PrunekitError, pip_install
from .saving import atomic_write_bytes, tensor_file_size, write_tensor_file

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "dense": "model-dense.safetensors",
           "sparse": "model-sparse.safetensors"}
MANIFEST = "exported.json"       # the files export_all wrote in its folder


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def export_dense(model: nn.Module, path: str | Path) -> Path:
    """The state dict, pruned weights as zeros (safetensors; metadata ``prunekit-export: dense``,
    which a checkpoint reader names when the file holds a shrunk model)."""
    write_tensor_file(path, _state(model), {"format": "pt", "prunekit-export": "dense"})
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
    write_tensor_file(path, tensors, {"format": "prunekit-sparse", "shapes": json.dumps(shapes)})
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


def onnx_install() -> str:
    """The commands that bring the onnx package into this interpreter: the package itself, or
    prunekit's ``export`` extra (pyproject.toml)."""
    extra = pip_install("'prunekit[export]'")
    return f"{pip_install('onnx')} (or prunekit's extra: {extra})"


def require_onnx() -> None:
    """Refuse ONNX export, before anything is written, when the onnx package torch's exporter needs
    is not installed, naming the install command."""
    try:
        importlib.import_module("onnx")
    except ImportError:
        raise PrunekitError(f"ONNX export needs the onnx package, which is not installed: {onnx_install()}; "
                            "nothing was written") from None


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, *,
                normalization=None, normalize_in_graph: bool = False) -> Path:
    """ONNX graph at opset 17 with a dynamic batch dimension (TorchScript-based exporter: fast, no
    onnxscript), and a dynamic sequence dimension (dim 1) for integer (token id) inputs of a model
    that runs at another length; for masked and shrunk models alike; checked by ``onnx.checker``.
    ``normalization`` (a ``Normalization``, mean / std per channel for pixels in [0, 1]) is
    recorded in the file's metadata_props; ``normalize_in_graph`` builds ``(x - mean) / std`` into
    the graph, which then takes pixels in [0, 1]. Needs the onnx package (``python -m pip install
    onnx`` with the interpreter that runs prunekit): without it, a one-line ``PrunekitError`` saying so."""
    atomic_write_bytes(path, onnx_bytes(model, example_input, normalization=normalization,
                                        normalize_in_graph=normalize_in_graph))
    return Path(path)


def onnx_bytes(model: nn.Module, example_input: torch.Tensor, *, normalization=None,
               normalize_in_graph: bool = False, notes: list | None = None) -> bytes:
    """``export_onnx``'s file in memory (``model`` is traced in eval mode, and each module is left
    in the mode it was given, ``_traced_in_eval``); an exporter failure is a
    one-line ``PrunekitError``, and the graph dump the exporter prints on stdout then is dropped.
    ``notes``, when given, receives one line per thing the graph cannot do (a token length it fixes)."""
    require_onnx()
    graph_model = with_normalization(model, example_input, normalization) if normalize_in_graph else model
    return _onnx_bytes(graph_model, example_input, _graph_metadata(normalization, normalize_in_graph),
                       notes if notes is not None else [])


@_traced_in_eval
def _onnx_bytes(model: nn.Module, example_input: torch.Tensor, metadata: dict, notes: list) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(model, example_input, strict=False, check_trace=False)
        except Exception:  # noqa: BLE001 - the exporter's own failure (below) is the one to report
            traced = None
    axes = {0: "batch"}
    if _takes_token_ids(example_input):
        length = example_input.shape[1]
        if traced is not None and _runs_at_other_length(traced, model, example_input):
            axes[1] = "sequence"
        else:
            notes.append(f"the ONNX graph takes {length} tokens only (dims [batch, {length}]): the model did not "
                         f"give the same outputs at another length when traced")
    metadata = {**metadata, "prunekit.dynamic_axes": ", ".join(f"{d}: {n}" for d, n in axes.items())}
    outputs = _output_names(model, example_input)
    import onnx
    proto = None
    if outputs is not None and [name for name, _, _ in outputs] != ["output"]:
        proto = _exported(model, example_input, axes, outputs, raise_failure=False)
        if proto is not None and [len(o.type.tensor_type.shape.dim) for o in proto.graph.output] != \
                [ndim for _, ndim, _ in outputs]:
            proto = None            # the exporter flattened the output otherwise: not named by guess
    if proto is None:
        # one tensor: its own batch axis or none; else the exporter's first output, as ever, with one
        outputs = outputs if outputs is not None and len(outputs) == 1 else [("output", 1, True)]
        proto = _exported(model, example_input, axes, outputs)
    else:
        metadata = {**metadata, "prunekit.outputs": ", ".join(name for name, _, _ in outputs)}
    if traced is not None:
        check_any_batch(traced, model, example_input, "ONNX")
    onnx.checker.check_model(proto)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def _exported(model: nn.Module, example_input: torch.Tensor, axes: dict, outputs: list[tuple[str, int, bool]],
              raise_failure: bool = True):
    """The ONNX ModelProto of ``model`` with input "input" (``axes``: its dynamic axes) and outputs named
    ``outputs`` ((name, ndim, batched) in the order the exporter flattens them: a dynamic axis 0 "batch"
    where ``batched``, i.e. the output's axis 0 follows the input's batch; a fixed one elsewhere); an
    exporter failure is a one-line ``PrunekitError`` (None if not ``raise_failure``)."""
    import onnx
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _no_exporter_log():
        warnings.simplefilter("ignore")     # the exporter's deprecation notes are not for our users
        try:
            torch.onnx.export(model, (example_input,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=[name for name, _, _ in outputs],
                              dynamic_axes={"input": axes, **{name: {0: "batch"} for name, _, batched in outputs if batched}})
        except Exception as err:  # noqa: BLE001 - report any exporter failure as one line
            if not raise_failure:
                return None
            raise PrunekitError(_onnx_failure(err, model, example_input)) from None
    return onnx.load_from_string(buffer.getvalue())


def _output_names(model: nn.Module, example_input) -> list[tuple[str, int, bool]] | None:
    """(name, ndim, batched) of each tensor of the model's output on ``example_input``, in the order the
    ONNX exporter flattens them: "output" for a tensor, a dict's keys ("logits", "aux"; nested: "aux.mask"),
    "output_0", "output_1" ... for a tuple or list (nested: "output_1.0"). ``batched``: its axis 0 follows
    the input's batch, i.e. is the example's batch size B there and B + 1 on a batch one larger (a mean
    over the batch, ``x.mean(0)``, has none; where the larger batch fails every output of rank >= 1 counts
    as batched: ``check_any_batch`` refuses such a graph). None where the forward fails or the names
    would not be unique (the exporter's own failure, or "output" and numbers, then)."""
    try:
        with torch.no_grad():
            out = model(example_input)
    except Exception:  # noqa: BLE001 - the exporter's own message is the one to give then
        return None

    def walk(value, name: str, found: list, depth: int = 0) -> list[tuple[str, torch.Tensor]]:
        if depth > 20:
            return found
        if isinstance(value, torch.Tensor):
            found.append((name or "output", value))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{name}.{key}" if name else str(key), found, depth + 1)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(item, f"{name}.{i}" if name else f"output_{i}", found, depth + 1)
        return found
    tensors = walk(out, "", [])
    batch = len(example_input) if isinstance(example_input, torch.Tensor) and example_input.ndim else None
    larger: dict[str, torch.Tensor] | None = None
    if batch is not None:
        try:
            with torch.no_grad():
                larger = dict(walk(model(torch.cat([example_input, example_input[:1]])), "", []))
        except Exception:  # noqa: BLE001 - check_any_batch names that fault
            larger = None

    def batched(name: str, value: torch.Tensor) -> bool:
        if value.dim() == 0 or batch is None:
            return False
        if larger is None or name not in larger:
            return True
        other = larger[name]
        return value.shape[0] == batch and other.dim() > 0 and other.shape[0] == batch + 1
    names = [(name, value.dim(), batched(name, value)) for name, value in tensors]
    unique = {name for name, _, _ in names}
    if not names or len(unique) < len(names) or "input" in unique:
        return None
    return names


def _takes_token_ids(example_input) -> bool:
    """An integer input of shape (batch, tokens): token ids, whose length may vary (an integer
    image, (N, C, H, W), is not one)."""
    return (isinstance(example_input, torch.Tensor) and example_input.ndim == 2
            and not example_input.is_floating_point() and not example_input.is_complex()
            and example_input.dtype != torch.bool)


def _runs_at_other_length(traced, model: nn.Module, example_input: torch.Tensor) -> bool:
    """Whether the traced graph gives the model's outputs on ``example_input`` one token shorter
    (one longer for a single token): the length is no constant in it, and the model takes it."""
    length = example_input.shape[1]
    other = example_input[:, :length - 1] if length > 1 else torch.cat([example_input, example_input], 1)
    try:
        with torch.no_grad():
            expected = torch.utils._pytree.tree_leaves(model(other))
            got = torch.utils._pytree.tree_leaves(traced(other))
    except Exception:  # noqa: BLE001 - a model or graph that fails at another length has a fixed one
        return False
    return len(got) == len(expected) and all(
        not isinstance(a, torch.Tensor) or (isinstance(b, torch.Tensor) and a.shape == b.shape
                                            and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-5))
        for a, b in zip(expected, got))


class NormalizedInput(nn.Module):
    """``model`` fed ``(x - mean) / std``: x of shape (N, C, ...) (or any shape for one channel),
    pixels scaled to [0, 1]; mean and std are buffers of shape (1, C, 1, ...)."""

    def __init__(self, model: nn.Module, mean, std, ndim: int, dtype=torch.float32):
        super().__init__()
        self.model = model
        shape = (1, len(mean)) + (1,) * (ndim - 2) if len(mean) > 1 else (1,)
        self.register_buffer("mean", torch.tensor(mean, dtype=dtype).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=dtype).view(shape))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def with_normalization(model: nn.Module, example_input: torch.Tensor, normalization) -> nn.Module:
    """``model`` wrapped so that it takes pixels in [0, 1] and normalizes them itself
    (``NormalizedInput``); refuses an input it cannot apply ``normalization`` to."""
    if normalization is None:
        raise PrunekitError("normalize_in_graph needs the model's normalization (mean / std), and none is "
                            "recorded: give normalization=, or leave normalize_in_graph out")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise PrunekitError("normalize_in_graph is for image inputs (floating point); this model takes "
                            f"{getattr(example_input, 'dtype', type(example_input).__name__)}: leave it out")
    channels = len(normalization.mean)
    if channels > 1 and (example_input.ndim < 2 or example_input.shape[1] != channels):
        raise PrunekitError(f"normalize_in_graph: the normalization has {channels} channels but the input's "
                            f"shape is {tuple(example_input.shape)} (channels at dim 1 expected): leave it out")
    device = example_input.device
    return NormalizedInput(model, normalization.mean, normalization.std, example_input.ndim,
                           example_input.dtype).to(device)


def normalization_record(normalization, normalize_in_graph: bool) -> dict | None:
    """What exported.json says of the inputs the graphs take (None: no normalization known)."""
    if normalization is None:
        return None
    return {"mean": list(normalization.mean), "std": list(normalization.std), "in_graph": bool(normalize_in_graph),
            "graph_input": ("pixels scaled to [0, 1] (the graph normalizes them)" if normalize_in_graph else
                            "pixels scaled to [0, 1], then (x - mean) / std per channel")}


def _graph_metadata(normalization, normalize_in_graph: bool) -> dict:
    """The ONNX metadata_props entries for the input normalization (strings)."""
    if normalization is None:
        return {}
    # repr: the shortest text that reads back as the same float (%g kept 6 digits: 0.48145466 -> 0.481455)
    return {"prunekit.normalize_mean": ",".join(repr(float(v)) for v in normalization.mean),
            "prunekit.normalize_std": ",".join(repr(float(v)) for v in normalization.std),
            "prunekit.input_range": normalization_record(normalization, normalize_in_graph)["graph_input"],
            "prunekit.normalize_in_graph": str(bool(normalize_in_graph)).lower()}


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
            raise PrunekitError(_torchscript_failure(err, model, example_input)) from None
        finally:
            set_mha_fastpath(fastpath)
    check_any_batch(traced, model, example_input, "TorchScript")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)



WRAP_EXAMPLE = ("class Logits(nn.Module): def __init__(self, m): super().__init__(); self.m = m; "
                "def forward(self, x): return self.m(x).logits")


def _first_line(err: BaseException, limit: int = 300) -> str:
    """Torch's error text cut to one readable line: its first line, without the "[Caused by"
    tail, ending before any printed tensor (a tracer's message may print a whole output), at
    most ``limit`` characters."""
    text = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split("  [Caused by")[0]
    cut = text.find("tensor(")
    if cut >= 0:
        text = text[:cut].rstrip(" ,=([") + " ..."
    return text if len(text) <= limit else text[:limit - 4].rstrip() + " ..."


def _output_containers(model: nn.Module, example_input) -> tuple[str | None, str | None]:
    """What the model's output holds besides tensors, from one forward on ``example_input``:
    (the type name of the first dict in it, e.g. a HuggingFace ``ModelOutput``; the type name of
    the first object that is neither a tensor, a container nor a plain number, e.g. a
    ``DynamicCache``). (None, None) for tensors and tuples / lists of them, or when the forward
    itself fails."""
    try:
        with torch.no_grad():
            out = model(example_input)
    except Exception:  # noqa: BLE001 - the exporter's own message is the one to give then
        return None, None
    found = {"dict": None, "object": None}

    def walk(value, depth=0):
        if depth > 20 or isinstance(value, (torch.Tensor, int, float, bool, str, type(None))):
            return
        if isinstance(value, dict):
            found["dict"] = found["dict"] or type(value).__name__
            for item in value.values():
                walk(item, depth + 1)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item, depth + 1)
        else:
            found["object"] = found["object"] or type(value).__name__
    walk(out)
    return found["dict"], found["object"]


def _onnx_failure(err: BaseException, model: nn.Module, example_input) -> str:
    """The one-line refusal for an exporter failure, naming its cause and the fix where there is one."""
    _, obj = _output_containers(model, example_input)
    if obj is not None:
        return (f"ONNX export failed: the model's output holds a {obj} (a cache or other object, not a tensor), "
                "which an ONNX graph cannot return: build the model with use_cache=False (HuggingFace: "
                "from_pretrained(..., use_cache=False)) or wrap it so forward returns a tensor or a tuple of "
                f"tensors ({WRAP_EXAMPLE})")
    op = re.search(r"Exporting the operator '([^']+)' to ONNX opset version (\d+) is not supported", str(err))
    if op:
        later = _later_opset(op.group(1), int(op.group(2)))
        return (f"ONNX export failed: the model uses {op.group(1)}, which torch.onnx's TorchScript exporter "
                f"(the one prunekit uses) has no ONNX form for at opset {op.group(2)}"
                f"{f' (it has one from opset {later} on)' if later else ', nor at any later opset'}: "
                "prunekit cannot export this model to ONNX as it is (its dense and sparse exports do not need it); "
                f"{HF_DIFF_HINT if op.group(1) == 'aten::diff' else ''}{DYNAMO_HINT}")
    return f"ONNX export failed: {_first_line(err)}"


def _later_opset(op: str, opset: int) -> int | None:
    """The first opset above ``opset`` at which torch's TorchScript exporter has ``op`` (None: none,
    or torch's registry cannot be read)."""
    try:
        from torch.onnx._internal.torchscript_exporter import registration
        return next((o for o in range(opset + 1, 26) if registration.registry.is_registered_op(op, o)), None)
    except Exception:  # noqa: BLE001 - a private registry: without it, say nothing of later opsets
        return None


HF_DIFF_HINT = ("a HuggingFace model calls it only when no attention_mask is given: export a wrapper whose "
                "forward is return self.m(ids, attention_mask=torch.ones_like(ids)).logits (built with "
                "use_cache=False); otherwise ")
DYNAMO_HINT = ("torch's dynamo exporter may: torch.onnx.export(model, (example,), dynamo=True) from Python "
               f"(needs {pip_install('onnxscript')})")


def _torchscript_failure(err: BaseException, model: nn.Module, example_input) -> str:
    """The one-line refusal for a tracer failure: a dict or an object in the output names the wrapper
    that fixes it; anything else is torch's first line, without printed tensors."""
    dict_type, obj = _output_containers(model, example_input)
    if dict_type is not None or obj is not None:
        what = f"{dict_type} (a dict)" if dict_type is not None else f"{obj} (not a tensor)"
        extra = f" and a {obj} (a cache: build the model with use_cache=False)" if dict_type and obj else ""
        return (f"TorchScript export failed: the model's forward returns {what}{extra}, which a traced "
                "TorchScript module cannot return: wrap it so forward returns a tensor or a tuple of tensors "
                f"({WRAP_EXAMPLE}; a HuggingFace model: or build it with return_dict=False, use_cache=False) "
                "and export the wrapper")
    return f"TorchScript export failed: {_first_line(err)}"


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


def export_all(model: nn.Module, example_input: torch.Tensor, out: str | Path, formats, *,
               normalization=None, normalize_in_graph: bool = False) -> list[dict]:
    """Write each of ``formats`` (keys of FORMATS, or one of them as a string) into folder ``out``;
    returns path, size per file (and a "note" where a file has a limit, e.g. an ONNX graph that
    fixes its token length). Refuses (``PrunekitError``, before writing anything) an unknown
    format, "onnx" without the onnx package installed, and to replace a file in ``out`` that an
    earlier ``export_all`` did not write. The
    graphs are traced in eval mode; ``model`` comes back in the mode it was given (each module's).

    ``normalization`` (a ``prunekit.data.Normalization``: per-channel mean / std of pixels scaled
    to [0, 1]) is the one the model was trained with: the graphs take inputs normalized so, and
    say so (ONNX metadata_props ``prunekit.normalize_mean`` / ``_std`` / ``input_range``; the
    manifest's "graphs" record per graph file). ``normalize_in_graph=True`` builds ``(x - mean) / std`` into the
    ONNX and TorchScript graphs instead, which then take pixels in [0, 1]."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise PrunekitError(f"formats: unknown export format {unknown[0]!r}; choose from {', '.join(FORMATS)}")
    graph_model = model
    if normalize_in_graph:
        graph_model = with_normalization(model, example_input, normalization)     # refused before any write
    record = normalization_record(normalization, normalize_in_graph)      # of the graphs written now
    if "onnx" in formats:
        require_onnx()          # before any format is written: not the others, then a failure
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"{out} is a file: exports go into a folder")
    ours = _written_before(out)
    graphs = _graph_records(out) if ours else {}      # an earlier export's graphs' records, kept while they are
    for path in [out / FORMATS[fmt] for fmt in formats] + [out / MANIFEST]:
        if path.exists() and path.name not in ours:
            raise PrunekitError(f"{path} was not written by prunekit export: move it away or export "
                                "elsewhere (nothing was changed)")
    written, had_manifest, had_folder = [], (out / MANIFEST).exists(), out.exists()
    _remove_stray_temps(out, ours)
    for fmt in formats:
        path = out / FORMATS[fmt]
        ours.add(path.name)       # listed as pending before it is written: a kill right after the write
        graphs.pop(path.name, None)     # leaves it ours, "files" names no missing file (nor its old record)
        _write_manifest(out, ours, pending=path.name, graphs=graphs)
        notes: list[str] = []
        try:
            if fmt == "onnx":
                atomic_write_bytes(path, onnx_bytes(model, example_input, notes=notes, normalization=normalization,
                                                    normalize_in_graph=normalize_in_graph))
            elif fmt == "torchscript":
                export_torchscript(graph_model, example_input, path)
            elif fmt == "dense":
                export_dense(model, path)
            else:
                export_sparse(model, path)
        except BaseException:
            if not path.exists():   # not written: a file put there later is the user's, not to be replaced
                ours.discard(path.name)
                if had_manifest or ours - {MANIFEST}:
                    _write_manifest(out, ours, graphs=graphs)
                else:
                    (out / MANIFEST).unlink()
                    if not had_folder and not any(out.iterdir()):
                        out.rmdir()
            raise
        if fmt in ("onnx", "torchscript") and record is not None:
            graphs[path.name] = record
        _write_manifest(out, ours, graphs=graphs)     # written (each file is written whole, then renamed): now listed
        written.append({"format": fmt, "path": str(path), "bytes": path.stat().st_size,
                        **({"note": "; ".join(notes)} if notes else {})})
    sizes = {f["format"]: f["bytes"] for f in written}
    if "sparse" in sizes:
        dense_bytes = sizes.get("dense") or tensor_file_size(_state(model))
        written[list(sizes).index("sparse")]["note"] = f"{sizes['sparse'] / dense_bytes:.1%} of the dense file's size"
    return written


def _write_manifest(out: Path, ours: set[str], pending: str | None = None, graphs: dict | None = None) -> None:
    """The manifest: "files", the exported files that are there (each was written whole, then
    renamed); "pending", the one being written now, which a kill may leave missing (it stays ours:
    the next export may replace it); "graphs", per graph file listed, what inputs it takes
    (``normalization_record``: each export call may differ, so each file keeps its own, across
    later calls that leave it); "normalization", that record once more where every graph listed
    has the same one (what manifests before "graphs" held: left out where they differ)."""
    files = sorted(name for name in ours - {MANIFEST, pending} if (out / name).is_file())
    records = {name: graphs[name] for name in files if name in (graphs or {})}
    listed_graphs = [name for name in files if name in (FORMATS["onnx"], FORMATS["torchscript"])]
    one = {json.dumps(records.get(name), sort_keys=True) for name in listed_graphs}
    shared = ({"normalization": records[listed_graphs[0]]} if len(one) == 1 and listed_graphs
              and listed_graphs[0] in records else {})
    atomic_write_bytes(out / MANIFEST, json.dumps({"files": files, **({"pending": [pending]} if pending else {}),
                                                   **({"graphs": records} if records else {}), **shared}).encode())


def _graph_records(out: Path) -> dict[str, dict]:
    """The "graphs" records of ``out``'s manifest (empty for one without them: a manifest before
    them held one "normalization" that may be another call's, so it is not attributed to a file)."""
    try:
        graphs = json.loads((out / MANIFEST).read_text()).get("graphs", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(graphs, dict):
        return {}
    return {name: record for name, record in graphs.items()
            if name in (FORMATS["onnx"], FORMATS["torchscript"]) and isinstance(record, dict)}


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
