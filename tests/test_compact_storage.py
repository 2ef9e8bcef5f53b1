"""X stored in bfloat16/float16: every product accumulates in float32 or better, by column blocks.

The references are the same products in float64 on the *same* (rounded) matrix, so what is
tested is the accumulation, not the rounding of X itself (that is the benchmark's question)."""

import subprocess
import sys
import textwrap

import pytest
import torch

from prunekit.solvers.backsolve import backsolve
from prunekit.solvers.falcon import falcon
from prunekit.solvers.quadratic import QuadraticModel
from peak_memory import fixed_mmap_threshold


def problem(dtype, n=24, p=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = (torch.randn(n, p, generator=gen) * torch.logspace(-2, 1, p)).to(dtype)   # uneven columns
    w_bar = torch.randn(p, generator=gen)
    return X, w_bar


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_products_match_float64_on_the_same_matrix(dtype):
    X, w_bar = problem(dtype)
    q = QuadraticModel(X, w_bar, 1e-3)
    q.block_columns = 512                                  # several blocks, and a short last one
    ref = QuadraticModel(X.double(), w_bar.double(), 1e-3)
    assert q.dtype == torch.float32 and q.X.dtype == dtype
    v = torch.randn(q.p, generator=torch.Generator().manual_seed(1))
    r = torch.randn(q.n, generator=torch.Generator().manual_seed(2))
    assert rel(q.matvec(v), ref.matvec(v.double())) < 1e-5
    assert rel(q.rmatvec(r), ref.rmatvec(r.double())) < 1e-5
    support = torch.rand(q.p, generator=torch.Generator().manual_seed(3)) < 0.5
    A = X.double()[:, support]
    assert rel(q.gram(support), A @ A.t()) < 1e-5
    w = w_bar * support
    assert abs(q.objective(w) - ref.objective(w.double())) < 1e-5 * abs(ref.objective(w.double()))
    assert rel(q.gradient(w), ref.gradient(w.double())) < 1e-5
    assert abs(q.lipschitz() - ref.lipschitz()) < 1e-4 * ref.lipschitz()
    assert rel(q.hessian_diagonal(), ref.hessian_diagonal()) < 1e-5


@pytest.mark.parametrize("size", [10, 2000])                # primal (|S| <= n) and Woodbury (|S| > n)
def test_backsolve_on_compact_x_matches_float64(size):
    X, w_bar = problem(torch.bfloat16)
    linear = torch.randn(X.shape[1], generator=torch.Generator().manual_seed(4)) * 1e-2
    q = QuadraticModel(X, w_bar, 1e-2, linear)
    q.block_columns = 700
    ref = QuadraticModel(X.double(), w_bar.double(), 1e-2, linear.double())
    support = torch.zeros(q.p, dtype=torch.bool)
    support[torch.randperm(q.p, generator=torch.Generator().manual_seed(5))[:size]] = True
    w, w_ref = backsolve(q, support), backsolve(ref, support)
    assert w.dtype == torch.float32 and torch.equal(w != 0, support)
    assert rel(w, w_ref) < 1e-4
    assert abs(q.objective(w) - ref.objective(w_ref)) < 1e-4 * abs(ref.objective(w_ref))


def test_falcon_runs_on_compact_x_and_meets_the_budget():
    X, w_bar = problem(torch.bfloat16, n=16, p=800)
    costs = torch.randint(1, 10, (800,)).double()
    q = QuadraticModel(X, w_bar, 1e-2)
    solution = falcon(q, costs, 300, 0.25 * float(costs.sum()), variant="dfo")
    ref = falcon(QuadraticModel(X.double(), w_bar.double(), 1e-2), costs, 300, 0.25 * float(costs.sum()),
                 variant="magnitude")
    assert solution.support_size <= 300 and float(costs[solution.w != 0].sum()) <= 0.25 * float(costs.sum())
    assert solution.objective <= ref.objective * (1 + 1e-4)      # DFO never worse than its start


def test_backsolve_on_compact_x_makes_no_float32_copy_of_x_nor_of_x_s():
    """n = 64, p = 1,000,000 in bfloat16 (128 MB): a full float32 copy would be 256 MB and
    X_S for |S| = 800,000 in float32 205 MB; products and the backsolve stay under 64 MB extra."""
    script = textwrap.dedent("""
        import torch
        from prunekit.process_memory import peak_usage
        from prunekit.solvers.backsolve import backsolve
        from prunekit.solvers.quadratic import QuadraticModel
        n, p = 64, 1_000_000
        gen = torch.Generator().manual_seed(0)
        X = torch.empty(n, p, dtype=torch.bfloat16)
        for row in X:
            row.copy_(torch.randn(p, generator=gen))
        w_bar = torch.randn(p, generator=gen)
        support = torch.rand(p, generator=gen) < 0.8
        q = QuadraticModel(X, w_bar, 1e-3)
        before = peak_usage()
        w = backsolve(q, support)
        q.lipschitz(); q.hessian_diagonal(); q.objective(w)
        print((peak_usage() - before) / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=fixed_mmap_threshold())
    assert float(out.stdout.split()[-1]) < 64
