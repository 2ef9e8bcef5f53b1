"""Turn names and paths from the user (CLI, recipes) into a model, its normalization and data.

This is where the checks on user input live, so that every entry point gets the same clear
errors: unknown model, missing file, checkpoint of another architecture, data whose image
shape or class count does not fit the model.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import user_models, zoo
from .data import ImageDataset, Normalization, load_dataset
from .data.dataset import DeferredImageDataset
from .errors import PrunekitError, PrunekitWarning, worded_warning
from .saving import read_meta
from .zoo.checkpoints import check_checkpoint_path, unwrap_parallel
from .zoo.layout import apply_layout
from .errors import warn as warn_ours

# Input normalization of models trained from scratch, per data set (mean, std in [0,1] units);
# the mnist and cifar10 ones are the zoo's. Fashion-MNIST: its training set's pixel statistics.
DATASET_NORMALIZATION = {
    "mnist": Normalization(zoo.spec("mlpnet").mean, zoo.spec("mlpnet").std),
    "fashion-mnist": Normalization((0.2860,), (0.3530,)),
    "cifar10": Normalization(zoo.spec("vgg16-bn").mean, zoo.spec("vgg16-bn").std),
}


@dataclass
class LoadedModel:
    """A model ready to evaluate: the module, its zoo name and build arguments, and the
    normalization its inputs need."""

    model: nn.Module
    name: str
    build_kwargs: dict
    normalization: Normalization | None    # None: a model file whose normalization was not given
    input_shape: tuple[int, ...] | None    # one example's, (C, H, W) for images; None: a model file's, not known yet
    prune_exclude: list[str]
    image_transform: dict | None = None    # {"resize": R, "crop": C} a saved model's image folder went through
    input_dtype: str = "float32"           # a model saved from Python with integer inputs (token ids): "int64"
    class_names: list[str] | None = None   # its outputs' class names, in order, if trained / pruned on an image folder

    def example_input(self) -> torch.Tensor:
        """One example of zeros, (1, *input_shape), of the model's input dtype."""
        if self.input_shape is None:
            raise PrunekitError(f"the input shape of {self.name} is unknown: give --input-shape (C,H,W for images)")
        dtype = getattr(torch, self.input_dtype)
        device = next(self.model.parameters(), torch.empty(0)).device
        check_example_fits(self.input_shape, dtype, device)
        return torch.zeros(1, *self.input_shape, dtype=dtype, device=device)


