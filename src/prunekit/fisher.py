"""Gradients for the empirical Fisher: the n x p matrix X whose rows are loss gradients at w̄.

Row i is either the gradient of the loss of one sample (``batch=1``) or the gradient of the
mean loss over a mini-batch of ``batch`` samples. Only the prunable weights (a ``ParamSpace``)
are differentiated. The model is evaluated in eval mode.

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
an explicit equivalent forward whose projections are hooked (:func:`layer_grads.explicit_attention`):
``in_proj_weight`` (its q, k, v thirds from their own inputs) or ``q/k/v_proj_weight``, and
``out_proj.weight``, get the Linear formula. The module's own forward is restored afterwards,
and the first-row check runs on it.

Layers that path cannot handle (anything else: :func:`layer_grads.unsupported_layers`), and any
model whose first hooked row disagrees with plain autograd of the modules' own forwards (a weight
used outside its layer's forward, say), fall back to ``torch.func.vmap`` per-sample gradients,
which build one chunk × p block per chunk; a warning names the reason.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from . import layer_grads
from .data.loaders import samples_per_pass
from .errors import PrunekitError, PrunekitWarning
from .losses import LossFn, mean_loss, summed_loss
from .options import OptionError
from .params import Entry, ParamSpace

# torch.func's notice for an operation without a batched (vmap) rule; it then loops over the
# samples, which is exact but slow. We say it once, in our words, after the gradients.
_NO_BATCH_RULE = re.compile(r"performance drop because we have not yet implemented the batching rule for (\S+?)\.")

BN_MODES = ("frozen", "batch")


def collect_gradients(model: nn.Module, space: ParamSpace, batches: Iterable, n: int, batch: int = 1,
                      chunk: int = 64, dtype: torch.dtype = torch.float32,
                      progress: bool = True, bn: str = "frozen", loss_fn: LossFn | None = None) -> torch.Tensor:
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
        warnings.warn(PrunekitWarning(
            f"per-sample gradients loop over the samples for {', '.join(sorted(unbatched))} (torch.func "
            "has no batched rule for it): exact but slower; mini-batch rows (fisher_batch=8) avoid it"),
            stacklevel=2)
    return rows


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
        warnings.warn(PrunekitWarning(
            f"per-layer gradients handle Linear, convolutions and attention only; {', '.join(unsupported[:3])}"
            f"{' ...' if len(unsupported) > 3 else ''} use the slower vmap path (chunk x p extra memory)"),
            stacklevel=3)
    else:
        replay = _Replay(batches)
        try:
            _collect_with_hooks(model, space, replay, rows, batch, chunk, progress, loss_fn,
                                on_checked=replay.forget)
            return
        except _HooksDisagree as error:
            warnings.warn(PrunekitWarning(f"per-layer gradients disagree with autograd ({error}); using the "
                                          "slower vmap path (chunk x p extra memory)"), stacklevel=3)
        batches = replay.again()             # a one-pass iterator loses none of the samples read so far
    _collect_with_vmap(model, space, batches, rows, batch, chunk, progress, loss_fn)


class _Replay:
    """One pass over ``batches`` that remembers the batches read until ``forget()``;
    ``again()`` yields those, then the batches not read yet (so a one-pass iterator can be
    started over once, for the samples the first row was checked on)."""

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


# --- per-layer hooks: each layer writes its own columns ----------------------------------------

class _HooksDisagree(Exception):
    pass


class _LayerHooks:
    """Forward hooks on the prunable layers that, during the backward pass, write each layer's
    weight gradients into its columns of ``self.target`` (rows × p). An attention module's
    projection weights (``in_proj_weight`` or ``q/k/v_proj_weight``, and nn.MultiheadAttention's
    ``out_proj.weight``) are written by ``project``, which its explicit forward calls for each
    projection (``layer_grads.explicit_attention``)."""

    def __init__(self, model: nn.Module, space: ParamSpace, summed: bool):
        modules = dict(model.named_modules())
        parents = layer_grads.attention_parent(model)
        dims = layer_grads.sample_dims(model)
        self.summed = summed
        self.target: torch.Tensor | None = None
        self.samples = 0
        self.written: set[tuple[str, int]] = set()
        self.projections: dict[tuple[int, str], Entry] = {}     # (id(attention), weight name/"out") -> entry
        attention: dict[str, nn.Module] = {}
        self.handles = []
        for e in space.entries:
            module = modules[e.module]
            if e.module in parents or isinstance(module, layer_grads.ATTENTION):
                name = parents.get(e.module, e.module)
                attention[name] = modules[name]
                which = "out" if e.module in parents else e.param_name.rsplit(".", 1)[-1]
                self.projections[(id(modules[name]), which)] = e
            else:
                self.handles.append(module.register_forward_hook(self._forward_hook(e, dims.get(e.module, 0))))
        self.attention_modules = list(attention.values())

    def _forward_hook(self, entry: Entry, sample_dim: int):
        def hook(module, inputs, output):
            if self.target is None:               # not collecting (e.g. the autograd check)
                return None
            if not self.summed and isinstance(module, nn.Linear) and (
                    inputs[0].dim() <= sample_dim or inputs[0].shape[sample_dim] != self.samples):
                raise _HooksDisagree(f"layer {entry.module_name!r}: dimension {sample_dim} of its input "
                                     f"{tuple(inputs[0].shape)} is not the {self.samples} samples")
            if isinstance(module, layer_grads.CONVOLUTIONS) and not _batch_of_samples(
                    module, inputs[0], None if self.summed else self.samples):
                raise _HooksDisagree(f"layer {entry.module_name!r}: its input {tuple(inputs[0].shape)} is "
                                     f"not a batch of the {self.samples} samples")
            return self._capture(entry, entry.slice, inputs[0], output,
                                 lambda a, g, dest, accumulate: layer_grads.write_weight_grads(
                                     module, a, g, dest, accumulate=accumulate, summed=self.summed,
                                     sample_dim=sample_dim))
        return hook

    def _capture(self, entry: Entry, columns: slice, inputs: torch.Tensor, output: torch.Tensor, write):
        """Hook ``output`` so that its gradient writes ``entry``'s ``columns`` by ``write``."""
        saved = [inputs.detach()]                 # dropped as soon as the gradient is written
        if not output.requires_grad:              # nothing upstream needs a gradient: start here
            output = output + torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)

        def on_gradient(g):
            key = (entry.module_name, columns.start)
            write(saved.pop(), g, self.target[:, columns], self.summed or key in self.written)
            self.written.add(key)
        output.register_hook(on_gradient)
        return output

    def project(self, module: nn.Module, which: str, a: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, rows: tuple[int, int] | None) -> torch.Tensor:
        """One projection of an attention's explicit forward: F.linear, its gradient written into
        the columns of weight ``which`` (``rows`` of ``in_proj_weight``, or all of the weight)."""
        output = F.linear(a, weight, bias)
        entry = self.projections.get((id(module), which))
        if self.target is None or entry is None:
            return output
        if not self.summed and a.shape[0] != self.samples:
            raise _HooksDisagree(f"layer {entry.module_name!r}: its batch of {a.shape[0]} is not the "
                                 f"{self.samples} samples")
        width = weight.shape[1]
        columns = entry.slice if rows is None else slice(entry.slice.start + rows[0] * width,
                                                          entry.slice.start + rows[1] * width)
        # always added: an attention's columns are zeroed before each forward (``backward``), as
        # its calls may write overlapping parts (self-attention all of in_proj, cross-attention q, kv)
        return self._capture(entry, columns, a, output,
                             lambda a, g, dest, accumulate: layer_grads.write_linear_grads(
                                 a, g, dest, True, self.summed))

    def backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                 loss_scale: float, entries: list[Entry], loss_fn: LossFn | None = None) -> None:
        """Forward x, backpropagate Σ loss / loss_scale, writing into ``target``."""
        self.target, self.written, self.samples = target, set(), x.shape[0]
        if not self.summed:                        # (a mini-batch's accumulator is zeroed by the caller)
            for entry in self.projections.values():
                target[:, entry.slice] = 0
        try:
            loss = summed_loss(loss_fn, model(x), y) / loss_scale
        except layer_grads.AttentionUnsupported as error:
            raise _HooksDisagree(str(error)) from error
        if loss.requires_grad:
            loss.backward()
        if not self.summed:                        # layers the forward never reached: zero gradient
            starts = {name for name, _ in self.written}
            for entry in entries:
                if entry.module_name not in starts:
                    target[:, entry.slice] = 0
        self.target = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _batch_of_samples(conv: nn.Module, a: torch.Tensor, samples: int | None) -> bool:
    """Whether a convolution's input ``a`` is batched (an unbatched call lacks the batch dimension)
    and, unless ``samples`` is None (mini-batch rows), its batch is the ``samples`` samples (not,
    say, a sample's frames folded into the batch)."""
    return a.dim() == len(conv.kernel_size) + 2 and (samples is None or a.shape[0] == samples)


