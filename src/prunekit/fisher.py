"""Gradients for the Fisher: the n x p matrix X whose rows are loss gradients at w̄.

Row i is either the gradient of the loss of one sample (``batch=1``) or the gradient of the
mean loss over a mini-batch of ``batch`` samples: at the data's labels (``kind="empirical"``, the
empirical Fisher) or at random output directions that make XᵀX/n an unbiased estimate of the
model's own Fisher (``kind="model"``, :mod:`prunekit.model_fisher`). Only the prunable weights
(a ``ParamSpace``) are differentiated. The model is evaluated in eval mode.

BatchNorm (``bn``): "frozen" (the default) normalises with the running statistics, so that
per-sample gradients are well defined. "batch" normalises each mini-batch row with that
mini-batch's own statistics, as the model will once its statistics are re-estimated around the
pruned weights (recalibration), and neither reads nor updates the running statistics: a row is
the gradient of the loss the recalibrated model has. Such a row needs its whole mini-batch in
one forward pass, so ``batch`` >= 2 and the chunk is at least ``batch``.

X is allocated once, (n, p) in the storage dtype, on the model's device, and each layer's
gradients are written straight into its columns as backpropagation reaches the layer
(:mod:`prunekit.layer_grads`, from the layer's input and output gradient). The peak is X +
the model + one chunk's activations + one layer's per-sample gradients for the chunk: there is
no chunk × p temporary and no concatenation.

nn.MultiheadAttention (packed or separate q/k/v weights, bias_k/bias_v, zero attention) and
prunekit's SlimAttention use their weights functionally, so while rows are collected they run
an explicit equivalent forward whose projections are hooked (:func:`attention_explicit.explicit_attention`):
``in_proj_weight`` (its q, k, v thirds from their own inputs) or ``q/k/v_proj_weight``, and
``out_proj.weight``, get the Linear formula. The module's own forward is restored afterwards,
and the check against autograd runs on it.

nn.Embedding tables get their rows by scattering the output gradient into the rows looked up
(a lookup shared by the batch, position ids (1, T), is expanded to the samples, once checked to
leave the loss unchanged); a leaf layer that stores its weight as (in, out) and computes x W + b
(GPT-2's Conv1D, :func:`layer_grads.transposed_linear`) gets the Linear formula transposed; a
weight tied to several layers (an output layer sharing the token embedding) sums their parts.

Layers that path cannot handle (anything else: :func:`layer_grads.unsupported_layers`), and any
model whose first hooked row disagrees with plain autograd of the modules' own forwards (a weight
used outside its layer's forward, say), fall back to ``torch.func.vmap`` per-sample gradients,
which build one chunk × p block per chunk; a warning names the reason.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import warnings
from typing import Iterable

import torch
from torch import nn

from . import fisher_batches, layer_grads, model_fisher
from .errors import PrunekitError, PrunekitWarning
from .fisher_hooks import HooksDisagree, collect_with_hooks
from .fisher_vmap import collect_with_vmap
from .losses import LossFn, mean_loss
from .options import OptionError
from .params import ParamSpace
from .errors import warn as warn_ours

# torch.func's notice for an operation without a batched (vmap) rule; it then loops over the
# samples, which is exact but slow. We say it once, in our words, after the gradients.
_NO_BATCH_RULE = re.compile(r"performance drop because we have not yet implemented the batching rule for (\S+?)\.")

BN_MODES = ("frozen", "batch")


def collect_gradients(model: nn.Module, space: ParamSpace, batches: Iterable, n: int, batch: int = 1,
                      chunk: int = 64, dtype: torch.dtype = torch.float32,
                      progress: bool = True, bn: str = "frozen", loss_fn: LossFn | None = None,
                      kind: str = "empirical", seed: int = 0, loss_scale: float = 1.0) -> torch.Tensor:
    """The (n, p) gradient matrix at the model's current weights, in ``dtype``, on the model's device.

    Args:
        batches: iterable of (x, y) training batches (any batch size); enough of them to give
            n·batch samples.
        n: number of rows (``fisher_samples``).
        batch: samples averaged per row (``fisher_batch``); 1 = per-sample gradients.
        chunk: samples forwarded together (memory: one chunk of activations).
        dtype: storage dtype of X (float32, bfloat16, float16, float64).
        bn: "frozen" (BatchNorm on its running statistics) or "batch" (each row on its
            mini-batch's statistics, running statistics untouched; needs ``batch`` >= 2).
        loss_fn: the loss differentiated (``prunekit.losses``; None: cross-entropy).
        kind: "empirical" (gradients of the loss at the data's labels) or "model" (draws of the
            model's Fisher, :mod:`prunekit.model_fisher`: the default cross-entropy, nn.MSELoss()
            or nn.BCEWithLogitsLoss(); ``seed`` seeds the draws).
        loss_scale: a power of two s: the rows hold s times the gradients (the loss is scaled in
            float32, before any rounding to ``dtype``: exact where nothing overflows), so that
            float16 rows of a tiny loss are not subnormal or zero (:func:`float16_loss_scale`).
    """
    if n < 1 or batch < 1 or chunk < 1:
        raise PrunekitError(f"need n >= 1 gradient rows of batch >= 1 samples (chunk >= 1), "
                            f"got n={n}, batch={batch}, chunk={chunk}")
    if bn not in BN_MODES:
        raise OptionError(f"fisher_bn must be one of {', '.join(BN_MODES)}, got {bn!r}", ("fisher_bn",))
    if bn == "batch":
        if batch < 2:
            raise OptionError("fisher_bn='batch' needs mini-batch rows: set fisher_batch to 2 or more (16 "
                              "measured well), or fisher_bn='frozen'", ("fisher_bn", "fisher_batch"))
        chunk = max(chunk, batch)                # a row's statistics are its whole mini-batch's
        batches = fisher_batches.one_shape(batches)
    if kind not in model_fisher.FISHER_KINDS:
        raise OptionError(f"fisher_kind must be one of {', '.join(model_fisher.FISHER_KINDS)}, got {kind!r}",
                          ("fisher_kind",))
    if kind == "model":
        if not model_fisher.supports(loss_fn):
            raise OptionError(model_fisher.refusal(loss_fn), ("fisher_kind", "loss"))
        batches, loss_fn = model_fisher.with_sample_seeds(batches, seed), model_fisher.draw_loss(loss_fn)
    if loss_scale != 1.0:
        if not (loss_scale > 0 and math.frexp(loss_scale)[0] == 0.5):
            raise PrunekitError(f"loss_scale must be a power of two, got {loss_scale!r}")
        loss_fn = _scaled_loss(loss_fn, loss_scale)
    device = space.weights()[0].device
    rows = torch.empty(n, space.numel, dtype=dtype, device=device)
    unsupported = layer_grads.unsupported_layers(model, space)
    was_training = model.training
    model.eval()
    unbatched: set[str] = set()
    normalise = batchnorm_on_batch_statistics(model) if bn == "batch" else contextlib.nullcontext()
    try:
        with _unbatched_ops(unbatched), normalise, full_float32():
            _collect_rows(model, space, batches, rows, batch, chunk, progress, unsupported, loss_fn)
    finally:
        model.train(was_training)
    if unbatched:
        warn_ours(PrunekitWarning(
            f"per-sample gradients loop over the samples for {', '.join(sorted(unbatched))} (torch.func "
            "has no batched rule for it): exact but slower; mini-batch rows (fisher_batch=8) avoid it"))
    return rows


def _scaled_loss(loss_fn: LossFn | None, scale: float) -> LossFn:
    """``scale`` times the mean loss (``loss_fn`` None: cross-entropy), as a loss function."""
    def scaled(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return mean_loss(loss_fn, outputs, targets) * scale
    return scaled


FLOAT16_TOP = 2.0**8        # where float16_loss_scale puts the largest probed gradient entry
FLOAT16_KEEP = (2.0**-2, 2.0**12)   # largest entries in this range: float16 rows as they are (scale 1)
PROBE_ROWS = 4


def float16_loss_scale(model: nn.Module, space: ParamSpace, batches: Iterable, n: int, **options) -> float:
    """The power of two by which to scale the loss before float16 rows are stored (1.0: none).

    Float16 holds normal numbers down to 6.1e-5 and nothing below 6e-8, so the rows of a tiny loss
    (a nearly perfect classifier: loss 1e-6, gradient entries of 1e-6 to 1e-9) were stored
    subnormal or zero, before any later scaling of X could help. The first min(n, ``PROBE_ROWS``) rows are
    computed in float32 from ``batches`` (a stream of its own: p floats a row) and the largest
    entry put at ``FLOAT16_TOP`` (256x headroom below float16's 65,504 for rows the probe did not
    see); 1.0 while that entry lies in ``FLOAT16_KEEP`` (ordinary losses: the rows as ever).
    ``options``: collect_gradients' (``progress`` off here)."""
    return float16_scale_for(float16_probe_top(model, space, batches, n, **options))


def float16_probe_top(model: nn.Module, space: ParamSpace, batches: Iterable, n: int, **options) -> float:
    """The largest |entry| of the first min(n, ``PROBE_ROWS``) gradient rows of ``batches``, computed
    in float32 (0.0 without rows): what :func:`float16_loss_scale` scales by. Under torch.distributed
    every rank probes the same first rows of the same stream and the ranks take the maximum
    (``collective.all_reduce_max``) before :func:`float16_scale_for`, so that all store their rows at
    one scale, the one process's."""
    options["progress"] = False
    probe = collect_gradients(model, space, batches, min(n, PROBE_ROWS), dtype=torch.float32, **options)
    top = float(probe.abs().max()) if probe.numel() else 0.0
    del probe
    return top


def float16_scale_for(top: float) -> float:
    """The power of two putting ``top`` (a probed largest gradient entry) at ``FLOAT16_TOP``; 1.0
    while it lies in ``FLOAT16_KEEP``, or is 0 or not finite."""
    if not math.isfinite(top) or top == 0.0 or FLOAT16_KEEP[0] <= top <= FLOAT16_KEEP[1]:
        return 1.0
    return 2.0 ** (math.floor(math.log2(FLOAT16_TOP / top)))


@contextlib.contextmanager
def full_float32():
    """Float32 convolutions and matrix products at full precision inside (no TF32 on GPUs).

    cuDNN convolves float32 in TF32 by default; measured on an H200 (torch 2.11, ResNet-50, random
    weights), the per-layer rows and autograd then differed by 10% on the first layer (both
    rounded, differently), and agreed within 1e-3 without TF32. Rows cost a few seconds of a
    solve that takes a minute there, so they are computed exactly."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")      # torch >= 2.9
    saved_conv = conv.fp32_precision if new_api else torch.backends.cudnn.allow_tf32
    saved_matmul = torch.get_float32_matmul_precision()
    try:
        if new_api:
            conv.fp32_precision = "ieee"
        else:
            torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        if new_api:
            conv.fp32_precision = saved_conv
        else:
            torch.backends.cudnn.allow_tf32 = saved_conv
        torch.set_float32_matmul_precision(saved_matmul)


@contextlib.contextmanager
def batchnorm_on_batch_statistics(model: nn.Module):
    """Within the block, every BatchNorm module of ``model`` normalises with the statistics of the
    batch it sees and neither reads nor updates its running statistics (``num_batches_tracked``
    included); other modules keep their mode. Restores each module's mode and flag on exit."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    try:
        for m in norms:
            m.train()
            m.track_running_stats = False
        yield norms
    finally:
        for m, (training, tracking) in zip(norms, saved):
            m.train(training)
            m.track_running_stats = tracking


def passes(batches: Iterable, max_passes: int = 1000):
    """The batches of ``batches`` pass after pass (a prunekit loader reshuffles and re-augments
    at every pass), for mini-batch rows that need more samples than one pass holds; stops at
    a pass that yields nothing (a one-shot iterator) and after ``max_passes``."""
    for _ in range(max_passes):
        empty = True
        for item in batches:
            empty = False
            yield item
        if empty:
            return


def skip_samples(batches: Iterable, count: int):
    """The (x, y) batches of ``batches`` less their first ``count`` samples (a batch that straddles
    the cut is sliced)."""
    for x, y in batches:
        if count >= y.shape[0]:
            count -= y.shape[0]
            continue
        if count:
            x, y, count = x[count:], y[count:], 0
        yield x, y


def keep_columns(grads: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """grads[:, index] (n, m) without a second n×p matrix: each row is compacted in place and the
    result is a view of the first m columns (row stride p)."""
    for row in grads:
        row[:index.numel()] = row[index]
    return grads[:, :index.numel()]


def _collect_rows(model, space, batches, rows, batch, chunk, progress, unsupported: list[str],
                  loss_fn: LossFn | None) -> None:
    """Per-layer hooks where every prunable layer allows them, else (or when they disagree with
    autograd) torch.func over the whole model."""
    if unsupported:
        warn_ours(PrunekitWarning(
            f"per-layer gradients handle Linear, embeddings, convolutions and attention only; {', '.join(unsupported[:3])}"
            f"{' ...' if len(unsupported) > 3 else ''} use the slower vmap path (chunk x p extra memory)"))
    else:
        replay = _Replay(batches)
        try:
            collect_with_hooks(model, space, replay, rows, batch, chunk, progress, loss_fn,
                                on_checked=replay.forget)
            return
        except HooksDisagree as error:
            warn_ours(PrunekitWarning(f"per-layer gradients disagree with autograd ({error}); using the "
                                          "slower vmap path (chunk x p extra memory)"))
        batches = replay.again()             # a one-pass iterator loses none of the samples read so far
    collect_with_vmap(model, space, batches, rows, batch, chunk, progress, loss_fn)


class _Replay:
    """One pass over ``batches`` that remembers the batches read until ``forget()``;
    ``again()`` yields those, then the batches not read yet (so a one-pass iterator can be
    started over once, for the samples the rows were checked on)."""

    def __init__(self, batches: Iterable):
        self.rest = iter(batches)
        self.read: list | None = []

    def __iter__(self):
        for item in self.rest:
            if self.read is not None:
                self.read.append(item)
            yield item

    def forget(self) -> None:
        self.read = None

    def again(self) -> Iterable:
        if self.read is None:
            raise RuntimeError("the batches read were forgotten")
        return itertools.chain(self.read, self.rest)


class _unbatched_ops:
    """Collect into ``found`` the operations torch.func reports as lacking a batched rule (and
    keep those notices from the user); any other warning passes through unchanged."""

    def __init__(self, found: set[str]):
        self.found = found
        self.catcher = warnings.catch_warnings(record=True)

    def __enter__(self):
        self.caught = self.catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.catcher.__exit__(*exc)
        for w in self.caught:
            match = _NO_BATCH_RULE.search(str(w.message))
            if match:
                self.found.add(match.group(1).removesuffix("_backward"))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False
