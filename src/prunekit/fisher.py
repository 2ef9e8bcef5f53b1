"""Gradients for the empirical Fisher: the n x p matrix X whose rows are loss gradients at w̄.

Row i is either the gradient of the loss of one sample (``batch=1``, computed for many samples
at once with ``torch.func.vmap``) or the gradient of the mean loss over a mini-batch of
``batch`` samples. Only the prunable weights (a ``ParamSpace``) are differentiated. Rows are
written into one preallocated (n, p) tensor as they are computed, so memory is n·p·4 bytes
(float32) plus one chunk of per-sample gradients. The model is evaluated in eval mode
(BatchNorm uses its running statistics), so that per-sample gradients are well defined.
"""

from __future__ import annotations

import re
import warnings
from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .errors import PrunekitError, PrunekitWarning

# torch.func's notice for an operation without a batched (vmap) rule; it then loops over the
# samples, which is exact but slow. We say it once, in our words, after the gradients.
_NO_BATCH_RULE = re.compile(r"performance drop because we have not yet implemented the batching rule for (\S+?)\.")
from .params import ParamSpace


def collect_gradients(model: nn.Module, space: ParamSpace, batches: Iterable, n: int, batch: int = 1,
                      chunk: int = 64, dtype: torch.dtype = torch.float32,
                      progress: bool = True) -> torch.Tensor:
    """The (n, p) gradient matrix at the model's current weights.

    Args:
        batches: iterable of (x, y) training batches (any batch size); enough of them to give
            n·batch samples.
        n: number of rows (``--fisher-samples``).
        batch: samples averaged per row (``--fisher-batch``); 1 = per-sample gradients.
        chunk: per-sample gradients computed together (memory: chunk·p floats).
    """
    if n < 1 or batch < 1:
        raise PrunekitError(f"need n >= 1 gradient rows of batch >= 1 samples, got n={n}, batch={batch}")
    names = space.param_names()
    device = space.weights()[0].device
    fixed = {k: v.detach() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()
             if k not in names}
    weights = {k: w.detach() for k, w in zip(names, space.weights())}

    def loss(w: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **w}, (x,))
        return nn.functional.cross_entropy(out, y)

    def one_sample_loss(w, x, y):
        return loss(w, x.unsqueeze(0), y.unsqueeze(0))

    per_sample_grads = vmap(grad(one_sample_loss), in_dims=(None, 0, 0))
    batch_grad = grad(loss)

    rows = torch.empty(n, space.numel, dtype=dtype)
    filled = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc="gradients", leave=False, disable=not progress, dynamic_ncols=True)
    unbatched: set[str] = set()
    try:
        for x, y in _regroup(batches, batch if batch > 1 else chunk):
            x, y = x.to(device), y.to(device)
            if batch == 1:
                with _unbatched_ops(unbatched):
                    g = per_sample_grads(weights, x, y)
                block = torch.cat([g[k].reshape(x.shape[0], -1) for k in names], dim=1)
            elif x.shape[0] < batch:
                break                       # a short last mini-batch would weigh rows unequally
            else:
                g = batch_grad(weights, x, y)
                block = torch.cat([g[k].reshape(1, -1) for k in names], dim=1)
            take = min(block.shape[0], n - filled)
            rows[filled:filled + take] = block[:take].to(device="cpu", dtype=dtype)
            filled += take
            bar.update(take)
            if filled >= n:
                break
    finally:
        bar.close()
        model.train(was_training)
    if unbatched:
        warnings.warn(PrunekitWarning(
            f"per-sample gradients loop over the samples for {', '.join(sorted(unbatched))} (torch.func "
            "has no batched rule for it): exact but slower; mini-batch rows (--fisher-batch 8) avoid it"),
            stacklevel=2)
    if filled < n:
        raise PrunekitError(f"the training data gave only {filled} gradient rows of {batch} sample(s), "
                            f"{n} asked: lower --fisher-samples or --fisher-batch, or give more training images")
    return rows


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