def gradient_bar(n: int, progress: bool) -> tqdm:
    """The "gradients" progress bar over ``n`` rows (pass it as ``progress`` to count several calls)."""
    return tqdm(total=n, desc="gradients", leave=False, disable=not progress, dynamic_ncols=True)


def _collect_with_hooks(model, space, batches, rows, batch, chunk, progress, loss_fn=None,
                        on_checked=lambda: None) -> None:
    n = rows.shape[0]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)                   # only activation gradients are needed
    hooks = _LayerHooks(model, space, summed=batch > 1)
    device = rows.device
    accumulator = torch.zeros(1, space.numel, dtype=torch.float32, device=device) if batch > 1 else None
    filled = 0
    bar = progress if isinstance(progress, tqdm) else gradient_bar(n, progress)
    restore = contextlib.ExitStack()
    try:
        patch = restore.enter_context(layer_grads.explicit_attention(hooks.attention_modules, hooks.project))
        for x, y in _regroup(batches, batch if batch > 1 else chunk):
            x, y = x.to(device), y.to(device)
            if batch == 1:
                take = min(x.shape[0], n - filled)
                x, y = x[:take], y[:take]
                hooks.backward(model, x, y, rows[filled:filled + take], 1.0, space.entries, loss_fn)
            elif x.shape[0] < batch:
                break                               # a short last mini-batch would weigh rows unequally
            else:
                take = 1
                accumulator.zero_()
                for xs, ys in zip(x.split(chunk), y.split(chunk)):
                    hooks.backward(model, xs, ys, accumulator, float(batch), space.entries, loss_fn)
                rows[filled] = accumulator[0]
            if filled == 0:                     # against autograd of the modules' own forwards
                with patch.suspended():
                    _check_first_row(model, space, x[:1] if batch == 1 else x, y[:1] if batch == 1 else y,
                                     rows[0], chunk, loss_fn)
                on_checked()
            filled += take
            bar.update(take)
            if filled >= n:
                break
    finally:
        if bar is not progress:             # a bar of the caller's (pieces of a rank's rows) stays open
            bar.close()
        hooks.remove()
        restore.close()                     # the attention modules' own forwards
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
    _check_filled(filled, n, batch)


