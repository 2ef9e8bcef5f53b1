"""``prunekit train``: train a zoo model (or a model file) on a data set (SGD, cosine learning rate)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
import tomllib
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from .. import distributed, recipes, run_lock, runs, user_models
from ..api_checks import check_out
from ..costs import CostModel
from ..distributed import is_main_process
from ..errors import PrunekitError, PrunekitWarning
from ..data import load_dataset, make_loader
from ..data.dataset import DeferredImageDataset, contents_fingerprint
from ..data.imagefolder import count_images, fingerprint_change, folder_fingerprint, peek_classes_and_channels
from ..loading import (check_checkpoint_fits, check_fits, check_normalized, check_zoo_model, load_model,
                       parse_normalization, recorded_classes)
from ..masks import NOTABLE_LAYER_SHARE, PRUNED_LAYER_SHARE, MaskHold, exact_zeros, masks_from_weights
from ..params import ParamSpace
from ..saving import read_meta, sidecar_path
from ..options import OptionError, cli_message, float32_problem
from ..pipelines.stages import StageState, capture_rng, load_optimizer, optimizer_tensors, restore_rng
from ..record import peak_rss_mb, save_pruned
from ..run_configs import _differing
from ..run_folder import _remove_own_files
from ..run_fit import shape_misfit
from ..runs import (EditedConfig, RunCheckpointer, RunFolder, check_claim, check_ranks_share, claim,
                    finished_read_only_on_rank_0, release_refused)
from ..zoo.checkpoints import _export_kind, check_checkpoint_path, read_ahead, reading_ahead
from ..train import TrainingDiverged, check_finite_weights, cosine, evaluate, sgd, train_epoch
from ..train import check_converging as diverged
from .common import (add_data_args, add_device_arg, add_model_args, check_image_transform, check_out_not_input,
                     describe, edited_model_file, emit, note_classes, resolve_model, show_progress, stop_recorded)
from ..errors import warn as warn_ours


def cmd_train(args) -> int:
    # the checkpoint read, and a model file imported, before the data: kept for this call only
    with reading_ahead(), user_models.importing_once():
        return _cmd_train(args)


def _cmd_train(args) -> int:
    check_train_args(args)
    resolve_model(args)
    check_out(args.out, "--out")
    if getattr(args, "force", False) and not args.out:
        raise PrunekitError("--force clears the training run in --out: add --out DIR, or leave out --force")
    check_out_not_input(args)
    check_before_the_data(args)
    if finished_before_the_data(args):  # this command's run, finished: its result, no image read, no model built
        given = result_again(args)
        if given is not None:
            return given
    seeded = check_model_before_the_data(args)     # a model file imported under --seed: the RNG state after it
    classes = recorded_classes(args.checkpoint)     # a prunekit model's own: an image folder is labelled by them
    train_ds = load_dataset(args.data, args.data_dir, "train", resize=args.resize, crop=args.crop,
                            limit=args.train_samples, seed=args.seed, classes=classes, defer=True)
    # an image folder without train/ and test/ is both: scanned and decoded once, shared (nothing
    # changes images in place: augmentation makes new batches)
    test_ds = train_ds if args.eval_split == "train" else load_dataset(args.data, args.data_dir, "test",
                                                                        resize=args.resize, crop=args.crop,
                                                                        classes=classes, defer=True,
                                                                        same_as=train_ds)
    # what the training images are (an image folder's files, another data set's images and labels),
    # recorded with each epoch: a resume over other ones is refused; computed once the run is known
    # unfinished (train_into)
    scanned = train_ds
    fingerprint = (lambda: folder_fingerprint(scanned) if args.data == "imagefolder" else
                   contents_fingerprint(scanned, args.data, args.data_dir)) if args.out else None
    # an image folder stays scanned, not decoded (its loaders decode it on first use): a finished
    # run in --out gives its result back without decoding a pixel; train_into decodes it once the
    # run is known unfinished (a decoding refusal then releases a folder claimed afresh)
    # before building: the seed picks the initial weights (and a model file's draws when imported, as
    # one imported here would: its import came first, under the seed, and the build carries on from there)
    if seeded is None:
        torch.manual_seed(args.seed)
    else:
        restore_rng(seeded)         # torch's CPU generator and, where the import used CUDA, each GPU's
    try:
        loaded = load_model(args.model, args.checkpoint, num_classes=len(train_ds.classes),
                            in_channels=train_ds.image_shape[0], dataset=args.data,
                            input_shape=tuple(train_ds.image_shape), normalization=args.normalize)
    except PrunekitError as err:
        raise edited_model_file(args, err) from None
    loaded.input_shape = tuple(train_ds.image_shape)
    note_classes(args, loaded, train_ds)    # recorded in the sidecar: later folders are labelled the same
    check_finite_weights(loaded.model)      # as prune does: training would only spread them
    check_normalized(loaded)
    check_image_transform(loaded, args)
    if args.device:
        loaded.model.to(args.device)
    costs = CostModel(loaded.model, loaded.example_input())   # refuses images the model cannot take
    pruned = pruned_checkpoint(args, loaded, costs)
    if args.out and (pruned is None or args.zeros == pruned.default):
        # --zeros naming what its default resolves to here: the same run as without it (config.toml)
        args.zeros = None
    if args.out and args.zeros == "train" and trained_by_an_older_prunekit(RunFolder(args.out), pruned):
        # what an older prunekit's finished run here did (its config.toml has no --zeros): its run
        args.zeros = None
    check_fits(loaded, train_ds, f"{args.data} train")
    if test_ds is not train_ds and test_ds.image_shape[0] != train_ds.image_shape[0]:
        # before any epoch (its normalization refused it after training): an all-grayscale test split
        # of colour training images; other sizes are left to the model, as before
        check_fits(loaded, test_ds, f"{args.data} {args.eval_split}")
    loader = make_loader(train_ds, loaded.normalization, batch_size=args.batch_size, shuffle=True,
                         augment=args.augment, seed=args.seed, drop_last=True)
    if len(loader) == 0:                # whole batches only: no step would be taken
        raise batch_size_refusal(args, len(train_ds))
    test_loader = make_loader(test_ds, loaded.normalization, batch_size=512)
    if args.out and not getattr(args, "force", False) and finished_read_only_on_rank_0(args.out):
        # a finished run in a folder this process may not write: its result again (when it is this
        # command's run), with no lock (its file could not be made) and nothing written
        return train_into(args, loaded, loader, test_loader, read_only=True, pruned=pruned, fingerprint=fingerprint)
    with run_lock.held_by_rank_0(args.out) if args.out else nullcontext():     # one process at a time in it
        with stop_recorded(args.out, distributed.is_main_process()):    # a stop in run.log, as prune's
            return train_into(args, loaded, loader, test_loader, pruned=pruned, fingerprint=fingerprint)


class PrunedCheckpoint:
    """What training keeps of a pruned checkpoint (a `prunekit prune` run's model, a `train` of
    one, or a plain file whose zeros look pruned): ``masks`` (its zero prunable weights, held at zero
    through every step when ``hold``; ``--zeros train``: not held, they train like every weight),
    ``shrunk`` (it has channels removed: its channel layout is saved with the trained model),
    ``source`` (the record it was saved with, whose dense MACs / params the kept shares are counted
    against), ``costs`` (the loaded model's cost model, for the nonzero-aware counts of the trained
    one), ``origin`` (the record's ``pruned`` entry: where the zeros came from), ``note`` (the line
    that says so, printed as training starts; ``always_say``: printed under --json too, on stderr:
    the zeros of a file without a prunekit record, whose handling the user did not see coming)."""

    def __init__(self, space: ParamSpace, masks: dict, shrunk: bool, source: dict, costs: CostModel,
                 hold: bool = True, origin: dict | None = None):
        self.space, self.masks, self.shrunk, self.source, self.costs = space, masks, shrunk, source, costs
        self.hold, self.origin = hold, origin
        self.note, self.always_say = "", False
        self.default = "keep"       # what --zeros left out resolves to for this model

    @property
    def choice(self) -> str:
        """The ``--zeros`` this training uses: "keep" (held at zero) or "train"."""
        return "keep" if self.hold else "train"

    @property
    def zeros(self) -> int:
        return sum(int((~m).sum()) for m in self.masks.values())

    def record(self, model) -> dict:
        """The counts of trained ``model`` as a prune record has them (MACs and params nonzero-aware,
        kept shares of the dense model's), and where it came from (``pruned``). Zeros trained
        (``--zeros train``) of a model with its channels all there: a dense model, so only their
        count (``trained_zeros``)."""
        if not (self.hold or self.shrunk):
            return {"trained_zeros": self.zeros}
        counts = self.costs.count(model)
        dense_macs = self.source.get("dense_macs") or counts.dense_macs
        dense_params = self.source.get("dense_params") or counts.dense_params
        nonzeros = sum(int((w != 0).sum()) for w in self.space.weights())
        record = {"macs": counts.macs, "dense_macs": dense_macs, "flops_kept": counts.macs / dense_macs,
                  "params": counts.params, "dense_params": dense_params, "params_kept": counts.params / dense_params,
                  "nonzero_params": counts.nonzero_params}
        if self.source.get("sparsity") is not None or not (self.source or self.shrunk):    # a weights method's
            record.update(sparsity=1 - nonzeros / self.space.numel, nonzeros=nonzeros)
        origin = self.origin or self.source.get("pruned") or (
            {"method": self.source.get("method"), "family": self.source.get("family")}
            if self.source else {"method": None, "family": None, "export": True})
        record["pruned"] = {**origin, "held_zeros": self.zeros if self.hold else 0, "shrunk": self.shrunk}
        if not self.hold:
            record["trained_zeros"] = self.zeros
        return record


def pruned_checkpoint(args, loaded, costs: CostModel) -> PrunedCheckpoint | None:
    """The pruning the loaded model carries and what ``--zeros`` (``args.zeros``: "keep", "train"
    or None, the default) does with it, or None when there is nothing to keep or say (no zeros, no
    channel layout).

    A prunekit-pruned checkpoint (a sidecar recording a `prunekit prune` run, whose ``result`` names
    a method; a `train` of one, whose ``result`` has ``pruned``; a channel layout; a file `prunekit
    export` wrote, model-dense / model-sparse.safetensors, no record): its zero prunable weights are
    held at zero unless ``--zeros train`` (which trains them; a channel layout is kept either way: a
    model with channels removed is a smaller dense model). Any other weights (a plain .pth /
    .safetensors, or what a model file's function built) are counted too (``_plain_zeros``): where a
    layer of a ``--checkpoint`` file is at least half exact zeros (``exact_zeros``: pruned by another
    tool, e.g. torch.nn.utils.prune made permanent) they are held at zero by default, saying so (under
    --json too) and naming ``--zeros train``; fewer zeros, and the zeros of a model built without
    ``--checkpoint`` (its initialisation), are trained, a note naming ``--zeros keep`` where a layer
    is at least ``NOTABLE_LAYER_SHARE`` zeros. ``note`` is that line (printed by ``train_into``);
    ``default`` what ``--zeros`` left out resolves to."""
    meta = read_meta(args.checkpoint) if args.checkpoint else {}
    source = meta.get("result") if isinstance(meta.get("result"), dict) else {}
    shrunk = "channel_layout" in meta
    exported = args.checkpoint is not None and _export_kind(Path(args.checkpoint)) is not None
    choice = getattr(args, "zeros", None)
    space = ParamSpace(loaded.model, costs=costs)     # every prunable weight, as the channel fine-tune holds them
    if not (shrunk or exported or source.get("method") is not None or source.get("pruned")):
        return _plain_zeros(args, space, costs, choice)
    pruned = PrunedCheckpoint(space, masks_from_weights(space), shrunk, source, costs, hold=choice != "train")
    if not (pruned.zeros or shrunk):                  # nothing pruned to keep (a dense model's export)
        return None
    method = (source.get("pruned") or source).get("method") or ("a prunekit export" if exported else "pruned")
    layout = "its channel layout (channels removed) is kept" if shrunk else ""
    share = f"its {pruned.zeros:,} pruned weights ({100 * pruned.zeros / space.numel:.1f}% of the prunable)"
    if pruned.hold:
        zeros = f"{share} are held at zero" if pruned.zeros else ""
        after = "stays pruned" + (" (--zeros train trains them)" if pruned.zeros else "")
    else:
        zeros = f"{share} are trained (--zeros train)" if pruned.zeros else ""
        after = "is " + ("a smaller dense model, its channels still removed" if shrunk else "dense")
    kept = " and ".join(filter(None, (zeros, layout)))
    pruned.note = f"{args.checkpoint} is a pruned model ({method}): {kept}, so the trained model {after}"
    return pruned


def _plain_zeros(args, space: ParamSpace, costs: CostModel, choice: str | None) -> PrunedCheckpoint | None:
    """``pruned_checkpoint`` of weights without a prunekit record: their exact zeros held (``--zeros
    keep``, or by default where a layer of a ``--checkpoint`` file is at least half zeros) or
    trained, with the line that says so. Without ``--checkpoint`` the model is freshly built (a zoo
    model, or what a model file's function returned): its zeros are its initialisation (eye_,
    dirac_, block-diagonal, zero-init branches) and train by default; a function that loads pruned
    weights itself cannot be told from one that initialises them so, so where a layer is a notable
    share zeros the line names ``--zeros keep`` for it."""
    found = exact_zeros(space)
    if not found.zeros:
        return None
    loaded = args.checkpoint is not None
    default = "keep" if loaded and found.looks_pruned else "train"
    hold = (choice or default) == "keep"
    if not hold and not found.notable:          # a few zeros of chance, a padding row: nothing to keep or say
        return None
    what = args.checkpoint or args.model
    counted = f"{what} holds {found.zeros:,} exact zero weights ({100 * found.share:.1f}% of the prunable)"
    pruned = PrunedCheckpoint(space, masks_from_weights(space), False, {}, costs, hold=hold,
                              origin={"method": None, "family": None, "plain": True})
    pruned.default = default
    if choice == "train":                       # as asked: counted in the record (trained_zeros), not said
        pruned.note = ""
    elif choice == "keep":
        pruned.note = f"{counted}: held at zero (--zeros keep), so the trained model stays as sparse"
    elif hold:                                  # not what plain training does: said under --json too
        pruned.always_say = True
        pruned.note = (f"{counted}, at least {PRUNED_LAYER_SHARE:.0%} zeros in layer(s) {found.layers()}: pruned, so "
                       "they are held at zero and the trained model stays as sparse; --zeros train trains every weight")
    elif loaded:
        pruned.note = (f"{counted}, at least {NOTABLE_LAYER_SHARE:.0%} zeros in layer(s) "
                       f"{found.layers(notable=True)}: trained like every weight, so the trained model is dense; "
                       "--zeros keep holds them at zero")
    else:
        pruned.note = (f"{what} built a model whose layer(s) {found.layers(notable=True)} are at least "
                       f"{NOTABLE_LAYER_SHARE:.0%} exact zeros ({found.zeros:,} weights): taken as its initialisation "
                       "(no --checkpoint), so trained like every weight; if it loads pruned weights itself, "
                       "--zeros keep holds them at zero")
    return pruned


def train_into(args, loaded, loader, test_loader, read_only: bool = False,
               pruned: PrunedCheckpoint | None = None,
               fingerprint: dict | Callable[[], dict | None] | None = None) -> int:
    """Train ``loaded`` on ``loader`` (into run folder ``args.out`` when given, carrying on from
    its last epoch), evaluate on ``test_loader``, print the result. ``read_only``: ``args.out``
    holds a finished run this process may not write: checked and read, nothing written. ``pruned``:
    a pruned checkpoint's zeros, held at zero, and its channel layout, saved with the model.
    ``fingerprint``: the training image folder's (``ImageFolderScan.fingerprint``; another data set's
    ``data.dataset.contents_fingerprint``), or a function
    that computes it, called only when the run is not finished (a finished one gives its result
    back without reading the images' first bytes again), recorded with each epoch; a resume over
    a folder whose images changed since is refused. An image folder's loaders may hold it scanned
    only (``DeferredImageDataset``): decoded here once the run is known unfinished, so a finished
    run's result comes back without decoding it (nor checking it: a folder changed under a finished
    run is not said, as ``prune`` says none for its finished run)."""
    folder = training_folder(args, read_only=read_only)
    if folder is not None and distributed.current().distributed:   # on several machines: one shared folder
        check_ranks_share(folder, next(iter(loaded.model.parameters()), torch.empty(0)).device)
    finished = finished_record(folder)
    if finished is not None:            # the same command after the run ended: its result again
        return give_back(args, folder, finished, pruned)
    if callable(fingerprint):
        fingerprint = fingerprint()
    decode_images(folder, loader, test_loader)
    checkpointer = RunCheckpointer(folder, unit="epoch") if folder is not None else None
    if checkpointer is not None:        # run.log said "resume: train ..." already (log_start): one line
        checkpointer.log_resuming = False
    state = checkpointer.last() if checkpointer is not None else None
    state = check_same_zeros(state, pruned, checkpointer, force=bool(getattr(args, "force", False)))
    # once the folder is claimed: a refusal stays one line
    if pruned is not None and pruned.note and (pruned.always_say or not args.json) and is_main_process():
        print(pruned.note, file=sys.stderr)
    optimizer = sgd(loaded.model, args.lr, weight_decay=args.weight_decay)
    schedule = cosine(optimizer, args.epochs * len(loader))
    held = pruned is not None and pruned.hold
    with MaskHold(pruned.space, pruned.masks, optimizer) if held else nullcontext():
        return _train_held(args, loaded, loader, test_loader, folder, checkpointer, optimizer, schedule, pruned,
                           state, fingerprint)


def give_back(args, folder: RunFolder, finished: dict, pruned: PrunedCheckpoint | None = None) -> int:
    """The result of the training run ``folder`` holds, finished (``finished``: its record), printed
    again for the same command, with the line that says so; nothing is trained. ``pruned``: the
    checkpoint's zeros (None: none, or not read: a run this version finished, whose record says
    how it trained them). A run that started from other weights than ``--checkpoint`` holds now
    (``refuse_changed_checkpoint``) is another run: refused."""
    refuse_changed_checkpoint(args, folder)
    folder.log("already complete; nothing to do")       # as prune's run.log says it (read-only: nothing)
    if folder.writable and folder.checkpoints.is_dir():    # a kill came between result.json and its removal
        with contextlib.suppress(OSError):                 # (the result is printed all the same)
            _remove_own_files(folder.checkpoints)
    older = trained_by_an_older_prunekit(folder, pruned)
    if older:                       # its zeros were trained: counted in its summary, as a run here counts them
        finished = {**finished, "trained_zeros": pruned.zeros}
    if is_main_process() and older and pruned.hold:     # today's same command would have held them
        print(f"prunekit: note: the training run in {args.out} was finished by an older prunekit, which trained "
              f"the {pruned.zeros:,} exact zero weights of its checkpoint: its result again, nothing was trained "
              "(--force trains anew, holding them at zero)", file=sys.stderr)
    elif is_main_process():
        print(f"prunekit: note: {args.out} holds this training run, finished: its result again, nothing was "
              "trained (--force trains it anew)", file=sys.stderr)
    emit(args, finished, result_lines(args, finished))
    return 0


def checkpoint_digest(args) -> str | None:
    """The SHA-256 of the ``--checkpoint`` file the training starts from (``runs.file_sha256``, as
    ``prune`` records it: ``checkpoint_sha256``); None without one."""
    checkpoint = getattr(args, "checkpoint", None)
    return runs.file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None


def refuse_changed_checkpoint(args, folder: RunFolder) -> None:
    """Refuse to give back the finished training run in ``folder`` when the ``--checkpoint`` file
    it started from has other contents now (other weights at the same path: the same command is
    another training run, whose result this is not). Its model.json records the file's SHA-256
    (``checkpoint_sha256``); a run of an older prunekit, which recorded none, is given back."""
    try:
        recorded = json.loads(sidecar_path(folder.model_path).read_text()).get("checkpoint_sha256")
    except (OSError, ValueError, AttributeError):
        return                      # no readable model.json: nothing to compare with
    if recorded is not None and recorded != checkpoint_digest(args):
        raise PrunekitError(f"--out {args.out} holds another training run, finished: it started from other weights "
                            f"than --checkpoint {args.checkpoint} holds now (its SHA-256 differs): pick another --out, "
                            "or --force to replace it with this one")


def finished_before_the_data(args) -> bool:
    """Whether ``--out`` holds this command's training run, finished, as the folder alone tells:
    its model and result.json written by this version (its record says how the checkpoint's zeros
    trained: ``zeros``) and its config.toml this command's very options. Its result is then given
    back (``result_again``) before the image folder is scanned (both splits' headers: minutes on a
    huge one) or the model built. Not with --force (it trains anew), --zeros (what it resolves to
    needs the model's weights), or under torchrun (the ranks check the folder they share): those,
    an older version's finished run, and a config.toml that differs in its text only (a folder
    moved with its run) go the way of an unfinished run, which scans, builds and says the same."""
    if not args.out or getattr(args, "force", False) or args.zeros is not None or distributed.current().distributed:
        return False
    folder = RunFolder(args.out)
    try:
        record = finished_record(folder)
        return (isinstance(record, dict) and "zeros" in record and folder.config.is_file()
                and folder.config_text() == run_config(args))
    except (OSError, UnicodeDecodeError, ValueError):
        return False        # a damaged folder: said where the run is read


def result_again(args) -> int | None:
    """``give_back`` of the finished run ``finished_before_the_data`` found in ``--out``, with the
    lock and the checks (``training_folder``) an unfinished run's command takes; None where the run
    is no longer finished once the folder is held (its command goes on as for an unfinished run)."""
    if finished_read_only_on_rank_0(args.out):     # a folder this process may not write: nothing written
        folder = training_folder(args, read_only=True)
        finished = finished_record(folder)
        return None if finished is None else give_back(args, folder, finished)
    with run_lock.held_by_rank_0(args.out):         # one process at a time in it
        with stop_recorded(args.out, distributed.is_main_process()):
            folder = training_folder(args)
            finished = finished_record(folder)
            return None if finished is None else give_back(args, folder, finished)


def decode_images(folder: RunFolder | None, *loaders) -> None:
    """Decode the scanned image folders ``loaders`` read (``DeferredImageDataset``: the training
    split, and the test split where it is another; each once), for a run known not to be finished:
    an image that cannot be decoded is refused in one line before any epoch, and a folder this
    command claimed afresh is released for the corrected command (``release_refused``)."""
    try:
        for loader in loaders:
            if isinstance(loader.dataset, DeferredImageDataset):
                loader.dataset.dataset          # noqa: B018 (decodes, once)
    except PrunekitError:
        release_refused(folder)
        raise


def trained_by_an_older_prunekit(folder: RunFolder | None, pruned: PrunedCheckpoint | None) -> bool:
    """Whether ``folder`` holds a training run an older prunekit finished over a file without a
    prunekit record whose zeros this version holds by default (``pruned.default``): that version
    trained them (it held the zeros of prunekit-pruned checkpoints only), and its result.json records
    none of this version's ``zeros``, ``pruned`` (zeros held) or ``trained_zeros``, nor its
    config.toml ``--zeros`` (so the same command, and ``--zeros train``, is that run)."""
    if folder is None or pruned is None or not (pruned.origin or {}).get("plain") or pruned.default != "keep":
        return False
    try:
        record = finished_record(folder)
    except (OSError, UnicodeDecodeError, ValueError):
        return False            # a damaged result.json: said where the run is read
    if not isinstance(record, dict) or {"zeros", "pruned", "trained_zeros"} & record.keys():
        return False
    try:
        return "zeros" not in tomllib.loads(folder.config_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


def check_same_zeros(state, pruned: PrunedCheckpoint | None, checkpointer: RunCheckpointer | None,
                     force: bool = False):
    """Carry on a training run with its zeros as its epochs so far had them (the ``zeros`` its last
    epoch checkpoint ``state`` recorded): the flag is in its config.toml (another is refused as
    another run), so what gets here is a checkpoint file whose zeros changed since (refused; with
    ``force``, --force, the run starts anew: its epochs so far are removed), or the epoch checkpoint
    of an older prunekit, which trained the zeros of a file without a prunekit record: carried on
    training them, and said (``pruned.note``; with --force started anew, holding them). The state
    to carry on from: ``state``, or None when the run starts anew."""
    if state is None:
        return None
    now = pruned.choice if pruned is not None else "train"
    started = state.extra.get("zeros")
    folder = checkpointer.folder
    if started is None:          # an older prunekit's: it held the zeros of prunekit-pruned checkpoints only
        plain = pruned is not None and bool((pruned.origin or {}).get("plain"))
        if plain and pruned.hold and force:
            _start_anew(checkpointer, "how the checkpoint's zero weights are trained")
            return None
        if plain and pruned.hold:
            pruned.hold = False
            pruned.note = (f"prunekit: note: the training run in {folder.path} was started by an older prunekit, "
                           f"which trained the {pruned.zeros:,} exact zero weights of its checkpoint: carried on "
                           "training them (--force trains anew, holding them at zero)")
        return state
    if started != now and force:
        _start_anew(checkpointer, "the checkpoint's zero weights")
        return None
    if started != now:
        said = {"keep": "held the checkpoint's zero weights at zero", "train": "trained the checkpoint's zero weights"}
        raise PrunekitError(f"the training run in {folder.path} {said[started]} in its epochs so far, and this one "
                            f"would have {'held them' if now == 'keep' else 'trained them'}: its checkpoint file "
                            "changed since; restore it to carry the run on, or add --force to train anew")
    return state


def _train_held(args, loaded, loader, test_loader, folder, checkpointer, optimizer, schedule,
                pruned: PrunedCheckpoint | None, state=None, fingerprint: dict | None = None) -> int:
    """``train_into``'s epochs, evaluation and saving (a pruned checkpoint's masks held by the
    caller; ``state``: the run's last epoch checkpoint, None when starting afresh; ``fingerprint``:
    the training image folder's, see ``resume``)."""
    digest = user_models.file_digest(args.model) if user_models.is_model_file(args.model) else None
    weights = checkpoint_digest(args) if args.out else None     # what it starts from (model.json, each epoch's)
    zeros = pruned.choice if pruned is not None else "train"
    history = resume(checkpointer, loaded.model, optimizer, schedule, loader, digest,
                     folder_labels=args.data == "imagefolder", fingerprint=fingerprint, data_dir=args.data_dir,
                     force=bool(getattr(args, "force", False)), state=state, weights=weights)
    if history and not args.json:
        print(f"resuming {args.out} after epoch {len(history)}/{args.epochs}", file=sys.stderr)
    for epoch in range(len(history), args.epochs):
        start = time.perf_counter()
        loss = train_epoch(loaded.model, loader, optimizer, schedule, f"epoch {epoch + 1}/{args.epochs}",
                           progress=show_progress(args))
        check_converging(args, loss, loaded.model, epoch, history, folder)
        history.append({"epoch": epoch + 1, "loss": loss, "seconds": time.perf_counter() - start})
        if not args.json:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}", file=sys.stderr)
        if checkpointer is not None:
            save_epoch(checkpointer, loaded.model, optimizer, schedule, loader, history, digest, fingerprint, zeros,
                       weights)
    loaded.model.eval()
    accuracy = evaluate(loaded.model, test_loader)
    record = {"model": args.model, "data": args.data, "split": args.eval_split, "epochs": args.epochs, "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed, "train_images": len(loader.dataset), "accuracy": accuracy,
              "seconds": sum(h["seconds"] for h in history), "history": history, "peak_rss_mb": peak_rss_mb(),
              "zeros": zeros}
    if pruned is not None:
        record.update(pruned.record(loaded.model))
    if checkpointer is not None and len(checkpointer.world_sizes) > 1:    # resumed with another world size
        record["world_sizes"] = list(checkpointer.world_sizes)
    # under torchrun: the world size and every rank's peak, as prune records them
    record = distributed.with_rank_peaks(record, next(iter(loaded.model.parameters()), torch.empty(0)).device)
    if args.out and is_main_process():     # under torchrun, rank 0 alone writes
        described = {**describe(loaded), **({"checkpoint_sha256": weights} if weights is not None else {})}
        save_pruned(args.out, loaded.model, described, record, shrunk=pruned is not None and pruned.shrunk)
        folder.log(f"done: {args.eval_split} accuracy {accuracy:.2f}% after {args.epochs} epochs")
        shutil.rmtree(folder.checkpoints, ignore_errors=True)     # the model and result.json are written
    emit(args, record, result_lines(args, record))
    return 0


