"""Save and load models as safetensors plus a JSON sidecar; writes are atomic.

``save_model(model, "out/model.safetensors", meta)`` writes the tensors (no pickle, so loading
never executes code) and ``out/model.json`` with ``meta``: the zoo architecture and its build
arguments, the input normalization, the budget and the counts. Files are written to a
temporary name in the same folder and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save
from torch import nn

from .atomic import atomic_output
from .errors import PrunekitError


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as out:
        out.write(data)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_model(model: nn.Module, path: str | Path, meta: dict) -> Path:
    """Save ``model``'s state dict to ``path`` (.safetensors) and ``meta`` to the sidecar."""
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"save_model(model, path, meta): model must be a torch.nn.Module, "
                            f"got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PrunekitError(f"model files end in .safetensors, got {path.name!r}: "
                            f"name it e.g. {path.stem}.safetensors")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={"format": "pt"}))
    atomic_write_json(sidecar_path(path), meta)
    return path


def read_meta(path: str | Path) -> dict:
    """The JSON sidecar of a model saved by prunekit (.safetensors), or {} if it has none."""
    side = sidecar_path(path)
    if Path(path).suffix != ".safetensors" or not side.exists():
        return {}
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise PrunekitError(f"{side} is not valid JSON ({err}); restore or delete it") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise PrunekitError(f"{side} is not a prunekit sidecar (no 'model' key); move it away from {Path(path).name}")
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
    norm = meta.get("normalization")
    if norm is not None:
        ok = (isinstance(norm, dict) and all(isinstance(norm.get(k), list) and norm[k]
                                             and all(isinstance(v, (int, float)) for v in norm[k]) for k in ("mean", "std"))
              and len(norm["mean"]) == len(norm["std"]) and all(v > 0 for v in norm["std"]))
        if not ok:
            return "normalization needs lists 'mean' and 'std' of one positive std per channel"
    return None
