"""``prunekit.prune``: the one Python entry; prune your own ``nn.Module`` with any method, in any mode.

::

    result = prunekit.prune(net, train_loader, method="falcon", flops=0.3, eval_data=test_loader)
    result = prunekit.prune(net, train_loader, method="autobot", flops=0.5)     # channels: a smaller net
    result = prunekit.prune(net, train_loader, method="chita", sparsity=0.9, gradual=True, events=3)
    print(result.summary())

``data`` (training batches, for gradients, gate training, fine-tuning and BatchNorm
recalibration) and ``eval_data`` may be a ``torch.utils.data.DataLoader`` or any re-iterable of
``(x, y)`` batches, a map-style ``Dataset`` of ``(x, y)`` pairs, a pair of tensors ``(X, Y)``, or
a function returning an iterable of batches. Only ``x`` (the model's one input) and ``y`` are read:
a batch with a third element (a sample index, a weight, a mask) is refused in one line, never
silently dropped; an index or weight goes, and a mask the model needs is one of its inputs (wrap
the model so that its forward takes one tensor). Every stage of a multi-stage method reads the
training data from the start again (a prunekit loader at the epoch it was at when ``prune`` was
called; any other data with the random draws of its shuffling and transforms replayed from torch's
RNG states at the call, ``prunekit.data.replay``; in a run folder, at the call that started the run,
kept in its ``data-rng.json``), so stages see the same batches however many ran before, a resumed
run (``out=``) matches an uninterrupted one whatever the resuming process's RNGs, and several
torchrun ranks read rank 0's batches. A run folder also records a fingerprint of the starting
weights (and data), so the same call with another model is refused, not resumed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import signal
import sys
import tomllib
from collections.abc import Callable, Iterable
from contextlib import ExitStack

import numpy as np
import torch
from torch import nn

from . import interrupts, recipes, run_lock, runs
from .distributed import collective as distributed
from .api_checks import (check_arguments, check_data, check_default_loss, check_example_batched, check_labels,
                         check_loss, check_not_meta, check_runs_on, first_batch, plain_numbers)
from .cost_cut import CutCheck
from .cost_inputs import refuse_lazy
from .data.dataset import DeferredImageDataset, ImageDataset, refuse_raw_pixels
from .data.loaders import BatchLoader, dataset_loader, map_style, samples_per_pass
from .data.replay import (READS_AT_PASS, ReplayedLoader, loader_generators, rng_states, set_rng_states,
                          states_from_json, states_to_json)
from .distributed import check_same_start, current, launched_by_torchrun
from .distributed.lost import first_line, is_lost_rank, lost_ranks_words
from .errors import PrunekitError, PrunekitWarning, note, single_sample_batchnorm
from .executor import execute, python_model_description
from .losses import loss_name
from .callables import describe, differing, fingerprint, forget_tensors, slot_record, slots, written_by_run
from .methods import BUILT_IN, METHODS, Method, lookup, result_parts
from .pipelines.fisher_methods import check_planned_rows, check_rows_before_plan
from .record import Result
from .request import PruneRequest
from .runs import RunFolder, claim_on_rank_0, release_refused
from .saving import atomic_write_json, refuse_non_tensors
from .errors import warn as warn_ours


def _buffers_kept(prune_call):
    """``prune_call`` (``prune``) leaving the buffers of the model passed to a channel method as they
    were (BatchNorm's are left so already): a buffer the model's own forward updates (a call counter,
    an EMA of its outputs) is not changed by prunekit's forward passes (measuring the model, checking
    its labels, training gates on it). A weights method prunes the model in place: the model passed
    is ``result.model`` and what a run folder saves, so its buffers stay as those passes left them."""
    @functools.wraps(prune_call)
    def call(model, *args, gradual: bool = False, **kwargs):
        kept = _own_buffers(model) if isinstance(model, nn.Module) and gradual is not True \
            and _channel_method(kwargs.get("method", "magnitude")) else []
        try:
            return prune_call(model, *args, gradual=gradual, **kwargs)
        finally:
            _put_back(kept)
    return call


def _channel_method(method) -> bool:
    """Whether ``method`` (a name or a Method) is a channel method; False for a name prune refuses."""
    try:
        return lookup(method).family == "channels"
    except PrunekitError:
        return False


def _own_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, buffer name, a copy of it) for every buffer of ``model`` outside BatchNorm layers (but
    a lazy module's buffer not made yet: nothing to copy)."""
    return [(module, name, buffer.detach().clone()) for module in model.modules()
            if not isinstance(module, nn.modules.batchnorm._BatchNorm)
            for name, buffer in module._buffers.items()
            if isinstance(buffer, torch.Tensor) and not buffer.is_meta and not nn.parameter.is_lazy(buffer)]


