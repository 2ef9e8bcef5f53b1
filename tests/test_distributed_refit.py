"""The least-squares re-fit (``prunekit.refit.refit``) on 2 gloo ranks re-fits as one process does:
the ranks split the batches (each layer's moments summed over them, the same images held out of the
fit whichever rank adds them, one held-out step per layer) and the output channels (each
rank solves its share, or rank 0 all of a small layer; all gather), so both end with the very same
weights, equal to one process's to rounding; with more ranks than batches, odd batch counts, a grouped
conv whose groups straddle the ranks' shares, sampled conv positions, and the truncated forwards
used where the networks cannot run in lockstep."""

import copy

import pytest
import torch
from torch import nn

# its tests share one spawn of the ranks: all on one xdist worker (`--dist loadgroup`), so the other
# worker goes on with other tests instead of waiting for that spawn
pytestmark = pytest.mark.xdist_group("distributed_refit")

import prunekit.refit as refit_module
from closeness import assert_close_to_scale
from distributed_spawn import run_ranks_once

LAYERS = ["0", "3", "6", "10"]
# (case, batches, whether the networks run in lockstep, whether the ranks share each layer's solve)
CASES = [("lockstep, 3 batches", 3, True, True), ("lockstep, 1 batch", 1, True, True),
         ("truncated, 4 batches", 4, False, True), ("lockstep, 3 batches, rank 0 solves", 3, True, False)]


def _networks():
    """A dense conv net with BatchNorm (a grouped conv among its layers) and a pruned copy."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(24, 5))
    for module in dense.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for name in LAYERS:
            weight = pruned.get_submodule(name).weight
            weight.mul_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(len(name))) > 0.5)
    return pruned, dense


def _batches(count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(6, 3, 12, 12, generator=g) for _ in range(count)]


def _refits(collective=None) -> dict:
    """Per case: the re-fit layers' weights and biases flattened, and the record's figures."""
    out = {}
    for case, count, lockstep, shared in CASES:
        model, dense = _networks()
        original = refit_module._lockstep, refit_module.SHARED_SOLVE_WORK
        if not lockstep:
            refit_module._lockstep = lambda *args: (None, "forced for the test")
        refit_module.SHARED_SOLVE_WORK = 0 if shared else 10**30     # every solve shared, or rank 0's
        try:
            record = refit_module.refit(model, dense, LAYERS, _batches(count), ridge=0.05, collective=collective)
        finally:
            refit_module._lockstep, refit_module.SHARED_SOLVE_WORK = original
        out[case] = torch.cat([p.detach().flatten() for n in LAYERS for p in model.get_submodule(n).parameters()])
        out[f"{case}: record"] = torch.tensor([record["layers"], record["centred"], record["max_iterations"],
                                               record["mean_error_before"], record["mean_error_after"],
                                               record["mean_step"]],
                                              dtype=torch.float64)
    return out


def _worker(rank, world):
    from prunekit.distributed import current
    torch.manual_seed(100 + rank)            # the re-fit must not depend on a rank's global RNG
    _settings(refit_module.__dict__.__setitem__)
    return _refits(current())


def _settings(set_):
    """Conv positions sampled (as on large inputs) and the conjugate gradients run to convergence, so
    that sums taken in another order cannot end them at another point within the default tolerance."""
    set_("ROWS_PER_INPUT", 4)
    set_("TOLERANCE", 1e-10)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks_once("distributed_refit", _worker, 2, tmp_path_factory, timeout=120)


def test_two_ranks_refit_alike_and_as_one_process(two_ranks, monkeypatch):
    _settings(lambda name, value: monkeypatch.setattr(refit_module, name, value))
    expected = _refits()
    pruned, _ = _networks()
    before = torch.cat([p.detach().flatten() for n in LAYERS for p in pruned.get_submodule(n).parameters()])
    for case, *_ in CASES:
        # every layer re-fit but at most one that the 2 held-out images reject (none held with 1 batch)
        assert int(expected[f"{case}: record"][0]) >= 3, case
        assert torch.equal(two_ranks[0][f"{case}: record"][:2], expected[f"{case}: record"][:2]), case
        assert not torch.equal(expected[case], before)
        assert torch.equal(two_ranks[0][case], two_ranks[1][case]), case     # the ranks hold the same weights
        # float32 weights re-fit from sums taken in another order: rounding, grown along the layers
        assert_close_to_scale(two_ranks[0][case], expected[case], 3e-4)
        assert torch.equal(two_ranks[0][case] != 0, expected[case] != 0), case
        assert_close_to_scale(two_ranks[0][f"{case}: record"][3:], expected[f"{case}: record"][3:], 1e-5)
