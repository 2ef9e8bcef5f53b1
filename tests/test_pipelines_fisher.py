"""End-to-end runs of the quadratic-model methods on the bundled MLPNet and MNIST sample."""

import json
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.cli import main
from prunekit.pipelines.schedule import keep_schedule

ASSETS = Path(prunekit.__file__).parent / "assets"
BASE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"),
        "--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256",
        "--fisher-samples", "64", "--json"]


def run(capsys, *extra):
    assert main([*BASE, *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method,stages", [("chita", 1), ("chita++", 3), ("woodfisher", 1)])
def test_sparsity_methods_meet_the_budget_and_beat_chance(capsys, method, stages):
    out = run(capsys, "--method", method, "--sparsity", "0.9", "--stages", str(stages))
    assert out["nonzeros"] <= 3236 and len(out["stages"]) == stages
    assert out["accuracy"] > 50            # magnitude gets 80.9% here; chance is 10%
    kept = [s["max_nonzeros"] for s in out["stages"]]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 3236


def test_falcon_meets_both_budgets(capsys):
    out = run(capsys, "--method", "falcon++", "--sparsity", "0.8", "--flops", "0.15", "--stages", "2")
    assert out["nonzeros"] <= 6472 and out["flops_kept"] <= 0.15
    assert [s["max_macs"] is not None for s in out["stages"]] == [True, True]


@pytest.mark.parametrize("method", ["chita", "woodfisher"])
def test_count_budget_methods_prune_further_to_meet_a_flop_budget(capsys, method):
    out = run(capsys, "--method", method, "--flops", "0.3")
    assert out["flops_kept"] <= 0.3
    assert out["flops_kept"] > 0.29                     # the search lands on the budget, not far below it
    assert out["stages"][0]["solver_info"]["fit_solves"] >= 2


def test_falcon_needs_a_flop_budget(capsys):
    assert main([*BASE, "--method", "falcon", "--sparsity", "0.9"]) == 2
    assert "--flops" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["poly", "exp", "linear", "const"])
def test_schedules_end_at_the_target_and_never_rise(kind):
    shares = keep_schedule(0.02, 10, kind)
    assert shares[-1] == 0.02 and all(a >= b for a, b in zip(shares, shares[1:]))
    assert all(0.02 <= s <= 0.9 for s in shares)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_fisher_diagonal_matches_the_definition(dtype):
    from prunekit.pipelines.fisher_methods import _mean_fisher_diagonal
    X = (torch.randn(7, 300_001, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    exact = float(X.double().square().sum()) / X.numel()           # mean_j (XᵀX/n)_jj
    assert _mean_fisher_diagonal(X) == pytest.approx(exact, rel=1e-6)



@pytest.mark.parametrize("method", ["falcon++", "chita++"])
def test_pruned_weights_stay_pruned_unless_revived(capsys, method):
    """Each stage records how many weights zero before it are nonzero after it: none without
    ``revive`` (with it, both revive none on this small sample either; the count itself is
    checked by the next test)."""
    budget = ["--sparsity", "0.9"] + (["--flops", "0.1"] if method == "falcon++" else [])
    kept = run(capsys, "--method", method, *budget, "--stages", "3")
    assert [s["revived"] for s in kept["stages"]] == [0, 0, 0]
    revived = run(capsys, "--method", method, *budget, "--stages", "3", "--revive")
    assert revived["stages"][0]["revived"] == 0 and all(s["revived"] >= 0 for s in revived["stages"])


def test_revived_counts_the_weights_that_come_back():
    """A stage solver that keeps k random weights of those offered: with ``revive`` every weight
    is offered at every stage, and ``revived`` is exactly how many of a stage's weights were
    zero after the stage before."""
    from torch import nn

    from prunekit.methods import Method
    from prunekit.pipelines.fisher_methods import plan_memory, run_stages
    from prunekit.pipelines.fisher_options import ChitaOptions
    from prunekit.solvers.result import Solution

    chosen = []

    def solve(q, k, max_macs, macs, opts, score_weights=None):
        keep = torch.randperm(q.p, generator=torch.Generator().manual_seed(len(chosen)))[:k]
        w = torch.zeros(q.p, dtype=q.w_bar.dtype)
        w[keep] = 1.0
        chosen.append(w != 0)
        return Solution(w=w, objective=0.0, support_size=k, iterations=0, seconds=0.0)

    method = Method("random-stages", "weights", ChitaOptions,
                    lambda ctx, opts: run_stages(ctx, solve, opts, plan_memory("chita")))
    x, y = torch.randn(60, 8), torch.randint(0, 3, (60,))
    for revive in (False, True):
        chosen.clear()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        # final_pick="last": one solve per stage, so ``chosen`` is the stages' supports in order
        result = prunekit.prune(net, (x, y), method=method, sparsity=0.8, stages=3, revive=revive,
                                fisher_samples=8, batch_size=10, final_pick="last")
        got = [s["revived"] for s in result.history]
        if revive:
            expected = [0] + [int((later & ~earlier).sum()) for earlier, later in zip(chosen, chosen[1:])]
            assert sum(expected) > 0 and got == expected
        else:
            assert got == [0, 0, 0]


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 300), torch.nn.ReLU(),
                               torch.nn.Linear(300, 300), torch.nn.ReLU(), torch.nn.Linear(300, 10))


@pytest.mark.parametrize("method,budget", [("chita", {"sparsity": 0.7}), ("falcon", {"flops": 0.4})])
def test_a_tiny_fisher_is_solved_as_its_scaled_up_twin(method, budget):
    """A loss scaled by 2**-70 scales every gradient by exactly 2**-70 and the Fisher by 2**-140
    (random-weight MobileNetV1 had a mean diagonal of 1e-37: a ridge of 1e-38, float32 subnormals).
    Its float32 squares underflowed (the ridge became 0.1 of a fallback 1, not of the Fisher) and
    products went subnormal: CHITA's result broke its budget ("internal error"). The stage's X is
    scaled by a power of two first (normalising_scale): the same masks as the unscaled loss, and
    its ridge and objective recorded in the loss's own units (2**-140 of the twin's)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    data = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    results = {}
    for c in (1.0, 2.0**-70):
        result = prunekit.prune(_tiny_net(), data, method=method, fisher_samples=64, recalibrate_bn=False,
                                loss=lambda out, y, c=c: F.cross_entropy(out, y) * c, **budget)
        mask = torch.cat([p.detach().reshape(-1) != 0 for name, p in result.model.named_parameters()
                          if name.endswith("weight")])
        results[c] = mask, result.history[0]
    (twin, normal), (mask, tiny) = results[1.0], results[2.0**-70]
    assert torch.equal(mask, twin)
    assert tiny["ridge"] == pytest.approx(normal["ridge"] * 2.0**-140, rel=1e-6)
    assert tiny["objective"] == pytest.approx(normal["objective"] * 2.0**-140, rel=1e-4)
    assert 0 < tiny["objective"] < 1e-40


def test_normalising_scale_leaves_ordinary_fishers_alone():
    from prunekit.pipelines.fisher_methods import normalising_scale
    assert normalising_scale(1e-6, torch.float32) == 1.0 and normalising_scale(3e7, torch.bfloat16) == 1.0
    assert normalising_scale(1e-37, torch.float16) == 1.0            # no room in float16's range
    for diagonal in (1e-37, 2.0**-140, 1e20):
        scale = normalising_scale(diagonal, torch.float32)
        assert scale == 2.0 ** round(torch.tensor(scale).log2().item())      # a power of two
        assert 0.5 <= diagonal * scale**2 <= 2.0
