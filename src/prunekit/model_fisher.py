"""Gradient rows of the model's Fisher rather than the empirical one (``fisher_kind="model"``).

The empirical Fisher's row for a sample is the gradient of the loss at its label, Jᵀ(p − e_y)
(J: the (classes, p) Jacobian of the class scores, p: the softmax). A well-trained network is
confident on most training images, so most such rows are near zero and the few misclassified
images dominate XᵀX. The model's Fisher E_y~p[∇ log p(y) ∇ log p(y)ᵀ] = Jᵀ(diag p − p pᵀ)J (for
softmax cross-entropy also the Gauss-Newton matrix, the curvature of the KL divergence from the
dense model's predictions) weighs every image by its own predictive uncertainty instead.

Each row here is one draw of it: Jᵀv with v = A z, z ~ N(0, I), A = diag(√p) − p √pᵀ, so that
E[v vᵀ] = A Aᵀ = diag p − p pᵀ and E[XᵀX]/n is the model's Fisher. v is the gradient, with
respect to the scores, of the surrogate loss ⟨scores, v⟩ (v held constant), so both gradient
collectors (per-layer hooks and torch.func) compute these rows unchanged.

z is a function of a seed made from the sample's own bytes (and the run's seed), so a sample gets
the same z however the stream is chunked, re-read for the first-row check, or split between
ranks; it is computed with tensor operations only, so that torch.func.vmap runs the loss too.

A user's loss (``loss=``) has model rows when its curvature in the outputs is known in closed form
(``draw_loss``): ``nn.MSELoss()`` (per sample (1/d)·Σ(o − y)² over its d outputs, Hessian (2/d)·I:
v = √(2/d)·z) and ``nn.BCEWithLogitsLoss()`` (Hessian diag σ(o)(1 − σ(o))/d: v = √(σ(1 − σ)/d)·z),
both with their default mean reduction and no weights. Rows are then draws of the Gauss-Newton
matrix Jᵀ H J, which, unlike the gradient at the targets, does not vanish where the model fits.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .errors import PrunekitError
from .losses import class_scores

FISHER_KINDS = ("empirical", "model")

_PRIME = 1_000_003
_MODULUS = 2 ** 40        # digests stay below it, so every sum and product fits int64 exactly
_MERSENNE = 2 ** 31 - 1
_SLICE = 2 ** 16          # bytes hashed at a time: byte · weight < 2^28, a slice's sum < 2^44
_coefficients: dict[tuple[int, str], torch.Tensor] = {}


def draw_loss(loss_fn) -> Callable:
    """The surrogate loss whose per-sample gradients are draws of the model's Fisher (Gauss-Newton
    matrix) under ``loss_fn`` (None: the default cross-entropy); refused in one line for a loss
    whose output curvature is not known here (``supports``)."""
    if not supports(loss_fn):
        raise PrunekitError(refusal(loss_fn))
    if loss_fn is None:
        return output_direction_loss
    return squared_error_direction_loss if type(loss_fn) is nn.MSELoss else logistic_direction_loss


def supports(loss_fn) -> bool:
    """Whether ``draw_loss`` has model rows for ``loss_fn`` (None: the default cross-entropy).
    Exact types only: a subclass may compute something else."""
    if loss_fn is None:
        return True
    if type(loss_fn) is nn.MSELoss:
        return loss_fn.reduction == "mean"
    if type(loss_fn) is nn.BCEWithLogitsLoss:
        return loss_fn.reduction == "mean" and loss_fn.weight is None and loss_fn.pos_weight is None
    return False


def refusal(loss_fn) -> str:
    """The one-line refusal of fisher_kind model for a loss ``supports`` rejects."""
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    return (f"fisher_kind model knows the output curvature of the default cross-entropy, nn.MSELoss() and "
            f"nn.BCEWithLogitsLoss() (mean reduction, no weights), not of {name}: use fisher_kind empirical")


def with_sample_seeds(batches: Iterable, seed: int):
    """(x, seeds) for each (x, y) of ``batches``: the labels are replaced by one int64 seed per
    sample (B,), a function of the sample's bytes and ``seed`` only."""
    for x, _ in batches:
        yield x, sample_seeds(x, seed)


