"""Session 55's second command-line walk: numbers that float32 cannot hold, and AutoBot gates that
blew up, are refused or said rather than reported as a success."""

from __future__ import annotations

import warnings

import pytest
import torch

from prunekit.errors import PrunekitError, PrunekitWarning
from prunekit.options import FLOAT32_MAX, FLOAT32_TINY, Integer, Real, SQUARED, float32_problem
from prunekit.structured.autobot import AutoBotOptions, check_gates_finite, warn_if_far_below


@pytest.mark.parametrize("value,positive,use,needle", [
    (1e308, False, None, "at most 3.4e+38"),
    (-1e308, False, None, "at most 3.4e+38"),
    (3.5e38, True, None, "at most 3.4e+38"),
    (1e-320, True, None, "at least 1.18e-38"),
    (1e-40, True, None, "at least 1.18e-38"),
    (2e19, True, SQUARED, "at most 1.84e+19 (its square"),
])
def test_float32_problem_names_the_bound(value, positive, use, needle):
    problem = float32_problem(value, positive, use)
    assert problem is not None and needle in problem, problem


@pytest.mark.parametrize("value,positive,use", [
    (0.1, True, None), (FLOAT32_MAX, False, None), (FLOAT32_TINY, True, None), (1e-320, False, None),
    (0.0, True, None), (1e19, True, SQUARED)])
def test_float32_problem_passes_what_float32_holds(value, positive, use):
    assert float32_problem(value, positive, use) is None


def test_real_and_integer_refuse_past_float32_and_sys_maxsize():
    assert "at most 3.4e+38" in Real(0, open_low=True).check(1e308)
    assert "at least 1.18e-38" in Real(0, open_low=True).check(1e-320)
    assert Real(0).check(1e-320) is None            # 0 is allowed there: 1e-320 rounding to it is no change
    assert "at most 9223372036854775807" in Integer(0).check(10**23)
    assert Integer(0).check(2**63 - 1) is None


def test_gates_that_blew_up_are_refused():
    options = AutoBotOptions(gate_lr=1e30, beta=1e30, gamma=1e30)
    with pytest.raises(PrunekitError, match="gate training diverged .*gate_lr 1e\\+30.*lower gate_lr, beta or gamma"):
        check_gates_finite([torch.tensor([0.0, float("inf")])], [{"ce": 2.3, "l_flops": 0.0, "l_bool": 0.0}], options)
    with pytest.raises(PrunekitError, match="diverged"):
        check_gates_finite([torch.zeros(3)], [{"ce": float("nan"), "l_flops": 0.0, "l_bool": 0.0}], options)
    check_gates_finite([torch.zeros(3)], [{"ce": 2.3, "l_flops": 0.1, "l_bool": 0.2}], AutoBotOptions())


def test_a_cut_far_below_the_budget_is_said():
    with pytest.warns(PrunekitWarning, match="keeps 2.46% of the MACs for a budget of 50.00%"):
        warn_if_far_below(0.0246, 0.5, AutoBotOptions())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_far_below(0.4782, 0.5, AutoBotOptions())


def test_bench_latency_thread_bound():
    from prunekit.commands.bench_latency import max_threads
    assert max_threads(2) == 64 and max_threads(16) == 256


def test_a_params_budget_that_binds_is_no_saturation():
    """flops 0.9 with params 0.2: the params budget keeps a quarter of the MACs by design; the
    "gates saturated" warning (lower gate_lr, beta or gamma) named the wrong cause."""
    import prunekit
    nn = torch.nn
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = prunekit.prune(m, (x, y), method="autobot", batch_size=16, gate_batches=5, flops=0.9, params=0.2)
    assert result.flops_kept < 0.45 and result.record["bound"] == "params"
    assert not [w for w in said if "saturated" in str(w.message)]
