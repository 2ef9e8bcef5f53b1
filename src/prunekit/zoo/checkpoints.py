"""Reading checkpoints into zoo models without executing anything from the file.

Three file kinds are read:

* ``.safetensors`` files, through ``safetensors`` (a plain tensor format, no code at all);
* PyTorch files (zip or legacy format) through ``torch.load(weights_only=True)``;
* PyTorch files that ``weights_only=True`` refuses because they pickle other objects (an
  optimizer, a scheduler ...) next to the weights, through :mod:`prunekit.zoo.restricted_pickle`,
  which rebuilds tensors only and replaces every other object by an inert placeholder.

The state dict is then found inside the file (top level, ``state_dict``, ``model_state_dict``
or ``model``) and its keys normalized to the zoo's names: ``module.`` and ``_orig_mod.``
prefixes stripped (DataParallel, torch.compile), ``X._layer.weight`` renamed ``X.weight`` and
``X._weight_mask`` entries applied to ``X.weight`` and dropped (the WoodFisher / CHITA
masked-layer wrappers); a prefix every key shares (a training wrapper's attribute, such as
Lightning's ``model.``) is dropped where the keys then are the model's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import pickle
import warnings
import re
import stat
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torch.nn.parameter import is_lazy

from prunekit.errors import PrunekitError
from prunekit.zoo import restricted_pickle
from prunekit.zoo.registry import MODEL_NAMES, build

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_MASK_KEY = re.compile(r"^(?P<owner>.*)\._(?P<param>[A-Za-z0-9]+)_mask$")  # "fc1._weight_mask"
_TOLERATED_MISSING = "num_batches_tracked"  # absent from checkpoints saved by PyTorch < 0.4.1


CHECKPOINT_HINT = "pass a torch.save file (.pth, .pt, .ckpt) or a prunekit .safetensors"


def check_checkpoint_path(path: str | Path, hint: str = CHECKPOINT_HINT) -> None:
    """Refuse a checkpoint path that is a folder, no file at all, or a file of another kind (text,
    an image ...: ``hint`` says what to pass instead)."""
    path = Path(path)
    if path.is_dir():
        inside = path / "model.safetensors"
        hint = f" (this one holds {inside})" if inside.is_file() else ""
        raise PrunekitError(f"checkpoint {path} is a folder, not a file: pass the checkpoint file{hint}")
    if path.exists() and not path.is_file():
        raise PrunekitError(f"checkpoint {path} is {_special_kind(path)}, not a file: {hint}")
    if not path.is_file() and path.name == "model.safetensors" and not path.parent.exists():
        # a run folder's model named before its run was made (a README block run ahead of its recipe)
        raise PrunekitError(f"checkpoint {path} not found: {path.parent} is not made yet: run the `prunekit train` or "
                            f"`prunekit prune` command that writes --out {path.parent} first (or check the path)")
    if not path.is_file():
        raise PrunekitError(f"checkpoint {path} not found: check the path")
    refusal = export_refusal(path, "not a checkpoint")
    if refusal:
        raise PrunekitError(refusal)
    other = _other_kind(path)
    if other:
        raise PrunekitError(f"{path} is not a model checkpoint ({other}): {hint}")


def export_refusal(path: str | Path, said: str) -> str | None:
    """The line refusing ``path`` where it is a TorchScript or ONNX export (as ``prunekit export``
    writes), which no command reads as a model: ``said`` what it is not ("not a checkpoint"),
    and what to pass instead, the run folder it came from where it lies in one; None for any other
    path (one that is no file included)."""
    path = Path(path)
    if not path.is_file():
        return None
    export = _export_file_kind(path)
    if not export:
        return None
    run = path.parent.parent if path.parent.name == "export" else None
    run = run if run is not None and (run / "model.safetensors").is_file() else None
    where = f" ({run}, or {run / 'model.safetensors'})" if run is not None else ""
    article = "an" if export[0] in "AEIOU" else "a"
    return (f"{path} is {article} {export} export (as `prunekit export` writes), {said}: pass "
            f"the run folder it was exported from, or its model.safetensors{where}")


def _export_file_kind(path: Path) -> str | None:
    """"TorchScript" for a torch.jit.save archive (a zip holding code and constants.pkl), "ONNX"
    for an ONNX model (named .onnx, or a protobuf that starts as ONNX's ModelProto does: its
    ir_version, then its producer or graph), else None; only the file's head (and a zip's list of
    names) is read."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(_ZIP_START):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        torchscript = any(n.endswith("/constants.pkl") or "/code/__torch__" in n for n in names)
        return "TorchScript" if torchscript else None
    if head[:1] == b"\x80" or (len(head) >= 9 and head[8:9] == b"{"):
        return None          # a pickle, or safetensors (whose header length may start with 0x08)
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and len(head) > 2 and head[2:3] in (b"\x12", b"\x3a")):
        return "ONNX"
    return None


