"""Magnitude baselines: exact counts, brute force on tiny problems, budgets always met."""

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from peak_memory import fixed_mmap_threshold
from prunekit.solvers import magnitude as magnitude_module
from prunekit.solvers.magnitude import fit_k_to_macs, magnitude_flops, magnitude_global, magnitude_uniform


def test_global_keeps_the_k_largest():
    w = torch.tensor([0.1, -3.0, 2.0, -0.5, 0.0, 1.0])
    assert magnitude_global(w, 3).tolist() == [False, True, True, False, False, True]
    assert magnitude_global(w, 0).sum() == 0


def test_uniform_keeps_the_same_share_of_every_layer():
    torch.manual_seed(0)
    w = torch.randn(100)
    slices = [slice(0, 10), slice(10, 40), slice(40, 100)]
    keep = magnitude_uniform(w, slices, 25)
    assert int(keep.sum()) == 25
    assert [int(keep[s].sum()) for s in slices] in ([2, 8, 15], [3, 7, 15], [3, 8, 14], [2, 7, 16])
    for s in slices:   # within each layer, the kept weights are the largest
        kept, dropped = w[s].abs()[keep[s]], w[s].abs()[~keep[s]]
        assert kept.min() >= dropped.max()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(0, 10), budget_share=st.floats(0.05, 1.0))
def test_flops_aware_magnitude_is_feasible_and_within_its_certified_gap(seed, k, budget_share):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(10, generator=g)
    slices, layer_macs = [slice(0, 4), slice(4, 7), slice(7, 10)], [16, 4, 1]
    macs = torch.tensor([16] * 4 + [4] * 3 + [1] * 3)
    max_macs = int(budget_share * int(macs.sum()))
    keep, ilp = magnitude_flops(w, slices, layer_macs, k, max_macs)
    assert int(keep.sum()) <= k and int(macs[keep].sum()) <= max_macs
    best = max((float((w[list(c)] ** 2).sum()) for r in range(k + 1)
                for c in itertools.combinations(range(10), r) if int(macs[list(c)].sum()) <= max_macs),
               default=0.0)
    kept = float((w[keep] ** 2).sum())
    assert kept == pytest.approx(ilp.primal, rel=1e-6, abs=1e-9)
    assert kept <= best + 1e-9 <= ilp.dual_bound + 1e-6 * max(best, 1)   # the optimum lies in the gap


def test_fit_k_to_macs_prunes_further_until_the_macs_fit():
    torch.manual_seed(1)
    w = torch.randn(50)
    macs = torch.randint(1, 10, (50,))
    keep = fit_k_to_macs(lambda k: magnitude_global(w, k), macs, 40, max_macs=60)
    assert int(macs[keep].sum()) <= 60
    bigger = magnitude_global(w, int(keep.sum()) + 1)
    assert int(macs[bigger].sum()) > 60     # the largest k that fits