def check_converging(args, loss: float, model, epoch: int, history: list[dict], folder: RunFolder | None) -> None:
    """Stop a training whose loss (or weights) became nan or inf in epoch ``epoch`` (0-based), before
    its checkpoint: nothing diverged is saved. A run folder claimed by this command and holding no
    epoch yet is released (the command with a lower --lr may use it); one that holds earlier epochs
    keeps them, consistent with its config.toml (this --lr), and says why it stopped in its run.log:
    the lower --lr is another run, which --force starts over there or another --out takes."""
    try:
        diverged(loss, model, args.lr, f"epoch {epoch + 1}/{args.epochs}")
        return
    except TrainingDiverged as err:
        message = cli_message(err)
        if folder is not None:
            release_refused(folder)
            if folder.config.exists():
                if folder.writable and (folder.path / "run.log").exists():
                    with contextlib.suppress(OSError):      # a full disk: the divergence is what the user is told
                        folder.log(f"stopped: {message}")
                message += (f"; {args.out} keeps the run up to epoch {len(history)} with this --lr: to train with a "
                            "lower one, add --force to start over there, or give it another --out")
    raise PrunekitError(message)


def result_lines(args, record: dict) -> list[str]:
    return ([f"{args.model} trained on {args.data}: {record['accuracy']:.2f}% {args.eval_split} accuracy "
             f"({record['seconds']:.1f} s of training"
             + (f"; still pruned: {100 * record['flops_kept']:.2f}% of the dense MACs, {100 * record['params_kept']:.2f}% "
                "of its params" if "pruned" in record else "")
            + (f"; {record['trained_zeros']:,} zero weights trained" if record.get("trained_zeros") else "") + ")"]
            + ([f"saved to {args.out}"] if args.out else []))


