"""Turn names and paths from the user (CLI, recipes) into a model, its normalization and data.

This is where the checks on user input live, so that every entry point gets the same clear
errors: unknown model, missing file, checkpoint of another architecture, data whose image
shape or class count does not fit the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import zoo
from .data import ImageDataset, Normalization, load_dataset
from .errors import PrunekitError
from .saving import read_meta
from .zoo.layout import apply_layout

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
    normalization: Normalization
    input_shape: tuple[int, int, int]
    prune_exclude: list[str]

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.input_shape, device=next(self.model.parameters()).device)


def load_model(name: str, checkpoint: str | Path | None = None, *, num_classes: int | None = None,
               in_channels: int | None = None, dataset: str | None = None) -> LoadedModel:
    """Build zoo model ``name`` and load ``checkpoint`` into it.

    A prunekit-saved ``.safetensors`` file carries a JSON sidecar with its build arguments and
    normalization, which win over the arguments here. Reference checkpoints use the zoo's
    normalization for that model; a model built for a data set other than its reference one
    (e.g. ResNet-20 on Fashion-MNIST) uses that data set's normalization.
    """
    spec = zoo.spec(name)   # refuses an unknown name, suggesting the closest
    meta = read_meta(checkpoint) if checkpoint is not None else {}
    if meta.get("model") not in (None, name):
        raise PrunekitError(f"{checkpoint} holds a {meta['model']!r} model, not {name!r}: "
                            f"load it as {meta['model']!r}")
    build_kwargs = meta.get("build_kwargs") or {k: v for k, v in
                                                (("num_classes", num_classes), ("in_channels", in_channels))
                                                if v is not None}
    model = zoo.build(name, **build_kwargs)
    if "channel_layout" in meta:   # a structurally pruned (shrunk) model: resize its layers first
        apply_layout(model, meta["channel_layout"])
    if checkpoint is not None:
        zoo.load_checkpoint(model, checkpoint)
    channels = build_kwargs.get("in_channels", spec.input_shape[0])
    input_shape = (channels, *spec.input_shape[1:])
    if "normalization" in meta:
        norm = Normalization(tuple(meta["normalization"]["mean"]), tuple(meta["normalization"]["std"]))
    elif dataset is not None and dataset != spec.dataset and dataset in DATASET_NORMALIZATION:
        norm = DATASET_NORMALIZATION[dataset]
    else:
        norm = Normalization(tuple(spec.mean), tuple(spec.std))
    if "input_shape" in meta:
        input_shape = tuple(meta["input_shape"])
    model.eval()
    return LoadedModel(model, name, build_kwargs, norm, input_shape, list(spec.prune_exclude))


def load_data(name: str, data_dir: str | Path, split: str, limit: int | None = None,
              seed: int | None = None) -> ImageDataset:
    """Load a split; ``limit`` keeps the first ``limit`` images (or a seeded random subset)."""
    ds = load_dataset(name, data_dir, split)
    if limit is not None and limit < len(ds):
        ds = ds.subset(limit, seed=seed)
    return ds


def check_fits(loaded: LoadedModel, ds: ImageDataset, what: str) -> None:
    """Refuse data whose image shape or labels do not fit the model."""
    if tuple(ds.image_shape) != tuple(loaded.input_shape):
        raise PrunekitError(f"the {what} images are {tuple(ds.image_shape)} (C,H,W) but model "
                            f"{loaded.name!r} takes {tuple(loaded.input_shape)}: pick the data set "
                            f"the model was made for, or another model")
    num_classes = _num_classes(loaded.model)
    if num_classes is not None and len(ds) and int(ds.labels.max()) >= num_classes:
        raise PrunekitError(f"the {what} labels go up to {int(ds.labels.max())} but model "
                            f"{loaded.name!r} has {num_classes} outputs: pick a matching model or data set")


def _num_classes(model: nn.Module) -> int | None:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None