def sample_seeds(x: torch.Tensor, seed: int) -> torch.Tensor:
    """(B,) int64 seeds on x's device: an exact integer hash of each sample's bytes (no floating
    point, so the same whatever the batch or the device) mixed with ``seed``."""
    if not isinstance(x, torch.Tensor):
        raise PrunekitError(f"fisher_kind model needs each batch's inputs as one tensor, got {type(x).__name__}: "
                            "use fisher_kind empirical")
    flat = x.detach().reshape(x.shape[0], -1).contiguous().view(torch.uint8)
    weights = _hash_weights(flat.shape[1], flat.device)
    digest = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
    for start in range(0, flat.shape[1], _SLICE):      # bounded int64 temporaries for large inputs
        piece = flat[:, start:start + _SLICE].to(torch.int64)
        digest = (digest + (piece * weights[start:start + _SLICE]).sum(dim=1)) % _MODULUS
    return (digest * _PRIME + seed % _MODULUS) % _MODULUS


def _hash_weights(length: int, device: torch.device) -> torch.Tensor:
    key = (length, str(device))
    if key not in _coefficients:
        generator = torch.Generator().manual_seed(20260)
        _coefficients[key] = torch.randint(1, 2 ** 20, (length,), generator=generator, dtype=torch.int64).to(device)
    return _coefficients[key]


def output_direction_loss(outputs, seeds: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ⟨scores_i, v_i⟩, v_i = A_i z_i held constant (see the module's
    docstring), z_i = ``standard_normal(seeds)[i]``: its per-sample gradient is
    one draw of a row of the model's Fisher. ``outputs``: (B, classes) scores (or an output
    holding them, ``losses.class_scores``); ``seeds``: (B,) int64."""
    scores = class_scores(outputs)
    probs = torch.softmax(scores.detach().float(), dim=-1)
    noise = standard_normal(seeds, probs.shape[-1])
    root = probs.sqrt()
    direction = root * noise - probs * (root * noise).sum(dim=-1, keepdim=True)
    return (scores * direction.to(scores.dtype)).sum(dim=-1).mean()


def standard_normal(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) float32 standard normal numbers, a fixed function of the (B,) int64 ``seeds``
    (entry j of row i depends on seeds[i] and j only): a counter-based generator (integer mixing
    rounds modulo the Mersenne prime 2^31 − 1, exact in int64) then Box-Muller. Tensor operations
    only, on the seeds' device, so it runs under torch.func.vmap."""
    counter = torch.arange(2 * count, device=seeds.device, dtype=torch.int64)
    state = (seeds.unsqueeze(-1) % _MERSENNE) * 16807 + counter * 48271 + 1
    for _ in range(4):
        state = state % _MERSENNE
        state = state ^ (state >> 13)
        state = (state * 48271 + 11) % _MERSENNE
        state = state ^ (state >> 17)
    uniform = (state.to(torch.float64) + 0.5) / (_MERSENNE + 1)          # in (0, 1)
    first, second = uniform[..., :count], uniform[..., count:]
    return (torch.sqrt(-2 * torch.log(first)) * torch.cos(2 * torch.pi * second)).float()


def squared_error_direction_loss(outputs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """``nn.MSELoss()``'s draw: mean over the batch of ⟨o_i, √(2/d)·z_i⟩ (v held constant; o_i the
    sample's d outputs, any shape (B, ...)), whose per-sample gradient is a draw of (2/d)·JᵀJ."""
    flat = outputs.reshape(outputs.shape[0], -1)
    scale = (2.0 / flat.shape[1]) ** 0.5
    direction = scale * standard_normal(seeds, flat.shape[1])
    return (flat * direction.to(flat.dtype)).sum(dim=-1).mean()


def logistic_direction_loss(outputs: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """``nn.BCEWithLogitsLoss()``'s draw: mean over the batch of ⟨o_i, v_i⟩, v_i = √(σ(o)(1 − σ(o))/d)·z_i
    (held constant; o_i the sample's d logits, any shape (B, ...)): a draw of Jᵀ diag(σ(1 − σ))/d J."""
    flat = outputs.reshape(outputs.shape[0], -1)
    prob = torch.sigmoid(flat.detach().float())
    direction = (prob * (1 - prob) / flat.shape[1]).sqrt() * standard_normal(seeds, flat.shape[1])
    return (flat * direction.to(flat.dtype)).sum(dim=-1).mean()