def finished_record(folder: RunFolder | None) -> dict | None:
    """The record of a training run that ended in ``folder`` (its model and result.json are
    written, in that order, before its epoch checkpoint is removed); None otherwise."""
    if folder is None:
        return None
    result = folder.path / "result.json"
    if not (result.exists() and folder.model_path.exists()):
        return None
    return json.loads(result.read_text())


def training_folder(args, read_only: bool = False) -> RunFolder | None:
    """``--out`` as a run folder: its config.toml is this command's options, so that the same
    command again carries on from the last completed epoch (under torchrun rank 0 writes, every
    rank reads). ``read_only``: a folder this process may not write (``runs.finished_read_only``),
    checked like a claim but left as it is (``RunFolder.follower``)."""
    if not args.out:
        return None
    collective = distributed.current()
    collective.barrier()
    if not is_main_process():
        collective.barrier()                 # rank 0 claims the folder
        return RunFolder(args.out).follower()
    folder = RunFolder(args.out).follower() if read_only else RunFolder(args.out)
    config_text = run_config(args)
    try:
        if _holds_a_prune_run(folder):          # never cleared by --force, which replaces training runs only
            raise PrunekitError(f"--out {args.out} holds a `prunekit prune` run: pick another --out for the "
                                "training")
        if read_only:                           # the same refusals as claim's, nothing written
            check_claim(folder, config_text)
        else:
            claim(folder, config_text, force=bool(getattr(args, "force", False)))
    except EditedConfig:        # this run's config.toml, edited since: said as it is (its fix is --force)
        raise
    except OptionError:
        old = folder.config_text() if folder.config.exists() else None
        keys = _differing(old, config_text, folder.path) if old is not None else []
        other = f" (other {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})" if keys else ""
        if old is None:
            raise PrunekitError(f"--out {args.out} holds files a training run would overwrite: pick another "
                                "--out, or --force to replace them") from None
        if finished_record(folder) is not None:
            raise PrunekitError(f"--out {args.out} holds another training run, finished{other}: pick another "
                                "--out, or --force to replace it with this one") from None
        raise PrunekitError(f"--out {args.out} holds an unfinished training run{other}: give that run's own options "
                            "to carry it on, pick another --out, or --force to replace it with this one") from None
    finally:
        collective.barrier()
    if not read_only:
        log_start(args, folder)
    return folder


