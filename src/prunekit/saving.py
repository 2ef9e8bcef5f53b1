"""Save and load models as safetensors plus a JSON sidecar; writes are atomic.

``save_model(model, "out/model.safetensors", meta)`` writes the tensors (no pickle, so loading
never executes code) and ``out/model.json`` with ``meta``: the zoo architecture and its build
arguments, the input normalization, the budget and the counts. Files are written to a
temporary name in the same folder and renamed, so a crash never leaves a half-written file.

A sidecar carries ``SIDECAR_MARK``; one written before the mark existed is known by its keys: a
string ``model`` and either prunekit's keys only or at least one key only prunekit writes
(``build_kwargs``, ``normalization``, ...), since old versions saved ``meta`` as given and users
added their own keys (a "note"). Any other JSON beside a model (a HuggingFace config, the user's
notes) is not a sidecar: reading ignores it and saving refuses to replace it.

A model file ``save_model`` wrote carries ``MODEL_MARK`` in its safetensors metadata; one written
before the mark existed is known by the prunekit sidecar beside it. Any other file at the path (the
user's own safetensors) is refused, not replaced.
"""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save
import torch
from torch import nn

from .atomic import atomic_output
from .errors import PrunekitError


SIDECAR_MARK = "prunekit_sidecar"     # key of the sidecar format's version
SIDECAR_VERSION = 1
MODEL_MARK = "prunekit-model"         # safetensors metadata key of a model file save_model wrote
_UNMARKED_KEYS = {"model", "build_kwargs", "input_shape", "input_dtype", "normalization", "image_transform", "custom",
                  "model_file_sha256", "checkpoint_sha256", "result", "channel_layout"}
_DISTINCTIVE_KEYS = _UNMARKED_KEYS - {"model"}     # one of these marks an unmarked sidecar with the user's extra keys


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def is_sidecar(obj) -> bool:
    """Whether parsed JSON ``obj`` is a prunekit sidecar: marked, or (written before the mark) an
    object with a string ``model`` whose keys are prunekit's only or include one only prunekit
    writes (old ``save_model`` kept a user's extra keys, e.g. a "note")."""
    if not isinstance(obj, dict):
        return False
    if SIDECAR_MARK in obj:
        return True
    keys = set(obj)
    return isinstance(obj.get("model"), str) and (keys <= _UNMARKED_KEYS or bool(keys & _DISTINCTIVE_KEYS))


def _header_prefix(header: dict) -> bytes:
    """The first bytes of a .safetensors file for a parsed ``header``: its length (8 bytes, little
    endian) and its JSON with the metadata keys sorted, padded with spaces to a multiple of 8 bytes
    (as safetensors pads it); the tensors' entries stay in the order given (the data's order)."""
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _tensor_file_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, bytes, int]:
    """(the sorted header's bytes, safetensors' own file bytes, where its data section starts in
    them): the file is the first followed by the second from that offset on, which a caller writes
    through a memoryview (no copy of the data: the file is held once, not three times)."""
    raw = save(tensors, metadata=metadata)
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(bytes(memoryview(raw)[8:8 + size]).decode("utf-8"))
    return _header_prefix(header), raw, 8 + size


