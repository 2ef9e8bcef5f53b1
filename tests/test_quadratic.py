"""QuadraticModel: value, gradient, products and Lipschitz constant against dense float64 math."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.solvers.quadratic import QuadraticModel, check_k, select_columns
from closeness import assert_close_to_scale

F64 = torch.float64


def _problem(n=6, p=11, seed=0, linear=True, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=gen, dtype=F64)
    w_bar = torch.randn(p, generator=gen, dtype=F64)
    g = torch.randn(p, generator=gen, dtype=F64) if linear else None
    return X.to(dtype), w_bar.to(dtype), 0.3, None if g is None else g.to(dtype)


def _dense_objective(X, w_bar, ridge, g, w):
    n = X.shape[0]
    delta = w - w_bar
    value = 0.5 * delta @ (X.T @ X / n) @ delta + ridge / 2 * delta @ delta
    return value + (0 if g is None else g @ delta)


@pytest.mark.parametrize("linear", [True, False])
def test_objective_and_gradient_match_autograd(linear):
    X, w_bar, ridge, g = _problem(linear=linear)
    q = QuadraticModel(X, w_bar, ridge, g)
    w = torch.randn(11, dtype=F64, requires_grad=True)
    expected = _dense_objective(X, w_bar, ridge, g, w)
    (autograd,) = torch.autograd.grad(expected, w)
    assert q.objective(w.detach()) == pytest.approx(expected.item(), rel=1e-12)
    assert_close_to_scale(q.gradient(w.detach()), autograd, rel=1e-12)


def test_gradient_matches_finite_differences():
    X, w_bar, ridge, g = _problem()
    q = QuadraticModel(X, w_bar, ridge, g)
    w = torch.randn(11, dtype=F64)
    eps = 1e-6
    numeric = torch.tensor([(q.objective(w + eps * e) - q.objective(w - eps * e)) / (2 * eps)
                            for e in torch.eye(11, dtype=F64)], dtype=F64)
    assert_close_to_scale(q.gradient(w), numeric, rel=1e-6)


def test_products_and_residual():
    X, w_bar, ridge, g = _problem()
    q = QuadraticModel(X, w_bar, ridge, g)
    v, r = torch.randn(11, dtype=F64), torch.randn(6, dtype=F64)
    assert_close_to_scale(q.matvec(v), X @ v, rel=1e-12)
    assert_close_to_scale(q.rmatvec(r), X.T @ r, rel=1e-12)
    assert_close_to_scale(q.residual(v), X @ (v - w_bar), rel=1e-12)
    assert q.objective(v, residual=q.residual(v)) == pytest.approx(q.objective(v), rel=1e-14)


@pytest.mark.parametrize("n,p", [(6, 11), (11, 6), (1, 5), (40, 40), (3, 200)])
def test_lipschitz_is_the_largest_eigenvalue(n, p):
    X, w_bar, ridge, _ = _problem(n, p, seed=n * p)
    q = QuadraticModel(X, w_bar, ridge)
    true = torch.linalg.eigvalsh(X.T @ X / n)[-1].item() + ridge
    assert true * (1 - 1e-3) <= q.lipschitz() <= true * (1 + 1e-9)
    assert q.lipschitz() is q.lipschitz()                     # cached


def test_lipschitz_with_clustered_spectrum():
    """Random X has nearly equal top eigenvalues, where plain power iteration stalls."""
    X = torch.randn(200, 2000, generator=torch.Generator().manual_seed(1), dtype=F64)
    true = torch.linalg.eigvalsh(X @ X.T / 200)[-1].item() + 0.01
    assert QuadraticModel(X, torch.zeros(2000, dtype=F64), 0.01).lipschitz() >= true * (1 - 1e-3)


def test_restrict_is_q_with_the_rest_held_at_zero():
    X, w_bar, ridge, g = _problem()
    q = QuadraticModel(X, w_bar, ridge, g)
    index = torch.tensor([0, 3, 4, 9])
    sub, constant = q.restrict(index)
    w = torch.zeros(11, dtype=F64)
    w[index] = torch.randn(4, dtype=F64)
    assert sub.objective(w[index]) + constant == pytest.approx(q.objective(w), rel=1e-12)
    assert_close_to_scale(sub.gradient(w[index]), q.gradient(w)[index], rel=1e-12)


def test_float32_stays_float32():
    X, w_bar, ridge, g = _problem(dtype=torch.float32)
    q = QuadraticModel(X, w_bar.double(), ridge, g)           # w̄ is cast to X's dtype
    assert q.w_bar.dtype == torch.float32
    assert q.gradient(q.w_bar).dtype == torch.float32
    assert q.residual(q.w_bar).dtype == torch.float32


@pytest.mark.parametrize("bad", [
    dict(grads=torch.randn(5)),                               # not 2-D
    dict(grads=torch.ones(3, 4, dtype=torch.int64)),          # not floating point
    dict(w_bar=torch.randn(5)),                               # wrong length
    dict(linear=torch.randn(3)),
    dict(ridge=0.0),
    dict(ridge=float("nan")),
])
def test_bad_inputs_name_the_fix(bad):
    args = dict(grads=torch.randn(3, 4), w_bar=torch.randn(4), ridge=0.1, linear=None) | bad
    with pytest.raises(PrunekitError):
        QuadraticModel(**args)


def test_check_k():
    assert check_k(3) == 3
    for bad in (-1, 2.5, "3", None):
        with pytest.raises(PrunekitError):
            check_k(bad)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_select_columns_of_a_slice_equals_indexing(dtype):
    # the stages' X is a column slice of a wider matrix: row stride > width
    wide = torch.randn(5, 30, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    X = wide[:, :17]
    index = torch.tensor([16, 0, 3, 3, 9])
    for matrix in (X, wide, X[:, 4:12]):
        picked = select_columns(matrix, index[index < matrix.shape[1]])
        assert picked.is_contiguous() and picked.dtype == dtype
        assert torch.equal(picked, matrix[:, index[index < matrix.shape[1]]])
