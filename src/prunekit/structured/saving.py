"""Save a shrunk model: tensors (safetensors) plus a sidecar that also records every layer's
channel counts, so ``load_model`` can rebuild the smaller architecture without running code;
and export to ONNX."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunekitError
from ..saving import save_model
from ..zoo.layout import channel_layout

ONNX_OPSET = 17


def save_shrunk(model: nn.Module, path: str | Path, meta: dict) -> Path:
    """``save_model`` with ``meta["channel_layout"]`` filled in from ``model``."""
    return save_model(model, path, {**meta, "channel_layout": channel_layout(model)})


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path) -> Path:
    """Export ``model`` (eval mode) to ONNX at opset 17 with a dynamic batch axis; checked by onnx.checker."""
    try:
        import onnx   # optional dependency, needed only here
    except ImportError:
        raise PrunekitError("ONNX export needs the onnx package: pip install 'prunekit[export]'") from None
    path = Path(path)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # the TorchScript exporter's deprecation notices
        try:
            torch.onnx.export(model, (example_input,), str(path), opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        except Exception as err:  # noqa: BLE001 - report any exporter failure as one line
            raise PrunekitError(f"ONNX export failed: {str(err).splitlines()[0]}") from None
    onnx.checker.check_model(onnx.load(str(path)))
    return path
