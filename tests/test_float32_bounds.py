"""Numbers that float32 cannot hold (an option's value, or its square where the option is squared) are
refused naming the bound, rather than run as inf or 0; whole numbers past sys.maxsize likewise."""

from __future__ import annotations

import pytest

from prunekit.options import FLOAT32_MAX, FLOAT32_TINY, Integer, Real, SQUARED, float32_problem


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