def _sorted_top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """top_k_mask as it was before session 52 (the reference): the first k of a stable descending sort."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        keep[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return keep


def _tied_vectors(seed: int, most_chunks: int | None = None):
    """Vectors of odd sizes with many ties: small integers, all zeros, ±0.0 and ±inf, float64,
    bfloat16, int64, and a few distinct values. most_chunks: only sizes of at most that many
    chunks of ``seed`` entries (a radix select's rounds run over the chunks in a Python loop)."""
    g = torch.Generator().manual_seed(seed)
    for p in (1, 2, 7, 100, 333, 1001):
        if most_chunks is not None and p > most_chunks * seed:
            continue
        yield torch.randint(0, 4, (p,), generator=g).float()
        yield torch.zeros(p)
        signed = torch.randint(-2, 3, (p,), generator=g).double()
        signed[::5] = -0.0
        yield signed
        wild = torch.randn(p, generator=g)
        wild[::3], wild[1::4], wild[2::7] = float("inf"), -0.0, float("-inf")
        yield wild
        yield torch.randn(p, generator=g).abs().to(torch.bfloat16)
        yield torch.randint(-3, 3, (p,), generator=g)
        yield torch.randn(p, generator=g)


@pytest.mark.parametrize("chunk", [7, 64, 2**18])
def test_top_k_mask_is_the_stable_sorts_mask_bit_for_bit(monkeypatch, chunk):
    """The radix select keeps what the stable sort kept: the k largest, ties at the threshold to the
    lower index, on vectors full of ties, for every k, with chunks that cut the ties apart."""
    from prunekit.solvers import magnitude
    monkeypatch.setattr(magnitude, "CHUNK", chunk)
    checked = 0
    for scores in _tied_vectors(chunk, most_chunks=50):       # chunk 7: up to p = 333, 48 chunks
        p = scores.numel()
        for k in sorted({-1, 0, 1, p // 3, p // 2, p - 1, p, p + 5} | set(range(0, p + 1, max(1, p // 17)))):
            got = magnitude.top_k_mask(scores, k)
            assert got.dtype == torch.bool and got.shape == scores.shape
            assert torch.equal(got, _sorted_top_k_mask(scores, k)), (scores.dtype, p, k)
            checked += 1
    assert checked > 300


def test_magnitude_masks_are_the_sorted_ones_on_random_layers():
    """magnitude_global, magnitude_uniform and the FLOP budget's fit over a random net's weights (rounded
    to few values, so that ties abound) give the masks of the sort-based top k."""
    from prunekit.solvers import magnitude
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(5003, generator=g) * 4).round() / 4
    slices = [slice(0, 1000), slice(1000, 1001), slice(1001, 4000), slice(4000, 5003)]
    for k in (0, 1, 2500, 4999, 5003):
        assert torch.equal(magnitude_global(w, k), _sorted_top_k_mask(w.abs(), k))
    uniform = magnitude_uniform(w, slices, 2501)
    for s in slices:
        assert torch.equal(uniform[s], _sorted_top_k_mask(w[s].abs(), int(uniform[s].sum())))
    macs = torch.cat([torch.full((s.stop - s.start,), float(c)) for s, c in zip(slices, (9, 1, 3, 5))])
    fitted = fit_k_to_macs(lambda k: magnitude_global(w, k), macs, 4000, int(macs.sum()) // 2)
    assert torch.equal(fitted, _sorted_top_k_mask(w.abs(), int(fitted.sum())))
    assert magnitude.CHUNK >= 2**16       # (the chunked path is the test above's)


def test_top_k_mask_peak_memory_is_a_few_bytes_per_entry():
    """The stable sort held its values, int64 indices and buffers at once: about 21 bytes per entry
    above what the process held (ResNet-50's 25.5M weights: 511 MB), 33 in a whole prune run. The
    radix select holds the (p,) bool mask and CHUNK-long temporaries: measured 1.6 B/entry there.
    Measured in a child (VmHWM after clearing it), every freed block over 1 MiB handed back."""
    code = textwrap.dedent("""
        import torch
        from prunekit.solvers.magnitude import top_k_mask
        def status(key):
            return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))
        p = 8_000_000
        scores = (torch.randn(p, generator=torch.Generator().manual_seed(0)) * 8).round().abs()   # ties
        before = status('VmRSS')
        open('/proc/self/clear_refs', 'w').write('5')
        keep = top_k_mask(scores, p // 2)
        print((status('VmHWM') - before) / p, int(keep.sum()))
    """)
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    env = {**fixed_mmap_threshold(), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(magnitude_module.__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    per_entry, kept = out.split()
    assert int(kept) == 4_000_000
    assert float(per_entry) < 4.0, per_entry        # the sort: about 21


def _eager_flops_mask(w, slices, macs, k, max_macs):
    """magnitude_flops as it was: the squares as one float64 vector, solved as plain scores."""
    from prunekit.solvers.ilp import solve_flops_ilp
    return solve_flops_ilp(w.to(torch.float64).square(), layer_slices=slices, layer_costs=[float(c) for c in macs],
                           max_count=k, max_cost=float(max_macs)).keep


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "equal", "float64", "float16"])
@pytest.mark.parametrize("k_share,mac_share", [(0.5, 0.3), (0.1, 0.05), (0.9, 0.95), (0.3, 1.0)])
def test_magnitude_flops_squares_read_lazily_choose_the_eager_squares_mask(kind, k_share, mac_share):
    """The squares read from w where needed (Squares) give bit for bit the mask of the float64
    squares held whole, ties (few distinct values, zeros, all equal) included."""
    gen = torch.Generator().manual_seed(3)
    sizes = [700, 64, 2300, 5, 1200, 999, 40]
    macs = [9, 1, 30, 4, 9, 17, 2]
    w = torch.randn(sum(sizes), generator=gen)
    if kind == "ties":
        w = (w * 4).round() / 4
    elif kind == "zeros":
        w = torch.where(torch.rand(w.numel(), generator=gen) < 0.6, 0.0, w)
    elif kind == "equal":
        w = torch.full_like(w, -0.5)
    elif kind == "float64":
        w = w.double() * 1e10
    elif kind == "float16":
        w = ((w * 3).round() / 3).half()
    bounds = list(itertools.accumulate(sizes, initial=0))
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    p, total = w.numel(), sum(m * n for m, n in zip(macs, sizes))
    k, budget = int(k_share * p), int(mac_share * total)
    keep, result = magnitude_flops(w, slices, macs, k, budget)
    assert torch.equal(keep, _eager_flops_mask(w.float() if kind == "float16" else w, slices, macs, k, budget))
    assert int(keep.sum()) <= k and result.cost <= budget


def test_magnitude_flops_peak_memory_is_a_few_bytes_per_weight():
    """The ILP's sorted view held the float64 squares, the laid-out scores and their running sums
    (8 bytes each) beside the int32 order: about 31 bytes a weight above the weights themselves
    (ResNet-50: 0.8 GB). Now the squares are read from w and the running sums held every 32nd
    position: ResNet-50 measured 6.1 B/weight (plus each layer's sort, a few times its size: the
    layers here are small for that). Measured in a child (VmHWM after clearing it)."""
    code = textwrap.dedent("""
        import torch
        from prunekit.solvers.magnitude import magnitude_flops
        def status(key):
            return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key))
        sizes = [250_000] * 24            # ResNet-50-like: no layer a large share of the weights
        w = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
        at, slices = 0, []
        for n in sizes:
            slices.append(slice(at, at + n)); at += n
        macs = [[49, 196, 784, 3136][i % 4] for i in range(24)]
        budget = sum(m * n for m, n in zip(macs, sizes)) // 3
        before = status('VmRSS')
        open('/proc/self/clear_refs', 'w').write('5')
        keep, result = magnitude_flops(w, slices, macs, w.numel() // 2, budget)
        print((status('VmHWM') - before) / w.numel(), result.cost <= budget)
    """)
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    env = {**fixed_mmap_threshold(), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(magnitude_module.__file__).parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    per_weight, fits = out.split()
    assert fits == "True"
    assert float(per_weight) < 10.0, per_weight       # before: about 31
