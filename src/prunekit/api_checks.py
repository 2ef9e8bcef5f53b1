"""Checks on the arguments of ``prunekit.prune``, before any work or any file is written.

Every bad value becomes one :class:`PrunekitError` line that names the parameter as Python
spells it (``fisher_samples``, not ``--fisher-samples``) and says what would be right. The method
options are checked by their declared constraints (``prunekit.options``, in
``PruneRequest.plan``), not here; the data checks (:func:`check_data`,
:func:`check_labels`) look at what the user passed, not at the model.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from .data.loaders import BatchLoader
from .data.replay import epoch_mark
from .errors import PrunekitError, input_fix
from .losses import class_scores
from .options import MAX_COUNT


def _whole(v) -> bool:
    """An int or a NumPy (or other) integer that ``operator.index`` takes, never a bool."""
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return not isinstance(v, torch.Tensor)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plain_numbers(value):
    """``value`` with a NumPy integer or floating scalar (``np.int64(3)``, ``np.float32(0.5)``, e.g.
    from a NumPy seed grid) as the Python ``int`` or ``float`` it stands for; anything else as is.
    Checks and records (config files, JSON) then see plain numbers."""
    if type(value).__module__ != "numpy" or isinstance(value, bool):
        return value
    if _whole(value):
        return operator.index(value)
    if isinstance(value, numbers.Real) and getattr(value, "ndim", 0) == 0:
        return float(value)
    return value


def _positive_whole(v) -> bool:
    return _whole(v) and v >= 1


def _positive_number(v) -> bool:
    return _number(v) and 0 < v < float("inf")


# The call's own arguments (not method options): name -> (test, what is expected).
ARGUMENT_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "method": (lambda v: isinstance(v, str), "a method name, e.g. 'chita'"),
    "seed": (lambda v: _whole(v) and 0 <= v < 2**63, "a whole number >= 0"),
    "batch_size": (lambda v: _positive_whole(v) and v <= MAX_COUNT, f"a whole number from 1 to {MAX_COUNT}"),
    "recalibrate_bn": (lambda v: isinstance(v, bool), "True or False"),
    "progress": (lambda v: isinstance(v, bool), "True or False"),
    "stage_eval": (lambda v: isinstance(v, bool), "True or False"),
    "gradual": (lambda v: isinstance(v, bool), "True or False"),
    "force": (lambda v: isinstance(v, bool), "True or False"),
    "include": (lambda v: v is None or _patterns(v), "a list of module-name patterns, e.g. ['fc1', 'conv*']"),
    "exclude": (lambda v: v is None or _patterns(v), "a list of module-name patterns, e.g. ['fc3']"),
    "out": (lambda v: v is None or isinstance(v, (str, os.PathLike)), "a folder path"),
    "loss": (lambda v: v is None or callable(v), "None or a function (outputs, targets) -> mean loss"),
}


def _patterns(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)


def _shown(value) -> str:
    text = repr(value)
    return (text if len(text) <= 40 else text[:37] + "...") + f" ({type(value).__name__})"


def check_arguments(model, arguments: dict) -> None:
    """Refuse a bad ``prunekit.prune`` argument (not a method option), naming it."""
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"model must be a torch.nn.Module, got {_shown(model)}")
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        kind = "parameter" if meta in dict(model.named_parameters()) else "buffer"
        raise PrunekitError(f"the model's {kind} {meta} is on the meta device (no data): load real weights first "
                            "(e.g. model.to_empty(device='cpu'), then load_state_dict)")
    for name, value in arguments.items():
        rule = ARGUMENT_RULES.get(name)
        if rule is None:
            continue
        test, expected = rule
        if not test(value):
            if isinstance(value, str) and name in ("include", "exclude"):
                expected += f" (a bare string would be read letter by letter: write [{value!r}])"
            raise PrunekitError(f"{name} must be {expected}; got {_shown(value)}")
    if arguments.get("force") and arguments.get("out") is None:
        raise PrunekitError("force=True clears the run folder out= names, and out is None: pass out=, or leave "
                            "force out")
    check_out(arguments.get("out"))
    check_not_training_run(arguments.get("out"), force=arguments.get("force") is True)


def check_out(out, flag: str | None = None) -> None:
    """``out`` must be a new (or empty) folder or a run folder (to resume): never a file, never a
    folder holding other things, which the run would write over. ``flag``: the CLI's name for it
    (``--out``); the message names ``out=`` otherwise."""
    if out is None:
        return
    if not str(out).strip():
        raise PrunekitError(f"{flag or 'out='} is an empty path: name a new folder for the run"
                            + ("" if flag else ", or leave out at None for no run folder"))
    path = Path(out)
    named = f"{flag} {out}" if flag else f"out={str(out)!r}"
    check_out_place(out, flag)
    if path.exists() and not path.is_dir():
        raise PrunekitError(f"{named} is a file: pass a new folder for the run (or a run folder to resume)")
    from .runs import only_leftovers
    others = path.is_dir() and not only_leftovers(path)    # a killed run's lock file and temporaries are ours
    if others and not (_is_run_config(path / "config.toml") or (path / "metrics.json").exists()):
        raise PrunekitError(f"{named} is a folder holding other files, not a run folder: pass a new "
                            "folder so that nothing there is written over")


def check_out_place(out, flag: str | None = None) -> None:
    """Refuse an ``out`` no run can be made at: a symbolic link to nothing (``mkdir`` said "File
    exists") or a path under a file ("Not a directory"), each raised as an OSError after the model
    and data were loaded. ``flag``: the CLI's name for it (``--out``); ``out=`` otherwise."""
    path = Path(out)
    named, which = (f"{flag} {out}", flag) if flag else (f"out={str(out)!r}", "out=")
    if path.is_symlink() and not path.exists():
        raise PrunekitError(f"{named} is a symbolic link to {os.readlink(path)}, which does not exist: create "
                            f"that folder, or pass another {which}")
    above = next((p for p in path.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise PrunekitError(f"{named}: {above} is a file, not a folder: pass an {which} whose parent is a folder")


def check_not_training_run(out, flag: str | None = None, force: bool = False) -> None:
    """Refuse a prune run's ``out`` that holds a `prunekit train` run (``folders.kind``): neither
    the same run again nor one to carry on (a training run carries on with its own train command),
    and clearing it would delete the user's trained model.safetensors (or, unfinished, its epoch
    checkpoints). ``force``: asked to clear it, the run goes ahead (the refusal says what that
    deletes). ``flag``: the CLI's name for ``out`` (``--out``); the message names ``out=`` otherwise."""
    from .folders import kind
    from .options import OptionError
    if out is None or force or kind(out) != "training run":
        return
    finished = (Path(out) / "model.safetensors").is_file()
    held = "its trained model.safetensors" if finished else "an unfinished training: its epoch checkpoints"
    lost = "that trained model" if finished else "that training run"
    if flag:
        raise PrunekitError(f"{flag} {out} holds a `prunekit train` run ({held}): pick another {flag} "
                            f"(--force would delete {lost})")     # (no params: a path may hold the word "out")
    raise OptionError(f"out={str(out)!r} holds a `prunekit train` run ({held}): pick another out "
                      f"(force=True would delete {lost})", ("out", "force"))


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is the config.toml of a prunekit run (prune names the model and the method,
    train the model and the run folder, prunekit.prune the model's class and the method), not a
    config.toml of the user's own in a folder of theirs."""
    from .run_folder import read_config     # (run_folder imports what imports this module)
    try:
        config = tomllib.loads(read_config(path))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return ("model" in config and ("method" in config or "out" in config)) or {"model_class", "method"} <= config.keys() \
        or {"model-class", "method"} <= config.keys()       # (as a Python run's config.toml spells it)


def check_data(data, what: str, class_labels: bool = True) -> None:
    """Refuse data that is not data: a split name, a path, a lone tensor, (X, Y) of unequal length
    (and, for ``class_labels``, Y that is not one label per sample)."""
    if data is None:
        return
    if isinstance(data, (str, bytes, os.PathLike)):
        raise PrunekitError(f"{what} must be data, not the name or path {str(data)!r}: load it first, e.g. "
                            f"prunekit.data.load_dataset('mnist', DIR, 'test'), or pass (X, Y) tensors")
    if isinstance(data, torch.Tensor):
        raise PrunekitError(f"{what} is one tensor: pass inputs and labels together as (X, Y)")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor) \
            and isinstance(data[0], (tuple, list, dict)):
        raise PrunekitError(f"{what} is (inputs, Y) with several inputs: {SEVERAL_INPUTS}")
    if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        if len(data) != 2:
            raise PrunekitError(f"{what} holds {len(data)} tensors: pass inputs and labels as (X, Y)")
        x, y = data
        check_not_meta(x, f"{what}'s X")
        check_not_meta(y, f"{what}'s Y")
        if x.ndim == 0 or y.ndim == 0 or (class_labels and y.ndim != 1) or x.shape[0] != y.shape[0]:
            wanted = "(N,)" if class_labels else "(N, ...)"
            hint = "" if not class_labels or y.ndim < 2 else NOT_INDICES
            raise PrunekitError(f"{what}=(X, Y) needs X of shape (N, ...) and Y of shape {wanted} with the same N; "
                                f"got X {tuple(x.shape)}, Y {tuple(y.shape)}{hint}")
        if x.shape[0] == 0:
            raise PrunekitError(f"{what} is empty: its (X, Y) hold no samples")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise PrunekitError(f"{what}'s X holds nan or inf values: pass finite inputs")
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") and len(data) == 0:
        raise PrunekitError(f"{what} is empty: the dataset holds no samples")


NOT_INDICES = " (targets that are not class indices need loss=, a function of (outputs, targets))"

SEVERAL_INPUTS = ("prunekit calls model(x) with one tensor x per batch; for a model of several inputs (ids and an "
                  "attention mask, a dict) wrap it in a module whose forward takes one tensor (e.g. the inputs "
                  "stacked) and give (x, y) batches of that")


WRONG_ARITY = ("prunekit reads (x, y) only (it calls model(x) and compares the output with y) and drops nothing "
               "itself, so a third element (a sample index, a weight, a mask) is refused, not ignored: give (x, y) "
               "batches, from a dataset whose __getitem__ returns (x, y) or a DataLoader whose collate_fn does "
               "(leave out an index or weight kept for bookkeeping; a mask the model needs is one of its inputs: "
               "wrap the model in a module whose forward takes one tensor, x and the mask stacked, and give "
               "(x, y) batches of that)")


def _several_inputs(batch) -> bool:
    """A dict batch, or (inputs, y) whose inputs are a tuple, list or dict."""
    return isinstance(batch, dict) or (isinstance(batch, (tuple, list)) and len(batch) == 2
                                       and isinstance(batch[0], (tuple, list, dict)))


def check_labels(model: nn.Module, example_input: torch.Tensor, data, batches: Callable[[], Iterable] | None,
                 what: str) -> None:
    """Labels must be integer class indices below the model's number of outputs.

    All labels are checked when they are at hand as one tensor ((X, Y), a TensorDataset, a
    prunekit loader); otherwise those of the first batch (reading every batch could cost an epoch).
    """
    if batches is None:
        return
    labels, inputs = _all_labels(data), None
    if labels is None:
        inputs, labels = first_batch(batches, what)
    if labels.ndim != 1:
        got = f"Y {tuple(labels.shape)}" if inputs is None else \
            f"X {tuple(inputs.shape)}, Y {tuple(labels.shape)} in its first batch"
        raise PrunekitError(f"{what} needs X of shape (N, ...) and Y of shape (N,) with the same N; got {got}{NOT_INDICES}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise PrunekitError(f"{what} labels must be integer class indices (torch.long), got {labels.dtype}")
    if labels.numel() == 0:
        return
    classes = _outputs(model, example_input)
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or (classes is not None and high >= classes):
        limit = f"0 to {classes - 1} (the model has {classes} outputs)" if classes is not None else "0 or more"
        raise PrunekitError(f"{what} labels go from {low} to {high}, but class indices must be {limit}: "
                            "pass the labels as indices of the model's outputs")


_FAILED = object()       # what ``_output`` gives for a model that fails on its input


def _output(model: nn.Module, x):
    """The model's output on ``x`` in eval mode without gradients (its training mode restored), or
    ``_FAILED`` where it raises: the cost model's trace reports a model that cannot run."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    except Exception:  # noqa: BLE001 - the cost model's trace reports a model that cannot run
        return _FAILED
    finally:
        model.train(was_training)


def check_default_loss(model: nn.Module, example_input) -> None:
    """Without ``loss=`` every method that trains, takes gradients or evaluates reads the model's
    output as (batch, classes) scores (``losses.class_scores``): refuse one that is not (a tuple, a
    dict without 2-D ``logits``, one value per example) in one line, before any work, the same for
    every method and mode (autobot's gates, taper, the hybrid, gradual fine-tunes, CHITA's rows).
    A model that fails on ``example_input`` is left to the trace, which says so in its words."""
    if (out := _output(model, example_input)) is not _FAILED:
        class_scores(out)


def check_example_batched(example_input, batches: Callable[[], Iterable] | None, what: str) -> None:
    """``example_input`` must be a batch: one example of the data without its batch dimension
    would be counted as a batch of its first dimension's size (MACs divided by the channels)."""
    if batches is None or not isinstance(example_input, torch.Tensor):
        return
    x = first_batch(batches, what)[0]
    if (isinstance(x, torch.Tensor) and x.dim() == example_input.dim() + 1
            and tuple(x.shape[1:]) == tuple(example_input.shape)):
        raise PrunekitError(f"example_input has shape {tuple(example_input.shape)}: one example of {what} without "
                            f"its batch dimension; pass example_input.unsqueeze(0), shape {(1, *example_input.shape)} "
                            "(MACs are counted per example of a batch)")


def check_runs_on(model: nn.Module, batches: Callable[[], Iterable], what: str, device: torch.device) -> None:
    """The model must run on the first input of ``batches`` (eval_data of another shape than data
    would fail only after pruning)."""
    x = first_batch(batches, what)[0][:1].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as err:  # noqa: BLE001 - any failure of the user's model on this input
        raise PrunekitError(f"the model failed on {what}'s first input, shape {tuple(x.shape)}: "
                            f"{str(err).splitlines()[0]}; "
                            + input_fix(x, model, f"pass {what} of the inputs the model takes")) from None
    finally:
        model.train(was_training)


def check_loss(model: nn.Module, loss, batches: Callable[[], Iterable], device: torch.device) -> None:
    """The user's ``loss(outputs, targets)`` must run on the first batch of ``data`` and return the
    mean loss: a tensor of one number (a per-sample loss fails only deep in the gradients), a mean
    over the batch and not a sum (``_check_loss_is_a_mean``)."""
    x, y = first_batch(batches, "data")
    x, y = x[:2].to(device), y[:2].to(device)
    if (outputs := _output(model, x)) is _FAILED:
        return
    try:
        value = loss(outputs, y)
    except Exception as err:  # noqa: BLE001 - any failure of the user's loss
        logits = getattr(outputs, "logits", None) if not isinstance(outputs, torch.Tensor) else None
        hint = (f" (the model returns {type(outputs).__name__} outputs, not a tensor: read outputs.logits in the loss)"
                if isinstance(logits, torch.Tensor) else "")
        raise PrunekitError(f"loss(outputs, targets) failed on data's first batch: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}{hint}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise PrunekitError(f"loss(outputs, targets) must return the mean loss, a tensor of one number; got {got}")
    _check_loss_is_a_mean(model, loss, *first_batch(batches, "data"), device)


def _check_loss_is_a_mean(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    """Refuse a loss that sums over the batch (``reduction='sum'``): on up to 16 samples of the
    first batch, split in two halves, the loss of the whole equals the sum of the halves' losses
    and not their mean (relative tolerance 1e-3). A mean of any kind (label smoothing, MSE over
    elements, class weights, a dict-output loss) is a weighted average of the halves' losses, which
    never equals their sum while both are positive, so it passes; with too few samples or losses
    near zero nothing is judged. A sum divided by a constant (``reduction='sum'`` / 128) adds up
    over the halves like a sum and is refused too: it is a mean only on batches of that size, and
    prunekit also calls the loss on single samples (the per-sample gradient rows would be
    1/constant of a mean's), a smaller last batch and evaluation batches."""
    n = min(int(x.shape[0]), 16) // 2 * 2
    if n < 2:
        return
    x, y = x[:n].to(device), y[:n].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            whole, first, second = (float(loss(model(x[part]), y[part]))
                                    for part in (slice(0, n), slice(0, n // 2), slice(n // 2, n)))
    except Exception:  # noqa: BLE001 - a loss that runs on the two samples above but not here: not ours to judge
        return
    finally:
        model.train(was_training)
    total, mean = first + second, (first + second) / 2
    scale = max(abs(first), abs(second), 1e-12)
    if not all(map(math.isfinite, (whole, first, second))) or min(first, second) <= 1e-6 * scale:
        return
    if abs(whole - total) <= 1e-3 * abs(total) and abs(whole - mean) > 1e-3 * abs(mean):
        raise PrunekitError(f"loss must be the mean over the batch (reduction='mean'): on {n} samples of data's first "
                            f"batch it gives {whole:.4g}, the sum of its halves' losses ({first:.4g} + {second:.4g}), "
                            "not their mean: a sum over the batch, or a sum divided by a fixed number (a "
                            "mean only on batches of that size: prunekit also calls the loss on single samples for "
                            "gradient rows, on a smaller last batch and on evaluation batches); use e.g. "
                            "nn.CrossEntropyLoss() rather than reduction='sum', or divide by the batch's own size: "
                            "F.cross_entropy(outputs, targets, reduction='sum') / targets.shape[0]")


def first_batch(batches: Callable[[], Iterable], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (x, y) batch of ``batches()``, refusing anything else in one line.

    The peek leaves no trace on the user's data stream: torch's global random state is restored
    (a shuffling DataLoader draws its order from it) and a prunekit loader's epoch is put back
    (``epoch_mark``; a ``ReplayedLoader``, ``prunekit.prune``'s wrapper of a user's ``lambda: loader``,
    reads copies of the loader it wraps), so the run sees the same batches as it would without the check.
    """
    try:
        with torch.random.fork_rng(devices=[]):
            produced = batches()
            put_back = epoch_mark(produced)
            try:
                first = next(iter(produced), None)
            finally:
                put_back()
    except TypeError as err:           # e.g. a function taking arguments, or returning no iterable
        raise PrunekitError(f"{what} gave no batches ({err}): pass a DataLoader, a Dataset, (X, Y) tensors "
                            "or a function of no arguments returning (x, y) batches") from None
    if first is None:
        raise PrunekitError(f"{what} is empty: it gave no batch")
    if not (isinstance(first, (tuple, list)) and len(first) == 2
            and all(isinstance(t, torch.Tensor) for t in first)):
        numpy = any(type(t).__module__ == "numpy" for t in (first, *(first if isinstance(first, (tuple, list)) else ())))
        if not numpy and isinstance(first, (tuple, list)) and len(first) != 2 and not _several_inputs(first):
            raise PrunekitError(f"{what} must give (x, y) batches of tensors; its first batch is a "
                                f"{type(first).__name__} of {len(first)} item{'s' if len(first) != 1 else ''}, "
                                f"not 2: {WRONG_ARITY}")
        raise PrunekitError(f"{what} must give (x, y) batches of tensors; its first batch is {_shown(first)}"
                            + (": convert NumPy arrays with torch.from_numpy" if numpy else
                               f": {SEVERAL_INPUTS}" if _several_inputs(first) else ""))
    if first[0].ndim == 0 or first[1].ndim == 0 or first[0].shape[0] != first[1].shape[0]:
        raise PrunekitError(f"{what}'s first batch has inputs of shape {tuple(first[0].shape)} and targets of shape "
                            f"{tuple(first[1].shape)}: each batch needs one target per input (the same first size)")
    for tensor in first:
        check_not_meta(tensor, f"{what}'s first batch")
    return first[0], first[1]


def check_not_meta(tensor, what: str) -> None:
    """Refuse a tensor on the meta device: it has a shape but no values to run on."""
    if isinstance(tensor, torch.Tensor) and tensor.is_meta:
        raise PrunekitError(f"{what} is on the meta device (no data): load real data first")


def _all_labels(data) -> torch.Tensor | None:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[1]
    if isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        return data.tensors[1]
    if isinstance(data, BatchLoader):        # prunekit's loader: the labels of its ImageDataset
        return data.dataset.labels
    return None


def _outputs(model: nn.Module, example_input: torch.Tensor) -> int | None:
    """The model's number of outputs per example (classes), or None if its output is not (1, C)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input)
    except Exception:            # the cost model's trace reports a model that cannot run, in its words
        return None
    finally:
        model.train(was_training)
    try:
        scores = class_scores(out)
    except PrunekitError:           # not a classifier's scores: the loss's check says so, in its words
        return None
    return int(scores.shape[1]) if scores.ndim >= 2 else None
