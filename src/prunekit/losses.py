"""The loss every method trains, differentiates and judges by, and evaluations report.

Default: cross-entropy on class indices (a classifier's logits). ``prunekit.prune(..., loss=f)``
takes the user's ``f(outputs, targets) -> scalar tensor``: the **mean over the batch** of the
per-sample losses, as ``nn.MSELoss()`` or a language model's token-averaged cross-entropy over
sequences of one length. The gradient rows are per-sample gradients of it, so a loss that
couples the samples of a batch (contrastive, batch-normalised) is not one to pass. Every method
trains and judges on it: the weights methods' gradients, judges and gradual fine-tunes, the channel
methods' gates, depth cut and fine-tune. Cross-entropy reads integer labels of any dtype (int32
from NumPy, int16, int8) as torch.long (:func:`class_indices`); a user's loss gets the labels as given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .errors import PrunekitError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def summed_loss(loss_fn: LossFn | None, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of the per-sample losses (a scalar tensor); ``loss_fn`` None: cross-entropy."""
    if loss_fn is None:
        return nn.functional.cross_entropy(class_scores(outputs), class_indices(targets), reduction="sum")
    return loss_fn(outputs, targets) * targets.shape[0]


def loss_name(loss_fn: LossFn) -> str:
    """How records and run folders name the user's loss: its function or class name."""
    return getattr(loss_fn, "__name__", type(loss_fn).__name__)


def mean_loss(loss_fn: LossFn | None, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of the per-sample losses; ``loss_fn`` None: cross-entropy."""
    if loss_fn is None:
        return nn.functional.cross_entropy(class_scores(outputs), class_indices(targets))
    return loss_fn(outputs, targets)


def class_indices(labels: torch.Tensor) -> torch.Tensor:
    """Integer class labels as the torch.long cross-entropy takes (it refuses int32 and int16)."""
    return labels.long() if labels.dtype in (torch.int8, torch.int16, torch.int32) else labels


def class_scores(outputs) -> torch.Tensor:
    """A classifier's (B, classes) scores: ``outputs`` itself if it is a tensor, or its ``logits``
    when that is a (B, classes) tensor (a HuggingFace ``...ForSequenceClassification`` or
    ``...ForImageClassification`` output, a dict with "logits"). Anything else (a language model's
    (B, T, vocab) logits, a tuple) is refused in one line: the default loss cannot know which part
    holds the scores, or how they meet the targets."""
    if isinstance(outputs, torch.Tensor):
        if outputs.dim() < 2:
            raise PrunekitError(f"the model returns scores of shape {tuple(outputs.shape)}, one value per example, not "
                                "(batch, classes) class scores: pass loss=f with f(outputs, targets) giving the mean "
                                "loss (e.g. nn.BCEWithLogitsLoss() for one logit, nn.MSELoss() for a regression)")
        if not outputs.is_floating_point():       # cross-entropy's log-softmax takes float scores alone
            raise PrunekitError(not_float_scores(outputs.dtype))
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        if not logits.is_floating_point():
            raise PrunekitError(not_float_scores(logits.dtype))
        return logits
    hint = f" (its .logits are {tuple(logits.shape)}, not (batch, classes))" if isinstance(logits, torch.Tensor) else ""
    raise PrunekitError(f"the model returns {type(outputs).__name__} outputs, not a tensor of class scores{hint}: "
                        "pass loss=f with f(outputs, targets) giving the mean loss, or wrap the model in a "
                        "module whose forward returns (batch, classes) scores")


def not_float_scores(dtype: torch.dtype) -> str:
    """The refusal of class scores of ``dtype`` (integer, bool or complex): cross-entropy, accuracy
    and every method's gradients need floating-point scores."""
    return (f"the model's outputs are {str(dtype).removeprefix('torch.')}, not floating point: its class scores must "
            "be floating point (logits): return them as computed, without converting them (.long(), .round(), "
            ".argmax())")
