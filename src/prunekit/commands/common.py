"""What the commands share: the model and data options, loading them, printing the result."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import torch

from .. import distributed, run_fit, run_lock, user_models, zoo
from ..data import DATASET_NAMES, make_loader
from ..data.dataset import pending_bytes
from ..data.loaders import leaves_one_over, samples_per_pass
from .. import report
from ..errors import PrunekitError, PrunekitWarning
from ..run_folder import read_config
from ..saving import read_meta
from ..run_digests import file_sha256
from ..zoo.checkpoints import check_checkpoint_path, export_refusal, read_state_dict
from ..api_checks import first_batch
from ..loading import (LoadedModel, check_fits, check_normalized, load_data, load_model, model_outputs,
                       python_saved_refusal, recorded_classes)
from ..errors import warn as warn_ours


MODEL_HELP = (f"zoo model ({', '.join(zoo.MODEL_NAMES)}) or your own: net.py:FUNCTION, a function of that "
              "file that returns the nn.Module (called with no arguments)")


@contextlib.contextmanager
def stop_recorded(out: str | None, main: bool):
    """Around a command's work in run folder ``out`` while it holds the folder's lock: a Ctrl-C,
    SIGTERM, a lost torchrun rank or launcher (``cli.stop_line``) that stops it is written to the
    folder's run.log, and a running run marked interrupted, before the lock is let go (by ``main``,
    the rank that writes); the command line then writes it no more (``prunekit_stop_written``).
    Used by ``prune --out`` and ``train --out``."""
    try:
        yield
    except (KeyboardInterrupt, RuntimeError) as err:
        from ..cli import _ending_on_our_own
        from ..distributed import launched_by_torchrun
        from ..distributed.lost import is_lost_rank
        if isinstance(err, RuntimeError) and launched_by_torchrun() and is_lost_rank(err):
            _ending_on_our_own()      # torchrun's SIGTERM, if it comes now, does not cut the stop's record short
        if out and main:
            from ..cli import stop_line
            from ..runs import RunFolder, mark_stopped
            line = stop_line(err)
            if line is not None:
                try:
                    mark_stopped(RunFolder(out), line)
                except OSError:        # a full disk: the stop itself is what the user is told
                    pass
                err.prunekit_stop_written = True
        raise


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=MODEL_HELP + "; may be left out with a prunekit checkpoint of a zoo model; "
                   "a run folder names its model and model.safetensors")
    p.add_argument("--checkpoint", help="weights to load (.pth/.th/.ckpt/.pth.tar or a prunekit .safetensors)")
    p.add_argument("--normalize", metavar="MEANS/STDS", help="for a model file: the per-channel input "
                   "normalization it was trained with, pixels in [0, 1] (e.g. 0.5,0.5,0.5/0.25,0.25,0.25), "
                   "or none; a prunekit-saved checkpoint remembers it")


def torch_device(text: str) -> str:
    """An argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: this torch ({torch.__version__}) sees no CUDA device; "
                                             "leave out --device to run on the CPU")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {count} CUDA device(s), cuda:0 to "
                                             f"cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no Apple GPU (MPS) here; leave out --device to run on the CPU")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: prunekit runs on cpu, cuda or mps devices")
    return text


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=torch_device, help="run on this torch device, e.g. cuda or cuda:1 (default: cpu)")