def _check_first_row(model, space, x, y, row, chunk, loss_fn=None) -> None:
    """Compare the first row with plain autograd, layer by layer; raise _HooksDisagree if off.
    A bfloat16/float16 row is off by its rounding (~0.4 %), hence the looser tolerance."""
    weights = space.weights()
    for w in weights:
        w.requires_grad_(True)
    reference = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        loss = summed_loss(loss_fn, model(xs), ys) / x.shape[0]
        for total, g in zip(reference, torch.autograd.grad(loss, weights, allow_unused=True)):
            if g is not None:
                total += g
    for w in weights:
        w.requires_grad_(False)
    tol = 1e-3 if row.dtype in (torch.float32, torch.float64) else 2e-2
    for entry, ref in zip(space.entries, reference):
        got = row[entry.slice].float()
        ref = ref.reshape(-1)
        off, scale = float((got - ref).norm()), float(ref.norm())
        if off > tol * scale + 1e-12:
            raise _HooksDisagree(f"layer {entry.module_name!r}: |difference| / |autograd| = "
                                 f"{off / max(scale, 1e-30):.2e}, tolerance {tol:.0e}")


# --- fallback: torch.func per-sample gradients of the whole model -----------------------------

def _collect_with_vmap(model, space, batches, rows, batch, chunk, progress, loss_fn=None) -> None:
    n = rows.shape[0]
    names = space.param_names()
    device = rows.device
    fixed = {k: v.detach() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
             if k not in names}
    weights = {k: w.detach() for k, w in zip(names, space.weights())}

    def loss(w: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **w}, (x,))
        return mean_loss(loss_fn, out, y)

    def one_sample_loss(w, x, y):
        return loss(w, x.unsqueeze(0), y.unsqueeze(0))

    per_sample_grads = _vmap_or_loop(grad(one_sample_loss))
    batch_grad = grad(loss)
    filled = 0
    bar = progress if isinstance(progress, tqdm) else gradient_bar(n, progress)
    try:
        for x, y in _regroup(batches, batch if batch > 1 else chunk):
            x, y = x.to(device), y.to(device)
            if batch == 1:
                take = min(x.shape[0], n - filled)
                g = per_sample_grads(weights, x[:take], y[:take])
            elif x.shape[0] < batch:
                break
            else:
                take = 1
                g = {k: v.unsqueeze(0) for k, v in batch_grad(weights, x, y).items()}
            for entry, name in zip(space.entries, names):
                rows[filled:filled + take, entry.slice] = g.pop(name).reshape(take, -1)
            filled += take
            bar.update(take)
            if filled >= n:
                break
    finally:
        if bar is not progress:             # a bar of the caller's (pieces of a rank's rows) stays open
            bar.close()
    _check_filled(filled, n, batch)