def _special_kind(path: Path) -> str:
    """What a path that exists but is neither a file nor a folder is (``/dev/null``: a device)."""
    mode = path.stat().st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def _other_kind(path: Path) -> str | None:
    """What ``path`` holds when its first bytes show that it is none of the files a checkpoint can be
    (torch.save's zip or legacy pickle, an old torch tar, safetensors), else None. Only the first
    bytes are read; a file that passes may still fail to load, with the reader's own message."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(_ZIP_START) or head[:1] == b"\x80" or head[257:262] == b"ustar":
        return None          # torch.save's zip, a pickle (torch's legacy format or a plain one), a tar
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 2**32:
        return None          # safetensors: the length of its JSON header, then the header
    if not head:
        return "an empty file"
    for magic, kind in _OTHER_MAGIC:
        if head.startswith(magic):
            return kind
    if b"\0" not in head and _is_utf8(head):
        return "a text file"
    return "neither a torch.save file nor safetensors"


def _is_utf8(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start >= len(head) - 3        # only a character cut off by the end of the bytes read
    return True


_OTHER_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                (b"%PDF", "a PDF file"), (b"\x93NUMPY", "a NumPy .npy array"), (b"\x1f\x8b", "a gzip file"),
                (b"\x7fELF", "a program"))


# A checkpoint read before the model it goes into can be built (``read_ahead``): {file key: state dict},
# at most one, given to the next ``read_state_dict`` of the same unchanged file; kept for one command
# call only (``reading_ahead``: dropped however the call ends, a refusal or a finished run's result)
_READ_AHEAD: dict[tuple, dict[str, torch.Tensor]] = {}


@contextlib.contextmanager
def reading_ahead():
    """The scope of ``read_ahead``'s state dict: one command call (``prunekit train``'s), on whose
    way out it is dropped, used or not (a refusal after the read, a finished run given back
    without building the model), so that a long process (a notebook calling ``cli.main``) does not
    keep a whole checkpoint."""
    try:
        yield
    finally:
        _READ_AHEAD.clear()


def _file_key(path: Path) -> tuple:
    """What tells one file from another, or from itself changed: its resolved path, size and mtime."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def read_ahead(path: str | Path) -> None:
    """Read checkpoint ``path`` now, before the model it goes into is built (its refusals: a file
    that is no checkpoint, holds no state dict, or that ``weights_only`` loading refuses), keeping its
    state dict for the next ``read_state_dict`` of the same unchanged file, so that it is read once:
    ``prunekit train`` builds its model only once the image folder's scan says its classes and image
    shape, and refuses such a file before that scan. One file is kept at a time (the next call
    replaces it; a file changed since is read again)."""
    path = Path(path)
    state = read_state_dict(path)
    _READ_AHEAD.clear()
    _READ_AHEAD[_file_key(path)] = state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights stored in checkpoint ``path``, on the CPU, under normalized names (read
    once where ``read_ahead`` read it already).

    Raises :class:`PrunekitError` if the file is missing, unreadable or holds no state dict.
    """
    path = Path(path)
    if _READ_AHEAD:
        try:
            ahead = _READ_AHEAD.pop(_file_key(path), None)
        except OSError:
            ahead = None
        if ahead is not None:
            return ahead
    check_checkpoint_path(path)
    raw = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
    if _export_kind(path) == "sparse":
        from prunekit.export import load_sparse      # export imports the cost model: not at zoo import
        raw = load_sparse(path)
    return _normalize(_find_state_dict(raw, path), path)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load the weights of checkpoint ``path`` into ``model`` (in place).

    Every parameter and buffer of ``model`` must be in the checkpoint with the same shape (a
    missing BatchNorm ``num_batches_tracked`` keeps the model's value) and the checkpoint must
    hold nothing else; otherwise :class:`PrunekitError` says what differs and, when one fits,
    which zoo model the checkpoint was made for. The model is left unchanged on error.
    """
    state = _without_wrapper_prefix(read_state_dict(path), model.state_dict())
    refusal = misfit(model, state, path)
    if refusal is not None:
        raise PrunekitError(refusal)
    own = model.state_dict()
    kept = {k: v for k, v in own.items() if k not in state}  # tolerated num_batches_tracked
    model.load_state_dict({**state, **kept}, strict=True)