def log_start(args, folder: RunFolder) -> None:
    """run.log's first line of this command in ``folder`` (just claimed, by the process that
    writes it), as ``prune`` writes its own (``executor.execute``): "start: ..." or, where epochs are
    checkpointed there already, "resume: ...". Written at once, before any image is decoded, so that
    a stop from there on is written after it (``stop_recorded``). A finished run writes nothing here
    (``give_back`` says it was given back)."""
    if finished_record(folder) is not None:
        return
    begun = any(folder.checkpoints.glob("stage-*.safetensors"))
    folder.log(f"{'resume' if begun else 'start'}: train {args.model} on {args.data}, {args.epochs} epochs, "
               f"lr {args.lr:g}, seed {args.seed}")


def run_config(args) -> str:
    """The config.toml of the training run ``args`` ask for (paths resolved: the same command from
    any directory is the same run)."""
    # force is about this invocation: kept in the config, the same command without it would be another run
    config = {k: v for k, v in vars(args).items() if k not in recipes.NOT_IN_RECIPES and k != "force"}
    for key in ("checkpoint", "data_dir", "out"):       # the same command from any directory
        if config.get(key) is not None:
            config[key] = str(Path(config[key]).resolve())
    if user_models.is_model_file(config["model"]):
        config["model"] = user_models.resolved(config["model"])
    return recipes.dump_recipe(config)


