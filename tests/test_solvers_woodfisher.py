"""WoodFisher: the OBS steps are exact constrained minimisers; the budget is met exactly."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.solvers.woodfisher import woodfisher
from prunekit.solvers.quadratic import QuadraticModel
from closeness import assert_close_to_scale

F64 = torch.float64
DAMP = 0.1


def _problem(n=5, p=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=gen, dtype=F64), torch.randn(p, generator=gen, dtype=F64)


def _fisher(X):
    return X.T @ X / X.shape[0] + DAMP * torch.eye(X.shape[1], dtype=X.dtype)


def _constrained_minimiser(F, w_bar, zero):
    """argmin ½(w − w̄)ᵀF(w − w̄) subject to w = 0 on ``zero`` (bool), by a dense solve."""
    Z, R = zero.nonzero().squeeze(1), (~zero).nonzero().squeeze(1)
    w = torch.zeros_like(w_bar)
    w[R] = w_bar[R] + torch.linalg.solve(F[R][:, R], F[R][:, Z] @ w_bar[Z])
    return w


@pytest.mark.parametrize("n", [3, 12])                 # Woodbury (B > n) and direct inverse
def test_single_removal_is_the_exact_constrained_minimiser(n):
    X, w_bar = _problem(n=n)
    F = _fisher(X)
    s = woodfisher(X, w_bar, k=9, block_size=10, damp=DAMP, steps=1)
    removed = (s.w == 0).nonzero().squeeze(1)
    assert removed.numel() == 1
    costs = []                                        # exact increase of the model per weight
    for i in range(10):
        w = _constrained_minimiser(F, w_bar, torch.arange(10) == i)
        costs.append((0.5 * (w - w_bar) @ F @ (w - w_bar)).item())
        if i == removed.item():
            assert_close_to_scale(s.w, w, rel=1e-10)
    assert removed.item() == min(range(10), key=costs.__getitem__)   # OBS saliency = exact cost


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_rounds_give_the_block_diagonal_minimiser_on_the_kept_weights(steps):
    X, w_bar = _problem(n=4, p=11, seed=steps)
    s = woodfisher(X, w_bar, k=4, block_size=4, damp=DAMP, steps=steps)
    assert s.support_size == 4 and s.iterations == steps
    for start in range(0, 11, 4):                     # each block: OBS removals are exact
        cols = slice(start, start + 4)
        expected = _constrained_minimiser(_fisher(X[:, cols]), w_bar[cols], s.w[cols] == 0)
        assert_close_to_scale(s.w[cols], expected, rel=1e-9)


@pytest.mark.parametrize("k", [0, 1, 6, 15, 16, 20])
@pytest.mark.parametrize("block_size", [1, 5, 16, 40])
def test_exactly_k_nonzeros(k, block_size):
    X, w_bar = _problem(n=6, p=16, seed=k + block_size)
    s = woodfisher(X.float(), w_bar.float(), k, block_size=block_size, damp=DAMP, steps=4)
    assert s.support_size == min(k, 16)
    assert s.w.dtype == torch.float32


def test_objective_is_the_full_quadratic():
    X, w_bar = _problem()
    s = woodfisher(X, w_bar, 5, block_size=3, damp=DAMP)
    assert s.objective == pytest.approx(QuadraticModel(X, w_bar, DAMP).objective(s.w), rel=1e-12)


def test_bad_arguments():
    X, w_bar = _problem()
    for kwargs in (dict(k=-1), dict(k=3, block_size=0), dict(k=3, steps=0)):
        with pytest.raises(PrunekitError):
            woodfisher(X, w_bar, **kwargs)


def test_a_ridge_near_float32s_smallest_prunes_exactly_and_finitely():
    """Gradients of a network with random weights can be so small that the relative ridge is
    denormal in float32 (MobileNetV1: 8e-39): F⁻¹ ~ 1/damp then overflowed float32, NaN spread
    through the OBS updates into pruned weights, and 250 more nonzeros than k came back. The
    blocks' inverses are kept scaled by damp (OBS's choices and updates do not change with a
    common scale of F⁻¹): exactly k nonzeros, all finite, the same weights as at a normal scale."""
    torch.manual_seed(0)
    n, p, k = 8, 512, 150
    X, w = torch.randn(n, p), torch.randn(p)
    damp, tiny_damp = 0.1, 1e-39                     # the same problem scaled: F_tiny = c² F
    tiny = woodfisher(X * (tiny_damp / damp) ** 0.5, w, k, block_size=128, damp=tiny_damp)
    normal = woodfisher(X, w, k, block_size=128, damp=damp)
    assert torch.isfinite(tiny.w).all() and int((tiny.w != 0).sum()) == k
    assert torch.equal(tiny.w != 0, normal.w != 0)
