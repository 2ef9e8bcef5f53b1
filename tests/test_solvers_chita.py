"""CHITA: backsolve against dense closed forms, IHT against brute force, budgets and memory."""

import functools
import importlib
import itertools
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.errors import PrunekitError
from prunekit.solvers.backsolve import backsolve, backsolve_blockwise
from prunekit.solvers.chita import chita
from prunekit.solvers.iht import iht
from prunekit.solvers.quadratic import QuadraticModel
from prunekit.solvers.swap_search import swap_search
from closeness import assert_close_to_scale
from peak_memory import fixed_mmap_threshold

F64 = torch.float64


def _instance(seed: int):
    """A tiny random problem: p ≤ 16, n ≤ 8, k ≤ 6, gradient-like X (a shared direction plus
    noise), ridge log-uniform in [1e-3, 1], a first-order term on odd seeds."""
    gen = torch.Generator().manual_seed(seed)
    p = int(torch.randint(6, 17, (1,), generator=gen))
    n = int(torch.randint(2, 9, (1,), generator=gen))
    k = int(torch.randint(1, min(6, p - 1) + 1, (1,), generator=gen))
    ridge = 10 ** float(torch.empty(1).uniform_(-3, 0, generator=gen))
    shared = torch.randn(p, generator=gen, dtype=F64)
    X = torch.randn(n, p, generator=gen, dtype=F64) + shared * float(torch.rand(1, generator=gen))
    w_bar = torch.randn(p, generator=gen, dtype=F64)
    g = torch.randn(p, generator=gen, dtype=F64) * 0.1 if seed % 2 else None
    return QuadraticModel(X, w_bar, ridge, g), k


SHAPES = [(2, 2), (3, 2), (2, 3), (2, 4), (3, 3)]       # (inputs d, hidden h): p = dh + 2h ≤ 16


@functools.lru_cache(maxsize=1)
def _trained_networks(count: int = 200):
    """``count`` tiny trained networks, trained together (zero-padded to 3 inputs, 4 hidden units).

    Network s: a tanh MLP x ↦ W₂ᵀtanh(W₁ᵀx) (d inputs, h hidden units, 2 classes, no biases)
    trained by 300 steps of gradient descent on the cross-entropy of 64 Gaussian points labelled
    by a random linear teacher, 20% of the labels flipped. Returns per network (w̄ (p,), the
    per-sample gradients at w̄ (64, p)).
    """
    shapes, xs, targets, W1s, W2s = [], [], [], [], []
    for seed in range(count):
        gen = torch.Generator().manual_seed(10_000 + seed)
        d, h = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=gen))]
        x = torch.zeros(64, 3, dtype=F64)
        x[:, :d] = torch.randn(64, d, generator=gen, dtype=F64)
        labels = (x[:, :d] @ torch.randn(d, 2, generator=gen, dtype=F64)).argmax(1)
        labels = torch.where(torch.rand(64, generator=gen) < 0.2, 1 - labels, labels)
        W1, W2 = torch.zeros(3, 4, dtype=F64), torch.zeros(4, 2, dtype=F64)
        W1[:d, :h] = torch.randn(d, h, generator=gen, dtype=F64) / d ** 0.5
        W2[:h] = torch.randn(h, 2, generator=gen, dtype=F64) / h ** 0.5
        shapes.append((d, h))
        xs.append(x)
        targets.append(torch.nn.functional.one_hot(labels, 2).to(F64))
        W1s.append(W1)
        W2s.append(W2)
    x, target, W1, W2 = torch.stack(xs), torch.stack(targets), torch.stack(W1s), torch.stack(W2s)
    mask1, mask2 = W1 != 0, W2 != 0                                      # the real weights

    def backward(W1, W2):                  # hidden units; cross-entropy gradients at the outputs
        hidden = torch.tanh(x @ W1)
        dz = torch.softmax(hidden @ W2, 2) - target
        return hidden, dz, (dz @ W2.transpose(1, 2)) * (1 - hidden ** 2)

    for _ in range(300):
        hidden, dz, da = backward(W1, W2)
        W1 = W1 - 0.5 / 64 * (x.transpose(1, 2) @ da) * mask1
        W2 = W2 - 0.5 / 64 * (hidden.transpose(1, 2) @ dz) * mask2
    hidden, dz, da = backward(W1, W2)
    g1, g2 = x[..., None] * da[:, :, None, :], hidden[..., None] * dz[:, :, None, :]   # per sample
    return [(torch.cat([W1[b, :d, :h].flatten(), W2[b, :h].flatten()]),
             torch.cat([g1[b, :, :d, :h].flatten(1), g2[b, :, :h].flatten(1)], 1))
            for b, (d, h) in enumerate(shapes)]