def check_example_fits(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Refuse (one line) an example of ``shape`` (one example's, no batch) and ``dtype`` whose input
    alone (bytes: the product of ``shape`` times the dtype's size) is more than ``device`` has
    available (``process_memory.available_memory``): an --input-shape of 1,100000,100000 asked
    40 GB of the allocator, which failed with a traceback."""
    from .memory_plan import _human
    from .process_memory import available_memory
    need = math.prod(shape) * dtype.itemsize
    if need <= 2**30:                          # 1 GB or less: no input of a model one prunes is refused
        return
    available = available_memory(device)
    if need > available:
        given = ",".join(map(str, shape))
        raise PrunekitError(f"one example of input shape {given} needs about {_human(need)} for its input alone but "
                            f"about {_human(available)} is available: give the shape the model takes (--input-shape "
                            "C,H,W for images), or smaller images")


def load_model(name: str, checkpoint: str | Path | None = None, *, num_classes: int | None = None,
               in_channels: int | None = None, dataset: str | None = None,
               input_shape: tuple[int, int, int] | None = None,
               normalization: Normalization | str | None = None) -> LoadedModel:
    """Build zoo model ``name`` (or a model file ``net.py:function``) and load ``checkpoint`` into it.

    A prunekit-saved ``.safetensors`` file carries a JSON sidecar with its build arguments,
    input shape and normalization, which win over the arguments here. Reference checkpoints use
    the zoo's normalization for that model; a model built for a data set other than its
    reference one (e.g. ResNet-20 on Fashion-MNIST) uses that data set's normalization.

    A model file has no spec: its ``input_shape`` (C, H, W) comes from the sidecar or the
    argument (the data's image shape), its ``normalization`` from the sidecar or the argument
    (a :class:`Normalization`, or ``"none"`` for pixels in [0, 1]); without one it is None and
    the commands that feed it images refuse (``check_normalized``).
    """
    if not isinstance(name, str):
        raise PrunekitError(f"load_model(name, checkpoint): name must be a zoo model name (e.g. 'mlpnet') or a "
                            f"model file 'net.py:function', got {type(name).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise PrunekitError(f"load_model(name, checkpoint): checkpoint must be a file path or None, "
                            f"got {type(checkpoint).__name__}")
    if user_models.is_model_file(name):
        return _load_model_file(name, checkpoint, input_shape, normalization)
    spec = check_zoo_model(name, normalization)
    meta, build_kwargs = _zoo_build_args(name, checkpoint, num_classes, in_channels)
    model = zoo.build(name, **build_kwargs)
    # built with the sidecar's own build arguments: as pruned, whatever its layout records
    _load_weights(model, checkpoint, meta, built_as_saved="build_kwargs" in meta)
    channels = build_kwargs.get("in_channels", spec.input_shape[0])
    input_shape = (channels, *spec.input_shape[1:])
    if "normalization" in meta:
        norm = _saved_normalization(meta)
    elif dataset is not None and dataset != spec.dataset and dataset in DATASET_NORMALIZATION:
        norm = DATASET_NORMALIZATION[dataset]
    else:
        norm = Normalization(tuple(spec.mean), tuple(spec.std))
    if "input_shape" in meta:
        input_shape = tuple(meta["input_shape"])
    return LoadedModel(model.eval(), name, build_kwargs, norm, input_shape, list(spec.prune_exclude),
                       meta.get("image_transform"), class_names=meta.get("class_names"))


def _zoo_build_args(name: str, checkpoint, num_classes: int | None, in_channels: int | None) -> tuple[dict, dict]:
    """``checkpoint``'s sidecar (``read_meta``; {} without one) and the build arguments of zoo model
    ``name`` for it: the sidecar's own, else ``num_classes`` / ``in_channels`` as given; refusing a
    sidecar that names another model."""
    meta = read_meta(checkpoint) if checkpoint is not None else {}
    if meta.get("custom") and meta.get("model") == type(zoo.build(name)).__name__:
        meta = {k: v for k, v in meta.items() if k != "model"}     # a zoo model pruned from Python, named again
    if meta.get("model") not in (None, name):
        raise PrunekitError(python_saved_refusal(checkpoint, meta) if meta.get("custom") else
                            f"{checkpoint} holds a {meta['model']!r} model, not {name!r}: load it as --model {meta['model']}")
    build_kwargs = meta.get("build_kwargs") or {k: v for k, v in
                                                (("num_classes", num_classes), ("in_channels", in_channels))
                                                if v is not None}
    return meta, build_kwargs


def check_checkpoint_fits(name: str, checkpoint: str | Path, *, num_classes: int | None = None,
                          in_channels: int | None = None) -> None:
    """Refuse ``checkpoint`` for zoo model ``name`` as ``load_model(name, checkpoint, num_classes=,
    in_channels=)`` would (a sidecar naming another model; weights that do not fit the model built
    with the sidecar's build arguments, else ``num_classes`` classes and ``in_channels`` input
    channels: other shapes, missing or unexpected keys), in the same words, loading nothing: the
    model is built on the meta device (no memory, no draw from torch's random generator) and the
    checkpoint's state dict compared with it (``read_ahead``'s, kept for ``load_model``). ``prunekit
    train`` checks so before an image folder's scan. A sidecar recording a channel layout is left to
    ``load_model`` (the layout resizes the built layers before the weights load)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        meta, build_kwargs = _zoo_build_args(name, checkpoint, num_classes, in_channels)
        if "channel_layout" in meta:
            return
        model = zoo.build(name, **build_kwargs)
    zoo.checkpoints.check_fits_checkpoint(model, checkpoint)


def check_zoo_model(name: str, normalization=None):
    """The zoo's spec of model ``name``, refusing an unknown name (suggesting the closest) and a
    ``normalization`` (--normalize) given for it: a zoo model's is its checkpoint's. Builds nothing."""
    if normalization is not None:
        raise PrunekitError(f"--normalize is for a model file (net.py:function); zoo model {name!r} "
                            "uses the normalization its checkpoint was trained with")
    return zoo.spec(name)   # refuses an unknown name, suggesting the closest


def load_dense_of(name: str, pruned: LoadedModel, checkpoint: str | Path | None = None) -> LoadedModel:
    """The dense ``name`` model a pruned one came from (``checkpoint``'s weights, or fresh ones),
    taking ``pruned``'s input shape and dtype: a dense checkpoint (or none) may have no sidecar to
    say them, and a token-id model (int64 inputs) fails on the float32 default."""
    dense = load_model(name, checkpoint, input_shape=pruned.input_shape)
    dense.input_dtype = pruned.input_dtype
    return dense


def _input_dtype(meta: dict) -> str:
    """The input dtype a sidecar records (integer inputs only), refusing one torch does not have."""
    dtype = meta.get("input_dtype", "float32")
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise PrunekitError(f"the checkpoint's sidecar names input dtype {dtype!r}, which torch does not have: "
                            "save the model again")
    return dtype


def python_saved_refusal(path, meta: dict) -> str:
    """The line for a model saved from Python (``prunekit.prune(model, ..., out=)``), whose sidecar
    names its class only: the command line needs the file that builds it, or, for a class of the
    zoo, the zoo model's name (the one whose state-dict keys the file's are named first)."""
    own = "name the file and function that build it, --model path/to/file.py:FUNCTION"
    names = _zoo_names_of_class(meta["model"])
    if not names:
        return f"{path} holds a {meta['model']} model saved from Python: {own}"
    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    try:
        fits = zoo.checkpoints._zoo_name(zoo.read_state_dict(file))
    except PrunekitError:
        fits = None
    names = sorted(names, key=lambda n: n != fits)
    others = f" (or {', '.join(names[1:])}, the one it was built as)" if len(names) > 1 else ""
    return (f"{path} holds a {meta['model']} model saved from Python: if prunekit's zoo built it, name the zoo "
            f"model, --model {names[0]}{others}; if it is a class of your own, {own.replace('name the', 'the')}")


@functools.cache
def _zoo_names_of_class(class_name: str) -> tuple[str, ...]:
    """The zoo models whose class is named ``class_name`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return tuple(n for n in zoo.MODEL_NAMES if type(zoo.build(n)).__name__ == class_name)


def _load_model_file(name: str, checkpoint, input_shape, normalization) -> LoadedModel:
    meta = read_meta(checkpoint) if checkpoint is not None else {}
    saved = meta.get("model")
    if saved is not None and not meta.get("custom") and not (
            user_models.is_model_file(saved) and user_models.function_name(saved) == user_models.function_name(name)):
        raise PrunekitError(f"{checkpoint} holds a {saved!r} model, not {name!r}: load it as --model {saved}")
    model = user_models.build_model(name)
    if meta.get("custom") and type(model).__name__ != saved:     # saved from Python: its class name only
        raise PrunekitError(f"{checkpoint} holds a {saved} model saved from Python, but {name} builds a "
                            f"{type(model).__name__}: name the function that builds a {saved}")
    if meta.get("model_file_sha256") not in (None, user_models.file_digest(name)):
        warn_ours(PrunekitWarning(f"{user_models.parse(name)[0]} changed since {checkpoint} was saved: if "
                                      "the model's forward changed, so do its outputs"))
    _load_weights(model, checkpoint, meta)
    if "input_shape" in meta:
        input_shape = tuple(meta["input_shape"])
    if isinstance(normalization, str):
        normalization = parse_normalization(normalization, input_shape)
    if "normalization" in meta:
        saved_norm = _saved_normalization(meta)
        if normalization is not None and normalization != saved_norm:
            raise PrunekitError(f"--normalize differs from the normalization {checkpoint} was saved with "
                                f"({normalization_text(saved_norm)}): leave --normalize out")
        normalization = saved_norm
    return LoadedModel(model, name, {}, normalization, input_shape, [], meta.get("image_transform"),
                       _input_dtype(meta), meta.get("class_names"))


def load_pruned(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a model prunekit saved (a run folder, or its ``model.safetensors`` with the JSON
    sidecar) into ``model``, a fresh instance of the architecture it was pruned from: a channel
    method's layers are first resized to the saved channel counts (and removed blocks removed),
    then every weight is loaded (shapes must fit). ``model`` built otherwise than the one pruned
    (another class count, a wider stem: a layer's counts differ from those the layout records) is
    refused, naming the layer and both counts, never narrowed to fit. A file an older prunekit
    saved records no such counts (nor does one saved from a model loaded from it, unless with
    ``save_model(..., pruned_from=)``): it still loads, but ``model``'s build cannot be checked
    against it, and a layer built wider is narrowed to the saved counts; a ``PrunekitWarning`` says
    so. Returns ``model``, in eval mode; no code from the files is run.
    """
    if not isinstance(model, nn.Module):
        raise PrunekitError(f"load_pruned(model, path): model must be a fresh torch.nn.Module of the architecture "
                            f"it was pruned from, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise PrunekitError(f"load_pruned(model, path): path must be a run folder or its model.safetensors, "
                            f"got {type(path).__name__}")
    path = Path(path)
    path = path / "model.safetensors" if path.is_dir() else path
    if path.exists():
        check_checkpoint_path(path, "pass a run folder (out=...) or its model.safetensors")
    if not path.is_file():
        raise PrunekitError(f"no saved model at {path}: pass a run folder (out=...) or its model.safetensors")
    _load_weights(model, path, read_meta(path))
    return model.eval()


def _load_weights(model: nn.Module, checkpoint, meta: dict, built_as_saved: bool = False) -> None:
    """Resize ``model`` to ``meta``'s channel layout (if any), then load ``checkpoint`` into it.
    ``built_as_saved``: ``model`` was built from the sidecar's own build arguments (nothing to warn of)."""
    model = unwrap_parallel(model)      # an nn.DataParallel: its module, named as the file names it
    if "channel_layout" in meta:   # a structurally pruned (shrunk) model: resize its layers first
        if not built_as_saved:
            _warn_unchecked_layout(meta["channel_layout"], checkpoint)
        apply_layout(model, without_parallel_prefix(meta["channel_layout"], model))
    if checkpoint is not None:
        zoo.load_checkpoint(model, checkpoint)


def without_parallel_prefix(layout, model: nn.Module):
    """``layout`` with the ``module.`` prefix of every layer name removed where the file was saved from
    an ``nn.DataParallel`` by a prunekit that kept it (and ``model`` has the names without it); else as it is."""
    if not isinstance(layout, dict) or not layout or not all(str(k).startswith("module.") for k in layout):
        return layout
    names = dict(model.named_modules())
    if any(k in names for k in layout) or not all(k[len("module."):] in names for k in layout):
        return layout
    return {k[len("module."):]: v for k, v in layout.items()}


def _warn_unchecked_layout(layout, checkpoint) -> None:
    """One ``PrunekitWarning`` where channel layout ``layout`` records "dense" counts (those of the
    model it was pruned from) for none of its Conv/Linear/BatchNorm layers: an older prunekit's file,
    or one saved from a model loaded from it. There the model passed cannot be checked against the
    one the file was pruned from (another class count, a wider stem), and a layer built wider is
    narrowed to the saved counts (``zoo.layout.apply_layout``). A file of today's prunekit may lack
    them for some layers (one the user's code put into a pruned model has no size before the cut):
    those are checked only for being no narrower, by design, and not warned of."""
    if not isinstance(layout, dict):
        return          # apply_layout says the sidecar is damaged
    sized = [(name, spec) for name, spec in layout.items() if isinstance(spec, dict)
             and ("features" in spec or "in" in spec and "out" in spec)]
    unchecked = [name for name, spec in sized if "dense" not in spec]
    if not unchecked or len(unchecked) < len(sized):
        return
    more = f" and {len(unchecked) - 1} more" if len(unchecked) > 1 else ""
    said = (f"{checkpoint} was saved by an older prunekit (or from a model loaded from such a file): its channel "
            f"layout records no counts from before pruning for layer {unchecked[0]!r}{more}, so the model's build "
            "(class count, widths) cannot be checked against the one it was pruned from, and a layer built wider "
            "is narrowed to the saved counts")
    warn_ours(worded_warning(
        f"{said}: pass a model built as that one was (the same code and constructor arguments); "
        "save_model(model, path, meta, pruned_from=a fresh model built so) re-saves it with those counts",
        f"{said}: build the model as that one was (the same model code and class count)"))


def _saved_normalization(meta: dict) -> Normalization:
    return Normalization(tuple(meta["normalization"]["mean"]), tuple(meta["normalization"]["std"]))


def parse_normalization(text: str, input_shape: tuple[int, ...] | None) -> Normalization:
    """``"0.5,0.5,0.5/0.25,0.25,0.25"`` (means / stds, pixels in [0, 1]), or ``"none"``."""
    if text.strip().lower() == "none":
        if input_shape is None:
            raise PrunekitError("--normalize none needs the input's channel count: give the data set too")
        return Normalization((0.0,) * input_shape[0], (1.0,) * input_shape[0])
    means, sep, stds = text.partition("/")
    try:
        if not sep:
            raise ValueError
        mean, std = tuple(float(v) for v in means.split(",")), tuple(float(v) for v in stds.split(","))
    except ValueError:
        raise PrunekitError(f"--normalize {text!r} is not MEANS/STDS: write e.g. 0.4914,0.4822,0.4465/"
                            "0.2470,0.2435,0.2616 (per channel, pixels scaled to [0, 1]) or none") from None
    try:
        norm = Normalization(mean, std)
    except PrunekitError as err:       # its words are Python's ("normalization ..."): name the flag and the value
        said = str(err).removeprefix("normalization ")
        if not said[:1].isdigit() and not said.startswith("."):     # it does not quote the value itself
            said = f"{text.strip()}: {said}"
        raise PrunekitError(f"--normalize {said}") from None
    if input_shape is not None and len(norm.mean) != input_shape[0]:
        raise PrunekitError(f"--normalize gives {len(norm.mean)} channel(s) but the images have {input_shape[0]}: "
                            "give one mean and one std per channel")
    return norm


def normalization_text(norm: Normalization) -> str:
    """The ``--normalize`` form of ``norm``."""
    return f"{','.join(map(str, norm.mean))}/{','.join(map(str, norm.std))}"


def check_normalized(loaded: LoadedModel) -> None:
    """Refuse to feed images to a model file whose input normalization nobody gave."""
    if loaded.normalization is None:
        raise PrunekitError(f"say how {loaded.name}'s inputs were normalized in training: --normalize MEANS/STDS "
                            "(per channel, pixels in [0, 1], e.g. 0.5,0.5,0.5/0.5,0.5,0.5) or --normalize none")


def load_data(name: str, data_dir: str | Path, split: str, limit: int | None = None,
              seed: int | None = None, resize: int | None = None, crop: int | None = None,
              classes: tuple[str, ...] | None = None, defer: bool = False,
              same_as=None) -> ImageDataset | DeferredImageDataset:
    """Load a split; ``limit`` keeps the first ``limit`` images (or a seeded random subset);
    ``resize`` / ``crop``: an image folder's images brought to one size; ``classes``: the class
    names a model records, which label an image folder; ``defer``: an image folder scanned, its
    pixels decoded on first use (a ``DeferredImageDataset`` is returned); ``same_as``: a split
    loaded before with ``defer``, returned again when this one is the same images (``load_dataset``)."""
    return load_dataset(name, data_dir, split, resize=resize, crop=crop, limit=limit, seed=seed, classes=classes,
                        defer=defer, same_as=same_as)


def recorded_classes(checkpoint: str | Path | None) -> tuple[str, ...] | None:
    """The class names (in the order of the model's outputs) a prunekit checkpoint's sidecar
    records, or None: a checkpoint without them (the zoo's, an older file, none)."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return None
    names = read_meta(checkpoint).get("class_names")
    return tuple(names) if names is not None else None


def check_fits(loaded: LoadedModel, ds: ImageDataset, what: str) -> None:
    """Refuse data whose image shape or labels do not fit the model."""
    if tuple(ds.image_shape) != tuple(loaded.input_shape):
        raise PrunekitError(f"the {what} images are {tuple(ds.image_shape)} (C,H,W) but model "
                            f"{loaded.name!r} takes {tuple(loaded.input_shape)}: pick the data set "
                            f"the model was made for, or another model")
    if user_models.is_model_file(loaded.name):
        _check_forward(loaded, what)
    num_classes = model_outputs(loaded.model)
    if num_classes is not None and len(ds) and int(ds.labels.max()) >= num_classes:
        raise PrunekitError(f"the {what} labels go up to {int(ds.labels.max())} but model "
                            f"{loaded.name!r} has {num_classes} outputs: pick a matching model or data set")


def _check_forward(loaded: LoadedModel, what: str) -> None:
    """A model file says nothing of its input: run it once on a zero image of the data's shape."""
    try:
        with torch.no_grad():
            out = loaded.model(loaded.example_input())
    except Exception as error:  # the user's forward: one line, what it said
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fault = user_models.forward_fault(error)
        if fault == user_models.NO_FORWARD:
            raise PrunekitError(user_models.no_forward_text(loaded.name, error)) from None
        where = user_models.error_line(error, user_models.parse(loaded.name)[0])
        head = (f"{loaded.name}'s forward raised {type(error).__name__} on one of the {what} images, "
                f"shape {tuple(loaded.input_shape)} (C,H,W){f', at {where}' if where else ''}: {first}; ")
        if fault == user_models.CODE:
            raise PrunekitError(head + "the fault is in the model's code, not the data: fix its forward (or what "
                                "it calls) and run again") from None
        if fault == user_models.EITHER:
            raise PrunekitError(head + "either the data's shape is not the one the model was made for (pick data "
                                "the model takes) or its forward is wrong (fix it)") from None
        raise PrunekitError(f"{loaded.name} fails on one of the {what} images, shape "
                            f"{tuple(loaded.input_shape)} (C,H,W): {first}; pick data the model takes") from None
    if not isinstance(out, torch.Tensor):         # a HuggingFace classifier's output: its .logits, as in Python
        logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
        out = logits if isinstance(logits, torch.Tensor) else out
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        name = type(out).__name__
        got = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
               else f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}")
        raise PrunekitError(f"{loaded.name} returns {got} for one image; the command line needs class scores of "
                            "shape (batch, classes): return them from the function's model (e.g. wrap it)")
    if not out.is_floating_point():
        raise PrunekitError(f"{loaded.name} returns {str(out.dtype).removeprefix('torch.')} outputs for one image; "
                            "the model's outputs must be floating point (class scores, logits): return them as "
                            "computed, without converting them (.long(), .round(), .argmax())")


def model_outputs(model: nn.Module) -> int | None:
    """The class scores ``model`` gives, as its last Linear layer's width (None without one)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None