def check_fits_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Refuse checkpoint ``path`` as ``load_checkpoint(model, path)`` would, loading nothing: ``model``
    may be built on the meta device (its names, shapes and dtypes are what is compared). The state
    dict ``read_ahead`` keeps is looked at, not taken (``load_checkpoint`` takes it)."""
    try:
        ahead = _READ_AHEAD.get(_file_key(Path(path))) if _READ_AHEAD else None
    except OSError:
        ahead = None
    state = ahead if ahead is not None else read_state_dict(path)     # (the refusal names path as given)
    refusal = misfit(model, _without_wrapper_prefix(state, model.state_dict()), path)
    if refusal is not None:
        raise PrunekitError(refusal)


def misfit(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> str | None:
    """The line refusing state dict ``state`` (checkpoint ``path``'s, its wrapper prefix removed) for
    ``model``: a layer pruned with torch.nn.utils.prune, missing / unexpected keys or other shapes
    (``_misfit_message``), integer weights for a float model; None where it loads."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_TOLERATED_MISSING)]
    unexpected = [k for k in state if k not in own]
    # a lazy module's parameter not made yet (no shape) is made to the checkpoint's by load_state_dict
    own = {k: v for k, v in own.items() if not is_lazy(v)}
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    masked = [k[:-len("_orig")] for k in unexpected
              if k.endswith("_orig") and k[:-len("_orig")] + "_mask" in state and k[:-len("_orig")] in missing]
    if masked:              # torch.nn.utils.prune's state dict: weight_orig and weight_mask, no weight
        module, _, local = masked[0].rpartition(".")
        return (f"checkpoint {path} holds '{masked[0]}_orig' and '{masked[0]}_mask' in place of "
                f"'{masked[0]}' (a layer pruned with torch.nn.utils.prune): call "
                f"torch.nn.utils.prune.remove(model.{module or '<module>'}, {local!r}) on each such "
                "layer before saving its state_dict, then load that file")
    if missing or unexpected or mismatched:
        return _misfit_message(model, state, path, missing, unexpected, mismatched)
    lossy = next((k for k in state if k in own and own[k].is_floating_point()
                  and not state[k].is_floating_point()), None)
    if lossy is not None and state[lossy].is_complex():   # copied in, its imaginary parts dropped
        return (f"checkpoint {path} holds '{lossy}' as {state[lossy].dtype}, where the model has "
                f"{own[lossy].dtype} weights: a complex-valued checkpoint, whose imaginary parts would be dropped; "
                "load the real-valued one")
    if lossy is not None:           # int8 weights copied into a float model: a silently wrong model
        return (f"checkpoint {path} holds '{lossy}' as {state[lossy].dtype}, where the model has "
                f"{own[lossy].dtype} weights: a quantized or integer checkpoint; load the float one")
    return _untied(model, state, path)


def _untied(model: nn.Module, state: Mapping[str, torch.Tensor], path) -> str | None:
    """The refusal of ``state`` where it holds different values for the names of one parameter the
    model ties (``b.weight = a.weight``: loading would keep the last, silently); else None."""
    from prunekit.zoo.layout import tied_parameters
    for holders in tied_parameters(model):
        keys = [f"{name}.{attr}" if name else attr for name, attr in holders]
        keys = [k for k in keys if k in state]
        differ = next((k for k in keys[1:] if state[k].shape != state[keys[0]].shape
                       or not torch.equal(state[k], state[keys[0]])), None)
        if differ is not None:
            return (f"checkpoint {path} holds different '{keys[0]}' and '{differ}', which the model ties (one "
                    f"tensor): build the model without the tie ({differ} = {keys[0]}) to load this file")
    return None


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module an ``nn.DataParallel`` / ``DistributedDataParallel`` wrapper holds (through nested
    wrappers), else ``model``. A saved model's weights and channel layout are named as the wrapped
    module names them (no ``module.`` prefix), so that a file loads into the plain class and into
    the wrapper alike; they share their parameters."""
    from torch.nn.parallel import DistributedDataParallel
    while isinstance(model, (nn.DataParallel, DistributedDataParallel)):
        model = model.module
    return model


def _without_wrapper_prefix(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict:
    """``state`` with a prefix every key shares removed when that makes its keys the model's (a
    training wrapper's attribute, e.g. Lightning's ``model.``); else ``state`` as it is."""
    if not state or set(state) <= set(own):
        return state
    prefix = next(iter(state)).partition(".")[0] + "."
    if all(k.startswith(prefix) for k in state):
        stripped = {k[len(prefix):]: v for k, v in state.items()}
        if set(stripped) <= set(own):
            return stripped
    return state


def _export_kind(path: Path) -> str | None:
    """"dense" or "sparse" for a file ``prunekit export`` wrote (by its safetensors metadata, or,
    for a dense export of a version that did not mark it, its folder's exported.json), else None."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata() or {}
        listed = json.loads((path.parent / "exported.json").read_text())["files"] \
            if (path.parent / "exported.json").is_file() else []
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None
    if meta.get("format") == "prunekit-sparse":
        return "sparse"
    if path.name == "model-dense.safetensors" and isinstance(listed, list) and path.name in listed:
        return "dense"
    return meta.get("prunekit-export")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise _damaged(path, err, "safetensors") from None


def _read_torch(path: Path) -> object:
    if _is_plain_pickle(path):
        raise PrunekitError(
            f"checkpoint {path} is a plain pickle (pickle.dump), not a torch.save file, and prunekit "
            "never unpickles arbitrary objects: save it with torch.save(model.state_dict(), path) "
            "or as .safetensors")
    try:
        with _quiet_torch_load():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # it pickles non-tensor objects: read it again, neutralizing them
    except Exception as err:  # torch raises many types for files that are not checkpoints
        raise _damaged(path, err) from None
    try:
        # weights_only=False is required to pass a pickle_module; the restricted module
        # resolves only tensor-rebuild functions, so nothing from the file is executed.
        with _quiet_torch_load():
            return torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle
            )
    except Exception as err:
        raise _damaged(path, err) from None


