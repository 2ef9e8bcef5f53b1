"""The one executor: runs every method in every mode (one-shot, multi-stage, gradual,
structured), with or without a run folder, and builds the one record.

    plan = PruneRequest(model, example_input, "falcon", {"flops": 0.3}).plan()   # checked once
    record, model, snapshots = execute(plan, train_batches, eval_loader, folder=RunFolder("runs/x"))

With a folder, every stage, event or phase is checkpointed (``runs.RunCheckpointer``), a
killed run resumes from the last one to the same weights, and the final model, ``result.json``
and ``metrics.json`` are written; a finished run is not redone. Without one, per-stage
accuracy is still measured when there is evaluation data.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .budget import budget_text
from .data.loaders import BatchLoader
from .data.replay import ReplayedLoader
from .errors import PrunekitError, PrunekitWarning, worded, worded_warning
from .pipelines.gradual import prune_gradual
from .structured.left_dense import dense_groups_warning
from .methods import BUILT_IN, METHODS, Method
from .pipelines.weights import Outcome, PruneContext, Pruned, prune_weights
from .options import OptionError
from .record import budget_max_params, build_record, save_pruned
from .request import Plan
from .run_fit import checkpoint_misfit
from .runs import RunCheckpointer, RunFolder, StageMeter, layer_density
from .structured.pipeline import prune_channels
from .train import check_finite_loss, evaluate_loss_accuracy
from .zoo.layout import apply_layout
from .errors import warn as warn_ours


def measure(plan: Plan, model: nn.Module, eval_loader) -> dict:
    """Counts of ``model`` as it is (the dense one, a masked one or a shrunk one) and its loss and
    accuracy when there is evaluation data."""
    start = time.perf_counter()
    counts = plan.costs.count(model)
    out = {"model_macs": counts.macs, "flops_kept": counts.flops_kept, "params_kept": counts.params_kept}
    if model is plan.space.model:
        out["sparsity"] = 1 - plan.space.count_nonzero() / plan.space.numel
    if eval_loader is not None:
        out.update(evaluate_loss_accuracy(model, eval_loader, loss_fn=plan.request.loss))
        out["eval_seconds"] = time.perf_counter() - start
    return out


def python_model_description(plan: Plan) -> dict:
    """The sidecar of a model passed from Python: its class name (the code that builds it is the
    user's, named again when the command line loads it: ``--model net.py:FUNCTION``) and, for a
    single-tensor input, the shape of one example ((C, H, W) for images), which info, export and
    latency need, and its dtype where it is not floating point (token ids: "int64")."""
    example = plan.request.example_input
    shape = {"input_shape": list(example.shape[1:])} if isinstance(example, torch.Tensor) and example.dim() > 1 else {}
    if shape and not example.is_floating_point():
        shape["input_dtype"] = str(example.dtype).removeprefix("torch.")
    return {"model": plan.name, "custom": True, **shape}


def _snapshot_record(record: dict, share: float) -> dict:
    """A taper snapshot's record with its own budget (built from the request, it had the final one's)."""
    asked = f"{share:g}" if isinstance(record["request"].get("flops"), str) else share     # as the request spells it
    return {**record, "request": {**record["request"], "flops": asked},
            "budget_max_macs": math.floor(share * record["dense_macs"])}


# How a refusal over changed images says to start the run anew: prune's command line words
ANEW = "start a new run (the original command with --force, or another --out)"
# How a warning over an older folder's unchecked data says to run it anew where that data changed:
# prune's command line's words (``prune --resume DIR`` takes no --force: ``REDO_RESUMED``)
REDO = "run it anew with --force"
REDO_RESUMED = "run it anew with the original command and --force (--resume takes none)"


def execute(plan: Plan, train_batches: Callable[[], Iterable] | None, eval_loader: Iterable | None, *,
            folder: RunFolder | None = None, describe: dict | None = None, dense: dict | None = None,
            progress: bool = False, on_step: Callable[[dict], None] | None = None, stage_eval: bool = True,
            about: dict | None = None,
            data_fingerprint: dict | None = None,
            force: bool = False, anew: str = ANEW, redo: str = REDO) -> tuple[dict, nn.Module, dict[float, nn.Module]]:
    """Prune as ``plan`` says; returns (record, pruned model, taper's snapshot models by share).

    train_batches(): one epoch of (x, y) training batches, the same at every call.
    describe: how to rebuild the model, for its sidecar in the folder (zoo name, build arguments,
        normalization); dense: the dense model's measurements if known (a sweep measures once).
    on_step(record): told after each stage, event or phase.
    stage_eval: measure accuracy and loss on ``eval_loader`` after each stage, event or phase too
        (not only before and after); their seconds are not the pruning's (``eval_seconds``).
    about: keys the record holds besides the measurements, e.g. ``data_file`` (the ``.npz`` the
        command line read its data from), kept in result.json and metrics.json with it.
    data_fingerprint: ``{split: fingerprint}`` of the data the run reads (the command line's: an image
        folder's ``ImageFolderScan.fingerprint``, another data set's ``data.dataset.contents_fingerprint``),
        kept in metrics.json: a resume over one whose images changed since is
        refused (with ``force``, the command line's --force: the unfinished run starts anew over it); a
        finished run gives its result back, as for any other change of its data. ``anew``: how that
        refusal says to start the run anew instead (a sweep's run has no --force: its sweep's words);
        ``redo``: how the warning over an older folder's unchecked classes or images says it (``REDO``).
    """
    describe = describe or python_model_description(plan)
    metrics = folder.read_metrics() if folder is not None else {}
    if folder is not None and metrics.get("status") == "done":
        model = _load_final(plan, folder, redo)
        if folder.writable and not _readable_json(folder.path / "model.json", folder.path / "result.json"):
            save_pruned(folder.path, model, describe, metrics["final"], shrunk=plan.method.family == "channels")
            folder.log("already complete; model.json / result.json written again (one was missing or damaged)")
        else:
            folder.log("already complete; nothing to do")
        return metrics["final"], model, {}
    if folder is not None:
        _refuse_changed_weights(folder, metrics, describe)
        _refuse_changed_classes(folder, metrics, describe, redo)
        if _refuse_changed_images(folder, metrics, data_fingerprint, force, anew, redo):     # --force: started anew
            metrics = {}
        # before the folder's records are written again: a refused resume leaves them be
        if metrics and _refuse_unfit_checkpoint(folder, plan, metrics, describe, force, anew):   # --force: anew
            metrics = {}
        _tell_changed_code(folder, metrics, describe)
        # one line once the run goes ahead (past the refusals above, and --force's start anew), naming
        # the checkpoint it carries on from (the checkpointer's own "resuming after ..." line is off: resume_point)
        probe = RunCheckpointer(folder, unit=_UNIT.get(plan.mode, "stage"))
        point = probe.resume_point() if metrics else None
        folder.log(f"{'resume' if metrics else 'start'}: {plan.name}, method {plan.method.name}, "
                   f"budget {budget_text(plan.request.budget)}{f', {point}' if point else ''}")
        if plan.channels is not None and (left := dense_groups_warning(plan.channels.groups.skipped)):
            folder.log(left)
    at_eval = _eval_resumer(eval_loader, dense_read=bool(not dense and metrics.get("dense")))
    if not dense and not metrics.get("dense"):
        dense = measure(plan, plan.request.model, eval_loader)
        if "loss" in dense:           # before any work: name the real cause
            check_finite_loss(dense["loss"])
    dense = dense or metrics.get("dense")
    measure_now = lambda model: measure(plan, model, eval_loader)   # noqa: E731
    measure_stage = lambda model: measure(plan, model, eval_loader if stage_eval else None)   # noqa: E731
    if folder is not None:
        metrics = {"status": "running", "model": plan.name, "method": plan.method.name, "mode": plan.mode,
                   "request": plan.request.budget,
                   # as the record's budget_max_* (record.build_record): a channel method has no
                   # nonzeros budget; its params budget, if asked, is max_params (all parameters kept)
                   "budget": {"max_nonzeros": plan.budget.max_nonzeros if plan.method.family == "weights" else None,
                              "max_macs": None if plan.budget.max_macs is None
                              else plan.budget.max_macs + plan.budget.fixed_macs,
                              "max_params": budget_max_params(plan)},
                   "prunable_weights": plan.space.numel, "dense_macs": plan.costs.macs,
                   "fixed_macs": plan.budget.fixed_macs, "dense": dense, "stages": metrics.get("stages", []),
                   "config": metrics.get("config") or (folder.config_text() if folder.config.exists() else None)}     # as the run began
        for key in ("model_file_sha256", "checkpoint_sha256", "class_names"):
            if key in describe:
                metrics[key] = describe[key]
        if data_fingerprint:
            metrics["data_fingerprint"] = data_fingerprint
        folder.write_metrics(metrics)

        def on_saved(history: list[dict]) -> None:
            metrics["stages"] = [dict(h) for h in history]
            folder.write_metrics(metrics)
            if on_step is not None:
                on_step(history[-1])
        checkpointer = RunCheckpointer(folder, measure_stage, on_saved,
                                       unit=_UNIT.get(plan.mode, "stage"))
        checkpointer.redo = redo
        checkpointer.log_resuming, checkpointer.announced = probe.log_resuming, probe.announced
        checkpointer.restored = at_eval
    else:
        checkpointer = StageMeter(measure_stage, on_step) if eval_loader is not None or on_step else None
    # the caller's torch RNGs as they were (the run reseeds them); Python's random and NumPy's are
    # neither seeded nor set by prunekit, a resumed run included (restore_rng): a user's loader that
    # draws from them is replayed on its own states (data.replay), and a loss or Method of the user's
    # that draws from them draws from the caller's, as any call of it would
    with torch.random.fork_rng(devices=_initialised_cuda_devices()):
        torch.manual_seed(plan.request.seed)
        outcome = _run(plan, train_batches, eval_loader, checkpointer, progress)
    restored = getattr(checkpointer, "restored_seconds", 0.0)
    final = measure_now(outcome.model)
    record = build_record(plan, outcome, dense, final, outcome.seconds + restored)
    record.update(about or {})
    if len(getattr(checkpointer, "world_sizes", ())) > 1:     # resumed with another world size: each session's
        record["world_sizes"] = list(checkpointer.world_sizes)
    if record.get("empty_layers"):
        warn_ours(PrunekitWarning(empty_layers_warning(record["empty_layers"])))
    snapshots = {share: _snapshot_record(build_record(replace(plan, shares=[share]), snap, dense,
                                                      measure_now(snap.model), snap.seconds + restored), share)
                 for share, snap in outcome.snapshots.items()}
    if snapshots:
        record["snapshots"] = list(snapshots.values())
    if folder is not None and folder.writable:
        shrunk = plan.method.family == "channels"
        save_pruned(folder.path, outcome.model, describe, record, shrunk)
        for share, snap in outcome.snapshots.items():
            save_pruned(folder.path / f"snapshot-{share:g}", snap.model, describe, snapshots[share], shrunk)
        metrics.update(status="done", final=record, stages=outcome.history,
                       layers=layer_density(plan.costs, outcome.model))
        folder.write_metrics(metrics)
        folder.log(f"done: MACs kept {record['flops_kept']:.4f}, {_quality(record)}")
    return record, outcome.model, {share: snap.model for share, snap in outcome.snapshots.items()}


def _eval_resumer(eval_loader, dense_read: bool) -> Callable | None:
    """Keep a resumed run's measurements those of an uninterrupted run: every measurement reads one
    pass of ``eval_loader`` (dense, each stage, event or phase, final), and a prunekit loader or a
    replay (one with an ``epoch``: an augmenting loader's crops and flips, a shuffling one's order)
    reads another epoch at each pass. A resumed call measures only what is left, so its first pass
    must read the epoch an uninterrupted run reads there, not the loader's first again.

    ``dense_read``: the dense measurement is the run's own, read from its metrics.json (its first
    call took the loader's first pass): the loader is moved on by that pass now. Returns the
    checkpointer's ``restored(state)``, which moves it on by the passes the restored records took
    (those with ``eval_seconds``: measured on the evaluation data; a run with ``stage_eval`` off
    measured none). None without such a loader (its passes are all alike, or not ours to number)."""
    if eval_loader is None or not isinstance(getattr(eval_loader, "epoch", None), int):
        return None
    first = eval_loader.epoch             # the loader's epoch as this call got it: a run's first pass
    before = 1 if dense_read else 0
    eval_loader.epoch = first + before

    def restored(state) -> None:
        eval_loader.epoch = first + before + sum("eval_seconds" in h for h in state.history)
    return restored


def _quality(record: dict) -> str:
    """run.log's measure of the pruned model: its accuracy, else (a user's loss) its loss."""
    shown = lambda x, spec: "?" if x is None else format(x, spec)     # noqa: E731
    if record.get("accuracy") is not None:
        return f"accuracy {shown(record.get('dense_accuracy'), '.2f')}% -> {record['accuracy']:.2f}%"
    if record.get("loss") is not None:
        return f"loss {shown(record.get('dense_loss'), '.4g')} -> {record['loss']:.4g}"
    return "no evaluation data"


def empty_layers_warning(layers: list[str]) -> str:
    """What a user is told of layers whose every weight was pruned."""
    quoted = [f"'{name}'" for name in layers]          # a Sequential child's name "3" would read as a count
    shown = (f"layer{'s' if len(layers) > 1 else ''} " + ", ".join(quoted[:6])
             + (f" and {len(layers) - 6} more" if len(layers) > 6 else ""))
    return (f"{shown} kept no weight: what {'it computes' if len(layers) == 1 else 'they compute'} no longer "
            "depends on its input (without a residual path around it the model's output is the same for every "
            "input); if that is not meant, lower the budget, exclude the layer, or use a method that keeps "
            "every layer (magnitude-uniform)")


def _initialised_cuda_devices() -> list[int]:
    """The CUDA devices whose RNG ``torch.manual_seed`` would change and the caller may have drawn
    from: every device once CUDA is initialised, none before (nothing to keep)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _run(plan: Plan, train_batches, eval_loader, checkpointer, progress: bool) -> Outcome:
    """Dispatch on the method's family and the mode: the one place where the paths part."""
    request = plan.request
    if plan.method.family == "channels":
        if train_batches is None:
            raise OptionError(f"method {plan.method.name} trains gates on training data: pass data", ("data",))
        source = train_batches()
        if isinstance(source, BatchLoader) and source.batch_size != plan.options.gate_batch_size:
            source = copy.copy(source)                 # the gates' batch size, on a loader of our own
            source.batch_size = plan.options.gate_batch_size
        elif isinstance(source, ReplayedLoader) and not source.make_takes_epoch:
            # lambda: loader over one of ours is read in the gates' batches: at_pass applies them to each
            # loader the function makes that is one of ours (known at each replayed make, not by a call
            # of the user's function of its own) and reads any other as it is
            source = copy.copy(source)
            source.batch_size = plan.options.gate_batch_size
        channels = replace(plan.channels, batches=lambda: source, loss_fn=request.loss)
        return prune_channels(channels, plan.method.run, plan.options, recalibrate_bn=request.recalibrate_bn,
                              checkpointer=checkpointer, progress=progress, sparsify=plan.method.sparsify)
    ctx = PruneContext(request.model, plan.space, plan.costs, plan.budget, train_batches, request.seed,
                       request.recalibrate_bn, progress, checkpointer, loss_fn=request.loss)
    run = plan.method.run if _built_in(plan.method) else _checked_run(plan.method)
    if plan.mode == "gradual":
        # the checkpointer measures each event when there is evaluation data
        return prune_gradual(ctx, run, plan.options, plan.gradual,
                             eval_loader=None if checkpointer is not None else eval_loader)
    return prune_weights(ctx, run, plan.options)


def _built_in(method: Method) -> bool:
    return method.name in BUILT_IN and METHODS.get(method.name) is method


def _checked_run(method: Method):
    """``method.run`` (a weights method of the user's own) with what it returns checked: a wrong
    result is refused naming that method and what is wrong, not blamed on prunekit."""
    def run(ctx: PruneContext, options) -> Pruned:
        pruned = method.run(ctx, options)
        fix = f"method {method.name!r} (your own) returned"
        if not isinstance(pruned, Pruned):
            raise PrunekitError(f"{fix} {type(pruned).__name__}: its run(ctx, options) must return "
                                "prunekit.pipelines.weights.Pruned(weights), the new flat weight vector")
        weights, numel = pruned.weights, ctx.space.numel
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (numel,):
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise PrunekitError(f"{fix} weights of shape {shape}: Pruned.weights must be a flat vector of the "
                                f"{numel:,} prunable weights (the order of ctx.space.vector())")
        if weights.is_floating_point() and not bool(torch.isfinite(weights).all()):
            raise PrunekitError(f"{fix} weights holding nan or inf: fix its run function")
        budget, nonzeros = ctx.budget, int(torch.count_nonzero(weights))
        if nonzeros > budget.max_nonzeros:
            raise PrunekitError(f"{fix} {nonzeros:,} nonzero weights, over the budget's {budget.max_nonzeros:,} "
                                "(ctx.budget.max_nonzeros): its run function must keep at most that many")
        if budget.max_macs is not None:
            ctx.space.assign(weights)
            macs = ctx.costs.count(ctx.space.model).macs - budget.fixed_macs
            if macs > budget.max_macs:
                raise PrunekitError(f"{fix} weights costing {macs:,} MACs, over the budget's {budget.max_macs:,} "
                                    "(ctx.budget.max_macs): its run function must keep within it")
        return pruned
    return run


_UNIT = {"gradual": "event", "structured": "phase"}     # what a run's checkpoint is (else a stage)


def _tell_changed_code(folder: RunFolder, metrics: dict, describe: dict) -> None:
    """A run of a model file resumed after its file changed: say so (the stages left run the new code)."""
    before, now = metrics.get("model_file_sha256"), describe.get("model_file_sha256")
    if before is not None and now is not None and before != now:
        message = (f"the model file changed since this run started ({describe['model']}): the "
                   f"{_UNIT.get(metrics.get('mode'), 'stage')}s left use the new code")
        folder.log(message)
        warn_ours(PrunekitWarning(message))


def _refuse_unfit_checkpoint(folder: RunFolder, plan: Plan, metrics: dict, describe: dict, force: bool = False,
                             anew: str = ANEW) -> bool:
    """A resume whose model no longer fits the run's newest checkpoint (its model file edited since
    the run began, a layer widened; or another model passed from Python) would fail loading it:
    refused before any work, naming the change and its fix. ``force`` (the command line's --force,
    which otherwise carries an unfinished run on): the run's checkpoints are removed instead and True
    returned, as ``_refuse_changed_images`` does: it starts anew on the model as it is now."""
    channels = plan.method.family == "channels"
    found = checkpoint_misfit(folder.checkpoints, plan.channels.model if channels else plan.request.model, channels)
    if found is None:
        return False
    name, misfit = found
    if force:
        from .run_folder import _remove_own_files
        folder.log(f"the model no longer fits {name} ({misfit}): --force starts the run anew (its stages so far "
                   "are removed)")
        if folder.writable and folder.checkpoints.is_dir():
            _remove_own_files(folder.checkpoints)
        return True
    before, now = metrics.get("model_file_sha256"), describe.get("model_file_sha256")
    if before is not None and now is not None and before != now:
        head = (f"the model file changed since the run in {folder.path} started ({describe['model']}), and the model "
                f"it builds no longer fits the run's checkpoint {name} ({misfit}): put the model file back as it was "
                "to carry the run on, or ")
    else:
        head = (f"the model does not fit the run's checkpoint {name} in {folder.path} ({misfit}): pass the model the "
                "run started with, built as it was, to carry the run on, or ")
    raise worded(head + "start a new run (force=True, or another out)", head + anew)


def _refuse_changed_weights(folder: RunFolder, metrics: dict, describe: dict) -> None:
    """A run resumed after its starting checkpoint changed would finish from other weights than it
    began with (and report the old dense accuracy): refused."""
    before, now = metrics.get("checkpoint_sha256"), describe.get("checkpoint_sha256")
    if before is not None and now is not None and before != now:
        raise PrunekitError(f"the checkpoint this run in {folder.path} started from has changed since (its SHA-256 "
                            "differs): put the original back to carry the run on, or start a new run in another "
                            "folder")


def _refuse_changed_classes(folder: RunFolder, metrics: dict, describe: dict, redo: str = REDO) -> None:
    """A run resumed over data whose class names changed since it began (an image folder's class
    folder renamed, added or removed: the labels are the sorted folder names) would carry on with
    other labels than its stages so far were judged and trained on: refused. The names the run
    began with are in its metrics.json (``class_names``, from ``describe``). ``redo``: the command
    line's words for running it anew (``REDO``), in the warning over an older folder."""
    before, now = metrics.get("class_names"), describe.get("class_names")
    if before is None and isinstance(now, list) and metrics.get("stages"):
        # a run of an older prunekit, which recorded none: the labels its stages so far learned are unknown
        names = ", ".join(map(str, now[:6])) + (", ..." if len(now) > 6 else "")

        def line(fix: str) -> str:
            return (f"{folder.path} was written by an older prunekit that recorded no class names: carried on "
                    f"without checking that the classes of the data ({names}) are the ones it started with (a "
                    f"renamed, added or removed class folder shifts the labels); {fix} if they changed")
        folder.log(line(redo))
        warn_ours(worded_warning(line("run it anew with force=True"), line(redo)))   # every rank (errors.warn)
    if isinstance(before, list) and isinstance(now, list) and before != now:
        shown = lambda names: ", ".join(map(str, names[:6])) + (", ..." if len(names) > 6 else "")   # noqa: E731
        raise PrunekitError(f"the classes of the data changed since the run in {folder.path} started "
                            f"({shown(before)}; now {shown(now)}): carrying it on would shift its labels; restore "
                            "the class folders to carry the run on, or start a new run in another folder")


def _refuse_changed_images(folder: RunFolder, metrics: dict, now: dict | None, force: bool = False,
                           anew: str = ANEW, redo: str = REDO) -> bool:
    """A run resumed over an image folder whose images changed since it began (an image added,
    removed or replaced: ``data.imagefolder.fingerprint_change``), or over another data set whose
    images or labels did (``data.dataset.contents_fingerprint``), would measure and prune its stages
    left on other images than its dense model and stages so far: refused, naming what changed.
    ``now``: ``{split: fingerprint}`` of the folders read now; the run's are in its metrics.json
    (``data_fingerprint``). A run that recorded none where it recorded its class names, or over a
    data set read whole (an older prunekit's), is carried on with a warning; one that recorded neither was warned of by
    ``_refuse_changed_classes``. ``force``: the run's checkpoints are removed instead and True
    returned: it starts anew over the images as they are now (its metrics are written afresh).
    ``anew``: the refusal's words for starting the run anew (``ANEW``: prune's command line's);
    ``redo``: the warning's over an older folder (``REDO``)."""
    from .data.imagefolder import fingerprint_change
    from .run_folder import _remove_own_files
    if not now:
        return False
    before = metrics.get("data_fingerprint")
    if isinstance(before, dict):
        for split, fingerprint in now.items():
            change = fingerprint_change(before.get(split), fingerprint)
            if change is not None and force:
                folder.log(f"the images the run read changed since it started ({change}): --force starts it "
                           "anew (its stages so far are removed)")
                if folder.writable and folder.checkpoints.is_dir():
                    _remove_own_files(folder.checkpoints)
                return True
            if change is not None:
                where = fingerprint.get("folder") or f"the {split} split"
                whole = "data" in fingerprint           # a data set read whole: its files, one split of them
                raise PrunekitError(f"the images in {where} changed since the run in {folder.path} started "
                                    f"({f'the {split} split: ' if whole else ''}{change}): its stages left would be "
                                    "pruned and measured on other images than the first; put "
                                    f"{'the files' if whole else 'the folder'} back as "
                                    f"{'they were' if whole else 'it was'} to carry the run on, or {anew}")
    elif metrics.get("stages") and (isinstance(metrics.get("class_names"), list)
                                    or any("data" in fingerprint for fingerprint in now.values())):
        def line(fix: str) -> str:
            return (f"{folder.path} was written by an older prunekit that recorded no fingerprint of its images: "
                    "carried on without checking that they are the ones it started with (an image added, removed or "
                    f"replaced changes what the stages left are pruned and measured on); {fix} if they changed")
        folder.log(line(redo))
        warn_ours(worded_warning(line("run it anew with force=True"), line(redo)))   # every rank (errors.warn)
    return False


def _readable_json(*paths) -> bool:
    """Whether every one of ``paths`` holds a JSON object."""
    for path in paths:
        try:
            if not isinstance(json.loads(path.read_text()), dict):
                return False
        except (OSError, ValueError):
            return False
    return True


def _has_layout(model: nn.Module, layout: dict) -> bool:
    """Whether ``model``'s channel layout (``zoo.layout.channel_layout``) is ``layout`` (as read from
    a model.json: JSON values)."""
    from .zoo.checkpoints import unwrap_parallel
    from .zoo.layout import channel_layout

    def plain(entries):      # a conv's "geometry" aside: a folder of a prunekit before it recorded none
        return {name: {k: v for k, v in spec.items() if k != "geometry"} if isinstance(spec, dict) else spec
                for name, spec in entries.items()} if isinstance(entries, dict) else entries
    return plain(json.loads(json.dumps(channel_layout(unwrap_parallel(model))))) == plain(layout)


def _load_final(plan: Plan, folder: RunFolder, redo: str = REDO) -> nn.Module:
    """The finished run's model: the request's own, with the saved weights (a weights method's
    always into the model passed in, as its first run pruned that one in place; a channel method's
    into a copy reshaped to the saved layout). ``redo``: how a refusal says to run it anew, in the command line's words
    (``execute``'s; Python's ``force=True`` where the refusal is read in Python)."""
    from .loading import without_parallel_prefix
    from .saving import read_meta
    from .zoo.checkpoints import unwrap_parallel
    model = plan.request.model
    layout = read_meta(folder.model_path).get("channel_layout")
    if layout is not None and not (plan.method.family == "weights" and _has_layout(model, layout)):
        model = copy.deepcopy(model)      # (an nn.DataParallel's layout names its module's layers)
        apply_layout(unwrap_parallel(model), without_parallel_prefix(layout, unwrap_parallel(model)))
    try:
        state = load_file(folder.model_path)
    except (SafetensorError, OSError) as err:
        head = (f"{folder.model_path}, this finished run's model, cannot be read "
                f"({str(err).splitlines()[0] if str(err) else type(err).__name__}): restore it, or ")
        raise worded(head + "run it anew with force=True", head + redo) from None
    try:       # saved under an nn.DataParallel's module's names (an older prunekit's file: the wrapper's)
        (model if set(state) == set(model.state_dict()) else unwrap_parallel(model)).load_state_dict(state)
    except RuntimeError:                 # a shrunk model without the layout its model.json kept
        head = (f"{folder.model_path} does not fit the model (a channel method's model.json, which holds its layer "
                "sizes, is missing or damaged?): restore it, or ")
        raise worded(head + "run it anew with force=True", head + redo) from None
    return model.eval()
