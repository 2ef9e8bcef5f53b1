"""Channel rounding: every group keeps a multiple of m (or its full size), never zero channels,
the best-scored channels, and the MACs of the shrunk model stay within the budget."""

from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit import zoo
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.structured.gates import GatedMacs
from prunekit.structured.groups import find_groups
import prunekit
from prunekit.structured.rounding import allowed_counts, cut_to_budget, minimum_rounded_macs
from prunekit.structured.shrink import shrink
from prunekit.structured.threshold import threshold_to_budget

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads


@lru_cache(maxsize=None)
def _setup(name):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    x = torch.randn(1, 3, 8, 8)
    costs = CostModel(model, x)
    groups = find_groups(model, x)
    return model, x, costs, groups, GatedMacs(model, groups, costs)


def test_allowed_counts():
    assert allowed_counts(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert allowed_counts(20, 8) == [8, 16, 20]      # full size is one more choice
    assert allowed_counts(6, 8) == [6]               # smaller than m: never pruned
    assert allowed_counts(5, 1) == [1, 2, 3, 4, 5]


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["resnet20", "resnet20-b"]), multiple=st.sampled_from([2, 8, 24]),
       share=st.floats(0.2, 0.95), seed=st.integers(0, 2 ** 31 - 1))
def test_rounding_keeps_multiples_and_the_budget(name, multiple, share, seed):
    model, x, costs, groups, counter = _setup(name)
    budget = share * costs.macs
    if minimum_rounded_macs(counter, multiple) > budget:
        with pytest.raises(PrunekitError, match="channel_multiple"):
            cut_to_budget([torch.randn(g.size) for g in groups], counter, budget, multiple)
        return
    gen = torch.Generator().manual_seed(seed)
    logits = [3 * torch.randn(g.size, generator=gen) for g in groups]
    masks, _ = cut_to_budget(logits, counter, budget, multiple)
    kept = [int(m.sum()) for m in masks]
    for g, k, m, s in zip(groups, kept, masks, logits):
        assert k >= 1
        assert k % multiple == 0 or k == g.size
        if k < g.size:                                # the highest-scored channels are the kept ones
            assert s[m].min() >= s[~m].max()
    small = shrink(model, groups, masks, x)
    assert costs.count(small).macs == counter.macs_of_masks(masks) <= budget
    # nothing left on the table: no group can take its next allowed count and still fit
    for i, (g, k) in enumerate(zip(groups, kept)):
        bigger = [a for a in allowed_counts(g.size, multiple) if a > k]
        if bigger:
            grown = [m.clone() for m in masks]
            grown[i][torch.argsort(logits[i], descending=True)[:bigger[0]]] = True
            assert counter.macs_of_masks(grown) > budget


@pytest.mark.parametrize("share", [0.8, 0.5, 0.3])
def test_multiple_one_is_the_plain_threshold_cut(share):
    model, x, costs, groups, counter = _setup("resnet20")
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(g.size, generator=gen) for g in groups]
    masks, threshold = cut_to_budget(logits, counter, share * costs.macs, 1)
    plain, plain_threshold = threshold_to_budget(logits, counter, share * costs.macs)
    assert threshold == plain_threshold
    assert all(torch.equal(a, b) for a, b in zip(masks, plain))
    assert any(int(m.sum()) % 8 for m in masks)      # the plain cut is not already rounded


def test_autobot_with_multiple_one_is_unchanged_and_eight_rounds():
    model, x, costs, groups, _ = _setup("resnet20")
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    runs = {}
    for options in ({"gate_batches": 4}, {"gate_batches": 4, "channel_multiple": 1},
                    {"gate_batches": 4, "channel_multiple": 8}):
        torch.manual_seed(0)
        runs[options.get("channel_multiple")] = prunekit.prune(model, lambda: data, method="autobot", flops=0.5,
                                                               example_input=x, recalibrate_bn=False, **options)
    assert runs[1].record["kept_channels"] == runs[None].record["kept_channels"]
    assert runs[1].macs == runs[None].macs
    assert all(k % 8 == 0 for k in runs[8].record["kept_channels"])
    assert runs[8].macs <= 0.5 * costs.macs


def test_request_below_the_rounded_floor_is_refused_before_work():
    model, x, costs, groups, counter = _setup("resnet20")
    share = (minimum_rounded_macs(counter, 16) - 1) / costs.macs
    with pytest.raises(PrunekitError, match="smaller channel_multiple"):
        prunekit.prune(model, None, method="autobot", flops=share, example_input=x, channel_multiple=16)
    for bad in (0, -8, 2.5):
        with pytest.raises(PrunekitError, match="channel_multiple"):
            prunekit.prune(model, None, method="autobot", flops=0.5, example_input=x, channel_multiple=bad)


def test_rounding_below_its_floor_names_the_groups_left_dense():
    """Through ``prunekit.prune`` this refusal cannot be reached (``channel_context`` checks every
    target against the same floor first); direct callers of the cut (``autobot_masks``,
    ``taper_snapshots``, ``cut_to_budget``) got only 'below the N MACs left with m channels per
    group', without the groups left dense that ``channel_context``'s refusal names."""
    model, x, costs, groups, counter = _setup("resnet20")
    assert groups.skipped                     # at least the group reaching the network output
    floor = minimum_rounded_macs(counter, 16)
    logits = [torch.randn(g.size) for g in groups]
    with pytest.raises(PrunekitError) as refused:
        cut_to_budget(logits, counter, floor - 1, 16)
    line = refused.value.args[0]
    assert "\n" not in line and line.endswith("smaller channel_multiple")
    n = len(groups.skipped)
    listed = line.split(f"{n} channel group{'s' if n > 1 else ''} left dense among them (", 1)[1]
    assert all(f"{root}: {why}" in listed for root, why in groups.skipped[:3])
    assert f"({floor / costs.macs:.4%})" in line
