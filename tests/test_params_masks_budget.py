"""ParamSpace round trips, masks that hold through training, budget parsing and resolution."""

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from prunekit.budget import Amount, Budget
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.masks import MaskHold, masks_from_vector, masks_from_weights
from prunekit.params import ParamSpace


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 36, 10))


def test_param_space_round_trip_and_patterns():
    model = tiny_cnn()
    space = ParamSpace(model)
    assert space.names() == ["0", "4"]
    assert space.numel == 36 + 1440
    w = space.vector()
    space.assign(w * 2)
    assert torch.equal(model[4].weight.flatten(), 2 * w[36:])
    assert ParamSpace(model, exclude=["4"]).names() == ["0"]
    with pytest.raises(PrunekitError, match=r"include pattern 'nothing\*' matches no prunable layer.*names \(0, 4\)"):
        ParamSpace(model, include=["nothing*"])
    with pytest.raises(PrunekitError, match=r"exclude pattern 'fc' matches no prunable layer"):
        ParamSpace(model, exclude=["4", "fc"])        # a typo among good patterns: it would silently prune fc
    with pytest.raises(PrunekitError, match=r"no prunable weights matched"):
        ParamSpace(model, include=["0"], exclude=["0"])
    with pytest.raises(PrunekitError, match="the model has no prunable weights"):
        ParamSpace(nn.Sequential(nn.Flatten(), nn.ReLU()))
    with pytest.raises(PrunekitError, match="flat vector"):
        space.assign(torch.zeros(3))


@pytest.mark.parametrize("optimizer_cls", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=0.01),
    lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)])
def test_pruned_weights_stay_exactly_zero_through_training(optimizer_cls):
    model = tiny_cnn()
    space = ParamSpace(model)
    optimizer = optimizer_cls(model.parameters())
    # Warm the optimizer state first, so stale momentum would move pruned weights.
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    keep = torch.rand(space.numel) > 0.7
    masks = masks_from_vector(space, keep)
    with MaskHold(space, masks, optimizer):
        for _ in range(5):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    w = space.vector()
    assert torch.all(w[~keep] == 0)
    assert torch.count_nonzero(w[keep]) == keep.sum()
    assert all(torch.equal(m, masks_from_weights(space)[n]) for n, m in masks.items())


@pytest.mark.parametrize("text,value,absolute", [
    ("0.9", 0.9, False), ("90%", 0.9, False), ("50k", 50_000, True), ("20M", 20e6, True),
    ("1.5G", 1.5e9, True), (0.3, 0.3, False), ("1200", 1200, True), ("2.01k", 2010, True)])
def test_amount_parse(text, value, absolute):
    amount = Amount.parse(text, "sparsity")
    assert amount.value == pytest.approx(value) and amount.absolute == absolute


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": "abc"}, "not a number"), ({"sparsity": "1.0"}, r"\[0, 1\)"),
    ({"flops": "0"}, r"\(0, 1\]"), ({"flops": "150%"}, r"\(0, 1\]"),
    ({"sparsity": "10M"}, "out of range"), ({"sparsity": "90"}, "ambiguous"), ({"params": "0.005k"}, "infeasible"), ({}, "no budget")])
def test_bad_budgets_are_refused_with_the_range(kwargs, match):
    model = tiny_cnn()
    costs, space = CostModel(model, torch.zeros(1, 1, 6, 6)), ParamSpace(model)
    with pytest.raises(PrunekitError, match=match):
        Budget.parse(**kwargs).resolve(costs, space)


def test_flops_budget_below_fixed_layers_names_the_smallest_feasible():
    model = tiny_cnn()
    costs = CostModel(model, torch.zeros(1, 1, 6, 6))
    space = ParamSpace(model, exclude=["4"])  # the linear layer stays dense
    with pytest.raises(PrunekitError, match="ask for more than"):
        Budget.parse(flops=0.1).resolve(costs, space)


_MODEL = tiny_cnn()
_COSTS, _SPACE = CostModel(_MODEL, torch.zeros(1, 1, 6, 6)), ParamSpace(_MODEL)


