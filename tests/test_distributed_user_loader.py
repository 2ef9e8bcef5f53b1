"""prunekit.prune given the user's own reshuffling DataLoader on 2 gloo ranks prunes as one
process does: each rank reads its gradient rows piece by piece, one pass of the loader per piece,
so every pass must be the order one process reads (a shuffling loader draws a new order at every
pass, from its generator or torch's global RNG, and the ranks' RNGs need not agree)."""

import pytest
import torch
from torch import nn

# its tests share one spawn of the ranks: all on one xdist worker (`--dist loadgroup`), so the other
# worker goes on with other tests instead of waiting for that spawn
pytestmark = pytest.mark.xdist_group("distributed_user_loader")

import prunekit
from closeness import assert_close_to_scale
from distributed_spawn import run_ranks_once

CASES = {"chita": dict(method="chita", sparsity=0.7, fisher_samples=48, relative_ridge=0.5),
         "falcon": dict(method="falcon", sparsity=0.7, flops=0.4, fisher_samples=48)}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))


def _loader(generator: bool) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 1, 6, 6, generator=g)
    y = (x.flatten(1)[:, :4].argmax(1) + (x.flatten(1)[:, 4] > 1).long()) % 4
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                       generator=torch.Generator().manual_seed(2) if generator else None)


def _prune(rank=0, world=1):
    out = {}
    for name, case in CASES.items():
        for generator in (False, True):
            net = _net()
            loader = _loader(generator)
            if rank == 1:            # the ranks' RNGs need not agree: rank 0's decides, as one process's would
                torch.manual_seed(123)
                if generator:
                    loader.generator.manual_seed(456)
            stage = prunekit.prune(net, loader, **case).history[-1]
            out[f"{name}, generator={generator}"] = torch.cat([p.detach().flatten() for p in net.parameters()])
            out[f"{name}, generator={generator}: ridge, objective"] = torch.tensor([stage["ridge"],
                                                                                   stage["objective"]])
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_ranks_once("distributed_user_loader", _prune, 2, tmp_path_factory, timeout=300)


def test_two_ranks_prune_a_shuffling_loader_as_one_process(two_ranks):
    """The rows are one process's: the ridge (relative to the mean Fisher diagonal) to 1e-5;
    FALCON's mask is one process's, its weights to 1e-5 of their scale; CHITA's swap search may
    end in another local optimum from rounding alone, so its objective to 1%. (Each rank's own
    order: 40-86 weights of the masks differed.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = _prune()
    finally:
        torch.set_num_threads(threads)
    for got in two_ranks:
        for name in CASES:
            for generator in (False, True):
                key = f"{name}, generator={generator}"
                (ridge, objective), want = got[f"{key}: ridge, objective"], expected[f"{key}: ridge, objective"]
                assert float(ridge) == pytest.approx(float(want[0]), rel=1e-5), key
                assert float(objective) == pytest.approx(float(want[1]), rel=1e-2), key
                if name == "falcon":
                    assert torch.equal(got[key] != 0, expected[key] != 0), key
                    assert_close_to_scale(got[key], expected[key], 1e-5)
