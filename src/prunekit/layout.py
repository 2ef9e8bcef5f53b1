"""The memory layout in which a model's image batches are fed to it on the CPU.

Convolutions on the CPU run faster on channels-last (NHWC) input batches than on the default
NCHW ones (ResNet-20, a batch of 128, one thread: 0.26 -> 0.18 s in eval mode, 0.30 -> 0.22 s in
train mode), and give the same result up to float rounding. BatchNorm re-estimation and every
evaluation (the run folder's per-stage record, the judge of candidate weights) are such forward
passes, a large share of a multi-stage run's time; the fine-tuning loop (``train.train_epoch``)
takes them too (forward and backward). Gradient rows (``fisher``) gained nothing from it.

A model need not accept such a batch: ``.view`` of a spatial activation raises on its strides.
So each model is probed once, on two samples in eval mode without gradients: channels-last is
used only if the model runs on it and its outputs match the NCHW ones. Only inputs change; the
model's own parameters keep their layout.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

_TAKES_CHANNELS_LAST: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def model_input(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``, as a channels-last batch when it is a 4-D float batch on the CPU and
    ``model`` takes one (probed on first use, then remembered for this model object)."""
    x = x.to(device)
    if x.dim() != 4 or not x.is_floating_point() or x.device.type != "cpu" or x.shape[1] == 1:
        return x                      # one channel: the layouts are the same
    takes = _TAKES_CHANNELS_LAST.get(model)
    if takes is None:
        takes = _TAKES_CHANNELS_LAST[model] = _takes_channels_last(model, x)
    return x.contiguous(memory_format=torch.channels_last) if takes else x


@torch.no_grad()
def _takes_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` runs on a channels-last copy of ``x[:2]`` (N, C, H, W) and gives the same
    outputs as on ``x[:2]`` itself, within float rounding (eval mode; the model's mode is restored)."""
    sample = x[:2].contiguous()
    was_training = model.training
    model.eval()
    try:
        reference = model(sample)
        fast = model(sample.contiguous(memory_format=torch.channels_last))
    except RuntimeError:
        return False
    finally:
        model.train(was_training)
    if not (isinstance(reference, torch.Tensor) and isinstance(fast, torch.Tensor)) or fast.shape != reference.shape:
        return False
    if reference.numel() == 0 or not bool(torch.isfinite(reference).all() and torch.isfinite(fast).all()):
        return False
    return float((fast - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
