"""Bytes a forward pass of the model holds per sample, measured on one example: what autograd
saves for the backward pass (the gradient phase of the memory plan) and what an inference pass
holds (the plan's judge, latency benchmarks)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import attention_explicit, layer_grads


def activation_bytes(model: nn.Module, example: torch.Tensor | tuple, prunable: list[nn.Module],
                      batch_statistics: bool = False, attention: list[nn.Module] = (),
                      hooked: dict[nn.Module, int] | None = None, summed: bool = False) -> int:
    """Bytes kept for the backward pass per sample: every tensor autograd saves, and the inputs
    of the prunable layers (which the gradient hooks keep), each storage counted once. Measured
    on a forward of the first sample of ``example`` (a batch or a tuple of batched inputs) in
    eval mode with the weights frozen, as the collector runs it; on two copies of that sample,
    halved, with ``batch_statistics`` (BatchNorm on batch statistics, fisher_bn="batch": one
    sample has no spread) or ``hooked`` (a layer whose input's first dimension is 1 whatever the
    batch, e.g. a Linear on a learned (1, T, E) table, passes the collector's test for one sample
    but not for its chunk of several). ``attention``: attention modules that run their explicit
    forward (``attention_explicit.explicit_attention``) as the collector runs them, their projections'
    inputs kept. ``hooked``: {layer: sample dimension} of the layers whose calls the per-layer
    collector tests (``fisher_hooks.hooked_layers``); each of their calls, and each attention
    projection, gets the collector's own test (``layer_grads.call_mismatch``, for the two samples,
    or for mini-batch rows with ``summed``) and a call that fails it raises
    ``layer_grads.CallUnsupported``: the collector would fall back to the vmap path."""
    from .fisher import batchnorm_on_batch_statistics      # the collector's own mode, not a copy
    device = next(model.parameters()).device
    copies = 2 if batch_statistics or hooked is not None else 1
    inputs = tuple(torch.cat([x[:1]] * copies).to(device)
                   for x in (example if isinstance(example, (tuple, list)) else (example,)))
    inputs = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in inputs)
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, nn.Parameter) and tensor.requires_grad is not None:
            keep(tensor)
        return tensor

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    samples = None if summed else copies
    checked = hooked or {}

    def test(reason: str | None) -> None:
        if reason is not None:
            raise layer_grads.CallUnsupported(reason)

    def probe(module, args, out) -> None:
        if module in checked:
            test(layer_grads.call_mismatch(module, args[0], samples, checked[module]))
        keep(args[0])

    handles = [m.register_forward_hook(probe) for m in prunable]
    was_training = model.training
    model.eval()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        mode = batchnorm_on_batch_statistics(model) if batch_statistics else contextlib.nullcontext()
        def project(module, which, a, weight, bias, rows):
            if hooked is not None:
                test(layer_grads.projection_mismatch(a, samples))
            keep(a)
            return F.linear(a, weight, bias)
        with mode, attention_explicit.explicit_attention(attention, project), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(*inputs)
    finally:
        model.train(was_training)
        for p, requires_grad in frozen:
            p.requires_grad_(requires_grad)
        for handle in handles:
            handle.remove()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    parameters |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    return sum(size for ptr, size in storages.items() if ptr not in parameters) // copies


@torch.no_grad()
def inference_bytes(model: nn.Module, example: torch.Tensor | tuple) -> tuple[int, int]:
    """(bytes of one sample's inputs, bytes of the largest module output for one sample), from a
    forward pass of the first sample of ``example`` in eval mode without autograd."""
    device = next(model.parameters()).device
    inputs = tuple(x[:1].to(device) for x in (example if isinstance(example, (tuple, list)) else (example,)))
    largest = [0]

    def measure(module, args, out) -> None:
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor):
                largest[0] = max(largest[0], tensor.nbytes)

    handles = [m.register_forward_hook(measure) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        model(*inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return sum(x.nbytes for x in inputs), largest[0]
