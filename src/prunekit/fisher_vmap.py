"""Gradient rows by torch.func over the whole model: per-sample gradients vmapped over the
samples (or one sample at a time where vmap cannot run the model), mini-batch gradients by
``grad``. The fallback of ``fisher_hooks``: slower, chunk × p extra memory, any model."""

from __future__ import annotations


import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .errors import PrunekitWarning
from .fisher_batches import check_filled, gradient_bar, group_size, row_groups
from .losses import mean_loss
from .errors import warn as warn_ours


def collect_with_vmap(model, space, batches, rows, batch, chunk, progress, loss_fn=None) -> None:
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
        for group in row_groups(batches, batch, chunk):
            group = [(x.to(device), y.to(device)) for x, y in group]
            if batch == 1:
                (x, y), = group
                take = min(x.shape[0], n - filled)
                g = per_sample_grads(weights, x[:take], y[:take])
            elif group_size(group) < batch:
                break
            else:
                take = 1
                g = {k: v.unsqueeze(0) for k, v in _mini_batch_grad(batch_grad, weights, group).items()}
            for entry, name in zip(space.entries, names):
                rows[filled:filled + take, entry.slice] = g.pop(name).reshape(take, -1)
            filled += take
            bar.update(take)
            if filled >= n:
                break
    finally:
        if bar is not progress:             # a bar of the caller's (pieces of a rank's rows) stays open
            bar.close()
    check_filled(filled, n, batch)


def _mini_batch_grad(batch_grad, weights: dict, group: list) -> dict:
    """The gradient of the mean loss over the samples of ``group``'s (x, y) pieces: ``batch_grad``
    of the one piece, or the pieces' gradients (of their own mean loss) weighed by their share of
    the samples (pieces of different shapes, ``fisher_batches.regroup``)."""
    if len(group) == 1:
        return batch_grad(weights, *group[0])
    total = group_size(group)
    out: dict = {}
    for x, y in group:
        for name, g in batch_grad(weights, x, y).items():
            part = g * (x.shape[0] / total)
            out[name] = out[name] + part if name in out else part
    return out


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
                warn_ours(PrunekitWarning(
                    f"torch.func.vmap cannot run the model ({str(err).splitlines()[0]}): per-sample gradients "
                    "one sample at a time, exact but slower; mini-batch rows (fisher_batch=8) avoid it"))
        grads = [sample_grad(weights, xi, yi) for xi, yi in zip(x, y)]
        return {name: torch.stack([g[name] for g in grads]) for name in grads[0]}
    return run
