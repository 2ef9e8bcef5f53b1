"""The model zoo: named architectures, their input specs, and safe checkpoint loading.

>>> from prunekit import zoo
>>> model = zoo.load_model("resnet20", "resnet20-12fca82f.th")   # doctest: +SKIP
>>> zoo.spec("resnet20").mean
(0.485, 0.456, 0.406)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prunekit.zoo.checkpoints import load_checkpoint, read_state_dict
from prunekit.zoo.registry import MODEL_NAMES, ModelSpec, build, spec

__all__ = [
    "MODEL_NAMES",
    "ModelSpec",
    "build",
    "load_checkpoint",
    "load_model",
    "read_state_dict",
    "spec",
]


def load_model(name: str, checkpoint: str | Path | None = None, **build_kwargs: Any) -> nn.Module:
    """Zoo model ``name`` (``build_kwargs`` go to :func:`build`), with the weights of
    ``checkpoint`` loaded when one is given, in eval mode."""
    model = build(name, **build_kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()
