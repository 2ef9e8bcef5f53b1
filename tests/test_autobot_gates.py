"""AutoBot's gates that blew up in training (inf or NaN) are refused naming the options to lower,
and a cut landing far below its MAC budget is said, rather than either reported as a success."""

import warnings

import pytest
import torch

from prunekit.errors import PrunekitError, PrunekitWarning
from prunekit.structured.autobot import AutoBotOptions, check_gates_finite, warn_if_far_below


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