def _put_back(kept: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    """Each buffer of ``kept`` (``_own_buffers``) set back to its copy where it changed: in place where
    it still has that shape and dtype, else the copy itself takes its place."""
    with torch.no_grad():
        for module, name, before in kept:
            now = module._buffers.get(name)
            if isinstance(now, torch.Tensor) and now.shape == before.shape and now.dtype == before.dtype \
                    and now.device == before.device and not now.is_inference():
                if not torch.equal(now, before):
                    now.copy_(before)
            elif name in module._buffers:
                module._buffers[name] = before


@_buffers_kept
def prune(model: nn.Module, data=None, *, method: str | Method = "magnitude", sparsity=None, flops=None,
          params=None, example_input: torch.Tensor | None = None, eval_data=None, include: list[str] | None = None,
          exclude: list[str] | None = None, seed: int = 0, recalibrate_bn: bool = True, gradual: bool = False,
          batch_size: int = 128, out: str | None = None, force: bool = False, progress: bool = False,
          stage_eval: bool = True, loss=None, **options) -> Result:
    """Prune ``model`` with ``method`` to the budget and return a ``Result``.

    Args:
        data: training data (see the module docstring). Every method and mode needs it except
            magnitude, magnitude-uniform and magnitude-flops run at once (not gradual, without
            ``layer_search`` or ``refit_batches``), which also prune with ``data=None``; BatchNorm
            recalibration needs it too (see ``recalibrate_bn``).
        method: a name from ``prunekit.methods.METHODS`` (magnitude, chita, falcon, autobot,
            taper ...) or a ``prunekit.methods.Method`` of your own.
        sparsity, flops, params: the budget, as on the command line (0.9, "90%", "50k"; flops =
            share of dense MACs kept, or MACs kept as "20M"; params = share of all parameters kept,
            or their count as "200k": with method autobot, every parameter the shrunk model keeps,
            channels cut until flops and params are both met).
        example_input: one input batch for counting MACs (its first example is the one traced;
            its first two rows check that cut: ``cost_cut``); default: the first training (or
            evaluation) batch.
        eval_data: evaluation data; gives accuracy and loss before, per stage and after.
        stage_eval: False: accuracy and loss before and after only, not after every stage, event
            or phase (each reads all of ``eval_data``; pruning seconds never include them).
        include, exclude: module-name patterns of the layers to prune (weights methods; default:
            every weight the traced example multiplies: Conv/Linear, attention projections,
            embedding tables, recurrent weights, parameters in functional products).
        gradual: prune in events with fine-tuning in between (weights methods; options
            ``events``, ``epochs_per_event``, ``final_epochs``, ``lr``).
        recalibrate_bn: re-estimate the BatchNorm statistics on ``data`` after pruning (default
            True). With ``data=None`` it cannot run: a model with BatchNorm then keeps its old
            statistics, with a warning (``recalibrate_bn=False`` prunes without and says nothing).
        batch_size: batch size used when ``data``/``eval_data`` are a Dataset or tensors.
        seed: a whole number >= 0 (a NumPy integer too) for the run's own random draws: the
            shuffled order of ``data`` given as a Dataset or ``(X, Y)`` tensors (its loader's
            generator is seeded with it), and everything the method draws (gradient sample rows,
            gate initialisation, fine-tuning), as ``prune`` calls ``torch.manual_seed(seed)``
            before pruning (inside ``torch.random.fork_rng``: torch's global RNG is given back
            as it was when ``prune`` was called). Python's ``random`` and NumPy's global RNGs are
            neither seeded nor set (a resumed run restores torch's states alone); a loss or
            Method of yours that draws from them draws from yours. Same model, data and
            seed give the same result. A DataLoader of your own that shuffles (or random
            transforms) draws its order from its own generator or from torch's global RNG as it
            stands when ``prune`` is called (replayed at every pass, see the module docstring),
            not from ``seed``: to repeat such a run, call ``torch.manual_seed`` before ``prune``
            or give the loader ``generator=torch.Generator().manual_seed(k)``.
        progress: True shows progress bars (tqdm, on stderr) while gradients are collected and
            while training and evaluating; default False: quiet.
        loss: for a model that is not a classifier over class indices, ``loss(outputs, targets)``
            -> the mean over the batch of the per-sample losses (e.g. ``nn.MSELoss()``): the
            gradients, the judge of a search and the evaluation's loss use it, and accuracy is
            None. Every method and mode; distillation (for classifiers) is then off (``prunekit.losses``).
        out: a run folder (config, log, metrics, checkpoints, model, report); calling again with
            the same arguments and folder resumes an interrupted run; a folder holding another
            run (other settings, or another model or data: the config records a SHA-256 of the
            starting weights, and of the data's contents where that is exact: ``(X, Y)``
            tensors, a ``TensorDataset`` or a ``Subset`` of one, alone or in a ``DataLoader``,
            prunekit's loaders; the same data in another form is refused too; and a fingerprint of
            the code given: ``loss``, an ``importance`` function, an own ``Method``, see
            ``prunekit.callables``) is refused unless ``force`` (which clears that run first);
            so is a run whose config.toml was edited since it ran or began (finished or not):
            ``force`` runs it anew with the values asked for.
            A finished run given back (not run) says so in one note (``errors.note``: the
            ``prunekit`` logger, or a ``prunekit: note:`` line on stderr; not a warning), a
            ``PrunekitWarning`` where a reseeded loader changed nothing.
            Any other Dataset or iterable is compared by
            its form and sample count only: carrying such a run on warns that its contents could
            not be checked. Its
            model.json records the class names the data (else eval_data) carries as ``classes``
            (an ImageFolder's, prunekit's ImageDataset's), so that the CLI labels later image
            folders by them.
        options: the method's options, e.g. ``fisher_samples=500, stages=5`` (see
            ``prunekit.methods``); an option the method does not take is refused.
            Magnitude methods take ``importance=f`` with ``f(module_name, weight) -> scores``.
    Weights methods prune ``model`` in place; channel methods (autobot, taper, hybrid) return a
    new, smaller model in ``result.model`` and leave ``model`` untouched. A ``torch.compile``'d
    model is pruned through the module it wraps (``compiled._orig_mod``, which shares its
    parameters): weights methods prune both in place, and ``result.model`` is the uncompiled
    module (compile it again to run it compiled).
    """
    model = _uncompiled(model)
    seed, batch_size = plain_numbers(seed), plain_numbers(batch_size)      # np.int64(3) from a NumPy grid: 3
    sparsity, flops, params = plain_numbers(sparsity), plain_numbers(flops), plain_numbers(params)
    options = {name: plain_numbers(value) for name, value in options.items()}
    check_arguments(model, {"method": method.name if isinstance(method, Method) else method, "seed": seed,
                            "batch_size": batch_size, "recalibrate_bn": recalibrate_bn, "progress": progress,
                            "stage_eval": stage_eval, "gradual": gradual, "force": force,
                            "include": include, "exclude": exclude, "out": out, "loss": loss})
    # the code's state before anything runs it (check_loss calls the loss): what the run writes is its output
    forget_tensors()        # (a tensor is hashed once in a call: before, in the config, after)
    code_before = {key: slot_record(obj, width=64)
                   for key, obj in _code_objects(METHODS.get(method, method) if isinstance(method, str) else method,
                                                    loss, options).items()} if out else {}
    check_data(data, "data", class_labels=loss is None)
    check_data(eval_data, "eval_data", class_labels=loss is None)
    check_not_meta(example_input, "example_input")
    if launched_by_torchrun() and not current().distributed:
        warn_ours(PrunekitWarning(
            f"this script runs under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) but joined no process group: "
            "every process prunes alone; call prunekit.distributed.init_from_env() first to share the work"))
    if out is not None:     # the run folder keeps the model (and its checkpoints) as .safetensors
        refuse_non_tensors(model, "out=", "prune without out= and save the result with torch.save")
    saved = _saved_streams(out, force)  # a run in out= replays its data from the states it started with
    train_batches = _batches(data, batch_size, shuffle=True, seed=seed, what="data", saved=saved.get("data"))
    eval_batches = _batches(eval_data, batch_size, shuffle=False, seed=seed, what="eval_data",
                            saved=saved.get("eval_data"))
    if example_input is None:
        source, what = (train_batches, "data") if train_batches is not None else (eval_batches, "eval_data")
        if source is None:
            raise PrunekitError(_without_data(method, gradual))
        first = first_batch(source, what)[0]
        example_input = first if isinstance(first, torch.Tensor) else first[:1]
        named = f"the first batch of {what}"
    else:
        check_example_batched(example_input, train_batches or eval_batches, "data" if train_batches else "eval_data")
        named = "example_input"
    if isinstance(example_input, torch.Tensor) and example_input.ndim > 0:
        example_input = example_input[:2]
    if isinstance(example_input, torch.Tensor):                 # the data may stay on the CPU
        example_input = example_input.to(_model_device(model))
    cut_check = None
    if isinstance(example_input, torch.Tensor) and example_input.ndim > 0:
        # MACs are per example; traced at batch 1, work that does not grow with the batch
        # (learned latents through a layer) is not divided among the examples and rounded down.
        # The plan's trace checks its cut on the first two rows (cost_cut)
        refuse_lazy(model)
        cut_check = CutCheck(example_input, named)
        example_input = example_input[:1]
    if loss is None:                          # the user's loss decides what its targets are
        check_labels(model, example_input, data, train_batches, "data")
        check_labels(model, example_input, eval_data, eval_batches, "eval_data")
        if eval_batches is not None or (train_batches is not None and _uses_loss(method, gradual)):
            check_default_loss(model, example_input)
    eval_loader = eval_batches() if eval_batches is not None else None
    budget = {"sparsity": sparsity, "flops": flops, "params": params}
    request = PruneRequest(model, example_input, method, budget, include, exclude, seed, gradual, recalibrate_bn,
                           options, loss=loss, cut_check=cut_check)
    if train_batches is not None:     # rows past the data: refused before the memory plan suggests more rows
        method_row, _, checked, _ = request.resolved_options()
        check_rows_before_plan(method_row, checked, samples_per_pass(train_batches()))
        request.data_samples = samples_per_pass(train_batches())     # a memory refusal names no more rows
    if train_batches is not None:     # gradient rows past the data: refused before the dense model is measured
        request.check_plan = lambda plan: check_planned_rows(      # (in plan(), before its warnings)
            plan, samples_per_pass(train_batches()), lambda: int(first_batch(train_batches, "data")[1].shape[0]))
    plan = request.plan()
    if eval_batches is not None and train_batches is not None:     # the plan ran the model on data's first input
        check_runs_on(model, eval_batches, "eval_data", _model_device(model))
    if loss is not None and train_batches is not None:
        check_loss(model, loss, train_batches, _model_device(model))
    if current().distributed:       # every rank must start from the same weights and read the same data
        settings = _settings_text(method, budget, include, exclude, seed, gradual, recalibrate_bn, options=options)
        given = {"data": train_batches, "eval_data": eval_batches}
        check_same_start(model, python=True, options=settings,
                         samples={what: samples_per_pass(batches()) for what, batches in given.items()
                                  if batches is not None},
                         **{what: first_batch(batches, what) if batches is not None else None
                            for what, batches in given.items()})
    folder = None
    resend = []
    with ExitStack() as lock:
        lock.callback(lambda: resend and interrupts.resend_sigterm())    # last: after the lock and the handler
        lock.enter_context(interrupts.running())      # a lost torchrun launcher stops this call, not the caller after it
        lock.enter_context(distributed.launcher_watched())   # a group the script joined itself: watched for this call
        took_sigterm = False
        pruning = False         # from the run's start on, a refusal or a single-sample batch releases a fresh claim
        was_training = model.training
        try:        # the span of sigterm_in_call's handler: a SIGTERM it raises anywhere in it is said here
            if current().distributed and launched_by_torchrun():
                # torchrun's SIGTERM to the ranks left once one died killed a script with no handler of its own
                # before a lost rank could be told: taken for this call alone (never over a handler of the script's)
                took_sigterm = lock.enter_context(interrupts.sigterm_in_call())
                distributed.say_process()                # so a peer can tell this rank's process ended
                interrupts.on_sigterm(distributed.say_stopped)
            if out is not None:       # under torchrun rank 0 alone holds the lock and writes; every rank computes
                lock.enter_context(run_lock.held_by_rank_0(out, "out="))        # one process at a time in the folder
                config = {"model_class": type(model).__name__, "method": plan.method.name, **budget,
                          "include": include, "exclude": exclude, "seed": seed, "recalibrate_bn": recalibrate_bn,
                          "gradual": gradual, **({"loss": loss_name(loss)} if loss is not None else {}),
                          **{k: v for k, v in options.items() if not callable(v)},
                          **_code_fingerprints(plan.method, loss, options, _saved_written(out, force),
                                              code_before),
                          **_fingerprint(model, data, train_batches, None if force else out),
                          **_eval_fingerprint(eval_data, eval_batches),
                          "batch_size": _batch_size_of(data, eval_data, batch_size)}
                text = _config_text(config, plan.method, loss, options)
                folder = claim_on_rank_0(out, text, force=force, device=_model_device(model), python=True,
                                         code_detail=_code_detail(out, force, config, code_before))
                older = _read_otherwise(folder, data, plan)
                told = _say_unchecked(folder, config, text, older)
                _keep_streams(folder, {"data": train_batches, "eval_data": eval_batches})
                _say_given_back(folder, text,
                                {"data": (data, train_batches), "eval_data": (eval_data, eval_batches)}, told)
            pruning = True
            describe = None if folder is None else {**python_model_description(plan),
                                                    **_class_names(model, data, eval_data)}
            record, pruned, snapshots = execute(plan, train_batches, eval_loader, folder=folder, describe=describe,
                                                progress=progress, stage_eval=stage_eval)
            if folder is not None and folder.writable:
                _note_final_weights(folder, pruned)
                _write_report(folder)
            if took_sigterm:    # no rank returns (SIGTERM at its default again) while rank 0 writes the report:
                distributed.barrier_if_alive()      # a SIGTERM meanwhile is said (say_stopped), not taken for a loss
        except PrunekitError as err:
            if pruning:
                release_refused(folder)
            stopped = runs.stopped_by_divergence(folder, err)
            if stopped is not err:
                raise stopped from None
            raise
        except KeyboardInterrupt:       # Ctrl-C, or a lost torchrun launcher: said while the lock is held
            if took_sigterm and interrupts.terminated():
                lost = [] if distributed.launcher_lost() else distributed.silent_peers() or []
                if lost:                # torchrun's SIGTERM because a rank died: that rank is the news
                    error = _lost_rank(lost_ranks_words(lost), out)
                    if folder is not None:
                        try:
                            runs.mark_stopped(folder, error.stop_line)
                        except OSError:
                            pass
                    raise error from None
                resend.append(True)     # a stop: the process ends by SIGTERM, as without this call's handler
            if folder is not None:
                try:
                    runs.mark_stopped(folder, f"interrupted ({interrupts.stopped_by()[0]})")
                except OSError:         # a full disk: the stop itself is what the caller is told
                    pass
            raise
        except RuntimeError as err:
            if (lost := lost_rank_refusal(err, out)) is None:
                raise
            if took_sigterm:        # torchrun's SIGTERM to the ranks left, on its way: not raised inside this
                signal.signal(signal.SIGTERM, signal.SIG_IGN)     # (the default is put back as the call ends)
            if folder is not None:           # said while the lock is held, as the command line does
                try:
                    runs.mark_stopped(folder, lost.stop_line)
                except OSError:             # a full disk: the lost rank itself is what the caller is told
                    pass
            raise lost from None
        except ValueError as err:
            if not pruning or (refusal := single_sample_batchnorm(err)) is None:
                raise
            release_refused(folder)
            raise refusal from None
        finally:
            if folder is not None:
                _note_written(folder, code_before, _code_objects(plan.method, loss, options), config)
    for returned in (pruned, *snapshots.values()):     # in the mode the model came in (gradual and channel
        returned.train(was_training)                   # methods ended in eval mode)
        if plan.method.family == "channels":           # save_model records its channel layout
            returned._prunekit_shrunk = True
    result = Result.from_record(record, pruned, out)
    result.snapshots = {share: Result.from_record(snap, snapshots[share]) for share, snap in
                        zip(snapshots, record.get("snapshots", []))}
    return result


class LostRank(PrunekitError):
    """Under torchrun, a collective of ``prunekit.prune`` failed because another rank stopped (killed,
    crashed, out of memory) or could not be reached (its machine, the group's timeout): the command
    line's one line, "rank R: a rank stopped or could not be reached (torch's words); ..." and how to
    carry on, in place of torch's raw ``DistBackendError``/``RuntimeError`` (a page of gloo text).
    ``stop_line``: what the run folder's run.log says (``interrupted: ...``, as the command line's)."""


def lost_rank_refusal(err: RuntimeError, out) -> LostRank | None:
    """``err`` (a collective's failure under torchrun) as a :class:`LostRank` naming how to carry on
    (``out``: the run folder, resumed by the same call again); None for any other error."""
    if not (launched_by_torchrun() and current().distributed):
        return None
    if not is_lost_rank(err):
        return None
    if distributed.launcher_lost() or first_line(err).startswith(distributed.LAUNCHER_GONE):
        return _lost_rank(None, out)            # its store went with it: the watcher's stop, in its words
    return _lost_rank(first_line(err), out)     # the command line's wording (distributed.lost), one line


def _lost_rank(first: str | None, out) -> LostRank:
    """The :class:`LostRank` for a lost rank described by ``first`` (torch's words, or the lost ranks);
    None: no rank was lost, the torchrun launcher stopped (said as the command line says it)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else os.environ.get("RANK", "?")
    again = f"prunekit.prune(..., out={str(out)!r})"
    resume = (runs.finished_note(out, f"{again} again") if out is not None and run_had_finished(out) else
              f"run the same script again under torchrun: {again} carries on from "
              "the last completed stage" if out is not None else
              "nothing was saved: run the script again (with out=DIR, a prune run can be resumed)")
    if first is None:                   # the torchrun launcher stopped: the command line's "interrupted (...)"
        lost = LostRank(f"rank {rank}: interrupted ({distributed.LAUNCHER_GONE}); {resume}")
        lost.stop_line = f"interrupted ({distributed.LAUNCHER_GONE})"
        return lost
    lost = LostRank(f"rank {rank}: a rank stopped or could not be reached ({first}); {resume}")
    lost.stop_line = f"interrupted: a rank stopped or could not be reached ({first})"
    return lost


def run_had_finished(out) -> bool:
    """Whether the run in folder ``out`` had finished (metrics.json says "done"), for the one line of a run
    stopped after it (``runs.finished_note``; the command line's too); False where it cannot be read."""
    try:
        return runs.finished_run(RunFolder(out))
    except (PrunekitError, OSError):
        return False


def _class_names(model: nn.Module, *datas) -> dict:
    """``{"class_names": [...]}`` for the run folder's model.json when the data names its classes,
    as the command line records an image folder's: a ``classes`` list of strings (label ``k`` is
    ``classes[k]``) on the data itself or on what it wraps, through ``.dataset`` (a DataLoader of a
    torchvision-style ``ImageFolder``, a ``Subset`` of one, prunekit's ``make_loader`` of an
    ``ImageDataset``). ``data``'s names first, else ``eval_data``'s. Recorded only when they name
    every output (as many names as the last Linear layer's outputs, or no Linear layer): names of
    some outputs only would label a later folder wrongly. ``{}`` when none."""
    from .loading import model_outputs
    for data in datas:
        seen = 0
        while data is not None and seen < 4:        # a loader of a subset of a dataset: a few levels
            try:
                names = getattr(data, "classes", None)
            except Exception:       # noqa: BLE001 - a property of the user's that fails: no names
                names = None
            if (isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names)
                    and len(set(names)) == len(names)):
                outputs = model_outputs(model)
                return {"class_names": list(names)} if outputs in (None, len(names)) else {}
            try:
                data = getattr(data, "dataset", None)
            except Exception:       # noqa: BLE001
                data = None
            seen += 1
    return {}


def _uncompiled(model):
    """The module a ``torch.compile``'d model wraps (``compiled._orig_mod``), else ``model``. They
    share their parameters and buffers, so pruning in place reaches the compiled model too; the
    compiled wrapper itself is not traced or measured (Dynamo would recompile at every probe, and
    fails on the symbolic shapes of prunekit's memory probes)."""
    if "torch._dynamo" not in sys.modules:        # nothing was compiled in this process
        return model
    from torch._dynamo.eval_frame import OptimizedModule
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def _settings_text(method, budget: dict, include, exclude, seed, gradual, recalibrate_bn,
                   options: dict | None = None) -> dict[str, str]:
    """A call's settings as text the ranks compare, parameter name -> value: plain values by
    value, anything else (a function, an object) by its type only (its repr may hold a per-process
    address)."""
    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return repr(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(plain(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k!r}: {plain(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
        return type(value).__name__
    name = method if isinstance(method, str) else getattr(method, "name", type(method).__name__)
    settings = {"method": name, **budget, "include": include, "exclude": exclude, "seed": seed, "gradual": gradual,
                "recalibrate_bn": recalibrate_bn, **(options or {})}
    return {str(key): plain(value) for key, value in settings.items()}


def _fingerprint(model: nn.Module, data, train_batches, out: str | None) -> dict:
    """What a run folder records of what the run starts from, so that the same call with another
    model (other weights) or other data is refused rather than handed this run's result:
    ``weights_sha256`` of the model's state dict (weights and buffers, as given); of the data,
    where cheap and the same however it is shuffled, ``data_sha256`` of ``(X, Y)`` tensors and
    ``data_samples``, the samples one pass reads (where known without reading it). A model that
    holds the finished run in ``out``'s result (the same call again on the model it pruned in
    place, e.g. a notebook cell run twice) counts as the model that run started from."""
    weights = runs.tensors_sha256(model.state_dict().items())
    if out is not None:
        folder = RunFolder(out)
        try:
            metrics = folder.read_metrics()
            started = tomllib.loads(folder.config_text()).get("weights-sha256") \
                if folder.config.is_file() else None
        except (PrunekitError, OSError, UnicodeDecodeError, ValueError):
            metrics, started = {}, None
        if (metrics.get("status") == "done" and metrics.get("final_weights_sha256") == weights
                and isinstance(started, str)):
            weights = started
    found = {"weights_sha256": weights}
    if data is not None:
        contents, form = data_identity(data)
        if contents is not None:
            found["data_sha256"] = contents
        if form is not None:
            found["data_form"] = form
    if train_batches is not None:
        found["data_samples"] = samples_per_pass(train_batches())
    return found


def _code_objects(method, loss, options: dict) -> dict:
    """The code a call hands in that its run folder fingerprints, by its config key: an own
    ``Method`` (``method_fingerprint``: ``methods.result_parts``, its family, options class,
    defaults, ``run`` and ``sparsify``, the rule ``add_method``'s ``code_of`` follows too: its gates
    ``check``, ``check_budget`` and ``plan_memory`` run anew at every call, before the folder is
    claimed, and are no part of it; none for a built-in method or a method's name), ``loss``
    (``loss_fingerprint``) and each option given as a function (``importance_fingerprint``)."""
    found = {}
    if isinstance(method, Method) and not (method.name in BUILT_IN and METHODS.get(method.name) is method):
        found["method_fingerprint"] = result_parts(method)
    if loss is not None:
        found["loss_fingerprint"] = loss
    for name, value in sorted(options.items()):
        if callable(value):
            found[f"{name}_fingerprint"] = value
    return found


def _code_fingerprints(method: Method, loss, options: dict, written: dict | None = None,
                       now: dict | None = None) -> dict:
    """What a run folder records of the code the user hands in, so that a rerun with another
    function is refused rather than handed this run's result: ``method_fingerprint`` ("built-in"
    for a method prunekit ships, else a fingerprint of the user's ``Method``: its family, options
    class, defaults, ``run`` and ``sparsify``, ``methods.code_of`` where nothing was written into
    it; not its gates ``check``, ``check_budget``, ``plan_memory``), ``loss_fingerprint`` (with ``loss``: its class and
    state, or its code) and ``<option>_fingerprint`` for each option given as a function (e.g.
    ``importance``). Each is a SHA-256 (``callables.fingerprint``: the same in every process for
    the same code and state) or ``"unchecked: <why>"`` where it cannot be hashed faithfully (a
    rerun then warns that it could not be checked). ``written``: what the run in ``out=`` wrote
    into that code (``runs.CODE_WRITTEN``, ``_note_written``); ``now``: the code's slots at this
    call's start (``callables.slot_record``, by config key). Code that is that run's but for what
    it wrote records the fingerprint that run recorded only when each slot it wrote holds, at
    this call's start, the value it held at that run's first start or the one the last call left
    (``_moved_written``: ``Annealed(t)`` writing and reading ``self.t``: a ``t=50`` loss is not the
    ``t=1`` one; an object called on since is refused naming the slot: a fresh object, or force=True)."""
    def text(obj) -> str:
        digest, why = fingerprint(obj)
        return digest if digest is not None else f"{runs.UNCHECKED}{why}"
    found = {"method_fingerprint": "built-in"}
    for key, obj in _code_objects(method, loss, options).items():
        entry = (written or {}).get(key)
        if entry is not None and _moved_written(entry, (now or {}).get(key)) == [] \
                and fingerprint(obj, skip=entry["written"])[0] == entry["rest"]:
            found[key] = entry["recorded"]
        else:
            found[key] = text(obj)
    return found


def _moved_written(entry: dict, record: dict | None) -> list[str] | None:
    """The slots a run wrote (``entry``: ``runs.CODE_WRITTEN``'s, with ``start``: each one's
    digest, first 16 hex digits, or None where it was not there, at that run's first start, and
    ``end``: as the last call into the folder left it) whose value at this call's start
    (``record``: ``callables.slot_record``) is neither: the object made afresh as the first was, or
    the one the last call left (the same cell run again, a run stopped by Ctrl-C carried on), is
    the same input; ``Annealed(50.0)`` after ``Annealed(1.0)``, or an object called on since, is
    not. None when that cannot be told (no record, an older folder's entry without ``start``): the
    code is then compared whole."""
    start, end = entry.get("start"), entry.get("end")
    end = end if isinstance(end, dict) else {}
    if record is None or not isinstance(start, dict) or not isinstance(record.get("slots"), dict):
        return None
    now = record["slots"]
    moved = []
    for path in entry["written"]:
        if path not in start:
            return None
        held = now.get(path)
        held = held[:16] if isinstance(held, str) else None
        if held != start[path] and (path not in end or held != end[path]):
            moved.append(path)
    return moved


def _saved_written(out: str | None, force: bool = False) -> dict:
    """What the run in folder ``out`` wrote into the code it was given (``runs.CODE_WRITTEN``,
    ``_note_written``), by config key: ``{"written": [slot, ...], "rest": the fingerprint without
    those slots, "recorded": the config's}``; {} without such a run, with ``force`` (which clears
    it) or when the file cannot be read (the code is then compared whole: a rerun may be refused,
    never given another run's result)."""
    if out is None or force:
        return {}
    try:
        saved = json.loads((RunFolder(out).path / runs.CODE_WRITTEN).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    return {key: entry for key, entry in saved.items()
            if isinstance(entry, dict) and isinstance(entry.get("written"), list)
            and all(isinstance(path, str) for path in entry["written"])
            and isinstance(entry.get("rest"), str) and isinstance(entry.get("recorded"), str)
            and all(part not in entry or isinstance(entry[part], dict)
                    and all(v is None or isinstance(v, str) for v in entry[part].values())
                    for part in ("start", "end"))}


def _note_written(folder: RunFolder, before: dict, code: dict, config: dict) -> None:
    """Record in ``folder`` (``runs.CODE_WRITTEN``) the slots of the code given (``code``, by
    config key) that this call changed from ``before`` (``callables.slots`` at the call's start:
    ``self.calls += 1``, ``self.last = loss.item()``, a list it owns appended to), with those of
    an earlier call into the folder: what the run writes into its loss is its output, not its
    input, so a rerun leaves those slots out of the comparison (``_code_fingerprints``), while a
    setting the run did not write (``label_smoothing``) is still compared. Nothing when nothing
    was written, the folder is not this process's to write (a torchrun rank but 0), or its config
    is gone (a refused run's); a disk error leaves the file as it was (a rerun then compares the
    code whole)."""
    if not before or not folder.writable or not folder.config.exists():
        return
    _note_slots(folder, before, config)
    forget_tensors()        # read anew: a write through .data (self.ema.data.mul_(0.9)) bumps no version
    saved = _saved_written(str(folder.path))
    entries = dict(saved)
    for key, obj in code.items():
        recorded, start = config.get(key), (before.get(key) or {}).get("slots")
        if start is None or not isinstance(recorded, str) or recorded.startswith(runs.UNCHECKED):
            continue
        after = slots(obj)
        if after is None:
            continue
        old = saved.get(key) if saved.get(key, {}).get("recorded") == recorded else None
        written = sorted(set(written_by_run(start, after)) | set(old["written"] if old else ()))
        if not written:
            continue
        rest = fingerprint(obj, skip=written)[0]
        if rest is not None:        # each slot's value at the run's FIRST start: kept, never the given-back call's
            first = old.get("start") if old and isinstance(old.get("start"), dict) else {}
            held = {path: digest[:16] for path, digest in start.items()}
            entries[key] = {"written": written, "rest": rest, "recorded": recorded,
                            "start": {path: first[path] if path in first else held.get(path) for path in written},
                            "end": {path: after[path][:16] if path in after else None for path in written}}
    if entries != saved:
        try:
            atomic_write_json(folder.path / runs.CODE_WRITTEN, entries)
        except OSError:
            pass


CODE_COMMENT = ("# *-fingerprint: a SHA-256 of the code given (prunekit.callables.fingerprint: a function's\n"
                "# bytecode, constants, defaults, closure and the globals it reads; a module's class and state;\n"
                "# not names, files or line numbers): a rerun into this folder with other code is refused")


def _config_text(config: dict, method: Method, loss, options: dict) -> str:
    """config.toml's text: ``recipes.dump_recipe(config)``, its ``-fingerprint`` lines (``_code_fingerprints``)
    preceded by ``CODE_COMMENT`` (what the digests cover) and each followed by a comment naming what it
    was taken of (``# row_scaled: the function's code``). Comments are not compared (``runs.same_values``):
    an ``importance=`` function renamed, its code the same, is the same run (``loss`` is also a
    key of its own, by name)."""
    named = {} if config.get("method_fingerprint") == "built-in" else \
        {"method_fingerprint": f"{method.name}: an own Method's family, options class, defaults, run and sparsify"}
    if loss is not None:
        named["loss_fingerprint"] = f"{loss_name(loss)}: " + ("its class and state" if isinstance(loss, nn.Module)
                                                             else "its code")
    named.update({f"{name}_fingerprint": f"{_callable_name(value)}: the function's code"
                  for name, value in options.items() if callable(value)})
    lines, said = [], False
    for line in recipes.dump_recipe(config).splitlines():
        key = line.split(" = ", 1)[0].replace("-", "_")
        if key.endswith("_fingerprint") and not said:
            lines.append(CODE_COMMENT)
            said = True
        lines.append(f"{line}  # {named[key]}" if key in named else line)
    return "\n".join(lines) + "\n"


def _callable_name(value) -> str:
    """How a config comment names a function (its qualified name) or another callable (its class)."""
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or type(value).__name__
    return "".join(c for c in str(name) if c.isprintable())


def _note_slots(folder: RunFolder, before: dict, config: dict) -> None:
    """Record in ``folder`` (``runs.CODE_SLOTS``) the slots of the code given as this call started
    (``before``: ``callables.slot_record``, by config key) with the fingerprint its config records,
    so that a later call with other code is told where it differs (``_code_detail``). A disk error
    leaves the file as it was (a refusal then says only that the code differs)."""
    entries = {key: {"recorded": config[key], "slots": {path: digest[:16] for path, digest in start["slots"].items()},
                     "keys": start["keys"]}
               for key, start in before.items()
               if start is not None and isinstance(config.get(key), str) and not config[key].startswith(runs.UNCHECKED)}
    path = folder.path / runs.CODE_SLOTS
    try:        # a key's record is its run's first start: a later call (given back, carried on) keeps it
        saved = json.loads(path.read_text()) if path.exists() else {}
        saved = saved if isinstance(saved, dict) else {}
        merged = {**entries, **{key: entry for key, entry in saved.items() if key in entries and
                                isinstance(entry, dict) and entry.get("recorded") == entries[key]["recorded"]}}
        if merged and merged != saved:
            atomic_write_json(path, merged)
    except (OSError, ValueError):
        pass


# what each part of ``_code_objects``' method_fingerprint tuple is, as ``callables.describe`` names it
_METHOD_PARTS = {0: "family", 1: "options class", 2: "defaults", 3: "run", 4: "sparsify"}


def _code_detail(out: str, force: bool, config: dict, now: dict) -> dict:
    """Where the code this call gives (``now``: ``callables.slot_record`` at its start, by config
    key) differs from the code the run in ``out`` was made with (its ``runs.CODE_SLOTS``, when it
    records the fingerprint that run's config.toml does), leaving out what that run wrote
    (``runs.CODE_WRITTEN``): ``{recipe key: ["its attribute scale", "global opts['smoothing']",
    ...]}`` for ``runs.other_code``'s refusal; {} when nothing can be said."""
    if force or not now:
        return {}
    folder = RunFolder(out)
    try:
        saved = json.loads((folder.path / runs.CODE_SLOTS).read_text())
        old = tomllib.loads(folder.config_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(saved, dict):
        return {}
    written = _saved_written(out)
    found = {}
    for key, record in now.items():
        entry, dashed = saved.get(key), key.replace("_", "-")
        if record is None or not isinstance(entry, dict) or entry.get("recorded") != old.get(dashed) \
                or entry.get("recorded") == config.get(key):
            continue
        mine = written.get(key) if written.get(key, {}).get("recorded") == entry.get("recorded") else None
        skip = mine["written"] if mine else ()
        items = _METHOD_PARTS if key == "method_fingerprint" else None
        places = differing(entry, record, skip=skip, items=items) or []
        moved = (_moved_written(mine, record) or []) if mine else []
        try:
            keys = {*map(str, entry.get("keys", ())), *record.get("keys", ())}
        except TypeError:       # a damaged record: the places named as attributes
            keys = set()
        places += [f"{describe(path, keys, items)}, which its run writes and holds neither as that run started nor as "
                   "its last call left it (pass a fresh object, or force=True)" for path in moved[:3]]
        if places:
            found[dashed] = places
    return found


def _eval_fingerprint(eval_data, eval_batches) -> dict:
    """What a run folder records of ``eval_data``, as ``_fingerprint`` of ``data``, under its own
    keys: ``eval_data_sha256`` (its contents, where ``data_identity`` hashes them exactly),
    ``eval_data_form`` and ``eval_data_samples`` (one pass, where known without reading it); {}
    without eval_data. Other eval_data gives another record (accuracy, loss): another run."""
    if eval_data is None:
        return {}
    contents, form = data_identity(eval_data)
    found = {"eval_data_sha256": contents, "eval_data_form": form}
    if eval_batches is not None:
        found["eval_data_samples"] = samples_per_pass(eval_batches())
    return {key: value for key, value in found.items() if value is not None}


def _batch_size_of(data, eval_data, batch_size: int) -> int | str:
    """The batch size a run folder records (``batch-size``): how many samples one batch of the
    training data holds (of ``eval_data`` without ``data``), which decides the gradient batches
    and the fine-tuning steps: a DataLoader's own ``batch_size`` (or its batch sampler's), a
    prunekit loader's, the ``batch_size`` argument for a Dataset or ``(X, Y)`` tensors (prunekit
    batches them) or without data; ``"the data's own"`` for data that is batched already (an
    iterable of batches, a function returning one, a DataLoader with a batch sampler of no
    ``batch_size``), whose batches the argument does not change."""
    given = data if data is not None else eval_data
    if given is None:
        return batch_size
    if isinstance(given, BatchLoader):
        return int(given.batch_size)
    if isinstance(given, torch.utils.data.DataLoader):
        size = given.batch_size
        if size is None:
            size = getattr(getattr(given, "batch_sampler", None), "batch_size", None)
        return int(size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else "the data's own"
    if map_style(given) is not None:
        return batch_size
    return "the data's own"


def _say_unchecked(folder: RunFolder, config: dict, config_text: str, older: bool = False) -> bool:
    """Warn (once, and in run.log) when the run in ``folder`` is carried on or its result given back
    over data (or eval_data) whose contents could not be fingerprinted (``data_identity``: an
    arbitrary Dataset or iterable): only its form and sample count were compared with what it
    started with; or with a function or module of the user's that could not be hashed faithfully
    (``_code_fingerprints``' "unchecked: ..."). ``older``: a finished run started by a prunekit that
    read ``lambda: loader`` otherwise (``_read_otherwise``), said too. Whether it warned. Under torchrun rank 0 decides
    (it claimed the folder) and every rank issues the warning (``errors.warn``: shown by rank 0,
    raised by every rank under an "error" filter, so none goes on alone); a collective: every rank
    calls it."""
    collective = current()
    message = _on_rank_0(collective, lambda: _unchecked_message(folder, config, config_text, older))
    if message is None:
        return False
    if folder.writable:
        folder.log(message)
    warn_ours(PrunekitWarning(message))
    return True


def _on_rank_0(collective, decide):
    """``decide()`` as rank 0 finds it, told to every rank (one process: ``decide()``); a
    ``PrunekitError`` of rank 0's is raised on every rank. A collective: every rank calls it."""
    if collective.rank == 0:
        try:
            said = decide()
        except PrunekitError as err:
            if not collective.distributed:
                raise
            said = err
    else:
        said = None
    if collective.distributed:
        said = collective.broadcast_object(said)
    if isinstance(said, PrunekitError):
        raise said
    return said


def _unchecked_message(folder: RunFolder, config: dict, config_text: str, older: bool = False) -> str | None:
    """``_say_unchecked``'s warning as rank 0 (the rank that claimed ``folder``) finds it, or None."""
    unchecked = [f"{what} ({config[what + '_form']})"
                 for what in ("data", "eval_data") if what + "_form" in config and what + "_sha256" not in config]
    code = [f"{key[:-len('_fingerprint')]}= ({value[len(runs.UNCHECKED):]})" for key, value in config.items()
            if key.endswith("_fingerprint") and isinstance(value, str) and value.startswith(runs.UNCHECKED)]
    if folder.claimed_afresh or not (unchecked or code):
        return None
    try:
        if not runs.same_values(folder.config_text(), config_text):   # an older folder: ``runs.claim``
            return None                                                     # said what it checked
    except OSError:
        return None
    done = "its stored result is given back" if runs.finished_run(folder) else "it is carried on"
    said = []
    if unchecked:
        said.append(f"the contents of this {' and this '.join(unchecked)} could not be checked against what it "
                    "started with, only form and sample count (prunekit fingerprints (X, Y) tensors, a TensorDataset "
                    "or a Subset of one, and its own loaders)")
    if code:
        said.append(f"this call's {' and '.join(code)} could not be checked against what it was made with")
    changed = " or ".join((["the data"] if unchecked else []) + (["that code or what it holds"] if code else []))
    message = f"{folder.path}: {done}, but {'; and '.join(said)}; clear it with force=True if {changed} changed"
    if older and runs.finished_run(folder):
        message += (" (it was written by a prunekit that read `lambda: loader` otherwise: this one would compute "
                    "another model; force=True runs it anew)")
    return message


def _say_given_back(folder: RunFolder, config_text: str, streams: dict, told: bool) -> None:
    """Say once that the finished run in ``folder`` is given back, not run (the command line's
    "holds this run, finished" note; ``errors.note``, not a warning: the same call again is no
    mistake, and ``-W error`` must not make it one), unless a warning about this folder (``told``, or
    ``runs.claim``'s about an older folder) said so already: the pruned model and record come from
    the folder. A user loader whose RNG states at this call (a ``torch.manual_seed`` before it)
    are not the ones the run recorded at its start is named: they changed nothing (a
    ``PrunekitWarning``: a reseed meant to draw another run is a possible mistake). Under torchrun
    rank 0 decides and notes; its warning is issued on every rank (``errors.warn``), so that an
    "error" filter raises it on every rank. A collective: every rank calls it."""
    collective = current()
    said = _on_rank_0(collective, lambda: _given_back_message(folder, config_text, streams, told))
    if said is None:
        return
    text, reseeded = said
    if reseeded:        # a reseed meant to draw another run: a possible mistake, warned
        warn_ours(PrunekitWarning(text))
    elif collective.rank == 0:      # the same call again (a notebook cell run twice): a note, not a warning
        note(text)


def _given_back_message(folder: RunFolder, config_text: str, streams: dict, told: bool) -> tuple[str, bool] | None:
    """``_say_given_back``'s words as rank 0 finds them and whether they are a warning, or None."""
    if told or folder.claimed_afresh or not runs.finished_run(folder):
        return None
    try:
        if not runs.same_values(folder.config_text(), config_text):   # an older folder: ``runs.claim`` warned
            return None
    except OSError:
        return None
    reseeded = []
    for what, (data, batches) in streams.items():
        if batches is None or not hasattr(batches, "states") or batches.states is batches.call_states \
                or isinstance(data, BatchLoader) or map_style(data) is not None:
            continue            # prunekit's own loaders, and a Dataset or tensors, shuffle by ``seed``
        if json.dumps(states_to_json(batches.states)) != json.dumps(states_to_json(batches.call_states)):
            reseeded.append(what)
    rng = (f"; this call's RNG state (torch.manual_seed) is not the one that run read its "
           f"{' and '.join(reseeded)} under ({runs.DATA_RNG}) and changed nothing" if reseeded else "")
    return (f"{folder.path} holds this run, finished: its stored result is given back, nothing was run{rng} "
            "(force=True runs it anew, or give another out)"), bool(reseeded)


def data_identity(data) -> tuple[str | None, str | None]:
    """``(contents, form)``: what a run folder records of ``data`` to tell other data from it.
    ``contents``: a SHA-256 of what the data holds, independent of the order its batches come in,
    where that is cheap and exact: ``(X, Y)`` tensors; a map-style Dataset of tensors (a
    ``TensorDataset``, a ``Subset`` of one: its indices and tensors), directly or behind a
    ``torch.utils.data.DataLoader``; prunekit's own loader (``make_loader``: its ``ImageDataset``'s
    uint8 images, labels and class names, the normalization and augmentation). None for anything
    else (an arbitrary Dataset, an iterable, a function): its contents cannot be checked.
    ``form``: None for ``(X, Y)`` tensors (what a run folder recorded before forms were), else
    ``"DataLoader"``, ``"Dataset"``, ``"prunekit loader"`` or the type's name (the same data in
    another form reads other batches). The same (X, Y) tensors give the same ``contents`` as a
    ``TensorDataset`` of them."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return runs.tensors_sha256(zip("XY", data)), None
    if isinstance(data, BatchLoader):
        ds, norm = data.dataset, data.norm      # an ImageDataset, or a DeferredImageDataset (decoded now)
        try:
            inner = runs.tensors_sha256([("images", ds.images), ("labels", ds.labels)])
        except (AttributeError, TypeError):
            return None, "prunekit loader"
        text = f"prunekit|{inner}|{list(ds.classes)}|{tuple(norm.mean)}|{tuple(norm.std)}|{data.augment}"
        return hashlib.sha256(text.encode()).hexdigest(), "prunekit loader"
    if isinstance(data, torch.utils.data.DataLoader):
        try:
            dataset = data.dataset
        except Exception:       # noqa: BLE001 - a loader of the user's without one
            return None, "DataLoader"
        return _dataset_contents(dataset), "DataLoader"
    if isinstance(data, torch.utils.data.Dataset):
        return _dataset_contents(data), "Dataset"
    return None, type(data).__name__


def _dataset_contents(dataset, depth: int = 0) -> str | None:
    """SHA-256 of a ``TensorDataset``'s tensors (two as ``X``, ``Y``: as ``(X, Y)`` tensors), or of
    a ``Subset``'s indices and what it takes them from (a few levels); None for any other Dataset
    (its items are computed by code prunekit cannot fingerprint exactly without reading them all)."""
    from torch.utils.data import Subset, TensorDataset
    if type(dataset) is TensorDataset:          # a subclass may change __getitem__
        tensors = dataset.tensors
        names = "XY" if len(tensors) == 2 else [str(i) for i in range(len(tensors))]
        return runs.tensors_sha256(zip(names, tensors))
    if type(dataset) is Subset and depth < 4:
        inner = _dataset_contents(dataset.dataset, depth + 1)
        if inner is None:
            return None
        try:
            indices = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            return None
        return hashlib.sha256(f"subset|{inner}|".encode() + indices.numpy().tobytes()).hexdigest()
    return None


def _note_final_weights(folder: RunFolder, pruned: nn.Module) -> None:
    """Record in metrics.json the fingerprint of the finished run's model (``final_weights_sha256``),
    by which the same call on the model it pruned in place is known (``_fingerprint``)."""
    metrics = folder.read_metrics()
    if metrics.get("status") != "done" or "final_weights_sha256" in metrics:
        return
    metrics["final_weights_sha256"] = runs.tensors_sha256(pruned.state_dict().items())
    folder.write_metrics(metrics)


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _write_report(folder: RunFolder) -> None:
    from . import report
    try:
        report.write_run_report(folder.path)
    except report.MissingPlotting:          # report.md is written, without its plots
        pass


def _with_fresh_workers(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """``loader`` with its persistent workers let go, so that its next pass starts new ones. Torch
    seeds a worker's RNGs (torch, ``random``, NumPy) when it starts, from a seed drawn at ``iter()``
    from the replayed RNGs; a persistent worker's RNGs run on from pass to pass instead, so a resumed
    run (or a later stage) would draw other numbers in the dataset's ``__getitem__``. A pass still
    being read keeps its workers until it is dropped."""
    loader._iterator = None
    return loader


def _uses_loss(method: str | Method, gradual: bool) -> bool:
    """Whether ``method`` (in this mode) trains, scores or takes gradients on the loss: gradual
    fine-tunes, channel methods' gates, Fisher methods' rows (as ``_without_data`` names them);
    a magnitude method run at once reads data only for BatchNorm statistics."""
    try:
        row = lookup(method)
    except PrunekitError:           # an unknown name: the request refuses it in its own words
        return False
    return gradual or row.family == "channels" or row.plan_memory is not None


def _without_data(method: str | Method, gradual: bool) -> str:
    """The refusal of a call with neither data nor example_input: a method that trains or takes
    gradients says it needs data first (example_input alone would be refused next)."""
    row = lookup(method)
    why = ("gradual pruning fine-tunes between events" if gradual else
           f"method {row.name} trains gates on it" if row.family == "channels" else
           f"method {row.name} takes its gradients" if row.plan_memory is not None else None)
    if why is None:
        return "pass example_input (one input batch) when there is no data to take it from"
    return f"pass data: {why} on the training data"


def _saved_streams(out: str | None, force: bool = False) -> dict[str, list]:
    """The RNG states the run in folder ``out`` replays its data and eval_data from (its
    ``runs.DATA_RNG``, written when it started), by what: {} without such a run, or with ``force``
    (which clears it: ``_keep_streams`` then keeps the call's own states)."""
    if out is None or force:
        return {}
    path = RunFolder(out).path / runs.DATA_RNG
    try:
        text = path.read_text()
    except OSError:          # none there (or out= cannot be a folder: the claim says what is wrong)
        return {}
    try:
        saved = json.loads(text)
        return {what: states_from_json(states) for what, states in saved.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PrunekitError(f"{path} cannot be read ({type(err).__name__}): restore it to carry that run on, or "
                            "clear the run first (force=True)") from None


def _keep_streams(folder: RunFolder, streams: dict) -> None:
    """Make the replayed data streams of a run in ``folder`` the same on every call: a run that
    has kept its RNG states (``runs.DATA_RNG``) reads its data from those (``_batches`` took them
    from the folder), so a resumed call reads the batches an uninterrupted one would, whatever
    its own RNGs; a new run (``force`` may have cleared the one whose states were read) reads
    from the call's and keeps them, before its first checkpoint."""
    replayed = {what: b for what, b in streams.items() if b is not None and hasattr(b, "states")}
    path = folder.path / runs.DATA_RNG
    # rank 0's view, before it writes the file (a collective: under torchrun every rank decides alike)
    kept, done, old_run = current().broadcast_object((path.exists(), folder.read_metrics().get("status") == "done",
                                                      any(folder.checkpoints.glob("stage-*.safetensors"))))
    if kept:
        unfit = [what for what, b in replayed.items() if b.states is b.call_states]
        if unfit and not done:
            warn_ours(PrunekitWarning(
                f"{path} holds no RNG states that fit this call's {' and '.join(unfit)} (another loader?): the "
                "stages left read it as drawn from this call's RNGs, which an uninterrupted run may not have"))
        return
    for batches in replayed.values():
        batches.states = batches.call_states
    if not replayed or done:
        return
    if old_run:       # a run of a version that kept no states
        warn_ours(PrunekitWarning(
            f"{folder.path} keeps no RNG states of its data ({runs.DATA_RNG}; written by an older prunekit): the "
            "stages left read a shuffled or randomly transformed loader as drawn from this call's RNGs, so the "
            "result may differ from an uninterrupted run's (clear it with force=True to run anew)"))
        return
    if folder.writable:         # (how a prunekit loader a function gives is read: _read_otherwise)
        atomic_write_json(path, {what: {**states_to_json(b.states), "prunekit_loader": READS_AT_PASS}
                                 for what, b in replayed.items()})


def _read_otherwise(folder: RunFolder, data, plan) -> bool:
    """Whether the run in ``folder`` was started by a prunekit that read ``data`` otherwise
    (``_older_replay``, as rank 0 finds it); an unfinished one is said once, in run.log and as a
    ``PrunekitWarning`` issued on every rank (shown by rank 0; raised by every rank under an
    "error" filter). A collective: every rank calls it."""
    said = _on_rank_0(current(), lambda: _older_replay(folder, data, plan))
    if said is None:
        return False
    if said != "finished":
        if folder.writable:
            folder.log(said)
        warn_ours(PrunekitWarning(said))
    return True


def _older_replay(folder: RunFolder, data, plan) -> str | None:
    """Whether the run in ``folder``, unfinished with checkpoints or finished, was started by a
    prunekit that read ``data``, a function giving a prunekit loader (``lambda: loader`` over a
    ``BatchLoader``), otherwise than this one does (``replay.at_pass``): its ``runs.DATA_RNG`` has
    no ``prunekit_loader`` for ``data`` (that version read the user's loader itself, pass after
    pass, in its own batches). Carried on, its stages mix the two versions' batches, so its model
    is neither version's: the line that says so for an unfinished run, "finished" for a finished one
    (given back as stored; ``_say_unchecked`` says so). The function is called once, under RNG
    states put back after, only for such a folder. None for anything else (tensors, a Dataset, a
    DataLoader, a prunekit loader passed as it is, a folder claimed afresh), and where the older
    reading computes what this one does (``_reads_alike``: AutoBot and the taper over a loader of
    their ``gate_batch_size``). ``eval_data`` is not looked at: its passes (one per measurement, from
    one replay for the call) read the epochs the older reading read in one process (a resume now
    sets the replay at the pass an uninterrupted run reads: ``executor._eval_resumer``, where the
    older reading started the user's loader's epochs anew), and change no weight."""
    if folder.claimed_afresh or not callable(data) or map_style(data) is not None \
            or isinstance(data, (BatchLoader, torch.utils.data.DataLoader)):
        return None
    try:
        saved = json.loads((folder.path / runs.DATA_RNG).read_text())
        done = runs.finished_run(folder)
    except (OSError, ValueError, PrunekitError):     # none (an older prunekit's: _keep_streams says so)
        return None
    entry = saved.get("data") if isinstance(saved, dict) else None
    if not isinstance(entry, dict) or "prunekit_loader" in entry \
            or not (done or any(folder.checkpoints.glob("stage-*.safetensors"))):
        return None
    theirs = rng_states([])
    try:
        made = data()
    finally:
        set_rng_states([], theirs)
    if not isinstance(made, (BatchLoader, ReplayedLoader)) or _reads_alike(plan, made):
        return None
    if done:
        return "finished"
    return (f"{folder.path} was written by a prunekit that read `lambda: loader` (a function giving a prunekit "
            "loader) otherwise: carried on, this run's weights match no uninterrupted run (of either version); "
            "run it anew with force=True for a reproducible result")


def _reads_alike(plan, made) -> bool:
    """Whether the older reading of ``lambda: loader`` (the user's loader read itself, pass after
    pass, in its own batches) and this one (``replay.at_pass``) give method ``plan.method`` the same
    batches, so that a folder of the older reading carried on ends where an uninterrupted run of
    this version does: a channel method that reads one replay for the whole run, pass after pass
    (AutoBot, the taper: in one process the copies at the user's epoch plus the pass are the
    epochs the user's loader went through; a resume sets the replay's epoch to the run's, which
    this version reads), over a prunekit loader ``made`` of the gates' batch size (the older reading
    took the loader's own), without ``reconstruct_batches`` (whose reads put the replay's epoch back,
    where the older reading had moved the user's loader on). Not the hybrid (its FALCON passes
    hold an epoch) nor a weights method (each stage, event and fine-tune starts a replay of its
    own at the run's epoch)."""
    return (plan.method.family == "channels" and plan.method.name in ("autobot", "taper")
            and not getattr(plan.options, "reconstruct_batches", 0)     # (it puts the replay's epoch back)
            and isinstance(made, BatchLoader) and made.batch_size == plan.options.gate_batch_size)


def _epoch_seed(seed: int, epoch: int) -> int:
    """The seed of a shuffling pass: ``seed`` itself for epoch 0, a mix of (seed, epoch) after."""
    if epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)


def _batches(data, batch_size: int, shuffle: bool, seed: int, what: str,
             saved: list | None = None) -> Callable[[], Iterable] | None:
    """A function returning a fresh iterable of (x, y) batches over ``data``, the same each call.
    Replayed from the RNG states at the call (``.call_states``), or from ``saved`` (a run folder's)
    where they fit the loader; ``.states``: those in use (``_keep_streams`` may set them)."""
    if data is None:
        return None
    if isinstance(data, BatchLoader):        # restart at the epoch it is at now, every time
        epoch = data.epoch

        def again():
            loader = copy.copy(data)
            loader.epoch = epoch
            return loader
        return again
    dataset = map_style(data)             # (X, Y) tensors as a TensorDataset
    data = data if dataset is None else dataset
    # a shuffling loader draws a new order at every pass; replayed from these states, every call
    # is the same stream, under torchrun rank 0's (each rank reads its gradient rows in pieces, a
    # pass per piece)
    generators = loader_generators(data)
    states = rng_states(generators)
    if dataset is not None:
        def make(epoch: int = 0):
            """Epoch 0 in the order ``seed`` draws, epoch k in the order (seed, k) draws."""
            return dataset_loader(dataset, batch_size, shuffle,
                                  torch.Generator().manual_seed(_epoch_seed(seed, epoch)) if shuffle else None)
    elif callable(data):
        make = data
    elif isinstance(data, Iterable):
        one_pass = iter(data) is data
        set_rng_states(generators, states)        # iter() of a DataLoader drew its workers' seed from them
        if one_pass:
            raise PrunekitError(f"{what} is a one-pass iterator: pass a DataLoader, a Dataset, (X, Y) tensors "
                                "or a function returning batches, so every stage can read it again")
        make = (lambda: _with_fresh_workers(data)) if getattr(data, "persistent_workers", False) else lambda: data
    elif isinstance(data, (ImageDataset, DeferredImageDataset)):       # load_dataset's, defer=True's too
        refuse_raw_pixels(data, what)
    else:
        raise PrunekitError(f"{what} must be a DataLoader, a Dataset, (X, Y) tensors or a function returning "
                            f"batches, got {type(data).__name__}")
    chosen = saved if saved is not None and len(saved) == len(states) else states
    states, chosen = current().broadcast_object((states, chosen))

    def replayed():
        return ReplayedLoader(make, generators, replayed.states, make_takes_epoch=dataset is not None)
    replayed.call_states, replayed.states = states, chosen
    return replayed