def _vmap_or_loop(sample_grad):
    """Per-sample gradients ``(weights, x (k, ...), y (k, ...)) -> {name: (k, ...)}``: ``sample_grad``
    vmapped over the samples, or, where vmap cannot run the model (torch's GRU and RNN kernels
    write their unbatched hidden state in place), ``sample_grad`` one sample at a time from then
    on: the same rows, slower; said once."""
    vmapped = vmap(sample_grad, in_dims=(None, 0, 0))
    looped = []

    def run(weights, x, y):
        if not looped:
            try:
                return vmapped(weights, x, y)
            except RuntimeError as err:
                looped.append(True)
                warnings.warn(PrunekitWarning(
                    f"torch.func.vmap cannot run the model ({str(err).splitlines()[0]}): per-sample gradients "
                    "one sample at a time, exact but slower; mini-batch rows (fisher_batch=8) avoid it"),
                    stacklevel=2)
        grads = [sample_grad(weights, xi, yi) for xi, yi in zip(x, y)]
        return {name: torch.stack([g[name] for g in grads]) for name in grads[0]}
    return run


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


def check_enough_samples(batches: Iterable, n: int) -> None:
    """Refuse, before any gradient, n per-sample rows from one pass over ``batches`` that holds
    fewer samples (where its size is known: ``data.loaders.samples_per_pass``)."""
    available = samples_per_pass(batches)
    if available is not None and available < n:
        raise OptionError(f"the training data holds {available} samples, {n} gradient rows of one sample asked: "
                          "lower fisher_samples or give more training images (mini-batch rows, fisher_batch > 1, "
                          "read the data pass after pass)", ("fisher_samples", "fisher_batch"))


def _check_filled(filled: int, n: int, batch: int) -> None:
    if filled < n:
        raise OptionError(f"the training data gave only {filled} gradient rows of {batch} sample(s), "
                          f"{n} asked: lower fisher_samples or fisher_batch, or give more training images",
                          ("fisher_samples", "fisher_batch"))


def _regroup(batches: Iterable, size: int):
    """Re-cut a stream of (x, y) batches into batches of exactly ``size`` (the last may be short)."""
    xs, ys, have = [], [], 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
        while have >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, have = [x_all[size:]], [y_all[size:]], have - size
    if have:
        yield torch.cat(xs), torch.cat(ys)