def _damaged(path: Path, err: BaseException, kind: str = "torch.save") -> PrunekitError:
    """The refusal of checkpoint ``path`` that torch.load (``kind`` "torch.save") or safetensors
    failed on: one line naming the file and the fix. The reader's own words (a truncated zip
    archive's "[Errno 22] Invalid argument", a damaged pickle's "invalid load key, '\\xf5'", a
    safetensors header's "incomplete metadata") say nothing more to the user than "damaged", so they
    are left out; an error of reading the file (EIO, EACCES, ...) is the cause, so it is named."""
    if isinstance(err, MemoryError):
        return PrunekitError(f"cannot read checkpoint {path}: out of memory reading it; free memory, or load it on a "
                             "machine with more")
    if isinstance(err, OSError) and err.errno not in (None, errno.EINVAL) and err.strerror:
        return PrunekitError(f"cannot read checkpoint {path}: {err.strerror}: check the file and the disk it is on "
                             "(or copy it elsewhere and pass that copy)")
    if kind == "torch.save" and _truncated_zip(path):
        return PrunekitError(f"checkpoint {path} is cut short (its zip archive has no end, as a copy or download that "
                             "stopped leaves it): save or download it again")
    return PrunekitError(f"checkpoint {path} is damaged (it does not read as a {kind} file): save or download it again")


def _truncated_zip(path: Path) -> bool:
    """Whether ``path`` starts as a zip archive (torch.save's format) but has no end (its central
    directory), as a copy or download cut short leaves it."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != _ZIP_START:
                return False
        zipfile.ZipFile(path).close()
    except zipfile.BadZipFile:
        return True
    except OSError:
        return False
    return False


# torch.save's two formats: a zip archive, or (legacy) a pickle that starts with this magic number.
_ZIP_START = b"PK\x03\x04"
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_plain_pickle(path: Path) -> bool:
    """A pickle (protocol 2+ starts with 0x80) in neither of torch.save's formats."""
    with open(path, "rb") as handle:
        head = handle.read(32)
    return head[:1] == b"\x80" and not head.startswith(_ZIP_START) and _LEGACY_MAGIC not in head