def tensor_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a .safetensors file holding ``tensors`` (name -> contiguous CPU tensor) and the
    string ``metadata``, the same bytes for the same input in every process. safetensors' own
    ``save`` writes the metadata in a per-process random key order (a Rust HashMap), so the same
    weights would hash differently run to run; here the header is rewritten with the metadata
    keys sorted (the tensors' entries and data bytes are left as safetensors wrote them, and the
    data offsets are relative to the data section, so they hold whatever the header's length).
    Holds the file twice at its peak: to write one, ``write_tensor_file`` (once); for its size,
    ``tensor_file_size`` (no data at all)."""
    prefix, raw, start = _tensor_file_parts(tensors, metadata)
    return b"".join((prefix, memoryview(raw)[start:]))


def write_tensor_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensor_file_bytes(tensors, metadata)`` to ``path`` atomically, holding the file's
    bytes once (safetensors' ``save`` output; the sorted header is written, then its data section
    through a memoryview) where building the bytes first held them three times."""
    prefix, raw, start = _tensor_file_parts(tensors, metadata)
    with atomic_output(path) as out:
        out.write(prefix)
        out.write(memoryview(raw)[start:])


def tensor_file_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """``len(tensor_file_bytes(tensors, metadata))`` in bytes, without building the file: the
    header of a file of one-element stand-ins of the same dtypes (safetensors orders the data by
    dtype, then name, whatever the shapes), rewritten with each tensor's shape and byte range."""
    stand_ins = {name: torch.zeros(1, dtype=t.dtype) for name, t in tensors.items()}
    prefix, raw, _ = _tensor_file_parts(stand_ins, metadata)
    (size,) = struct.unpack("<Q", prefix[:8])
    parsed = json.loads(prefix[8:8 + size].decode("utf-8"))
    header, offset = {}, 0
    if "__metadata__" in parsed:
        header["__metadata__"] = parsed.pop("__metadata__")
    for name, entry in sorted(parsed.items(), key=lambda item: item[1]["data_offsets"][0]):
        tensor = tensors[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {**entry, "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return len(_header_prefix(header)) + offset


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as out:
        out.write(data)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_model(model: nn.Module, path: str | Path, meta: dict, *, replace_sidecar: bool = False,
               pruned_from: nn.Module | None = None) -> Path:
    """Save ``model``'s state dict to ``path`` (.safetensors) and ``meta`` to the sidecar. The
    smaller model a channel method returned (``prunekit.prune(..., method="autobot")``'s
    ``result.model``), or one ``prunekit.load_pruned`` returned (then fine-tuned, say), gets its
    channel layout in the sidecar too, which ``load_pruned`` reads.
    A model whose layers your own code narrowed (a conv's out-channels sliced, say) needs
    ``pruned_from``: an instance of its architecture as built before the narrowing (fresh weights
    will do; it is not changed). The sidecar then records both layer sizes (``channel_layout``), so that
    ``load_pruned(fresh_model, path)`` resizes a fresh model and refuses one built otherwise; without
    it such a file records no layout and ``load_pruned`` refuses it, saying this; where ``meta``
    names a zoo model with its build arguments (``"model"``, ``"build_kwargs"``: what ``--model``
    builds) that model as built stands for ``pruned_from``.
    A JSON of that name that is not prunekit's sidecar, or a file at ``path`` that prunekit did not
    write (no ``MODEL_MARK`` in its metadata, no prunekit sidecar beside it), is refused, not
    replaced, unless ``replace_sidecar`` (a run folder's model.json and model.safetensors, which
    only prunekit writes)."""
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"save_model(model, path, meta): model must be a torch.nn.Module, "
                            f"got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":     # ".safetensors" alone is a hidden file's name with no suffix
        stem = "model" if path.name.lower() == ".safetensors" else path.stem
        raise PrunekitError(f"model files end in .safetensors, got {path.name!r}: "
                            f"name it e.g. {stem}.safetensors")
    if not isinstance(meta, dict):
        raise PrunekitError(f"save_model(model, path, meta): meta must be a dict of JSON values (the sidecar's "
                            f"fields; {{}} for none), got {type(meta).__name__}")
    refuse_non_tensors(model, "save_model", "save that model with torch.save(model.state_dict(), ...) instead")
    if pruned_from is not None and not isinstance(pruned_from, nn.Module):
        raise PrunekitError(f"save_model(..., pruned_from=): pruned_from must be a torch.nn.Module built as the model "
                            f"was before your code narrowed it, got {type(pruned_from).__name__}")
    from .zoo.checkpoints import unwrap_parallel
    # an nn.DataParallel's weights and layout under the names of the module it wraps: the file loads
    # into the plain class and into the wrapper (load_pruned unwraps it) alike
    model = unwrap_parallel(model)
    pruned_from = unwrap_parallel(pruned_from) if pruned_from is not None else None
    meta = _with_channel_layout(model, meta, pruned_from)
    try:                 # checked before anything is written: never a model file without its sidecar
        sidecar = (json.dumps({SIDECAR_MARK: SIDECAR_VERSION, **meta}, indent=2, sort_keys=False) + "\n").encode()
    except (TypeError, ValueError) as err:
        raise PrunekitError(f"save_model(model, path, meta): meta must hold JSON values only (numbers, strings, "
                            f"lists, dicts): {err}") from None
    side = sidecar_path(path)
    if not replace_sidecar:
        _refuse_a_prunekit_folders_own(path, side)
    if side.exists() and not replace_sidecar and not _holds_sidecar(side):
        raise PrunekitError(f"{side} is not a prunekit sidecar and saving {path.name} would replace it: "
                            f"move it away, or save under another name")
    if path.exists() and not replace_sidecar and not _written_by_save_model(path, side):
        raise PrunekitError(f"{path} was not written by prunekit.save_model and saving would replace it: move it "
                            "away, or save under another name (nothing was changed)")
    _refuse_a_file_as_folder(path)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    written = None
    try:
        write_tensor_file(path, state, {"format": "pt", MODEL_MARK: "1"})
        written = path
        atomic_write_bytes(side, sidecar)
    except OSError as err:      # an unwritable folder, a full disk: named by the user's path, not the temporary's
        full = err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        raise PrunekitError(f"cannot save {path}: {err.strerror or err} writing in {path.parent}"
                            + (f" ({side.name} was not written beside it)" if written else "")
                            + (": the disk (or the quota) is full; free some space there, or save elsewhere" if full
                               else ": save into a folder you can write (or make this one writable)")) from None
    return path


def _refuse_a_file_as_folder(path: Path) -> None:
    """Refuse ``path`` where one of the folders it lies in is a file (``notes.txt/m.safetensors``)."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise PrunekitError(f"cannot save {path}: {parent} is a file, not a folder: save into a folder "
                                    "(nothing was changed)")
            return


def refuse_non_tensors(model: nn.Module, what: str, fix: str) -> None:
    """Refuse, in one line ending in ``fix``, a model whose state dict holds an entry that is not a
    tensor (the object a module's ``get_extra_state`` returns): a .safetensors file holds tensors only."""
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise PrunekitError(f"{what}: the model's state dict holds {name}, a {type(value).__name__} (a module's "
                                f"get_extra_state), and a .safetensors file holds tensors only: {fix}")


def _with_channel_layout(model: nn.Module, meta: dict, pruned_from: nn.Module | None = None) -> dict:
    """``meta`` with the channel layout of a shrunk model (``zoo.layout.is_shrunk``: the smaller model
    ``prunekit.prune``'s channel methods return, one ``prunekit.load_pruned`` resized to a saved
    layout, fine-tuned since or not, a wrapper or part of either), so that ``load_pruned`` can resize
    a fresh model to it before loading; ``meta`` as it is otherwise, or when it names a layout.

    The layout is not recorded for every model: loading applies it, and a dense model's layout
    would quietly narrow a fresh model built wider (e.g. for 100 classes where the file has 10)
    instead of refusing the misfit. Nor can it be derived here from the tensors' shapes: that needs
    the dense model to compare with, which the caller gives as ``pruned_from`` for a model its own
    code narrowed (``layout_against``)."""
    from .zoo.layout import channel_layout, is_shrunk, layout_against
    if "channel_layout" in meta:
        return meta
    if pruned_from is not None:
        layout = layout_against(model, pruned_from)
        return {**meta, "channel_layout": layout} if layout is not None else meta
    if not is_shrunk(model):
        built = _zoo_model_named(meta)       # a zoo model the sidecar names: compared with it as built
        try:
            layout = layout_against(model, built) if built is not None else None
        except PrunekitError:                # not that model at all: loading it says so
            layout = None
        return {**meta, "channel_layout": layout} if layout is not None else meta
    return {**meta, "channel_layout": channel_layout(model)}


def _zoo_model_named(meta: dict) -> nn.Module | None:
    """The zoo model ``meta`` names (``"model"`` with its ``"build_kwargs"``, ``{}`` for the defaults),
    built on the meta device (shapes only, no memory), or None: none named, or it does not build.
    Without "build_kwargs" the model is not known: loading builds it with the command line's
    --num-classes / --in-channels, which another class count than the default's is saved for."""
    from . import zoo
    name, kwargs = meta.get("model"), meta.get("build_kwargs")
    if not isinstance(name, str) or name not in zoo.MODEL_NAMES or meta.get("custom") or not isinstance(kwargs, dict):
        return None
    try:
        with torch.device("meta"):
            return zoo.build(name, **kwargs)
    except (PrunekitError, TypeError, ValueError):
        return None


def _refuse_a_prunekit_folders_own(path: Path, side: Path) -> None:
    """Refuse ``path`` (or its sidecar ``side``) where it is a file the prunekit folder it lies in
    writes (``folders.own_file``: a prune or training run's model, a sweep's or comparison's
    runs.json, an export's manifest, ...): only that command writes it. Anywhere inside a run folder
    of a sweep (``folders.inside_a_sweeps_run``, at any depth, made or not yet) is refused too: a
    sweep, run again, finishes its runs into folders a file there would be in the way of."""
    from .folders import inside_a_sweeps_run, own_file
    for target in (path, side):
        if (what := own_file(target)) is None:
            continue
        if target.name == "model.safetensors":
            raise PrunekitError(f"{path} is the model of the prunekit {what} in {path.parent} (its result): save "
                                "under another name or folder (prunekit export DIR writes copies of it; nothing was "
                                "changed)")
        raise PrunekitError(f"saving {path} would write {target.name}, a file of the prunekit {what} in "
                            f"{path.parent}: save under another name or folder (nothing was changed)")
    if (inside := inside_a_sweeps_run(path)) is not None:
        folder, run = inside
        raise PrunekitError(f"{path} lies inside {run}, a run folder of the prunekit sweep in {folder}, which writes "
                            f"that run there (a killed sweep's later runs too): save outside {run} (nothing was "
                            "changed)")


def _written_by_save_model(path: Path, side: Path) -> bool:
    """Whether the file at ``path`` is a model ``save_model`` wrote: its safetensors metadata has
    ``MODEL_MARK``, or (written before the mark) a prunekit sidecar lies beside it."""
    try:
        with safe_open(str(path), "pt") as handle:
            if MODEL_MARK in (handle.metadata() or {}):
                return True
    except (SafetensorError, OSError, ValueError):
        pass
    return side.exists() and _holds_sidecar(side)


def _holds_sidecar(side: Path) -> bool:
    try:
        return is_sidecar(json.loads(side.read_text()))
    except (OSError, ValueError):
        return False


def read_meta(path: str | Path) -> dict:
    """The JSON sidecar of a model saved by prunekit (.safetensors), or {} if it has none (a JSON
    beside it that is not prunekit's is no sidecar)."""
    side = sidecar_path(path)
    if Path(path).suffix != ".safetensors" or not side.exists():
        return {}
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise PrunekitError(f"{side} is not valid JSON ({err}): restore it if prunekit wrote it, "
                            f"else move it away from {Path(path).name}") from None
    if not is_sidecar(meta):
        return {}
    problem = _sidecar_problem(meta)
    if problem is not None:
        raise PrunekitError(f"{side} is damaged ({problem}): restore it from the run that wrote it")
    return meta


MOST_CLASSES = 1_000_000         # a build argument past this is an edit, not a model: refused before allocating


def _sidecar_problem(meta: dict) -> str | None:
    """What is wrong with the fields a model is rebuilt from (a hand-edited sidecar), or None."""
    kwargs = meta.get("build_kwargs", {})
    if not isinstance(kwargs, dict):
        return "build_kwargs is not a mapping"
    if set(kwargs) - {"num_classes", "in_channels"}:
        return f"build_kwargs holds {sorted(set(kwargs) - {'num_classes', 'in_channels'})[0]!r}, which no model takes"
    if any(not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MOST_CLASSES
           for k, v in kwargs.items() if k in ("num_classes", "in_channels")):
        return "build_kwargs num_classes / in_channels are not counts"
    shape = meta.get("input_shape", [1])
    if not (isinstance(shape, list) and shape and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                      for v in shape)):
        return "input_shape is not a list of positive integers"
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        return "class_names is not a list of class names"
    norm = meta.get("normalization")
    if norm is not None:
        ok = (isinstance(norm, dict) and all(isinstance(norm.get(k), list) and norm[k]
                                             and all(isinstance(v, (int, float)) for v in norm[k]) for k in ("mean", "std"))
              and len(norm["mean"]) == len(norm["std"]) and all(v > 0 for v in norm["std"]))
        if not ok:
            return "normalization needs lists 'mean' and 'std' of one positive std per channel"
    return None