@settings(max_examples=60, deadline=None)
@given(sparsity=st.floats(0, 0.999), flops=st.floats(0.01, 1.0))
def test_resolved_budget_meets_the_request(sparsity, flops):
    costs, space = _COSTS, _SPACE
    try:
        resolved = Budget.parse(sparsity=sparsity, flops=flops).resolve(costs, space)
    except PrunekitError:
        assert (1 - sparsity) * space.numel < 1
        return
    assert 1 <= resolved.max_nonzeros <= (1 - sparsity) * space.numel + 1e-6
    assert resolved.max_nonzeros > (1 - sparsity) * space.numel - 1
    assert resolved.max_macs <= flops * costs.macs


def test_bn_recalibration_without_data_keeps_the_statistics():
    from prunekit.train import recalibrate_batchnorm
    model = tiny_cnn()
    model[1].running_mean.fill_(0.25)
    assert recalibrate_batchnorm(model, []) is False
    assert torch.all(model[1].running_mean == 0.25)


def test_param_space_sees_packed_attention_weights_and_patterns_reach_them():
    from prunekit import zoo
    vit = zoo.build("vit-tiny")
    costs = CostModel(vit, torch.zeros(1, 1, 28, 28))
    space = ParamSpace(vit, costs=costs)
    assert "blocks.0.attn.in_proj_weight" in space.names() and "blocks.0.attn.out_proj" in space.names()
    assert "blocks.0.attn.in_proj_weight" in space.param_names()
    # every MAC a weight pays is priced per weight; only attention's QKᵀ/AV are fixed
    assert int(space.macs_per_weight(costs).sum()) == costs.macs - costs.activation_macs
    budget = Budget.parse(flops=0.4).resolve(costs, space)
    assert budget.fixed_macs == costs.activation_macs
    left = ParamSpace(vit, exclude=["blocks.*.attn"], costs=costs).names()
    assert not any(".attn" in name for name in left)
    only = ParamSpace(vit, include=["*.in_proj_weight"], costs=costs).names()
    assert only == ["blocks.0.attn.in_proj_weight", "blocks.1.attn.in_proj_weight"]


class _Branchy(nn.Module):
    """A layer forward never calls and a branch the first example does not take."""

    def __init__(self):
        super().__init__()
        self.a, self.big, self.small, self.never = nn.Linear(10, 20), nn.Linear(20, 4), nn.Linear(20, 4), nn.Linear(20, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.big(h) if bool(x[0, 0] > 0) else self.small(h)


def test_layers_the_trace_never_ran_are_left_dense_and_named():
    """A prunable layer the example input did not run has no known cost: pruning it and counting it
    dense made the record's params disagree with a recount (0.48 kept reported, 0.30 true); it is
    now left dense, named in a warning, and the record equals the recount."""
    import prunekit
    from prunekit.errors import PrunekitWarning
    torch.manual_seed(0)
    model, x = _Branchy(), torch.randn(64, 10)
    x[0, 0] = -1.0                                   # the first example (the trace's) takes the small branch
    y = torch.randint(0, 4, (64,))
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.warns(PrunekitWarning, match=r"big, never did not run on the example input"):
        result = prunekit.prune(model, (x, y), method="magnitude", params=0.6)
    assert all(torch.equal(getattr(model, n).weight, dense[f"{n}.weight"]) for n in ("big", "never"))
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    assert result.record["params"] == nonzero
    assert result.record["params"] <= 0.6 * result.record["dense_params"]
    with pytest.raises(PrunekitError, match=r"none of the layers to prune ran on the example input \(never\)"):
        ParamSpace(_Branchy(), include=["never"], costs=CostModel(_Branchy(), x[:1]))


def test_a_tied_weight_is_named_by_any_module_holding_it():
    """GPT-2's head shares the token embedding's tensor; torch lists it once, under the embedding.
    exclude=["lm_head"] was silently ignored (the head pruned anyway) and include=["lm_head"] refused."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.mid, self.lm_head = nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 30, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, ids):
            return self.lm_head(torch.relu(self.mid(self.wte(ids))))

    model, ids = Tied(), torch.randint(0, 30, (1, 5))
    costs = CostModel(model, ids)
    assert ParamSpace(model, costs=costs).names() == ["wte", "mid"]
    assert ParamSpace(model, exclude=["lm_head"], costs=costs).names() == ["mid"]
    assert ParamSpace(model, include=["lm_head"], costs=costs).names() == ["wte"]
