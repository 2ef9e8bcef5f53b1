"""Whether a run's newest stage checkpoint still fits the model a resume rebuilt: a model file
edited between a kill and the resume (a layer widened), or another model passed from Python, makes
the saved tensors another shape than the model's, and the resume is refused in one line before
anything is run or the folder's records are written, rather than failing deep in
``load_state_dict``. Only the checkpoint's header is read (the tensors' shapes), as the resume
would read the newest readable one."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import PrunekitError


def newest_shapes(checkpoints: Path) -> tuple[str, dict[str, tuple[int, ...]], dict] | None:
    """(file name, ``{key: shape}`` of its ``model/`` tensors with that prefix off, its ``extra``
    metadata) of the newest checkpoint in ``checkpoints`` whose header reads (``RunCheckpointer.last``'s
    choice: a damaged one is passed over); None when there is none."""
    for path in sorted(checkpoints.glob("stage-*.safetensors"), reverse=True):
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
                shapes = {k[len("model/"):]: tuple(handle.get_slice(k).get_shape())
                          for k in handle.keys() if k.startswith("model/")}
            extra = json.loads(meta.get("extra", "{}"))
        except (SafetensorError, ValueError, TypeError, OSError):
            continue
        return path.name, shapes, extra if isinstance(extra, dict) else {}
    return None


def shape_misfit(model: nn.Module, saved: Mapping[str, tuple[int, ...]], where: str) -> str | None:
    """The first way ``model``'s state dict and the saved shapes ``saved`` differ, in words (a key
    only in one of them, or a tensor of another shape: "'3.weight' is (20, 40) in stage-001.safetensors
    but (24, 40) in the model"), with how many tensors differ; None where they fit, as a strict
    ``load_state_dict`` would take them."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differ = [k for k in own if k in saved and own[k] != tuple(saved[k])]      # in the model's order
    missing, unexpected = [k for k in own if k not in saved], [k for k in saved if k not in own]
    count = len(differ) + len(missing) + len(unexpected)
    more = f"; {count} tensors differ" if count > 1 else ""
    if differ:
        k = differ[0]
        return f"'{k}' is {tuple(saved[k])} in {where} but {own[k]} in the model{more}"
    if missing:
        return f"the model has '{missing[0]}', which {where} lacks{more}"
    if unexpected:
        return f"{where} has '{unexpected[0]}', which the model lacks{more}"
    return None


def checkpoint_misfit(checkpoints: Path, model: nn.Module, channels: bool = False,
                      prefix: str = "") -> tuple[str, str] | None:
    """(checkpoint name, how it differs) where the newest checkpoint in ``checkpoints`` does not fit
    ``model`` as its resume would load it; None where it fits or there is none.

    ``channels``: a channel method's phase checkpoint, holding each share's shrunk model
    (``<share>/<key>``) and its channel layout (``extra["layouts"]``): ``model`` (the dense one) is
    cut to each layout, as the resume does, and compared. Otherwise the checkpoint holds the model's
    own state dict, its keys under ``prefix`` (a training epoch's: "model/", beside its optimizer's)."""
    found = newest_shapes(checkpoints)
    if found is None:
        return None
    name, shapes, extra = found
    if not channels:
        saved = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
        misfit = shape_misfit(model, saved, name)
        return (name, misfit) if misfit is not None else None
    from .zoo.layout import apply_layout       # (the zoo imports the pipelines, which import the runs)
    layouts = extra.get("layouts")
    for key, layout in (layouts.items() if isinstance(layouts, dict) else ()):
        try:
            small = apply_layout(copy.deepcopy(model), layout)
        except PrunekitError as err:        # a layer built otherwise than the one the cut was made from
            return name, str(err).split(" in the model the file was pruned from")[0].split(": ")[0]
        head = f"{key}/"
        misfit = shape_misfit(small, {k[len(head):]: s for k, s in shapes.items() if k.startswith(head)}, name)
        if misfit is not None:
            return name, misfit
    return None


def started_with(folder: Path) -> dict:
    """What the unfinished run in ``folder`` recorded of the files it began with: ``model_file_sha256``
    (the model file's digest) and ``checkpoint_sha256`` (the --checkpoint file's), from a prune run's
    metrics.json or else a training run's newest epoch checkpoint; {} for a finished run, a folder
    that holds none, or records that do not read (the resume refuses those itself)."""
    keys = ("model_file_sha256", "checkpoint_sha256")
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except FileNotFoundError:
        metrics = None
    except (OSError, ValueError):
        return {}
    if metrics is not None:
        done = not isinstance(metrics, dict) or metrics.get("status") == "done"
        return {} if done else {k: metrics[k] for k in keys if k in metrics}
    if (folder / "model.safetensors").exists():
        return {}
    found = newest_shapes(folder / "checkpoints")
    return {k: found[2][k] for k in keys if k in found[2]} if found is not None else {}
