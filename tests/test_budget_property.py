"""Property: over random small models x budgets x methods, what ``prunekit.prune`` reports
(sparsity, nonzeros, MACs, params) equals an independent recount, and never exceeds the budget
asked (issue 10).

The recount does not use prunekit's CostModel: forward hooks on every Conv2d/Linear count, per
example, each nonzero weight once per output position (conv) or token (linear), the README's
convention; nonzeros and parameters are counted straight from the tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit

METHODS = ["magnitude", "magnitude-uniform", "magnitude-flops", "chita", "falcon"]


@st.composite
def small_models(draw):
    """(model, input shape, classes): a small CNN (1-2 convs, optional BatchNorm and pooling,
    then 1-2 linears) or an MLP, with random widths, kernels and strides."""
    classes = draw(st.integers(2, 4))
    if draw(st.booleans()):                                    # CNN
        channels, size = draw(st.integers(1, 3)), draw(st.integers(6, 9))
        layers, c, s = [], channels, size
        for _ in range(draw(st.integers(1, 2))):
            out, k, stride = draw(st.integers(2, 6)), draw(st.sampled_from([1, 3])), draw(st.integers(1, 2))
            pad = draw(st.integers(0, k // 2))
            layers.append(nn.Conv2d(c, out, k, stride=stride, padding=pad, bias=draw(st.booleans())))
            if draw(st.booleans()):
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            c, s = out, (s + 2 * pad - k) // stride + 1
        if s >= 4 and draw(st.booleans()):
            layers.append(nn.MaxPool2d(2))
            s //= 2
        layers.append(nn.Flatten())
        features = c * s * s
        shape = (channels, size, size)
    else:                                                      # MLP
        features = draw(st.integers(4, 12))
        layers, shape = [nn.Flatten()], (1, features)
    for _ in range(draw(st.integers(0, 1))):
        hidden = draw(st.integers(3, 10))
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Linear(features, classes))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return nn.Sequential(*layers), shape, classes


def recount(model: nn.Module, example: torch.Tensor) -> dict:
    """Nonzeros of the Conv/Linear weights, MACs per example (hooks) and parameters kept."""
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        per_example = output.numel() // output.shape[0]
        positions = per_example // (module.out_channels if isinstance(module, nn.Conv2d) else module.out_features)
        macs += int(torch.count_nonzero(module.weight)) * positions

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    weights = [m.weight for m in layers]
    nonzeros = sum(int(torch.count_nonzero(w)) for w in weights)
    others = sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in weights)
    return {"nonzeros": nonzeros, "prunable": sum(w.numel() for w in weights), "macs": macs,
            "params": nonzeros + others, "all_params": sum(p.numel() for p in model.parameters())}


SPARSITY_ONLY = st.fixed_dictionaries({"sparsity": st.floats(0.1, 0.95)})
WITH_FLOPS = st.one_of(st.fixed_dictionaries({"flops": st.floats(0.15, 0.9)}),
                       st.fixed_dictionaries({"sparsity": st.floats(0.1, 0.95), "flops": st.floats(0.15, 0.9)}))


@st.composite
def budgets(draw, method):
    """A budget the method takes (FALCON needs a FLOP budget)."""
    return draw(WITH_FLOPS if method == "falcon" else st.one_of(SPARSITY_ONLY, WITH_FLOPS))


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=small_models(), data=st.data())
def test_reported_budget_equals_recount_and_fits(method, case, data):
    model, shape, classes = case
    budget = data.draw(budgets(method), label="budget")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, *shape, generator=gen)
    y = torch.randint(0, classes, (32,), generator=gen)
    example = x[:1]
    dense = recount(model, example)
    options = {"fisher_samples": 16} if method in ("chita", "falcon") else {}
    if "sparsity" in budget and math.floor(round((1 - budget["sparsity"]) * dense["prunable"], 6)) < 1:
        with pytest.raises(prunekit.PrunekitError, match="keeps no weight"):     # refused, rightly
            prunekit.prune(model, (x, y), method=method, example_input=example, **budget, **options)
        return
    result = prunekit.prune(model, (x, y), method=method, example_input=example, batch_size=16, **budget, **options)
    after = recount(model, example)

    # what is reported is what is there
    assert result.nonzeros == after["nonzeros"]
    assert result.macs == after["macs"] and result.dense_macs == dense["macs"]
    assert result.sparsity == pytest.approx(1 - after["nonzeros"] / after["prunable"], rel=1e-12, abs=1e-12)
    assert result.flops_kept == pytest.approx(after["macs"] / dense["macs"], rel=1e-12)
    assert result.params_kept == pytest.approx(after["params"] / dense["all_params"], rel=1e-12)
    # and it is within what was asked
    if "sparsity" in budget:
        assert after["nonzeros"] <= math.floor((1 - budget["sparsity"]) * after["prunable"] + 1e-6)
    if "flops" in budget:
        assert after["macs"] <= budget["flops"] * dense["macs"]
    assert after["nonzeros"] >= 1