def _network_instance(seed: int):
    """A trained network's problem (see _trained_networks): X holds the per-sample gradients of
    n ≤ 8 of its training points, ridge 1e-3..1e-1 times their mean square, the mean gradient
    as first-order term on odd seeds; k ≤ 6."""
    w_bar, grads = _trained_networks()[seed]
    gen = torch.Generator().manual_seed(20_000 + seed)
    p = w_bar.numel()
    n = int(torch.randint(2, 9, (1,), generator=gen))
    k = int(torch.randint(1, min(6, p - 1) + 1, (1,), generator=gen))
    X = grads[torch.randperm(64, generator=gen)[:n]]
    ridge = float((X * X).mean()) * 10 ** float(torch.empty(1).uniform_(-3, -1, generator=gen))
    g = X.mean(0) if seed % 2 else None
    return QuadraticModel(X, w_bar, ridge, g), k


def _dense_hessian(q: QuadraticModel) -> torch.Tensor:
    return q.X.T @ q.X / q.n + q.ridge * torch.eye(q.p, dtype=q.X.dtype)


def _dense_backsolve(q: QuadraticModel, support: torch.Tensor) -> torch.Tensor:
    """argmin ½δᵀHδ + gᵀδ (δ = w − w̄) with w = 0 off the support, by a dense p×p solve."""
    H = _dense_hessian(q)
    g = torch.zeros(q.p, dtype=F64) if q.linear is None else q.linear
    S, R = support.nonzero().squeeze(1), (~support).nonzero().squeeze(1)
    delta = -q.w_bar.clone()
    delta[S] = torch.linalg.solve(H[S][:, S], -g[S] + H[S][:, R] @ q.w_bar[R])
    return q.w_bar + delta


def _brute_force(q: QuadraticModel, k: int) -> float:
    """min Q over all supports of size k, each solved densely (batched over supports)."""
    H = _dense_hessian(q)
    g = torch.zeros(q.p, dtype=F64) if q.linear is None else q.linear
    S = torch.tensor(list(itertools.combinations(range(q.p), k)))             # (C, k)
    on = torch.zeros(len(S), q.p, dtype=torch.bool).scatter_(1, S, True)
    delta = torch.where(on, 0.0, -q.w_bar)                                      # δ off the support
    rhs = torch.gather(-(g + delta @ H), 1, S)
    delta = delta.scatter(1, S, torch.linalg.solve(H[S[:, :, None], S[:, None, :]], rhs))
    return (0.5 * ((delta @ H) * delta).sum(1) + delta @ g).min().item()


def _mask(p, index):
    mask = torch.zeros(p, dtype=torch.bool)
    mask[list(index)] = True
    return mask


# --- backsolve ---------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 4, 7, 11])        # n = 7: both the k×k and the Woodbury side
@pytest.mark.parametrize("linear", [False, True])
def test_backsolve_equals_dense_closed_form(size, linear):
    gen = torch.Generator().manual_seed(size)
    X, w_bar = torch.randn(7, 12, generator=gen, dtype=F64), torch.randn(12, generator=gen, dtype=F64)
    g = torch.randn(12, generator=gen, dtype=F64) if linear else None
    q = QuadraticModel(X, w_bar, 0.05, g)
    support = _mask(12, torch.randperm(12, generator=gen)[:size].tolist())
    w = backsolve(q, support)
    assert_close_to_scale(w, _dense_backsolve(q, support), rel=1e-9)
    assert not w[~support].any()


