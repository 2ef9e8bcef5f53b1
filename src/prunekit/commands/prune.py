"""``prunekit prune``: the command's request, one call to the executor, the lines it prints.

    args -> PruneRequest (request.py) -> plan() -> executor.execute -> method (methods.py) -> solver
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from .. import distributed, recipes, report, run_lock, runs, user_models
from ..api_checks import check_not_training_run, check_out
from ..budget import Amount
from ..data.loaders import samples_per_pass
from ..errors import PrunekitError
from ..executor import REDO_RESUMED, execute
from ..fisher_batches import check_sample_count
from ..pipelines.fisher_methods import check_planned_rows, plan_counts_the_data
from ..loading import LoadedModel
from ..methods import METHODS, lookup
from ..pipelines.gradual import GradualOptions
from ..request import PruneRequest
from ..run_folder import read_config
from ..saving import atomic_write_json
from ..structured.left_dense import listed_skips, unexpected_skips
from . import option_flags
from .common import (add_data_args, add_device_arg, add_model_args, bytes_to_load, check_out_not_input, describe,
                     emit, eval_data, loaded_model, resolve_model, show_progress, training_batches,
                     stop_recorded, warn_if_random_weights, write_report)
from .option_flags import add_option_flags

RUN_ONLY = recipes.NOT_IN_RECIPES     # options about this invocation, not the run
PRUNE_USAGE = ("prunekit prune [--model MODEL] [--checkpoint FILE] --data DATA --data-dir DIR [--method METHOD] "
               "[--sparsity S] [--flops F] [--params P] [options]\n"
               "       prunekit prune --recipe FILE [options]\n"
               "       prunekit prune --resume DIR [--json]")


def method_options(args) -> dict:
    """The method (and gradual) options given on the command line; None = not given."""
    return {name: getattr(args, name) for name in option_flags.OPTION_NAMES if getattr(args, name, None) is not None}


def taken_options(method: str, gradual: bool) -> set[str]:
    """The option names a run of ``method`` takes (with ``gradual``, the gradual mode's too): a
    sweep gives each run only these, and a run's config.toml holds no other."""
    return set(lookup(method).options.names()) | (set(GradualOptions.names()) if gradual else set())


def request_of(args, loaded: LoadedModel, method: str | None = None, budget: dict | None = None,
               data_to_load: int = 0, costs=None) -> PruneRequest:
    """The request of ``args`` (with ``method`` and ``budget``: one run of a sweep, which gives
    each method only the options it takes); ``data_to_load``: bytes of data scanned but not yet
    decoded that the run will hold (``common.bytes_to_load``), which its memory plan counts;
    ``costs``: the model's trace made before (``PruneRequest.costs``: a sweep's, once for its runs)."""
    row = lookup(method or args.method)
    weights = row.family == "weights" or row.sparsify is not None       # the hybrid's FALCON phase too
    exclude = loaded.prune_exclude if args.exclude is None and weights else args.exclude
    budget = budget or {k: getattr(args, k) for k in ("sparsity", "flops", "params")}
    options = method_options(args)
    if method is not None:
        taken = taken_options(row.name, bool(args.gradual))
        options = {k: v for k, v in options.items() if k in taken}
    return PruneRequest(loaded.model, loaded.example_input(), row.name, budget, args.include, exclude, args.seed,
                        bool(args.gradual), not args.no_bn_recalibration, options, loaded.name,
                        data_to_load=data_to_load, costs=costs)


def check_request_values(args, method: str | None = None, budget: dict | None = None) -> None:
    """The request's checks that need neither the model nor any data (``PruneRequest.check_values``:
    the method, its options, the budget's values, the seed), made before the model is loaded and an
    image folder is scanned (every image's header: minutes on a huge folder; a model file's input
    shape is read from the evaluation split) so that a bad value is refused at once, in the words
    ``plan()`` would use; ``method``, ``budget``: one run of a sweep. Its warnings are left to
    ``plan()``, which makes these checks again."""
    # these checks read no model: a stand-in takes its place in the request
    stand_in = LoadedModel(nn.Identity(), str(args.model), {}, None, (1,), [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        request_of(args, stand_in, method, budget).check_values()


def step_printer(args):
    if args.json:
        return None

    def show(step: dict) -> None:
        what = (f"stage {step['stage']}" if "stage" in step else f"event {step['event']}" if "event" in step
                else " ".join(str(step[k]) for k in ("phase", "flops", "epoch") if step.get(k)))
        acc = f", accuracy {step['accuracy']:.2f}%" if step.get("accuracy") is not None else ""
        print(f"{what}: MACs kept {100 * step.get('flops_kept', float('nan')):.2f}%{acc}", file=sys.stderr)
    return show


def cmd_prune(args) -> int:
    check_out(args.out, "--out")         # before any work: never write over a user's files
    if not getattr(args, "resume", None):         # (--resume of a train folder is refused as such)
        check_not_training_run(args.out, "--out", bool(getattr(args, "force", False)))
    if args.train_samples is not None and args.train_samples < 1:
        raise PrunekitError("--train-samples must be at least 1 (leave it out to use every training image)")
    if args.onnx and not args.out:
        raise PrunekitError("--onnx writes into the run folder: add --out DIR")
    if getattr(args, "force", False) and not args.out:      # a recipe's force = true too
        raise PrunekitError("--force clears the run folder --out names, and there is no --out: add --out DIR, "
                            "or leave --force out")
    resolve_model(args)                 # --model DIR: the checkpoint it names
    check_out_not_input(args)
    check_request_values(args)          # before the model is loaded and the evaluation split scanned
    loaded = loaded_model(args)
    if args.onnx:
        check_onnx(loaded)
    if traced_before_the_scan(args):    # a zoo model's budget against its weights before the folder's scan
        data = data_on_demand(args, loaded)
        plan = plan_of(args, loaded, None, None, data=data)
        eval_loader, train_batches = data()
    else:
        eval_loader = eval_data(args, loaded)
        train_batches = training_batches(args, loaded, eval_loader)
        plan = plan_of(args, loaded, eval_loader, train_batches)    # counts the images still to decode, checks the rows
    warn_if_random_weights(args)
    finished = bool(args.out) and not args.force and runs.RunFolder(args.out).read_metrics().get("status") == "done"
    record = prune_into(args, plan, loaded, eval_loader, train_batches)
    if finished and distributed.is_main_process():     # (a different request was refused inside prune_into)
        anew = ("--force runs it anew" if not getattr(args, "resume", None) else    # --resume takes no --force
                f"the original command with --force runs it anew, as does `{anew_command(args.out)}`; "
                "or give another --out")
        print(f"prunekit: note: {args.out} holds this run, finished: its result again, nothing was run ({anew})",
              file=sys.stderr)
    saved = [f"  saved to   {args.out}" + (f" (ONNX: {record['onnx']})" if record.get("onnx") else "")]
    emit(args, record, prune_lines(record) + (saved if args.out else []) + finetune_hint(args, record))
    return 0


FINETUNE_LR = 0.01      # a fine-tune's peak rate: prune's --finetune-lr default, not train's 0.1 from scratch


def finetune_hint(args, record: dict) -> list[str]:
    """The summary's one line after a channel method run with no fine-tune (--finetune-epochs 0):
    its accuracy drop is mostly won back by a short fine-tune, so name the two ways to run one
    (``prune --finetune-epochs N``, or ``train --checkpoint`` of the run folder, written out in
    full from this command's model and data options). No line otherwise."""
    if record.get("family") != "channels" or (record.get("options") or {}).get("finetune_epochs", 0):
        return []
    again = "rerun with --finetune-epochs 3 (a few epochs on the training split)"
    lead = (f"  fine-tune  none (--finetune-epochs 0): a channel-pruned model regains most of its accuracy when "
            f"fine-tuned: {again}, or ")
    if not (args.out and getattr(args, "data", None) and getattr(args, "data_dir", None)):
        run = str(args.out) if args.out else "DIR"
        return [lead + (f"fine-tune this run with `prunekit train --checkpoint {run}` and this "
                "command's --data and --data-dir" if args.out else "add --out DIR and fine-tune that run with "
                "`prunekit train --checkpoint DIR`")]
    command = ["prunekit", "train"] + (["--model", args.model] if getattr(args, "model", None) else [])
    command += ["--checkpoint", str(args.out), "--data", args.data, "--data-dir", str(args.data_dir)]
    for flag in ("resize", "crop"):
        if getattr(args, flag, None) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    command += ["--epochs", "1", "--lr", f"{FINETUNE_LR:g}", "--out", f"{str(args.out).rstrip('/')}-ft"]
    return [f"{lead}fine-tune this run: {shlex.join(command)}"]


def _data_file(eval_loader) -> dict:
    """``{"data_file": path}`` where the run's images were read from one file (an ``.npz`` read
    as --data cifar10, both splits: ``ImageDataset.source``), as eval records it; {} otherwise."""
    source = getattr(getattr(eval_loader, "dataset", None), "source", None)
    return {"data_file": source} if isinstance(source, str) else {}


def _fingerprints(plan, eval_loader, train_batches, args) -> dict:
    """``{split: fingerprint}`` of the splits the run reads (the evaluation split, and the training
    split where the run reads it): an image folder's ``ImageFolderScan.fingerprint``, any other data
    set's ``contents_fingerprint`` (its images and labels as read)."""
    from ..data.dataset import contents_fingerprint
    from ..data.imagefolder import folder_fingerprint
    splits = {args.eval_split: getattr(eval_loader, "dataset", None)}
    if train_batches is not None and reads_training_data(plan):
        splits["train"] = train_batches.split()
    found = {split: folder_fingerprint(ds) if args.data == "imagefolder" else
             contents_fingerprint(ds, args.data, args.data_dir) for split, ds in splits.items()}
    return {split: fingerprint for split, fingerprint in found.items() if fingerprint is not None}


# How a sweep's run refused over changed images is started anew (a sweep has no --force): the whole
# sweep into another folder, its runs so far having been pruned and measured (the dense model once,
# shared by its runs) on the images as they were; a run folder removed alone would be rerun beside
# them, against the old images' dense measurement
_SWEEP_ANEW = ("run the sweep anew over these images with another --out (its runs so far, and the dense "
               "measurement they share, were made on the images as they were)")


# How a warning over an older sweep run's unchecked images says to run it anew (a sweep has no --force)
_SWEEP_REDO = "run the sweep anew with another --out"


def _lower_rate_after_resume(args, err: PrunekitError) -> str:
    """How to run a ``--resume``d run that diverged with a lower learning rate (``runs.stopped_by_divergence``'s
    ``cli_fix``): --resume takes no other flag (no --force, no rate), so the original command again
    with the lower rate and --force, or a --recipe of the folder's config.toml with them."""
    from ..train import TrainingDiverged
    flag = "--" + (err.lr_name if isinstance(err, TrainingDiverged) else "lr").replace("_", "-")
    recipe = shlex.quote(str(Path(args.out) / "config.toml"))
    return (f"run the original command again with a lower {flag} and --force (it starts over there; --resume takes "
            f"neither), e.g. `prunekit prune --recipe {recipe}{_out_if_moved(args.out)} {flag} LOWER --force`, or "
            "give it another --out")


def anew_command(out: str) -> str:
    """The command that runs the prune run in folder ``out`` anew with its config.toml's values
    (``--resume`` takes no --force): ``prunekit prune --recipe OUT/config.toml --force``."""
    return (f"prunekit prune --recipe {shlex.quote(str(Path(out) / 'config.toml'))}{_out_if_moved(out)} "
            "--force")


def _out_if_moved(out: str) -> str:
    """" --out OUT" when run folder ``out`` was moved since its run began: its config.toml's ``out``
    names the old place, where a ``--recipe`` of it would write."""
    config = runs.RunFolder(out).config
    try:
        moved = runs.moved_from(read_config(config), out)
    except (OSError, UnicodeDecodeError):
        return ""
    return f" --out {shlex.quote(str(out))}" if moved else ""


def _check_rows_fit_the_data(args, train_batches, method: str | None = None, plan=None) -> None:
    """More per-sample gradient rows (from one pass) than training images are refused before any work
    and before a run folder is made. Without ``plan``: --fisher-samples as given, checked before the
    request's memory check, which would otherwise suggest an n the data cannot give (``plan_of``: after
    the request's checks that need no data). ``plan``: the planned run's
    rows (the method's default fisher_samples too, and the schedule --stages auto will choose), checked
    once its options are. ``method``: one run of a sweep."""
    row = lookup(method or args.method)
    if "fisher_samples" not in row.options.names() or train_batches is None:
        return
    if plan is not None:
        check_planned_rows(plan, train_batches.samples_per_pass(), train_batches.first_batch_size)
        return
    if plan_counts_the_data(row):
        return      # its memory plan refuses rows past the data, or names an n that fits both (plan_of)
    given = {k: v for k, v in method_options(args).items() if k in row.options.names()}
    rows, batch, fresh = given.get("fisher_samples"), given.get("fisher_batch") or 1, given.get("fresh_samples")
    stages = given.get("stages", (row.defaults or {}).get("stages"))
    if row.family == "weights" and stages == "auto":
        return      # the thorough schedule reads fresh images pass after pass: the plan's check resolves it as the API does
    if isinstance(rows, int) and batch == 1 and not fresh:
        check_sample_count(train_batches.samples_per_pass(), rows)


def check_onnx(loaded: LoadedModel) -> None:
    """Refuse ``--onnx`` before any work when the dense model cannot be exported (its pruned form
    runs the same operations), naming the exporter's reason."""
    from ..export import onnx_bytes, onnx_install, require_onnx
    try:
        require_onnx()
    except PrunekitError:
        raise PrunekitError(f"--onnx needs the onnx package, which is not installed: {onnx_install()}, "
                            "or leave out --onnx") from None
    was_training = loaded.model.training
    try:
        onnx_bytes(loaded.model, loaded.example_input())
    except PrunekitError as err:
        raise PrunekitError(f"--onnx: {loaded.name} cannot be exported ({err}); leave out --onnx") from None
    finally:
        loaded.model.train(was_training)


def run_config(args) -> str:
    """The config.toml of the run ``args`` ask for."""
    # force is about this invocation: kept in the config, a --resume would clear the run again
    config = {k: v for k, v in vars(args).items() if k not in RUN_ONLY and k != "force"}
    for key in ("checkpoint", "data_dir", "out"):     # a run folder's config works from any directory
        if config.get(key) is not None:
            config[key] = str(Path(config[key]).resolve())
    if user_models.is_model_file(config["model"]):
        config["model"] = user_models.resolved(config["model"])
    return recipes.dump_recipe(config)


def _settings(args) -> dict[str, str]:
    """The run's options without its paths, which the ranks compare (the weights and data the paths
    lead to, and the run folder, are compared apart, with messages of their own): option -> its
    value as given (a string) or as a recipe writes it; options not given are left out."""
    paths = {"checkpoint", "data_dir", "out", "force"}
    return {k: v if isinstance(v, str) else recipes.dump_recipe({k: v}).partition(" = ")[2].strip()
            for k, v in vars(args).items() if k not in RUN_ONLY and k not in paths and v is not None}


def prune_into(args, plan, loaded: LoadedModel, eval_loader, train_batches, dense: dict | None = None) -> dict:
    """Prune as ``plan`` says, into run folder ``args.out`` when given (resuming it with
    ``--resume``, clearing it first with ``--force``), then write its report."""
    main = distributed.is_main_process()           # under torchrun, rank 0 alone writes
    if distributed.current().distributed:          # every machine must read the same weights and data
        reads_training = reads_training_data(plan)                # else the training split is never loaded
        first_train = _first_batch(train_batches) if reads_training else None
        evaluation, training = "evaluation data (--data-dir)", "training data (--data-dir)"
        distributed.check_same_start(loaded.model, options=_settings(args),
                                     samples={evaluation: _samples(eval_loader),
                                              training: _samples(train_batches) if reads_training else None},
                                     **{evaluation: _first_batch(eval_loader), training: first_train})
    if args.out and not getattr(args, "force", False) and runs.finished_read_only_on_rank_0(args.out):
        # a finished run in a folder this process may not write: its result again, with no lock
        # (its file could not be made) and nothing written (no claim, log or report); under
        # torchrun as rank 0 finds the folder, on every rank
        return _prune_into(args, plan, loaded, eval_loader, train_batches, dense, main, read_only=True)
    # one process at a time in it (a --resume refused so is told to wait, not to pick another --out)
    flag = "--resume" if getattr(args, "resume", None) else "--out"
    with run_lock.held_by_rank_0(args.out, flag) if args.out else nullcontext():
        with stop_recorded(args.out, main):      # why the run stops, and its status, written while the lock is held
            return _prune_into(args, plan, loaded, eval_loader, train_batches, dense, main)


DATA_FREE_METHODS = ("magnitude", "magnitude-uniform", "magnitude-flops")


def _training_use(method: str, options, gradual: bool, recalibrate_bn: bool, model) -> str | None:
    """What a run reads the training split for: None (not at all: a magnitude method run at once,
    not gradual, without a layer search or a re-fit, and without BatchNorm recalibration or
    BatchNorm to recalibrate), "batchnorm" (such a run, only to re-estimate BatchNorm), or "data"
    (any other method or mode: gradients, gates, fine-tuning)."""
    if (method not in DATA_FREE_METHODS or gradual or getattr(options, "layer_search", 0)
            or getattr(options, "refit_batches", 0)):
        return "data"
    return "batchnorm" if recalibrate_bn and _has_batchnorm(model) else None


def reads_training_data(plan) -> bool:
    """Whether ``plan`` loads the training split (``_training_use``)."""
    return _training_use(plan.method.name, plan.options, plan.mode == "gradual", plan.request.recalibrate_bn,
                         plan.request.model) is not None


def training_use(request: PruneRequest) -> str | None:
    """``_training_use`` of ``request`` before its plan (its options checked, the model not traced)."""
    method, _, options, gradual = request.resolved_options()
    return _training_use(method.name, options, gradual is not None, request.recalibrate_bn, request.model)


def traced_before_the_scan(args) -> bool:
    """Whether the request's checks on the traced model (its budget against the model's weights and
    MACs, a channel method's groups, the gradual mode's start) come before the evaluation split is
    read (``data_on_demand``): a zoo model on an image folder, whose scan reads every image's header
    (minutes on a huge folder) while the model's example input is its own. A model file's input shape
    is the evaluation images' (read already, and its forward checked on them first); other data sets
    are read in moments."""
    return getattr(args, "data", None) == "imagefolder" and not user_models.is_model_file(args.model)


def data_on_demand(args, loaded: LoadedModel):
    """A function giving ``(eval_loader, train_batches)`` (``eval_data``, ``training_batches``),
    made on its first call only: ``plan_of(..., data=)`` calls it once the request's checks that
    need no data have passed."""
    made = []

    def data():
        if not made:
            eval_loader = eval_data(args, loaded)
            made.append((eval_loader, training_batches(args, loaded, eval_loader)))
        return made[0]
    return data


def plan_of(args, loaded: LoadedModel, eval_loader, train_batches, method: str | None = None,
            budget: dict | None = None, data=None, traced: dict | None = None):
    """``request_of(args, loaded, method, budget).plan()``, its memory plan made before any image is
    decoded and counting the image-folder pixels still to decode that the run will hold: the
    evaluation split's, and the training split's only where the run reads it (``training_use``: a
    split it never reads is neither loaded nor counted). A split read only to re-estimate BatchNorm
    that cannot be loaded is refused naming --no-bn-recalibration.

    Cheap refusals first: the training split is scanned (every image's header: minutes on a huge
    train/ folder) only once the request's options, budget and the method's own checks have passed
    (``PruneRequest.data_to_load`` as a function, which ``plan()`` calls after them), then the gradient
    rows asked for are checked against it (``_check_rows_fit_the_data``), then the memory plan, then
    the planned run's rows (``PruneRequest.check_plan``), all before the plan's warnings.

    ``data``: a ``data_on_demand`` function in place of ``eval_loader`` and ``train_batches`` (None
    then): called with the data's checks, after the checks on the traced model, so that the
    evaluation split too is scanned only once they pass. ``traced``: a sweep's ``{"costs": CostModel}``
    (empty before its first plan, which fills it): the model's one trace, taken by every run's plan."""
    request = request_of(args, loaded, method, budget, costs=(traced or {}).get("costs"))
    use = training_use(request)
    counted = []

    def data_to_load() -> int:
        nonlocal eval_loader, train_batches
        if data is not None and not counted:
            eval_loader, train_batches = data()
        if not counted:
            if use == "batchnorm":
                _check_training_split_for_batchnorm(request.method, train_batches)
            _check_rows_fit_the_data(args, train_batches, method)     # before the memory plan: its n
            if use and train_batches is not None and "fisher_samples" in lookup(request.method).options.names():
                request.data_samples = train_batches.samples_per_pass()     # a memory refusal names no more rows
            counted.append(bytes_to_load(eval_loader, train_batches if use else None))
        return counted[0]

    request.data_to_load = data_to_load
    # the planned rows (the method's default fisher_samples too, the schedule --stages auto will
    # choose), checked inside plan() before its warnings: a refusal comes alone
    request.check_plan = lambda plan: _check_rows_fit_the_data(args, train_batches, method, plan=plan)
    plan = request.plan()
    if traced is not None:
        traced.setdefault("costs", request.costs)
    data_to_load()          # a method without a memory plan: the same checks, after the plan's
    return plan


def _has_batchnorm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check_training_split_for_batchnorm(method: str, train_batches) -> None:
    """For a run that reads the training split only to re-estimate the model's BatchNorm statistics
    (``training_use``: "batchnorm"): a split that cannot be loaded is refused before any work,
    naming --no-bn-recalibration as the other way out (in Python, data=None warns and prunes
    without the recalibration)."""
    if train_batches is None:
        return
    try:
        train_batches.samples_per_pass()                 # loads the split (kept for the run)
    except PrunekitError as err:
        raise PrunekitError(f"{err} (method {method} reads the training split only to re-estimate "
                            "BatchNorm after pruning: --no-bn-recalibration prunes without it)") from None


def _first_batch(batches):
    """The first batch of a loader (a copy of it: its epoch count stays) or of ``batches()``; None without data."""
    if batches is None:
        return None
    loader = batches() if callable(batches) else copy.copy(batches)
    return next(iter(loader), None)


def _samples(batches) -> int | None:
    """The samples one pass over a loader (or ``batches()``) yields, where known without reading it."""
    if batches is None:
        return None
    return samples_per_pass(batches() if callable(batches) else batches)


def _described(loaded: LoadedModel, checkpoint: str | None) -> dict:
    """``describe(loaded)`` and, for a run folder, the SHA-256 of the checkpoint it starts from
    (a resume after that file changed is refused: ``executor``)."""
    described = describe(loaded)
    if checkpoint is not None and Path(checkpoint).is_file():
        described["checkpoint_sha256"] = runs.file_sha256(checkpoint)
    return described


def _prune_into(args, plan, loaded: LoadedModel, eval_loader, train_batches, dense: dict | None, main: bool,
                read_only: bool = False) -> dict:
    """``prune_into`` once the folder is held; ``read_only``: a finished run in a folder this
    process may not write, read as it is (``RunFolder.follower``: nothing is written)."""
    folder, finished = None, False
    if read_only:
        folder = runs.RunFolder(args.out).follower()
        device = next(iter(loaded.model.parameters()), torch.empty(0)).device
        if not getattr(args, "resume", None):        # the same request again, or another run's folder
            runs.check_claim_on_rank_0(folder, run_config(args), device=device)
        elif distributed.current().distributed:
            runs.check_ranks_share(folder, device)
        finished = True
    elif args.out:              # rank 0 claims the folder and writes it; the others read it
        resume = bool(getattr(args, "resume", None))       # a folder of an older version may say force = true
        folder = runs.claim_on_rank_0(args.out, run_config(args), resume=resume,
                                      force=bool(getattr(args, "force", False)) and not resume,
                                      device=next(iter(loaded.model.parameters()), torch.empty(0)).device)
        finished = folder.read_metrics().get("status") == "done"     # a --resume with nothing left to do
        if main and not args.json:
            folder.echo = lambda line: print(line, file=sys.stderr)
    try:
        record, model, _ = execute(plan, train_batches, eval_loader, folder=folder,
                                   describe=_described(loaded, args.checkpoint if folder is not None else None),
                                   dense=dense, progress=show_progress(args), on_step=step_printer(args),
                                   stage_eval=not getattr(args, "no_stage_eval", False),
                                   about=_data_file(eval_loader),
                                   # (a finished run's result is given back: its folders are not read)
                                   data_fingerprint=_fingerprints(plan, eval_loader, train_batches, args)
                                   if folder is not None and not finished else None,
                                   force=bool(getattr(args, "force", False)),
                                   **({"anew": _SWEEP_ANEW, "redo": _SWEEP_REDO} if "force" not in vars(args) else
                                      {"redo": REDO_RESUMED} if getattr(args, "resume", None) else {}))
    except PrunekitError as err:
        runs.release_refused(folder)
        stopped = runs.stopped_by_divergence(           # a sweep's run folder: no --force, its sweep another --out
            folder if main else None, err, **({"cli_fix": _lower_rate_after_resume(args, err)}
                                              if getattr(args, "resume", None) else
                                              {} if "force" in vars(args) else
                                              {"cli_fix": "give the sweep another --out"}))
        if stopped is not err:
            raise stopped from None
        raise
    collective = distributed.current()
    if collective.distributed:          # under torchrun: every rank's peak, rank order
        record = distributed.with_rank_peaks(record, next(model.parameters()).device)
        if finished and (folder.path / "result.json").exists():   # the run's own peaks, not the saved one R times
            record = json.loads((folder.path / "result.json").read_text())
        elif folder is not None and main:  # the executor wrote rank 0's record; add the others' peaks
            atomic_write_json(folder.path / "result.json", record)
    if folder is not None and main and not folder.writable:     # read-only: model.onnx as the run wrote it
        if args.onnx and (folder.path / "model.onnx").is_file():
            record["onnx"] = str(folder.path / "model.onnx")
    elif folder is not None and main:
        if args.onnx:
            from ..export import export_onnx
            record["onnx"] = str(export_onnx(model, loaded.example_input(), folder.path / "model.onnx",
                                                 normalization=loaded.normalization))
        write_report(lambda: report.write_run_report(folder.path), args.json)
    return record


def _flops_bound(one: dict) -> str:
    """"; the flops budget bound it ..." where a count budget (--sparsity, --params) was also given
    and the MACs budget made the run keep fewer weights than it allows, else ""."""
    k, nonzeros, sparsity = one.get("budget_max_nonzeros"), one.get("nonzeros"), one.get("sparsity")
    if one.get("budget_max_macs") is None or k is None or nonzeros is None or not sparsity or sparsity >= 1:
        return ""
    prunable = round(nonzeros / (1 - sparsity))
    if not nonzeros < k < prunable:
        return ""
    return f"; the flops budget bound: the weight budget allowed {100 * (1 - k / prunable):.2f}%"


def _already_sparse(one: dict) -> str:
    """"; the model loaded already had X% ..." where more of its prunable weights were zero before
    pruning than the weight budget asked to remove, so the result is sparser than asked, else ""."""
    k, nonzeros, sparsity, before = (one.get(key) for key in ("budget_max_nonzeros", "nonzeros", "sparsity",
                                                               "dense_sparsity"))
    if None in (k, nonzeros, sparsity, before) or sparsity >= 1:
        return ""
    prunable = round(nonzeros / (1 - sparsity))
    allowed = 1 - k / prunable
    if not (before > allowed and sparsity > allowed) or round(before * prunable) <= prunable - k:
        return ""
    return (f"; the model loaded already had {100 * before:.2f}% of its prunable weights at zero, "
            f"more than the {100 * allowed:.2f}% asked")


def _params_bound(one: dict) -> str:
    """"; the params budget bound ..." where --sparsity was also given and the params budget made the
    run keep fewer weights than the sparsity budget allows (and the run kept as many as the params
    budget allows: where the flops budget bound below that, ``_flops_bound`` says so), else ""."""
    asked = (one.get("request") or {}).get("sparsity")
    k, nonzeros, sparsity = one.get("budget_max_nonzeros"), one.get("nonzeros"), one.get("sparsity")
    if (asked is None or (one.get("request") or {}).get("params") is None or k is None or nonzeros is None
            or sparsity is None or sparsity >= 1 or nonzeros < k):
        return ""
    prunable = round(nonzeros / (1 - sparsity))
    amount = Amount.parse(asked, "sparsity")
    allowed = int(amount.value) if amount.absolute else math.floor(round((1 - amount.value) * prunable, 6))
    if not k < allowed:
        return ""
    return f"; the params budget bound: the sparsity budget allowed {100 * (1 - allowed / prunable):.2f}%"


def _channels_line(one: dict) -> str:
    """The summary's channels line: channels kept of the groups' channels, heads apart from them
    where the groups hold both (a count of 8 heads and 256 MLP units is no one count)."""
    n = len(one["kept_channels"])
    segments = one.get("group_segments") or [1] * n
    kinds = ["heads" if kind in ("heads", "qkv_heads") else "channels"
             for kind in (one.get("group_kinds") or ["channels"] * n)]
    parts = []
    for what in ("heads", "channels"):
        chosen = [i for i in range(n) if kinds[i] == what]
        if chosen:
            kept = sum(one["kept_channels"][i] * segments[i] for i in chosen)
            size = sum(one["group_sizes"][i] * segments[i] for i in chosen)
            parts.append((what, kept, size, len(chosen)))
    if len(parts) == 1:
        what, kept, size, groups = parts[0]
        return f"{what + ' ' * (10 - len(what))} {kept:,} of {size:,} in {groups} groups"
    return "channels   " + ", ".join(f"{what} {kept:,} of {size:,} in {groups} group{'s' if groups != 1 else ''}"
                                    for what, kept, size, groups in parts)


def _channel_bound(one: dict) -> str:
    """"; the params budget bound ..." / "; the flops budget bound ..." where a channel method was
    given both budgets (``bound``: the one that chose the cut), with what the other alone allowed.
    The hybrid's FALCON phase meets them with zeros (no ``flops_alone_params``): what the other
    budget allowed, as a weights method's line says it; "channels": its channel cut met both."""
    if one.get("bound") and "flops_alone_params" not in one:     # the hybrid
        most = f" (at most {one['budget_max_params']:,})"
        if one["bound"] == "params":
            return (f"; the params budget bound{most}: the flops budget allowed "
                    f"{100 * one['budget_max_macs'] / one['dense_macs']:.2f}% of the MACs")
        if one["bound"] == "flops":
            return (f"{most}; the flops budget bound: the params budget allowed "
                    f"{100 * one['budget_max_params'] / one['dense_params']:.2f}% of the parameters")
        return f"{most}; neither budget bound: the channel cut (--structured-flops) already met both"
    if one.get("bound") == "params":
        return (f"; the params budget bound (at most {one['budget_max_params']:,}): the gates cut to the flops "
                f"budget alone keep {one['flops_alone_params']:,}")
    if one.get("bound") == "flops":
        return (f" (at most {one['budget_max_params']:,}); the flops budget bound: the gates cut to the params "
                f"budget alone keep {100 * one['params_alone_flops']:.2f}% of the MACs")
    return ""


def prune_lines(r: dict) -> list[str]:
    """The summary a run prints: a taper's snapshots first, labelled, so that the result asked for
    is the block right above the time."""
    lines = []
    for one in [*r.get("snapshots", []), r]:
        label = f"snapshot at {100 * one['flops_kept']:.0f}% MACs, " if one is not r else ""
        lines += [f"{one['model']} pruned with {one['method']} ({label}{one['mode']}):"]
        if one is r and r.get("data_file"):           # an .npz read as cifar10: the file, not only "cifar10"
            lines.append(f"  data       {r['data_file']}")
        lines.append(f"  accuracy   {one['dense_accuracy']:.2f}% -> {one['accuracy']:.2f}%")
        if one["sparsity"] is not None:
            lines.append(f"  sparsity   {100 * one['sparsity']:.2f}% ({one['nonzeros']:,} prunable weights kept)"
                         f"{_already_sparse(one) or _params_bound(one) + _flops_bound(one)}")
        lines += [f"  MACs kept  {100 * one['flops_kept']:.2f}% ({one['macs']:,} of {one['dense_macs']:,})",
                  f"  params     {100 * one['params_kept']:.2f}% kept ({one['params']:,}){_channel_bound(one)}"]
        if "kept_channels" in one:
            lines.append(f"  {_channels_line(one)}")
            dense = unexpected_skips([tuple(entry.split(": ", 1)) for entry in one.get("skipped_groups", [])])
            if dense:
                lines.append(f"  left dense {listed_skips(dense)}")
        if one is r and r.get("taper_steps", 0) > r.get("planned_steps", float("inf")):    # the schedule ran over
            lines.append(f"  taper      {r['taper_steps']:,} steps where {r['planned_steps']:,} were planned "
                         "(--taper-epochs): the gates reached the budget late")
        if one.get("depth"):          # --depth-flops: the blocks removed before the channel method
            removed = one["depth"]["removed"]
            kinds = [one["depth"].get("kinds", {}).get(name) for name in removed]
            kind = ("" if None in kinds else ": residual blocks (each replaced by its identity shortcut)"
                    if set(kinds) == {"residual block"} else ": shape-keeping layers, no residual block"
                    if set(kinds) == {"layer"} else ": residual blocks and shape-keeping layers")
            lines.append(f"  depth      {len(removed)} block{'s' if len(removed) != 1 else ''} removed first "
                         f"({', '.join(removed[:5])}{', ...' if len(removed) > 5 else ''}{kind}), "
                         f"{100 * one['depth']['flops_kept']:.2f}% of the MACs left" if removed else
                         ("  depth      no block removed: the model has no residual block with an identity shortcut "
                          "(a module whose forward adds its own input) and no shape-keeping layer outside a residual "
                          "branch" if one["depth"].get("candidates") == 0 else
                          "  depth      no block removed: each would have left fewer MACs than --depth-flops"))
        lines += _stages_lines(one) + _layer_search_lines(one) + _event_choice_lines(one)
        # --reconstruct-batches (the shrunk model's layers after the cut), --refit-batches (the pruned ones)
        for refit in ((one.get("reconstruct") or {}).get(f"{one.get('flops', 0):g}"), one.get("refit")):
            if refit:
                errors = (f", {'held-out ' if refit.get('held_out_images') else ''}output error "
                          f"{refit['mean_error_before']:.3f} -> {refit['mean_error_after']:.3f}"
                          if refit["layers"] else "")
                dropped = "" if refit.get("kept", True) else "; not kept: it raised the loss on held batches"
                lines.append(f"  re-fit     {refit['layers']} layers ({refit['centred']} centred for BatchNorm, "
                             f"{refit['skipped']} skipped){errors}, {refit['seconds']:.1f} s"
                             f"{f' on {images:,} images' if (images := refit.get('images')) else ''}{dropped}")
    spent = f"{r['seconds']:.2f} s pruning"
    if "gate_seconds" in r:          # a structured run: every phase, the gates apart
        tuned = (r.get("options") or {}).get("finetune_epochs")
        spent += f"{' and fine-tuning' if tuned else ''} (gates {r['gate_seconds']:.2f} s)"
    peaks = r.get("peak_rss_mb_per_rank")
    memory = (f"peak RSS {r['peak_rss_mb']:.0f} MB" if not peaks
              else f"{r['ranks']} ranks, peak RSS {' / '.join(f'{v:.0f}' for v in peaks)} MB")
    return lines + [f"  time       {spent}, {memory}"]


def _stages_lines(r: dict) -> list[str]:
    """The schedule's line of the summary when stages was "auto": which one, and why."""
    auto = r.get("stages_auto")
    if not auto:
        return []
    rows = f"{auto['fisher_samples']:,} rows" if isinstance(auto["fisher_samples"], int) else "rows"
    rows += f" of {auto['fisher_batch']}-image gradients" if auto["fisher_batch"] > 1 else " of per-sample gradients"
    fresh = ""
    if auto["fresh_samples"]:
        reused = auto["stages"] - r.get("fresh_stages", auto["stages"])
        fresh = (", each stage on fresh images" if not reused else
                 f", fresh images for {auto['stages'] - reused} stages (the data holds no more), then reused")
    if auto["thorough"]:
        why = f"the layer search over them cheap: {_auto_reason(auto, cheap=True)}"
    elif not auto["search_trials"]:
        why = "no layer search; the 15-stage schedule is chosen only with it"
    else:
        why = f"the layer search over 15 stages not cheap: {_auto_reason(auto, cheap=False)}"
    return [f"  stages     {auto['stages']} stages of {rows}{fresh} (auto: {why})"]


def _layer_search_lines(r: dict) -> list[str]:
    """The layer search's line of the summary: what it ran, or why "auto" left it off."""
    searched = [stage for stage in r.get("stages") or [] if "layer_search_loss" in stage]
    auto = r.get("layer_search_auto")
    why = f" (auto: {_auto_reason(auto, cheap=bool(auto['trials']))})" if auto else ""
    if auto and not auto["trials"]:
        return [f"  search     off{why}; --layer-search 100 runs it"]
    if not searched:           # a gradual event's record holds the choice, not its stages
        return [f"  search     on, {auto['trials']} trials per layer search{why}"] if auto else []
    seconds = sum(stage["layer_search_seconds"] for stage in searched)
    trials = auto["trials"] if auto else (r.get("options") or {}).get("layer_search")
    return [f"  search     {len(searched)} layer search{'es' if len(searched) > 1 else ''} of {trials} trials, "
            f"{seconds:.1f} s{why}"]


def _event_choice_lines(r: dict) -> list[str]:
    """A gradual run's stages and search lines: what "auto" chose at its events (each event's
    record holds its own), once when every event chose alike, else per event."""
    per_event = [(event["event"], _stages_lines(event) + _layer_search_lines(event)) for event in r.get("events") or []]
    chosen = [(number, lines) for number, lines in per_event if lines]
    if not chosen:
        return []
    if all(lines == chosen[0][1] for _, lines in chosen) and len(chosen) == len(per_event):
        return _with_label(chosen[0][1], "every event")
    return [line for number, lines in chosen for line in _with_label(lines, f"event {number}")]


def _with_label(lines: list[str], label: str) -> list[str]:
    """Summary lines ("  stages     ...") with ``label`` after the name: "  stages     (event 2) ..."."""
    return [f"{line[:13]}({label}) {line[13:]}" for line in lines]


def _auto_reason(auto: dict, cheap: bool) -> str:
    """The count that decided an "auto" by the layer search's cost (``cheap``: within both
    limits): the solves' when they alone were over their limit, else the forward passes'."""
    if auto["weight_trials"] > auto["limit_weight_trials"] and auto["forward_macs"] <= auto["limit_macs"]:
        return f"trials x weights {auto['weight_trials'] / 1e6:,.1f}M, over {auto['limit_weight_trials'] / 1e6:,.0f}M"
    verdict = "within" if cheap else "over"
    return f"forward passes of {auto['forward_macs'] / 1e9:,.1f} GMACs, {verdict} {auto['limit_macs'] / 1e9:,.0f} GMACs"


def add_prune_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """prune's options; a sweep takes several methods and budgets and needs --out."""
    many = {"nargs": "+"} if sweep else {}
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--method", default=["magnitude"] if sweep else "magnitude", **many,
                   help=(f"one or more of {', '.join(METHODS)} (default magnitude)" if sweep else
                         f"one of {', '.join(METHODS)} (default magnitude)"))
    p.add_argument("--sparsity", **many, help="as a share in [0, 1), the prunable weights REMOVED (0.9 or 90%% removes "
                   "90%%); as a count, the weights KEPT (50k keeps 50,000)")
    p.add_argument("--flops", **many, help="share of dense MACs kept, in (0, 1] (0.3, 30%%), or MACs kept (20M); alone, it "
                   "leaves the count of weights free (falcon chooses it; count-budget methods prune to the "
                   "largest count that fits)")
    p.add_argument("--params", **many, help="share of all parameters kept, in (0, 1] (0.1), or count kept (200k); "
                   "with --method autobot (or hybrid) and --flops, both are met")
    p.add_argument("--train-samples", type=int, default=None,
                   help="training images used for gradients and BN recalibration (>= 1; default: all)")
    p.add_argument("--include", nargs="+", help="module-name patterns to prune (default: every multiplied weight: Conv/Linear, attention, "
                   "embeddings, recurrent)")
    p.add_argument("--exclude", nargs="*", help="module-name patterns to leave dense (default: the "
                   "model's paper convention, e.g. resnet20-b's 1x1 projections; --exclude with no pattern prunes all)")
    p.add_argument("--no-bn-recalibration", action="store_true",
                   help="keep the BatchNorm statistics of the dense model")
    p.add_argument("--no-train-augment", action="store_true",
                   help="use plain training images for gradients and BN (default for cifar10: crop + flip, "
                        "as the models were trained)")
    p.add_argument("--out", required=sweep, help="run folder: config, log, metrics, stage checkpoints, model, "
                   "report" + (" (one run folder per method and budget inside)" if sweep else ""))
    p.add_argument("--recipe", help="TOML file of options (keys = option names); flags override it")
    p.add_argument("--no-stage-eval", action="store_true",
                   help="measure accuracy before and after pruning only, not after every stage, event or phase")
    p.add_argument("--onnx", action="store_true", help="also export the pruned model to DIR/model.onnx")
    add_device_arg(p)
    add_option_flags(p)
    if not sweep:
        p.add_argument("--force", action="store_true",
                       help="--out holds another run: clear that run's files first")
        p.add_argument("--resume", metavar="DIR", help="finish the run in DIR from its last completed stage")


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to a budget", usage=PRUNE_USAGE)
    add_prune_args(p)
    p.set_defaults(func=cmd_prune)