def _holds_a_prune_run(folder: RunFolder) -> bool:
    """Whether ``folder`` holds a `prunekit prune` run (its metrics.json, or a config.toml naming a
    method: a prune killed before it wrote its metrics), not a training run."""
    if folder.metrics_path.exists():            # only prune runs write one
        return True
    try:
        return "method" in tomllib.loads(folder.config_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


_LAST = object()


def resume(checkpointer: RunCheckpointer | None, model, optimizer, schedule, loader,
           digest: str | None = None, folder_labels: bool = False, fingerprint: dict | None = None,
           data_dir: str | None = None, force: bool = False, state=_LAST, weights: str | None = None) -> list[dict]:
    """Restore model, optimizer, schedule, RNG and data order from the last epoch checkpoint;
    its per-epoch history (empty when starting afresh). ``digest``: the model file's SHA-256,
    compared with the one the checkpoint was written with. ``folder_labels``: the data's labels are
    its class folders' sorted names (an image folder): a checkpoint that recorded no class names
    (an older prunekit's) is carried on with a warning that they could not be checked.
    ``fingerprint``: the training image folder's now (``ImageFolderScan.fingerprint``; ``data_dir``
    the folder, to name it): one that differs from the checkpoint's is refused, naming what changed
    (the epochs left would train on other images than the first); a checkpoint that recorded none
    (an older prunekit's) is carried on with a warning. ``force`` (--force): where the class names or
    images changed, the epochs so far are removed and the run starts anew on the data as it is now
    (without a change, --force carries the same unfinished run on, as it always did).
    ``state``: the checkpoint already read from ``checkpointer`` (default: its last is read here).
    ``weights``: the SHA-256 of the --checkpoint file now (``checkpoint_digest``): one that differs
    from the one the run started from is refused (its epochs left would go on from other weights
    than its first; ``force``: started anew); a checkpoint that recorded none is carried on.
    """
    if state is _LAST:
        state = checkpointer.last() if checkpointer is not None else None
    if state is None:
        return []
    started = state.extra.get("class_names")      # None: a checkpoint of a prunekit that recorded none
    classes = list(getattr(loader.dataset, "classes", None) or [])
    recorded = state.extra.get("data_fingerprint")      # None: an older prunekit's (or not an image folder)
    change = fingerprint_change(recorded, fingerprint) if fingerprint is not None else None
    renamed = isinstance(started, list) and classes and started != classes
    other_weights = state.extra.get("checkpoint_sha256") not in (None, weights)
    name = checkpointer.path(state.stage).name
    misfit = shape_misfit(model, {k[len("model/"):]: tuple(v.shape) for k, v in state.model_state.items()
                                  if k.startswith("model/")}, name)
    if force and (renamed or change is not None or other_weights or misfit):
        return _start_anew(checkpointer, "its classes" if renamed else "its --checkpoint file" if other_weights
                           else "its model" if misfit else f"its training images ({change})")
    if misfit:      # its model file edited since (a layer widened): the epochs so far do not load into it
        edited = state.extra.get("model_file_sha256") not in (None, digest)
        raise PrunekitError((f"the model file changed since the run in {checkpointer.folder.path} started, and the "
                             f"model it builds no longer fits the run's checkpoint {name} ({misfit}): put the model "
                             "file back as it was to carry the run on" if edited else
                             f"the model does not fit the run's checkpoint {name} in {checkpointer.folder.path} "
                             f"({misfit}): build it as the run began to carry the run on") +
                            ", or --force to train anew with it")
    if other_weights:
        raise PrunekitError(f"the --checkpoint file the run in {checkpointer.folder.path} started from has changed "
                            "since (its SHA-256 differs): put the original back to carry the run on, or --force to "
                            "train anew from this one")
    if renamed:
        shown = lambda names: ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")     # noqa: E731
        raise PrunekitError(f"the classes of the training data changed since the run in {checkpointer.folder.path} "
                            f"started ({shown(started)}; now {shown(classes)}): its epochs so far learned the labels "
                            "of the first, so carrying it on would shift them; restore the class folders, or "
                            "--force to train anew on these")
    if change is not None:
        where = f" in {fingerprint.get('folder') or data_dir}"
        back = "the files back as they were" if "data" in fingerprint else "the folder back as it was"
        raise PrunekitError(f"the training images{where} changed since the run in {checkpointer.folder.path} started "
                            f"({change}): its epochs left would train on other images than its first; put {back} "
                            "to carry the run on, or --force to train anew on these")
    if started is None and classes and folder_labels:                # an older run's: which labels its epochs learned is unknown
        line = (f"the epoch checkpoint in {checkpointer.folder.path} was written by an older prunekit that recorded "
                f"no class names: carried on without checking that the class folders ({', '.join(classes[:6])}"
                f"{', ...' if len(classes) > 6 else ''}) are the ones its epochs learned (a renamed, added or removed "
                "class folder shifts the labels) or that their images are; run it anew with --force if they changed")
        checkpointer.folder.log(line)
        warn_ours(PrunekitWarning(line))        # every rank: errors.warn shows it on rank 0 alone
    elif recorded is None and fingerprint is not None:      # class names recorded, images not (an older prunekit's)
        line = (f"the epoch checkpoint in {checkpointer.folder.path} was written by an older prunekit that recorded "
                "no fingerprint of its training images: carried on without checking that they are the ones its "
                "epochs so far trained on (an image added, removed or replaced changes what the rest train on); "
                "run it anew with --force if they changed")
        checkpointer.folder.log(line)
        warn_ours(PrunekitWarning(line))        # every rank: errors.warn shows it on rank 0 alone
    if state.extra.get("model_file_sha256") not in (None, digest):
        warn_ours(PrunekitWarning("the model file changed since this training started: the epochs left use "
                                      "the new code"))
    model.load_state_dict({k[len("model/"):]: v for k, v in state.model_state.items() if k.startswith("model/")})
    load_optimizer(optimizer, schedule, state.model_state, state.extra["optimizer"])
    restore_rng(state.rng)
    loader.epoch = state.extra["loader_epoch"]
    return list(state.history)


def _start_anew(checkpointer: RunCheckpointer, what: str) -> list[dict]:
    """--force over a run whose data changed since it started: its epoch checkpoints are removed
    (by the process that writes the folder) and the run starts from epoch 1; said in run.log."""
    checkpointer.folder.log(f"{what} changed since this run started: --force starts it anew (its epochs so far "
                            "are removed)")
    if checkpointer.folder.writable and checkpointer.folder.checkpoints.is_dir():
        _remove_own_files(checkpointer.folder.checkpoints)
    checkpointer.restored_seconds = 0.0
    return []


def save_epoch(checkpointer: RunCheckpointer, model, optimizer, schedule, loader, history: list[dict],
               digest: str | None = None, fingerprint: dict | None = None, zeros: str = "train",
               weights: str | None = None) -> None:
    """One checkpoint after the epoch just done; the one before it is removed (a long run keeps
    one model's worth of checkpoint, written atomically before the old one goes)."""
    tensors, optimizer_state = optimizer_tensors(optimizer, schedule)
    tensors.update({f"model/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()})
    epoch = len(history)
    checkpointer.save(StageState(epoch, tensors, history, capture_rng(),
                                 {"optimizer": optimizer_state, "loader_epoch": loader.epoch,
                                  "model_file_sha256": digest,
                                  # the --checkpoint file it started from: a resume from another is refused
                                  **({"checkpoint_sha256": weights} if weights is not None else {}),
                                  "zeros": zeros,     # --zeros as resolved: a resume doing otherwise is refused
                                  # the labels these epochs learned: a resume over renamed class folders is refused
                                  "class_names": list(getattr(loader.dataset, "classes", None) or []),
                                  # the images they trained on (an image folder's): a resume over others is refused
                                  **({"data_fingerprint": fingerprint} if fingerprint is not None else {})}), model)
    if checkpointer.folder.writable and epoch > 1:
        checkpointer.path(epoch - 1).unlink(missing_ok=True)


def check_train_args(args) -> None:
    """Refuse training settings that would silently do nothing or fail deep in the optimizer."""
    if args.epochs < 1:
        raise PrunekitError(f"--epochs must be at least 1, got {args.epochs}: 0 epochs would save an "
                            "untrained model")
    if not 0 < args.lr < math.inf:
        raise PrunekitError(f"--lr must be a positive learning rate (e.g. 0.1), got {args.lr}")
    if problem := float32_problem(args.lr, positive=True):
        raise PrunekitError(f"--lr must be {problem}: give a learning rate like 0.1")
    if not 0 <= args.weight_decay < math.inf:
        raise PrunekitError(f"--weight-decay must be 0 or more (e.g. 5e-4), got {args.weight_decay}")
    if problem := float32_problem(args.weight_decay):
        raise PrunekitError(f"--weight-decay must be {problem}: give a decay like 5e-4")
    if args.batch_size < 1:
        raise PrunekitError(f"--batch-size must be at least 1, got {args.batch_size}")
    ranks = distributed.current().size
    if args.batch_size < ranks:
        # every batch is whole (drop_last) and split over the ranks: the ranks past the batch size
        # would have no sample of any batch, waiting on the others at every step (the result is one
        # process's, only slower); a short batch in a Python loader's pass is trained on (train_epoch)
        idle = ranks - args.batch_size
        raise PrunekitError(f"--batch-size {args.batch_size} is below the {ranks} ranks torchrun started: each batch "
                            f"is split over the ranks, so {idle} {'rank' if idle == 1 else 'ranks'} would have no "
                            f"sample of any batch; use --batch-size {ranks} or more, or start at most "
                            f"{args.batch_size} {'rank' if args.batch_size == 1 else 'ranks'}")
    if args.train_samples is not None and args.train_samples < 1:
        raise PrunekitError("--train-samples must be at least 1 (leave it out to train on every training image)")
    if not 0 <= args.seed < 2**63:                     # torch.manual_seed's range
        raise PrunekitError(f"--seed must be a whole number from 0 to 2**63 - 1, got {args.seed}")


def check_before_the_data(args) -> None:
    """The refusals that need no image header, made before the data is read (an image folder's scan
    reads every image's header: minutes on a huge one): a --checkpoint path that is no file, or a file
    that does not load as a checkpoint (read now and kept for the model: ``zoo.checkpoints.read_ahead``;
    one whose weights do not fit the model is refused once it is built), a --model file spec without
    a function name or whose file does not exist, its --normalize that is not MEANS/STDS (the channel
    count is checked against the images later), an unknown zoo model or --normalize given for one,
    and a --batch-size above the image folder's training images (counted from its file listing:
    ``imagefolder.count_images``, no file opened). The model is built once the data says its classes
    and image shape."""
    if args.checkpoint:
        check_checkpoint_path(args.checkpoint)
    if args.model is not None and user_models.is_model_file(args.model):
        user_models.check_file(args.model)
        if args.normalize is not None and args.normalize.strip().lower() != "none":
            parse_normalization(args.normalize, None)
    elif args.model is not None:
        check_zoo_model(args.model, args.normalize)
    if args.checkpoint:
        read_ahead(args.checkpoint)
    if args.data == "imagefolder" and args.data_dir:
        found = count_images(args.data_dir, "train", recorded_classes(args.checkpoint), at_most=args.batch_size)
        images = found if found is None or args.train_samples is None else min(found, args.train_samples)
        if images is not None and args.batch_size > images:     # as the loader finds it (whole batches only)
            raise batch_size_refusal(args, images)


def check_model_before_the_data(args) -> dict | None:
    """The model's refusals that need no image header, made before an image folder's scan (every
    image's header: minutes on a huge folder) once the run is known unfinished (a finished run gives
    its result back without building the model): a model file that does not import or defines no
    such function (imported now, once for the call: ``user_models.importing_once``; the function is
    called once the data says the input shape), and a zoo model's --checkpoint that does not fit it
    (``loading.check_checkpoint_fits``: built on the meta device with the class count of the folder's
    listing and its images' channels, known from the first image headers where one is in colour; with
    only grayscale ones there, refused where neither 1 nor 3 channels fit, alike, and where 1 does not
    fit, from the headers read on until one is in colour: an all-grayscale folder is refused before
    either split's scan, not after). Each in the words ``load_model`` uses after the scan.

    Returns torch's RNG states just after a model file's import (``stages.capture_rng``: the CPU
    generator's and, where the import used CUDA, each GPU's, as ``restore_rng`` takes them), made under
    ``torch.manual_seed(args.seed)`` as the build's import always was (a file drawing at import time,
    ``PROJ = torch.randn(...)``, draws the same in every run, rank and resume): the build sets it
    back rather than seeding again, so its draws are those that follow the import's, whatever the
    data's reading drew in between. None for a zoo model (the build seeds as before)."""
    if args.model is None:
        return None
    if user_models.is_model_file(args.model):
        torch.manual_seed(args.seed)
        user_models.check_function(args.model)
        return capture_rng()
    if not args.checkpoint or args.data != "imagefolder" or not args.data_dir:
        return None     # (other data sets are read in moments: load_model refuses after them)
    found = peek_classes_and_channels(args.data_dir, "train", recorded_classes(args.checkpoint),
                                      limit=args.train_samples, seed=args.seed)
    if found is None:
        return          # the scan refuses the folder, in its own words
    classes, channels = found
    refusals = {}
    for tried in [channels] if channels is not None else [1, 3]:
        try:
            check_checkpoint_fits(args.model, args.checkpoint, num_classes=classes, in_channels=tried)
        except PrunekitError as refusal:
            refusals[tried] = refusal
        else:
            if tried != 3 or channels is not None:
                return      # it fits (with 1 channel: the scan says whether a colour image makes it 3)
    if len(refusals) == 1 and channels is not None or len({str(r) for r in refusals.values()}) == 1 < len(refusals):
        raise next(iter(refusals.values()))     # the same line whatever the images' channels
    # grayscale images alone so far, and 1 channel does not fit: the headers read on (until one is in
    # colour) say the channels, so an all-grayscale folder is refused here, not after both splits' scans
    found = peek_classes_and_channels(args.data_dir, "train", recorded_classes(args.checkpoint),
                                      limit=args.train_samples, seed=args.seed, headers=None)
    if found is not None and found[1] in refusals:
        raise refusals[found[1]]


def batch_size_refusal(args, images: int) -> PrunekitError:
    """The refusal of a --batch-size above the ``images`` training images (whole batches only: no
    step would be taken)."""
    return PrunekitError(f"--batch-size {args.batch_size} is more than the {images:,} {args.data} training images: "
                         "lower --batch-size")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a zoo model (or your own: --model net.py:FUNCTION) on a data set")
    add_model_args(p)
    add_data_args(p, batch_size=128, batch_help="training batch size (evaluation uses 512)")
    add_device_arg(p)
    p.add_argument("--epochs", type=int, default=10, help="passes over the training split (>= 1; default 10)")
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate, cosine schedule (> 0; default 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (default 5e-4)")
    p.add_argument("--train-samples", type=int, default=None,
                   help="train on this many training images (>= 1), a random subset drawn with --seed (default: all)")
    p.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR-style)")
    p.add_argument("--out", help="run folder for the trained model (safetensors + JSON), with a checkpoint "
                   "after every epoch: the same command again carries on after a kill")
    p.add_argument("--zeros", choices=("keep", "train"), default=None,
                   help="exact zero weights of --checkpoint: keep (held at zero: the trained model stays as sparse) "
                   "or train (every weight trains: dense again; a model with channels removed keeps its smaller "
                   "layout). Default: keep for a prunekit-pruned checkpoint and for a --checkpoint file with a "
                   "layer at least half zeros (pruned by another tool), train otherwise (a model built without "
                   "--checkpoint trains its initial zeros); a line on stderr says so")
    p.add_argument("--force", action="store_true", help="--out holds another training run (or this one, "
                   "finished): clear that run's files first")
    p.set_defaults(func=cmd_train)
