"""The named models of the zoo: what each expects as input and how to build it."""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.suggest import closest
from prunekit.zoo.cifar_resnet import cifar_resnet
from prunekit.zoo.imagenet_resnet import ResNet50
from prunekit.zoo.mlp import MLPNet
from prunekit.zoo.mobilenet import MobileNetV1
from prunekit.zoo.vgg import VGG16BN
from prunekit.zoo.vit import VisionTransformer

Norm = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per input channel

_MNIST: Norm = ((0.1307,), (0.3081,))
_FASHION: Norm = ((0.2860,), (0.3530,))   # Fashion-MNIST training pixels' mean and std
_HALF: Norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_IMAGENET: Norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The CIFAR-10 training set's per-channel pixel mean and standard deviation.
_CIFAR: Norm = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@dataclass(frozen=True)
class ModelSpec:
    """What a zoo model expects.

    ``input_shape`` is the (C, H, W) of one example and ``mean``/``std`` the per-channel input
    normalization its reference checkpoint was trained with (``(x - mean) / std`` on pixels
    scaled to [0, 1]); ``dataset`` is the name of its default data set. ``prune_exclude``
    holds module-name patterns left dense by default, so that the prunable set is the one
    the papers report on (CHITA/FALCON/WoodFisher leave ResNet-20-B's 1x1 projections dense).
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    prune_exclude: tuple[str, ...] = ()


Builder = Callable[[int, int], nn.Module]  # (num_classes, in_channels) -> fresh model


def _entry(
    name: str, shape: tuple[int, int, int], classes: int, dataset: str, norm: Norm, builder: Builder,
    prune_exclude: tuple[str, ...] = (),
) -> tuple[str, tuple[ModelSpec, Builder]]:
    return name, (ModelSpec(name, shape, classes, dataset, *norm, prune_exclude), builder)


_CIFAR_SHAPE = (3, 32, 32)
_IMAGENET_SHAPE = (3, 224, 224)

_REGISTRY: dict[str, tuple[ModelSpec, Builder]] = dict(
    [
        _entry("mlpnet", (1, 28, 28), 10, "mnist", _MNIST, MLPNet),
        # akamaster's option-A checkpoints were trained on ImageNet-normalized inputs.
        _entry("resnet20", _CIFAR_SHAPE, 10, "cifar10", _IMAGENET, lambda k, c: cifar_resnet(20, "A", k, c)),
        _entry("resnet32", _CIFAR_SHAPE, 10, "cifar10", _IMAGENET, lambda k, c: cifar_resnet(32, "A", k, c)),
        _entry("resnet44", _CIFAR_SHAPE, 10, "cifar10", _IMAGENET, lambda k, c: cifar_resnet(44, "A", k, c)),
        _entry("resnet56", _CIFAR_SHAPE, 10, "cifar10", _IMAGENET, lambda k, c: cifar_resnet(56, "A", k, c)),
        _entry("resnet20-b", _CIFAR_SHAPE, 10, "cifar10", _HALF, lambda k, c: cifar_resnet(20, "B", k, c),
               ("*.downsample.*",)),
        _entry("mobilenetv1", _IMAGENET_SHAPE, 1000, "imagenet", _IMAGENET, MobileNetV1),
        _entry("mobilenetv1-cifar", _CIFAR_SHAPE, 10, "cifar10", _CIFAR,
               lambda k, c: MobileNetV1(k, c, stem_stride=1)),
        _entry("resnet50", _IMAGENET_SHAPE, 1000, "imagenet", _IMAGENET, ResNet50),
        _entry("vgg16-bn", _CIFAR_SHAPE, 10, "cifar10", _CIFAR, VGG16BN),
        # 4 heads of 16, 2 pre-norm blocks, 7x7 patches: 17 tokens (recipe in the README).
        _entry("vit-tiny", (1, 28, 28), 10, "fashion-mnist", _FASHION, VisionTransformer),
    ]
)  # fmt: skip

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _refuse_path_spec(name: str) -> None:
    """``PATH:FUNCTION`` whose PATH exists but is no Python file (a folder, notes.txt, /dev/null,
    a pipe), or ``net.py:build:x``: say what is wrong with it, not the zoo's names."""
    example = "write path/to/net.py:FUNCTION, the function that returns your nn.Module"
    for i, char in enumerate(name):
        if char != ":" or i == 0:
            continue
        path, function = Path(name[:i]), name[i + 1:]
        if name[:i].endswith(".py") and ":" in function:
            raise PrunekitError(f"{function!r} after the colon of model {name} is not a Python function name: "
                                f"{example}")
        try:
            mode = path.stat().st_mode
        except (OSError, ValueError):
            continue
        if stat.S_ISDIR(mode):
            what = "a folder"
        elif stat.S_ISREG(mode):
            what = "not a .py file"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            what = "a device, not a .py file"
        elif stat.S_ISFIFO(mode):
            what = "a pipe, not a .py file"
        else:
            what = "not a .py file"
        raise PrunekitError(f"model {name}: {path} is {what}; {example} (a Python file ending in .py)")


def _lookup(name: str) -> tuple[ModelSpec, Builder]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    _refuse_path_spec(name)
    close = closest(name, MODEL_NAMES)
    hint = f"did you mean '{close}'? " if close else ""
    raise PrunekitError(f"unknown model '{name}': {hint}pick one of {', '.join(MODEL_NAMES)}")


def spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of zoo model ``name`` (one of :data:`MODEL_NAMES`)."""
    return _lookup(name)[0]


def build(name: str, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """A freshly initialized zoo model, in training mode.

    ``num_classes`` and ``in_channels`` default to the model's spec; change them to train e.g.
    ``resnet20`` on 1-channel 28x28 Fashion-MNIST (``in_channels=1``).
    """
    model_spec, builder = _lookup(name)
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PrunekitError(f"{arg} must be a positive integer, got {value!r}")
    return builder(
        model_spec.num_classes if num_classes is None else num_classes,
        model_spec.input_shape[0] if in_channels is None else in_channels,
    )