def add_data_args(p: argparse.ArgumentParser, required: bool = True, *, seed: bool = True,
                  batch_size: int = 256, batch_help: str = "evaluation batch size") -> None:
    p.add_argument("--data", required=required, choices=DATASET_NAMES, help="data set")
    p.add_argument("--data-dir", required=required, help="folder with the data files (IDX, CIFAR batches or .npz; imagefolder: one subfolder "
                   "of images per class)")
    p.add_argument("--resize", type=int, metavar="PIXELS", help="imagefolder: scale every image so that its "
                   "shorter side has PIXELS (e.g. 256)")
    p.add_argument("--crop", type=int, metavar="PIXELS", help="imagefolder: keep the central PIXELS x PIXELS "
                   "(e.g. 224, after --resize 256)")
    p.add_argument("--eval-split", default="test", choices=("test", "train"),
                   help="split the accuracy is measured on (default test)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"{batch_help} (>= 1; default {batch_size})")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed for every random choice, 0 to 2**63-1 (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def resolve_model(args, saved_file=None) -> None:
    """``--checkpoint`` a run folder: its model.safetensors. ``--model`` left out: the zoo model a
    prunekit checkpoint (``saved_file``, default ``--checkpoint``) was saved from, else a refusal."""
    checkpoint = getattr(args, "checkpoint", None)
    if names_run_folder(args.model):
        saved = Path(args.model) / "model.safetensors"
        if checkpoint and Path(checkpoint).resolve() not in (saved.resolve(), Path(args.model).resolve()):
            raise PrunekitError(f"{args.model} is a run folder and --checkpoint {checkpoint} another model file: "
                                "give one of them")
        args.checkpoint, args.model = str(saved), None
        checkpoint = args.checkpoint
    if checkpoint and Path(checkpoint).is_dir() and (Path(checkpoint) / "model.safetensors").is_file():
        args.checkpoint = str(Path(checkpoint) / "model.safetensors")
    elif checkpoint and Path(checkpoint).is_dir():
        refuse_unfinished(checkpoint)        # a run folder whose run has not finished: how to finish it
    if args.model is not None:
        command = getattr(args, "command", None)
        exported = export_refusal(args.model, f"not a model `prunekit {command}` reads" if command
                                  else "not a model prunekit reads")
        if exported and args.model not in zoo.MODEL_NAMES and not user_models.is_model_file(args.model):
            raise PrunekitError(exported)
        return
    saved_file = saved_file or args.checkpoint
    if saved_file:
        check_checkpoint_path(saved_file)
    meta = read_meta(saved_file) if saved_file else {}
    saved = meta.get("model")
    if saved in zoo.MODEL_NAMES:
        args.model = saved
    elif saved is not None and meta.get("custom"):
        raise PrunekitError(python_saved_refusal(saved_file, meta))
    elif saved is not None and user_models.is_model_file(saved):
        path, function = user_models.parse(saved)
        raise PrunekitError(f"{saved_file} holds a model built by {saved}: name its file again, "
                            f"--model path/to/{path.name}:{function}")
    else:
        raise PrunekitError("say which model: --model NAME (a zoo model) or --model net.py:FUNCTION (yours)"
                            + (f"; {saved_file} does not record it" if saved_file else ""))


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` (a file, or a run folder standing for its model) is ``folder`` or lies inside it."""
    return Path(folder).resolve() in Path(path).resolve().parents or Path(path).resolve() == Path(folder).resolve()


def _run_writes(path: str, folder: str | Path) -> bool:
    """Whether a run in run folder ``folder`` may write (or ``--force`` remove) ``path``: it is,
    or lies inside, one of the run's own files or subfolders there (``runs.RUN_FILES``, taper's
    ``snapshot-*``). Anything else in ``folder`` (a subfolder of the user's, another run's
    folder) is never written or cleared by the run."""
    from ..runs import RUN_FILES
    folder = Path(folder).resolve()
    resolved = Path(path).resolve()
    if folder not in resolved.parents:
        return resolved == folder
    name = resolved.relative_to(folder).parts[0]
    return name in RUN_FILES or name.startswith("snapshot-")


def check_out_not_input(args, run_folders: list[str] | None = None, report_files: tuple[str, ...] = ()) -> None:
    """Refuse an ``--out`` where the command would write over (or ``--force`` clear) the model it
    reads (after ``resolve_model``: ``--model DIR`` and ``--checkpoint DIR`` name
    DIR/model.safetensors): the input lies at one of the run's own paths in its folder
    (``_run_writes``), and its config.toml would then name its own output as the model it started
    from. An input elsewhere inside ``--out`` (``sweep --out .`` reading ``./r5``) is left alone.
    ``run_folders``: a sweep's run folders (default: ``--out`` itself); ``report_files``: the
    files (or subfolders) of ``--out`` the command writes besides (a sweep's report)."""
    out, checkpoint = getattr(args, "out", None), getattr(args, "checkpoint", None)
    if not (out and checkpoint):
        return
    report = any(_inside(checkpoint, Path(out) / name) for name in report_files)
    if report or any(_run_writes(checkpoint, folder) for folder in (run_folders or [out])):
        raise PrunekitError(f"--out {out} holds the model this command reads ({checkpoint}), which the run would "
                            "write over; pick another --out (or copy the model out of that folder first)")


def names_run_folder(model) -> bool:
    """``info runs/x`` as well as ``info --checkpoint runs/x``: a folder holding model.safetensors
    (a zoo name or a model file is never read as a folder)."""
    if model is None or model in zoo.MODEL_NAMES or user_models.is_model_file(model) or not Path(model).is_dir():
        return False
    if not (Path(model) / "model.safetensors").is_file():
        raise PrunekitError(f"{model} is a folder without a model.safetensors: name a run folder whose run "
                            "finished, or a model (--model NAME or net.py:FUNCTION)")
    return True


def loaded_model(args) -> LoadedModel:
    resolve_model(args)
    input_shape = None
    if user_models.is_model_file(args.model) and getattr(args, "data", None) and args.data_dir:
        input_shape = tuple(evaluation_split(args.data, args.data_dir, args.eval_split, args.resize,
                                             args.crop, recorded_classes(args.checkpoint)).image_shape)
    seed = getattr(args, "seed", 0)
    with torch.random.fork_rng(devices=[]):     # weights a checkpoint does not give are drawn from --seed
        if 0 <= seed < 2**63:                   # (one out of torch's range is refused with the request)
            torch.manual_seed(seed)
        try:
            loaded = load_model(args.model, args.checkpoint, dataset=getattr(args, "data", None),
                                input_shape=input_shape, normalization=getattr(args, "normalize", None))
        except PrunekitError as err:
            raise edited_model_file(args, err) from None
    if getattr(args, "data", None):
        check_image_transform(loaded, args)
    if getattr(args, "device", None):           # every tensor follows the model (solvers included)
        loaded.model.to(args.device)
    return loaded


def edited_model_file(args, err: PrunekitError) -> PrunekitError:
    """``err``, the refusal of ``--checkpoint`` for the model ``--model net.py:FUNCTION`` builds, as
    the edit it is where the unfinished run in ``--out`` began from that same checkpoint with another
    version of the file (a layer widened since): the checkpoint loaded then, so the file is named,
    not the checkpoint (whose own refusal advises a channel layout). ``err`` itself otherwise (a
    file that does not build, a checkpoint changed too: the run refuses that as such)."""
    out, checkpoint, model = getattr(args, "out", None), getattr(args, "checkpoint", None), args.model
    if not (out and checkpoint and model and user_models.is_model_file(model) and Path(checkpoint).is_file()):
        return err
    began = run_fit.started_with(Path(out))
    if began.get("model_file_sha256") in (None, user_models.file_digest(model)):
        return err
    if began.get("checkpoint_sha256") not in (None, file_sha256(checkpoint)):
        return err
    try:
        with torch.device("meta"):          # names and shapes only
            built = user_models.build_model(model)
        state = read_state_dict(checkpoint)
    except PrunekitError:
        return err
    misfit = run_fit.shape_misfit(built, {k: tuple(v.shape) for k, v in state.items()}, Path(checkpoint).name)
    if misfit is None:
        return err
    return PrunekitError(f"the model file changed since the run in {out} started ({model}), and the checkpoint it "
                         f"started from, {checkpoint}, no longer fits the model it builds ({misfit}): put the model "
                         "file back as it was to carry the run on (a run of the edited code needs a checkpoint "
                         "that fits it)")


def warn_if_random_weights(args) -> None:
    """Say so when a zoo model runs without --checkpoint (after the input checks: no noise on top
    of a refusal). A model file is left alone: its function may load weights itself."""
    if args.checkpoint is None and not user_models.is_model_file(args.model):
        warn_ours(PrunekitWarning(f"no --checkpoint: {args.model} has random weights, so its accuracy means "
                                      "nothing (fine for measuring cost and speed); pass --checkpoint FILE for a "
                                      "trained one"))


def image_transform(args) -> dict | None:
    """The --resize / --crop an image folder goes through (None: neither)."""
    given = {k: getattr(args, k, None) for k in ("resize", "crop") if getattr(args, k, None) is not None}
    return given or None


def check_image_transform(loaded: LoadedModel, args) -> None:
    """A model saved after training or pruning on resized / cropped images sees its images so
    again: other flags would change every input without any error. The current ones are recorded."""
    given = image_transform(args)
    if loaded.image_transform is not None and given != loaded.image_transform:
        saved = " ".join(f"--{k} {v}" for k, v in loaded.image_transform.items())
        raise PrunekitError(f"{args.checkpoint} was saved from images brought to one size by {saved}: "
                            f"pass {saved} again")
    loaded.image_transform = given


@lru_cache(maxsize=1)
def evaluation_split(name: str, data_dir: str, split: str, resize: int | None, crop: int | None,
                     classes: tuple[str, ...] | None = None):
    """The evaluation images, read once (a model file's input shape is theirs); ``classes``: the
    class names the model records, which label an image folder. An image folder is scanned only,
    its pixels decoded on first use (``DeferredImageDataset``): after the memory plan."""
    return load_data(name, data_dir, split, resize=resize, crop=crop, classes=classes, defer=True)


def model_classes(loaded: LoadedModel) -> tuple[str, ...] | None:
    """The class names ``loaded`` records (its sidecar's ``class_names``), to label image folders by."""
    return tuple(loaded.class_names) if loaded.class_names is not None else None


def note_classes(args, loaded: LoadedModel, ds) -> None:
    """A model that meets an image folder keeps its class names (in label order), so that the
    model saved from it labels any later folder (one lacking a class, say) the same way."""
    if args.data == "imagefolder" and loaded.class_names is None:
        outputs = model_outputs(loaded.model)
        if outputs is not None and len(ds.classes) < outputs:
            # without the model's own names a missing class shifts the labels of every class after it
            warn_ours(PrunekitWarning(
                f"{args.data_dir} has {len(ds.classes)} class folders but the model has {outputs} outputs and "
                f"records no class names (a zoo checkpoint, or saved by an older prunekit): its images "
                f"are labelled 0-{len(ds.classes) - 1} by their sorted folder names, right only if the missing "
                f"classes sort after them; add an (empty) folder for each missing class"))
            return           # names of some of its outputs only: not recorded
        if outputs is not None and len(ds.classes) > outputs:
            # more names than outputs would label a later folder by a class the model cannot give
            warn_ours(PrunekitWarning(
                f"{args.data_dir} has {len(ds.classes)} class folders ({', '.join(list(ds.classes)[:outputs + 2])}"
                f"{', ...' if len(ds.classes) > outputs + 2 else ''}) but the model has {outputs} outputs: its class "
                "names are not recorded; remove the folders that are no class of the model"))
            return
        loaded.class_names = list(ds.classes)


def note_label_order(args, loaded: LoadedModel, ds) -> None:
    """One warning when a model records class names and the data's labels cannot be matched to them:
    bare integer labels (a Keras-style ``.npz``: their order cannot be checked) or names of another
    order. An image folder is labelled by the model's own names and needs none."""
    names = loaded.class_names
    if names is None or args.data == "imagefolder":
        return
    where = getattr(ds, "source", None) or "the data"
    shown = ", ".join(f"{k}={name}" for k, name in enumerate(list(names)[:10])) + (", ..." if len(names) > 10 else "")
    if not getattr(ds, "named_labels", True):
        warn_ours(PrunekitWarning(
            f"the model records its class names ({shown}) but {where} has bare integer labels, whose order cannot "
            "be checked: the accuracy is right only if each label means the class named here; relabel the data in "
            "this order, or evaluate on an image folder (labelled by the model's names)"))
    elif list(ds.classes[:len(names)]) != list(names):
        warn_ours(PrunekitWarning(
            f"the model records its class names ({shown}) but {where} names its labels "
            f"{', '.join(f'{k}={name}' for k, name in enumerate(list(ds.classes)[:10]))}: the accuracy counts "
            "label k as the model's class k; relabel the data in the model's order"))


def eval_data(args, loaded: LoadedModel):
    ds = evaluation_split(args.data, args.data_dir, args.eval_split, args.resize, args.crop, model_classes(loaded))
    note_classes(args, loaded, ds)
    note_label_order(args, loaded, ds)
    check_fits(loaded, ds, f"{args.data} {args.eval_split}")
    check_normalized(loaded)
    return make_loader(ds, loaded.normalization, batch_size=args.batch_size)


def training_batches(args, loaded: LoadedModel, evaluation=None):
    """A function giving training batches, loading the training split on first use only.

    ``evaluation``: the evaluation loader (``eval_data``); where the training split is the same
    images (an image folder without train/ and test/, or ``--eval-split train``), its data set is
    shared: scanned and decoded once (``--train-samples`` below its count: those rows, copied).

    With ``--train-samples`` the split is read now: a count above its number of images takes them
    all (``load_data`` warns once) and ``args.train_samples`` becomes the count used, so the run's
    config.toml records what ran (and the same command again, capped the same, resumes it)."""

    check_normalized(loaded)

    @lru_cache(maxsize=1)
    def dataset():
        ds = load_data(args.data, args.data_dir, "train", limit=args.train_samples, seed=args.seed,
                       resize=args.resize, crop=args.crop, classes=model_classes(loaded), defer=True,
                       same_as=getattr(evaluation, "dataset", evaluation))
        check_fits(loaded, ds, f"{args.data} train")
        return ds

    if args.train_samples is not None:
        args.train_samples = min(args.train_samples, len(dataset()))

    # CIFAR models are trained on randomly cropped and flipped images, so their BatchNorm
    # statistics are those of augmented data: recalibrating on plain images costs ResNet-20-B
    # 3 points dense (90.86% -> 87.81%), on augmented ones it keeps 91.15%.
    augment = args.data == "cifar10" and not args.no_train_augment
    # a model of the user's own may not have been trained so (synthetic images, other crops): said
    # once, when the batches are first used (not before a refusal, which is one line)
    note_due = augment and user_models.is_model_file(loaded.name) and distributed.is_main_process()

    def make():
        return make_loader(dataset(), loaded.normalization, batch_size=128, shuffle=True,
                           augment=augment, seed=args.seed, drop_last=leaves_one_over(len(dataset()), 128))

    def batches():
        nonlocal note_due
        if note_due:
            note_due = False
            print("prunekit: note: the training images for gradients and BatchNorm are randomly cropped and "
                  "flipped, as CIFAR-10 models are trained; --no-train-augment gives plain images", file=sys.stderr)
        return make()
    batches.samples_per_pass = lambda: samples_per_pass(make())     # read without the note
    batches.first_batch_size = lambda: int(first_batch(make, "data")[1].shape[0])
    batches.split = dataset         # the split, scanned (an image folder is decoded on first use)
    return batches


def bytes_to_load(eval_loader, train_batches) -> int:
    """Bytes of image-folder pixels a run of these loaders will decode and hold that are not
    decoded yet (each split is scanned first and decoded on first use): the evaluation split and the
    training split (``train_batches``: a ``training_batches`` function, or None where the run does
    not read the training split: it is then neither loaded nor counted). The memory plan is
    made before they are decoded and counts them as held, so a request too large is refused in seconds."""
    return pending_bytes(eval_loader, *([train_batches.split()] if train_batches is not None else []))


def show_progress(args) -> bool:
    """Progress bars on stderr: not with --json, and not into a file or pipe (a log of a long run
    would otherwise fill with bar redraws; the stage lines still go there) unless the environment
    says PRUNEKIT_PROGRESS=1 (0: never)."""
    forced = os.environ.get("PRUNEKIT_PROGRESS")
    if forced is not None and forced.strip():
        word = forced.strip().lower()
        if word not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
            raise PrunekitError(f"PRUNEKIT_PROGRESS={forced} is not a switch: set 1 (or true, yes, on) to draw "
                                "progress bars, 0 (or false, no, off) never to, or unset it")
        return word in ("1", "true", "yes", "on") and not args.json
    return not args.json and sys.stderr.isatty()


def describe(loaded: LoadedModel) -> dict:
    """How to rebuild the model: what its saved sidecar holds besides the result (for a model
    file, the SHA-256 of the code it was built with, to tell later whether it changed)."""
    described = {"model": loaded.name, "build_kwargs": loaded.build_kwargs, "input_shape": list(loaded.input_shape),
                 "normalization": {"mean": list(loaded.normalization.mean), "std": list(loaded.normalization.std)}}
    if user_models.is_model_file(loaded.name):
        described["model_file_sha256"] = user_models.file_digest(loaded.name)
    if loaded.image_transform is not None:
        described["image_transform"] = loaded.image_transform
    if loaded.class_names is not None:
        described["class_names"] = list(loaded.class_names)
    return described


def refuse_unfinished(folder) -> None:
    """Refuse a run folder whose run has not finished (no model.safetensors yet), saying how to finish it."""
    folder = Path(folder)
    if not (folder / "config.toml").is_file():
        return
    refuse_running(folder)
    try:
        method = "method" in tomllib.loads(read_config(folder / "config.toml"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
        method = False
    from ..cli import _is_python_config
    if _is_python_config(folder / "config.toml"):        # `prune --resume` refuses these: name what carries it on
        raise PrunekitError(f"{folder} holds a run started from Python that has not finished (no model.safetensors "
                            f"yet): carry it on first (call prunekit.prune again with the same arguments and "
                            f"out={str(folder)!r}), then use it")
    if method or (folder / "metrics.json").is_file():      # only prune runs have a method and write metrics
        raise PrunekitError(f"{folder} holds a prune run that has not finished (no model.safetensors yet): resume it "
                            f"with `prunekit prune --resume {folder}`, then use it")
    raise PrunekitError(f"{folder} holds a training run that has not finished (no model.safetensors yet): run its "
                        "`prunekit train` command again to carry it on, then use it")


def refuse_running(folder: Path) -> None:
    """Refuse a run folder a live prunekit process holds (its run is still at work), naming its pid:
    a resume would be refused by the folder's lock, so waiting is the advice."""
    if run_lock.in_use(folder):
        pid = run_lock.holder_pid(folder)
        raise PrunekitError(f"{folder} holds a run that is still at work (prunekit process"
                            f"{f' {pid}' if pid else ''} holds it): wait for it to finish, then use it")


def model_file(path) -> Path:
    """A run folder's model.safetensors, or the path itself."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def emit(args, payload: dict, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(payload))
    else:
        print("\n".join(lines))


_NOTES_SAID: set[str] = set()     # the notes this command printed already (cleared as each command starts)


def forget_notes() -> None:
    """A new command (``cli.main``) prints its notes again."""
    _NOTES_SAID.clear()


def note_once(text: str) -> None:
    """``prunekit: note: text`` on stderr, once per command: a sweep's runs and its report would
    otherwise each say the same (a note on missing matplotlib five times for four runs)."""
    if text not in _NOTES_SAID:
        _NOTES_SAID.add(text)
        print(f"prunekit: note: {text}", file=sys.stderr)


def write_report(write, quiet: bool) -> None:
    try:
        write()
    except report.MissingPlotting as err:      # the report is written, without its plots
        if not quiet:
            note_once(str(err))
