"""Magnitude baselines: exact counts, brute force on tiny problems, budgets always met."""

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

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