@contextlib.contextmanager
def _quiet_torch_load():
    """Silence torch's notice about a pickle protocol its weights-only reader was not made for:
    when such a file cannot be read, our error says why in one line; when it can, all is well."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _find_state_dict(raw: object, path: Path) -> Mapping[str, torch.Tensor]:
    if _is_state_dict(raw):
        return raw  # type: ignore[return-value]
    if isinstance(raw, Mapping):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(raw.get(key)):
                return raw[key]
        for state in (raw, *(raw.get(k) for k in _STATE_DICT_KEYS)):
            array = _numpy_entry(state)
            if array is not None:
                raise PrunekitError(
                    f"checkpoint {path} holds NumPy arrays ('{array}' ...), not torch tensors, and prunekit never "
                    "unpickles NumPy objects: save {name: torch.from_numpy(array)} with torch.save, or as .safetensors")
        inert = _inert_entry(raw)
        if inert is not None:        # weights_only refused it: read as a placeholder, nothing executed
            key, source = inert
            raise PrunekitError(
                f"checkpoint {path} holds Python objects ({source} under {key!r}) that prunekit will not load (it "
                "loads tensors only, as torch.load(..., weights_only=True) does): re-save the weights as a plain "
                "state dict, torch.save(model.state_dict(), path), or as .safetensors")
        found = ", ".join(repr(k) for k in list(raw)[:8])
        raise PrunekitError(
            f"checkpoint {path} holds no state dict (top-level keys: {found}): "
            f"save the weights as a dict of tensors, alone or under {' / '.join(_STATE_DICT_KEYS)}"
        )
    kind = getattr(type(raw), "source", None) or type(raw).__name__     # a pickled object: the class it names
    raise PrunekitError(
        f"checkpoint {path} holds an object ({kind}), not a state dict: "
        "save model.state_dict() rather than the model object"
    )


def _inert_entry(raw: Mapping) -> tuple[str, str] | None:
    """The key and refused class ("module.name") of the first pickled object (read as an inert
    placeholder) where the weights would be: under one of the state-dict keys (``{"model": net}``,
    or inside the dict there); None if none (an optimizer beside no state dict is no such case)."""
    for state in (raw.get(k) for k in _STATE_DICT_KEYS):
        if isinstance(state, Mapping):
            for key, value in state.items():
                if isinstance(value, restricted_pickle.InertObject):
                    return str(key), value.source
        elif isinstance(state, restricted_pickle.InertObject):
            return next(k for k in _STATE_DICT_KEYS if raw.get(k) is state), state.source
    return None


def _numpy_entry(state: object) -> str | None:
    """The first key of mapping ``state`` whose value is a pickled NumPy object (read as an inert
    placeholder), or None."""
    if not isinstance(state, Mapping):
        return None
    return next((str(k) for k, v in state.items()
                 if isinstance(v, restricted_pickle.InertObject) and v.source.startswith("numpy")), None)


def _normalize(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Strip ``module.`` prefixes, rename ``._layer.`` and fold ``_<param>_mask`` entries in."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):       # DataParallel, torch.compile
            key = key.partition(".")[2]
        key = key.replace("._layer.", ".")
        if key in renamed:
            raise PrunekitError(f"checkpoint {path} holds '{key}' twice once prefixes are stripped")
        renamed[key] = value
    out: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        match = _MASK_KEY.match(key)
        if match:
            masks[f"{match['owner']}.{match['param']}"] = value
        else:
            out[key] = value
    for key, mask in masks.items():
        if key not in out:
            raise PrunekitError(f"checkpoint {path} holds a mask for '{key}' but no such tensor")
        if mask.shape != out[key].shape:      # a broadcast would mask whole rows silently, or fail in torch
            raise PrunekitError(f"checkpoint {path} holds a mask for '{key}' of shape {tuple(mask.shape)}, but the "
                                f"tensor is {tuple(out[key].shape)}: the checkpoint is damaged, or not of this model")
        if not bool((mask == 1).all()):
            out[key] = out[key] * mask.to(out[key].dtype)
    return out


@functools.cache
def _zoo_signature(name: str) -> frozenset[str]:
    """State-dict keys of zoo model ``name`` (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        keys = build(name).state_dict().keys()
    return frozenset(k for k in keys if not k.endswith(_TOLERATED_MISSING))


def _zoo_name(keys: Iterable[str]) -> str | None:
    """The zoo model whose state-dict keys are exactly ``keys`` (num_batches_tracked aside)."""
    wanted = frozenset(k for k in keys if not k.endswith(_TOLERATED_MISSING))
    return next((n for n in MODEL_NAMES if _zoo_signature(n) == wanted), None)


def _misfit_message(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: Path,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    own = model.state_dict()
    problems = []
    if missing:
        problems.append(_counted(len(missing), "missing key") + f" e.g. '{missing[0]}'")
    if unexpected:
        problems.append(_counted(len(unexpected), "unexpected key") + f" e.g. '{unexpected[0]}'")
    if mismatched:
        k = mismatched[0]
        problems.append(
            _counted(len(mismatched), "shape mismatch")
            + f" e.g. '{k}' {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the model"
        )
    model_name = _zoo_name(own)
    fits = _zoo_name(state)
    label = f"model '{model_name}'" if model_name else f"model {type(model).__name__}"
    kind = _export_kind(path)
    changed = _changed_model(path, state, own, missing, unexpected, mismatched)
    if changed is not None:
        return changed
    if kind is not None and mismatched and not missing and not unexpected:
        folder = Path(path).parent
        run = folder.parent if folder.name == "export" else "RUNDIR"
        hint = (f"it is prunekit's {kind} export of a shrunk model (channels removed), whose channel layout is in "
                f"its run folder: load {run} instead (the command line's --checkpoint {run}, Python's "
                f"prunekit.load_pruned(model, {str(run)!r}))")
    elif fits and fits == model_name and _ends_only(own, state, mismatched):
        hint = f"build the model with the checkpoint's {_ends_only(own, state, mismatched)}"
    elif fits and fits == model_name and _first_input_only(own, state, mismatched):
        k = mismatched[0]
        hint = (f"its first layer '{k}' takes {state[k].shape[1]} inputs, the model's {own[k].shape[1]}: the "
                "checkpoint was made for inputs of another size; pick the model (and data) it was trained for")
    elif fits and fits == model_name:
        hint = ("the file's layer widths differ from the model's, e.g. a model with channels removed: load its run "
                "folder, which records the channel layout (the command line's --checkpoint RUNDIR, Python's "
                "prunekit.load_pruned(model, RUNDIR))")
    elif not fits and mismatched and not missing and not unexpected and _narrower_only(own, state, mismatched):
        hint = ("the file's layers are narrower than the model's: a model with channels removed, saved without its "
                "channel layout; one your own code narrowed: save it with prunekit.save_model(model, path, meta, "
                "pruned_from=MODEL_AS_BUILT), which records both layer sizes for load_pruned; a channel method's: "
                "load its run folder (prunekit.prune(..., out=RUNDIR), then "
                "prunekit.load_pruned(model, RUNDIR)), or save the model prunekit.prune or prunekit.load_pruned "
                "returned with prunekit.save_model, which records the layout (an older prunekit did not for "
                "load_pruned's: load the run folder and save it again)")
    elif fits:
        hint = f"pick the model it was trained for ({fits!r}?)"
    else:
        hint = "pick the model it was trained for"
    return f"checkpoint {path} does not fit {label} ({', '.join(problems)}): {hint}"


def _changed_model(path: Path, state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                   missing: list[str], unexpected: list[str], mismatched: list[str]) -> str | None:
    """The line for a checkpoint prunekit saved from the user's own model (a model file's, or a class
    saved from Python) that the model no longer fits, naming the first differing tensor; None for
    any other checkpoint. Its sidecar records the channel layout of a channel-pruned model (applied
    before loading), so a misfit is the model's code having changed since, not channels removed
    -- unless the sidecar records a channel run without its layout (an older prunekit's) and the
    file's tensors are narrower only (the caller's hint for that)."""
    from prunekit.saving import read_meta
    from prunekit.user_models import is_model_file
    try:
        meta = read_meta(path)
    except PrunekitError:
        return None
    saved = meta.get("model")
    if not isinstance(saved, str) or not (is_model_file(saved) or meta.get("custom")):
        return None
    result = meta.get("result") if isinstance(meta.get("result"), dict) else {}
    channel_run = result.get("family") == "channels" or (result.get("pruned") or {}).get("shrunk")
    if ("channel_layout" not in meta and channel_run and not missing and not unexpected
            and _narrower_only(own, state, mismatched)):
        return None
    k = next((k for k in own if k in mismatched or k in missing), None)     # the first, in the model's order
    if k in mismatched:
        first = f"'{k}' is {tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the model"
    elif k is not None:
        first = f"the model has '{k}', which the file lacks"
    else:
        first = f"the file holds '{unexpected[0]}', which the model lacks"
    what = f"the model file ({saved})" if is_model_file(saved) else f"your {saved} class"
    if "channel_layout" not in meta and "result" not in meta and mismatched and not missing and not unexpected \
            and _narrower_only(own, state, mismatched):
        # narrower only, no layout, saved by the user's save_model (a run's and train's sidecar holds its
        # "result"): a model the user's code narrowed after building it and saved without pruned_from (no
        # mark tells it from a dense model then), or code changed to build wider layers
        return (f"checkpoint {path} does not fit {what}: {first}, the file's layers narrower only and its sidecar "
                "recording no channel layout: a model your own code narrowed after building it was saved without "
                "its layer sizes; save it again with prunekit.save_model(model, path, meta, "
                "pruned_from=MODEL_AS_BUILT), which records both for loading; or, if the model's code changed since "
                "prunekit saved it, restore that code")
    return (f"checkpoint {path} no longer fits {what}: {first}; the model's code differs from the code prunekit "
            "saved it with: restore that code, or train (or prune) again with this one")


def _narrower_only(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], mismatched: list[str]) -> bool:
    """Whether every mismatched tensor of the file is the model's, narrower (no dimension larger,
    the same number of dimensions): what removing channels does."""
    return all(state[k].dim() == own[k].dim() and all(a <= b for a, b in zip(state[k].shape, own[k].shape))
               for k in mismatched)


def _weight_layers(own: Mapping[str, torch.Tensor]) -> list[str]:
    """The model's weight tensors of layers (2+ dimensions: Linear, convolutions), in order."""
    return [k for k, v in own.items() if k.endswith(".weight") and v.dim() >= 2]


def _differ(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    """The dimensions in which the shapes of ``a`` and ``b`` differ (all past the shorter one's)."""
    a, b = tuple(a.shape), tuple(b.shape)
    return {i for i in range(max(len(a), len(b))) if i >= min(len(a), len(b)) or a[i] != b[i]}


def _ends_only(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], mismatched: list[str]) -> str:
    """What another num_classes / in_channels would change, where the shape mismatches are confined
    to the last layer's outputs ("num_classes (10)") and a first convolution's input channels
    ("in_channels (1)"), not to inner widths (nor a Linear first layer's input features: the image
    size, which in_channels alone does not set); "" otherwise."""
    layers = _weight_layers(own)
    if not layers:
        return ""
    first, last = layers[0], layers[-1].removesuffix(".weight")
    said = {}
    for k in mismatched:
        if k.removesuffix(".weight").removesuffix(".bias") == last and _differ(state[k], own[k]) <= {0}:
            said["num_classes"] = state[k].shape[0] if state[k].dim() else "?"
        elif k == first and own[k].dim() >= 3 and _differ(state[k], own[k]) <= {1}:
            said["in_channels"] = state[k].shape[1] if state[k].dim() > 1 else "?"
        else:
            return ""
    return " and ".join(f"{name} ({value})" for name, value in said.items())


def _first_input_only(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                      mismatched: list[str]) -> bool:
    """Whether the one shape mismatch is the first layer's input width (dimension 1) alone."""
    layers = _weight_layers(own)
    return (len(mismatched) == 1 and bool(layers) and mismatched[0] == layers[0]
            and state[layers[0]].dim() == own[layers[0]].dim() and _differ(state[layers[0]], own[layers[0]]) == {1})


def _counted(n: int, noun: str) -> str:
    plural = "es" if noun.endswith(("ch", "sh")) else "s"
    return f"{n} {noun}{'' if n == 1 else plural}"