def test_backsolve_is_stationary_on_the_support():
    q, _ = _instance(3)
    support = _mask(q.p, range(0, q.p, 2))
    w = backsolve(q, support)
    scale = q.gradient(torch.zeros_like(w)).abs().max()     # the gradient's size away from the optimum
    assert q.gradient(w)[support].abs().max() < 1e-10 * scale


def test_backsolve_float32_is_close_to_float64():
    q, _ = _instance(5)
    q32 = QuadraticModel(q.X.float(), q.w_bar.float(), q.ridge, None if q.linear is None else q.linear.float())
    support = _mask(q.p, range(q.p // 2))
    w32 = backsolve(q32, support)
    assert w32.dtype == torch.float32
    assert_close_to_scale(w32.double(), backsolve(q, support), rel=1e-4)


def test_blockwise_is_exact_with_one_block_and_block_diagonal_otherwise():
    q, _ = _instance(7)
    support = _mask(q.p, range(1, q.p, 3))
    assert_close_to_scale(backsolve_blockwise(q, support, q.p), backsolve(q, support), rel=1e-9)
    block = 4
    w = backsolve_blockwise(q, support, block)
    for start in range(0, q.p, block):                # each block is its own exact problem
        cols = slice(start, start + block)
        own = QuadraticModel(q.X[:, cols], q.w_bar[cols], q.ridge,
                             None if q.linear is None else q.linear[cols])
        assert_close_to_scale(w[cols], _dense_backsolve(own, support[cols]), rel=1e-9)


# --- IHT and CHITA -------------------------------------------------------------------------------

def _iht_once_per_problem(monkeypatch) -> None:
    """Within a test, chita's IHT runs once per (problem, k, options): the call with and the
    call without the swap search get the same (deterministic) IHT result, computed once. IHT is
    most of chita's time on these tiny problems, so this halves the brute-force tests."""
    module = importlib.import_module("prunekit.solvers.chita")
    cache: dict = {}

    def iht_once(q, k, **options):
        key = (id(q), k, tuple(sorted(options.items())))
        if key not in cache:
            cache.clear()                                # one problem at a time
            cache[key] = (q, iht(q, k, **options))       # q kept alive: its id stays its own
        return cache[key][1]

    monkeypatch.setattr(module, "iht", iht_once)


def _rates_against_brute_force(family, monkeypatch) -> tuple[int, int, int]:
    """Over 200 instances: how often chita (with its swap search), IHT + backsolve (chita
    without it) and magnitude + backsolve reach the brute-force optimum (to 1e-6 relative).
    Checks on every instance that chita is never worse than the other two."""
    _iht_once_per_problem(monkeypatch)
    optimal = iht_optimal = magnitude_optimal = 0
    for seed in range(200):
        q, k = family(seed)
        best = _brute_force(q, k)
        found = chita(q, k, "iht").objective
        without = chita(q, k, "iht", swap_rounds=0).objective
        magnitude = chita(q, k, "backsolve").objective
        assert found >= best - 1e-9 * abs(best)          # the brute force is a lower bound
        assert found <= without + 1e-12 * abs(without)
        assert without <= magnitude + 1e-12 * abs(magnitude)
        optimal += found <= best + 1e-6 * abs(best)
        iht_optimal += without <= best + 1e-6 * abs(best)
        magnitude_optimal += magnitude <= best + 1e-6 * abs(best)
    return optimal, iht_optimal, magnitude_optimal


def test_chita_against_brute_force(monkeypatch):
    """Measured over these 200 instances, optimum reached by: chita 190 (95%); IHT + backsolve
    (no swap search) 58 (29%); magnitude + backsolve 36 (18%). These are hard instances (n < p,
    strongly correlated columns, w̄ as large as the noise, ridge down to 1e-3); IHT, a local
    method, often stops at another support, and the swap search moves it to the optimum."""
    optimal, iht_optimal, magnitude_optimal = _rates_against_brute_force(_instance, monkeypatch)
    assert optimal >= 185
    assert iht_optimal >= 50
    assert iht_optimal > magnitude_optimal


def test_chita_against_brute_force_on_trained_networks(monkeypatch):
    """The same on tiny trained networks' per-sample gradients. Measured: chita 195 (97.5%);
    IHT + backsolve 57 (28.5%); magnitude + backsolve 30 (15%)."""
    optimal, iht_optimal, magnitude_optimal = _rates_against_brute_force(_network_instance, monkeypatch)
    assert optimal >= 190
    assert iht_optimal >= 50
    assert iht_optimal > magnitude_optimal


@pytest.mark.parametrize("seed", [0, 3, 4, 9, 12, 21])       # both k ≤ n and k > n (Woodbury) problems
def test_swap_search_ends_at_a_local_minimum(seed):
    """With every weight a candidate and rounds to spare, no single swap lowers the backsolve
    objective of the result, which is never worse than its start and keeps the support size."""
    q, _ = _instance(seed)
    for k in sorted({2, q.n, q.n + 2} & set(range(1, q.p))):
        start = _mask(q.p, q.w_bar.abs().topk(k, largest=False).indices.tolist())   # a poor start
        s = swap_search(q, start, rounds=100, candidates=q.p, kicks=0)
        start_objective = q.objective(backsolve(q, start))
        assert s.objective <= start_objective + 1e-12 * abs(start_objective)
        assert int(s.mask.sum()) == k
        assert_close_to_scale(s.w, backsolve(q, s.mask), rel=1e-9)       # the updated solve is exact
        assert s.objective == pytest.approx(q.objective(s.w), rel=1e-10)
        inside, outside = s.mask.nonzero().squeeze(1).tolist(), (~s.mask).nonzero().squeeze(1).tolist()
        for i, j in itertools.product(inside, outside):
            swapped = s.mask.clone()
            swapped[i], swapped[j] = False, True
            assert q.objective(backsolve(q, swapped)) >= s.objective - 1e-9 * abs(s.objective)


@pytest.mark.parametrize("seed", range(6))
def test_one_swap_round_makes_the_best_single_swap(seed):
    """The swap scores are the exact changes of the objective: one round allowed one swap finds
    the best of all single swaps."""
    q, _ = _instance(seed)
    for k in sorted({2, q.n + 1} & set(range(1, q.p))):
        start = _mask(q.p, range(k))
        s = swap_search(q, start, rounds=1, candidates=q.p, max_swaps=1, kicks=0)
        best = q.objective(backsolve(q, start))
        for i, j in itertools.product(range(k), range(k, q.p)):
            swapped = start.clone()
            swapped[i], swapped[j] = False, True
            best = min(best, q.objective(backsolve(q, swapped)))
        assert s.objective == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("block_size", [None, 16])
def test_chita_swaps_never_hurt_in_float32(linear, block_size):
    """Larger float32 problems, in both backsolve regimes: chita is never worse than without its
    swap search (nor than magnitude + backsolve), and its w is the backsolve on its support."""
    gen = torch.Generator().manual_seed(1)
    n, p = 40, 300
    X = torch.randn(n, p, generator=gen) + torch.randn(p, generator=gen)
    g = torch.randn(p, generator=gen) * 0.1 if linear else None
    q = QuadraticModel(X, torch.randn(p, generator=gen), 1e-2, g)
    for k in (10, 120):
        found = chita(q, k, block_size=block_size)
        without = chita(q, k, block_size=block_size, swap_rounds=0)
        assert found.objective <= without.objective
        assert found.objective <= chita(q, k, "backsolve", block_size=block_size).objective
        assert found.support_size <= k and found.objective == pytest.approx(q.objective(found.w), rel=1e-9)
        if block_size is None:
            assert found.objective < without.objective               # it does find better supports
            assert_close_to_scale(found.w, backsolve(q, found.mask), rel=1e-3)


def test_iht_never_increases_the_objective():
    for seed in range(20):
        q, k = _instance(seed)
        start = torch.where(_mask(q.p, q.w_bar.abs().topk(k).indices.tolist()), q.w_bar, 0)
        for active_set in (True, False):
            assert iht(q, k, active_set=active_set).objective <= q.objective(start) + 1e-12


def test_chita_reports_its_counters():
    q, k = _instance(11)
    s = chita(q, k)
    assert s.support_size <= k and s.seconds >= 0
    for key in ("iterations", "exact_steps", "line_searches", "objective_evals",
                "active_set_rounds", "magnitude_objective", "iht_objective", "swap_rounds", "swaps",
                "swap_trials", "swap_starts", "swap_kicks", "swap_objective"):
        assert key in s.info
    assert s.objective == pytest.approx(q.objective(s.w), rel=1e-12)


def test_polish_is_coordinate_descent_on_the_support():
    q, k = _instance(4)
    plain, polished = iht(q, k, max_iter=2), iht(q, k, max_iter=2, polish=50)
    assert torch.equal(plain.mask | polished.mask, plain.mask)       # same or smaller support
    assert polished.objective <= plain.objective + 1e-12
    assert polished.objective == pytest.approx(q.objective(backsolve(q, polished.mask)), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), p=st.integers(1, 30), k=st.integers(0, 35), seed=st.integers(0, 10_000),
       active_set=st.booleans(), variant=st.sampled_from(["iht", "backsolve"]),
       block_size=st.sampled_from([None, 3]), polish=st.integers(0, 1), swap_rounds=st.sampled_from([0, 10]))
def test_support_never_exceeds_k(n, p, k, seed, active_set, variant, block_size, polish, swap_rounds):
    gen = torch.Generator().manual_seed(seed)
    q = QuadraticModel(torch.randn(n, p, generator=gen), torch.randn(p, generator=gen), 1e-2)
    for s in (iht(q, k, active_set=active_set, polish=polish),
              chita(q, k, variant, block_size=block_size, active_set=active_set, swap_rounds=swap_rounds)):
        assert s.support_size == int((s.w != 0).sum()) <= k
        assert s.w.dtype == torch.float32 and s.w.shape == (p,)
        assert math.isfinite(s.objective)


def test_k_at_least_p_gives_the_unconstrained_minimiser():
    q, _ = _instance(2)
    full = _dense_backsolve(q, torch.ones(q.p, dtype=torch.bool))
    assert_close_to_scale(iht(q, q.p + 3).w, full, rel=1e-5)      # float32 results
    assert_close_to_scale(chita(q, q.p).w, full, rel=1e-5)


def test_bad_arguments():
    q, _ = _instance(0)
    with pytest.raises(PrunekitError):
        chita(q, -1)
    with pytest.raises(PrunekitError):
        chita(q, 2, variant="lasso")
    with pytest.raises(PrunekitError):
        iht(q, 2, w0=torch.zeros(q.p + 1))
    with pytest.raises(PrunekitError):
        backsolve_blockwise(q, q.w_bar != 0, 0)
    with pytest.raises(PrunekitError):
        chita(q, 2, swap_candidates=0)
    with pytest.raises(PrunekitError):
        chita(q, 2, swap_rounds=-1)


def test_memory_stays_linear_in_p():
    """p = 2,000,000 (p² would be 16 TB): a few IHT steps, a backsolve and a few swap rounds
    stay under 1 GB beyond the 128 MB of X. Peak resident memory is read in a fresh process."""
    script = textwrap.dedent("""
        import torch
        from prunekit.process_memory import peak_usage
        from prunekit.solvers.backsolve import backsolve
        from prunekit.solvers.iht import iht
        from prunekit.solvers.swap_search import swap_search
        from prunekit.solvers.quadratic import QuadraticModel
        gen = torch.Generator().manual_seed(0)
        q = QuadraticModel(torch.randn(16, 2_000_000, generator=gen),
                           torch.randn(2_000_000, generator=gen), 1e-3)
        before = peak_usage()
        s = iht(q, 100_000, max_iter=3)
        w = backsolve(q, s.mask)
        assert int((w != 0).sum()) <= 100_000
        assert swap_search(q, s.mask, rounds=3).support_size <= 100_000
        print((peak_usage() - before) / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=fixed_mmap_threshold())
    assert float(out.stdout.split()[-1]) < 1024


def _tiny_fisher_problem(seed: int, exponent: int, duplicate: bool):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 40, generator=g) * 2.0**exponent
    if duplicate:
        X[:, 1::2] = X[:, 0:1]
    w = torch.randn(40, generator=g)
    return X, w, 1e-4 * float((X.double() ** 2).mean())       # the relative ridge's value


def test_iht_keeps_k_nonzeros_when_the_curvature_underflows():
    """A Fisher of 2^-140 in float32: ‖Xd‖² underflowed to 0, the exact step τ = ‖d‖²/(λ‖d‖²) came
    out 1e46, beyond float32, and w − τd made inf·0 = NaN in every weight off the support, which
    the objective test (NaN >= f is False) accepted: 8 nonzeros for k = 5, 40 for k = 35."""
    from prunekit.solvers.iht import iht
    X, w, ridge = _tiny_fisher_problem(0, -70, False)
    for k in (5, 20, 35):
        found = iht(QuadraticModel(X, w, ridge), k)
        assert int((found.w != 0).sum()) <= k and bool(torch.isfinite(found.w).all()), k
        assert math.isfinite(found.objective)


def test_chita_never_keeps_more_than_k_on_degenerate_problems():
    """Property over many random degenerate problems: zero rows, duplicate or zero columns, no
    curvature but the ridge, integer ties, all-equal weights, Fishers of 2^-120 to 2^-140. CHITA
    returns at most k nonzeros, all finite, or refuses a singular model in one line; never more."""
    checked = refused = 0
    for seed in range(32):          # every kind (seed % 8) with every ridge (seed % 3), 4 problems each
        g = torch.Generator().manual_seed(seed)
        kind = seed % 8
        n, p = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(2, 14, (1,), generator=g))
        X = torch.randn(n, p, generator=g)
        w = torch.randn(p, generator=g).round()
        ridge = [1e-12, 1e-6, 1e-3][seed % 3]
        if kind == 0:
            X[torch.rand(n, generator=g) < 0.5] = 0                  # zero rows
        elif kind == 1:
            X[:, 1::2] = X[:, 0:1]                                   # duplicate columns
        elif kind == 2:
            X.zero_()                                                # the ridge alone
        elif kind == 3:
            X = X.round()                                            # ties
        elif kind == 4:
            X[:, : p // 2] = 0                                       # zero columns
            w.fill_(0.5)                                             # all weights equal
        elif kind in (5, 6, 7):
            X, w, ridge = _tiny_fisher_problem(seed, [-60, -65, -70][kind - 5], seed % 2 == 0)
            p = w.numel()
        for k in sorted({0, 1, p // 2, p - 1, p}):
            for variant in ("backsolve", "iht"):
                try:
                    sol = chita(QuadraticModel(X.clone(), w.clone(), ridge), k, variant)
                except PrunekitError as error:
                    assert "singular" in str(error) and "\n" not in str(error)
                    refused += 1
                    continue
                checked += 1
                assert int((sol.w != 0).sum()) <= k, (seed, kind, k, variant)
                assert sol.support_size <= k and bool(torch.isfinite(sol.w).all()), (seed, kind, k, variant)
    assert checked > 10 * max(refused, 1), (checked, refused)
