"""Gradient rows with BatchNorm on batch statistics (fisher_bn="batch") and FALCON's saliency
support (support_score="saliency"): against brute force, the model left untouched, the options
refused where they do not belong, the memory plan, and a tiny model end to end."""

import copy
import itertools

import pytest
import torch
from torch import nn

import prunekit
from prunekit import fisher
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.fisher import batchnorm_on_batch_statistics, collect_gradients, passes
from prunekit.memory_plan import plan as memory_plan
from prunekit.methods import METHODS
from prunekit.options import OptionError
from prunekit.params import ParamSpace
from prunekit.solvers.falcon import falcon, fisher_diagonal
from prunekit.solvers.quadratic import QuadraticModel
from closeness import assert_close_to_scale


def bn_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():                        # nontrivial running statistics and affine parameters
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def data(n, per_batch=5):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + per_batch], y[i:i + per_batch]) for i in range(0, n, per_batch)]


def brute_force_row(model, x, y, train_mode: bool):
    """The mean-loss gradient of one mini-batch by plain autograd on a deep copy, BatchNorm in
    training mode (the mini-batch's statistics) or eval mode (running statistics)."""
    twin = copy.deepcopy(model).train(train_mode)
    nn.functional.cross_entropy(twin(x), y).backward()
    return torch.cat([w.grad.reshape(-1) for w in ParamSpace(twin).weights()])


@pytest.mark.parametrize("path", ["hooks", "vmap"])
def test_batch_statistic_rows_equal_brute_force_mini_batch_gradients(path, monkeypatch):
    model = bn_net()
    space = ParamSpace(model)
    if path == "vmap":             # the fallback path must see the same BatchNorm mode
        monkeypatch.setattr(fisher.layer_grads, "supported", lambda module: False)
    with pytest.warns(Warning) if path == "vmap" else _nothing():
        rows = collect_gradients(model, space, data(20), n=3, batch=6, chunk=2, progress=False, bn="batch")
    x = torch.cat([b[0] for b in data(20)])
    y = torch.cat([b[1] for b in data(20)])
    for i in range(3):
        xi, yi = x[6 * i:6 * i + 6], y[6 * i:6 * i + 6]
        expected = brute_force_row(model, xi, yi, train_mode=True)
        assert_close_to_scale(rows[i], expected, rel=1e-5)
        frozen = brute_force_row(model, xi, yi, train_mode=False)     # the mode really changes the rows
        assert float((expected - frozen).norm()) > 0.05 * float(frozen.norm())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_batch_statistic_rows_leave_the_model_untouched():
    model = bn_net()
    for bn in (model[1], model[5]):
        bn.momentum = 0.5                        # any running-statistics update would show at once
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collect_gradients(model, ParamSpace(model), data(20), n=3, batch=6, progress=False, bn="batch")
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key       # running mean/var and num_batches_tracked too
    assert not model.training and not any(m.training for m in model.modules())
    assert model[1].track_running_stats and model[5].track_running_stats
    assert all(p.grad is None for p in model.parameters())


def test_the_batch_statistics_mode_restores_a_training_model_too():
    model = bn_net().train()
    model[5].eval()                               # a mixed state comes back as it was
    with batchnorm_on_batch_statistics(model) as norms:
        assert norms == [model[1], model[5]]
        assert all(m.training and not m.track_running_stats for m in norms)
    assert model[1].training and not model[5].training
    assert model[1].track_running_stats and model[5].track_running_stats


@pytest.mark.parametrize("kwargs, params", [({"batch": 1, "bn": "batch"}, ("fisher_bn", "fisher_batch")),
                                            ({"batch": 4, "bn": "running"}, ("fisher_bn",))])
def test_bad_batchnorm_modes_are_refused_naming_the_parameters(kwargs, params):
    model = bn_net()
    with pytest.raises(OptionError) as caught:
        collect_gradients(model, ParamSpace(model), data(20), n=2, progress=False, **kwargs)
    assert all(name in caught.value.params for name in params)
    assert "fisher_bn" in str(caught.value)


def test_passes_give_more_rows_than_one_pass_and_stop_on_an_empty_pass():
    model = bn_net()
    space = ParamSpace(model)
    seen = []

    class Reshuffled:                 # a new order at every pass, as a prunekit loader gives
        def __iter__(self):
            seen.append(len(seen))
            return iter(data(10) if len(seen) % 2 else data(10)[::-1])

    rows = collect_gradients(model, space, passes(Reshuffled()), n=5, batch=6, progress=False, bn="batch")
    assert rows.shape == (5, space.numel) and len(seen) == 3        # 30 samples from 10 a pass
    assert list(passes([])) == []                                    # no data: stops, never spins
    assert len(list(passes(iter(data(10))))) == 2                    # a one-shot iterator: one pass
    with pytest.raises(OptionError, match="fisher_samples"):         # and then the usual refusal
        collect_gradients(model, space, passes(iter(data(10))), n=5, batch=6, progress=False, bn="batch")


# --- options: declared once, refused where they do not belong --------------------------------------

def test_options_belong_to_the_quadratic_methods_only():
    assert "fisher_bn" in METHODS["chita"].options.names() and "fisher_bn" in METHODS["falcon"].options.names()
    assert "support_score" in METHODS["falcon++"].options.names()
    assert "support_score" not in METHODS["chita"].options.names()
    with pytest.raises(OptionError, match="takes no option fisher_bn"):
        METHODS["magnitude-flops"].options.from_user({"fisher_bn": "batch"}, method="magnitude-flops")
    with pytest.raises(OptionError, match="takes no option support_score"):
        METHODS["chita"].options.from_user({"support_score": "saliency"}, method="chita")
    with pytest.raises(OptionError, match="support_score must be one of magnitude, saliency"):
        METHODS["falcon"].options.from_user({"support_score": "obd"}, method="falcon")
    with pytest.raises(OptionError, match="fisher_batch to 2 or more") as caught:
        METHODS["falcon"].options.from_user({"fisher_bn": "batch"}, method="falcon")
    assert set(caught.value.params) == {"fisher_bn", "fisher_batch"}
    opts = METHODS["falcon"].options.from_user({"fisher_bn": "batch", "fisher_batch": 16}, method="falcon")
    assert (opts.fisher_bn, opts.fisher_batch, opts.support_score) == ("batch", 16, "magnitude")


@pytest.mark.parametrize("flags, message", [
    (["--method", "falcon", "--flops", "0.5", "--fisher-bn", "batch"], "--fisher-bn batch needs mini-batch rows"),
    (["--method", "magnitude", "--sparsity", "0.5", "--fisher-bn", "batch"], "takes no option --fisher-bn"),
    (["--method", "chita", "--sparsity", "0.5", "--support-score", "saliency"], "takes no option --support-score"),
])
def test_the_cli_refuses_them_in_one_line(capsys, flags, message):
    code = main(["prune", "--model", "mlpnet", "--data", "mnist", "--data-dir", "src/prunekit/assets/mnist", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# --- the memory plan prices the batch-statistic rows ----------------------------------------------

def test_memory_plan_forwards_a_whole_mini_batch_with_batch_statistics():
    model = bn_net()
    space = ParamSpace(model)
    example = data(5)[0][0]
    frozen = memory_plan(model, space, example, n=10, fisher_batch=32, max_memory="64G")
    batch = memory_plan(model, space, example, n=10, fisher_batch=32, max_memory="64G", fisher_bn="batch")
    assert batch.chunk == 32                                   # the row's mini-batch, never split
    assert batch.activations >= frozen.activations * 32 / frozen.chunk
    # BatchNorm on batch statistics saves its inputs for the backward pass: more per sample
    per_sample = lambda p: p.activations / p.chunk
    assert per_sample(batch) > per_sample(frozen)
    assert all(not m.training for m in model.modules()) and model[1].track_running_stats


# --- FALCON's saliency support ---------------------------------------------------------------------

def test_fisher_diagonal_is_the_mean_squared_gradient_plus_the_ridge():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 12, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 12, dtype=torch.float64)
    q = QuadraticModel(X, torch.randn(12, generator=g, dtype=torch.float64), 1e-2)
    assert_close_to_scale(fisher_diagonal(q), (X ** 2).mean(0) + 1e-2, rel=1e-12)
    compact = QuadraticModel(X.to(torch.bfloat16), q.w_bar, 1e-2)
    assert_close_to_scale(fisher_diagonal(compact), (X.to(torch.bfloat16).double() ** 2).mean(0) + 1e-2, rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_saliency_support_is_the_best_selection_under_both_budgets(seed):
    """variant "magnitude" with score "saliency" keeps the support that maximises Σ d_j·w̄_j² under
    the count and the MAC budget, against every selection of 12 weights (within the ILP's
    certified gap, which is 0 on most instances)."""
    g = torch.Generator().manual_seed(seed)
    p = 12
    X = torch.randn(20, p, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, p, dtype=torch.float64)
    w_bar = torch.randn(p, generator=g, dtype=torch.float64)
    q = QuadraticModel(X, w_bar, 1e-2)
    costs = torch.tensor([5.0] * 4 + [2.0] * 4 + [1.0] * 4, dtype=torch.float64)
    k, max_macs = 5, 12.0
    score = ((X ** 2).mean(0) + 1e-2) * w_bar ** 2
    best = max(float(score[list(s)].sum()) for r in range(k + 1) for s in itertools.combinations(range(p), r)
               if float(costs[list(s)].sum()) <= max_macs)
    solution = falcon(q, costs, k, max_macs, variant="magnitude", score="saliency")
    kept = solution.w != 0
    assert int(kept.sum()) <= k and float(costs[kept].sum()) <= max_macs
    got = float(score[kept].sum())
    assert got <= best * (1 + 1e-12)
    assert got >= best * (1 - solution.info["max_ilp_gap"]) - 1e-12 * best
    magnitude_best = falcon(q, costs, k, max_macs, variant="magnitude", score="magnitude")
    assert got >= float(score[magnitude_best.w != 0].sum()) * (1 - solution.info["max_ilp_gap"]) - 1e-12 * best


def test_saliency_and_magnitude_supports_differ_when_curvature_does():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 12, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, 12, dtype=torch.float64)
    w_bar = torch.randn(12, generator=g, dtype=torch.float64)
    q = QuadraticModel(X, w_bar, 1e-2)
    ones = torch.ones(12, dtype=torch.float64)
    d = (X ** 2).mean(0) + 1e-2
    sol = falcon(q, ones, 4, 12.0, variant="magnitude", score="saliency")
    assert set(sol.w.nonzero().squeeze(1).tolist()) == set(torch.topk(d * w_bar ** 2, 4).indices.tolist())
    assert set(torch.topk(d * w_bar ** 2, 4).indices.tolist()) != set(torch.topk(w_bar.abs(), 4).indices.tolist())


@pytest.mark.parametrize("seed", range(5))
def test_saliency_first_order_method_meets_both_budgets_and_never_loses_to_its_start(seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(20, 40, generator=g, dtype=torch.float64)
    q = QuadraticModel(X, torch.randn(40, generator=g, dtype=torch.float64), 1e-3)
    costs = torch.rand(40, generator=g, dtype=torch.float64) + 0.5
    max_macs = 0.3 * float(costs.sum())
    start = falcon(q, costs, 12, max_macs, variant="magnitude", score="saliency")
    dfo = falcon(q, costs, 12, max_macs, variant="dfo", score="saliency")
    assert int((dfo.w != 0).sum()) <= 12 and float(costs[dfo.w != 0].sum()) <= max_macs * (1 + 1e-12)
    assert dfo.objective <= start.objective
    assert dfo.info["score"] == "saliency"


def test_unknown_score_is_refused():
    q = QuadraticModel(torch.randn(5, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64), 1e-2)
    with pytest.raises(PrunekitError, match="saliency"):
        falcon(q, torch.ones(6, dtype=torch.float64), 3, 10.0, score="obd")


# --- end to end -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, stages", [("falcon", 1), ("falcon++", 2)])
def test_falcon_with_batch_statistic_rows_and_saliency_on_a_batchnorm_net(method, stages):
    """More rows than one pass of the data holds (12 x 8 samples from 40), both budgets met,
    the options recorded, BatchNorm's running statistics re-estimated only by the recalibration."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 36, 3))
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    result = prunekit.prune(net, (x, y), method=method, flops=0.5, batch_size=10, fisher_samples=12,
                            fisher_batch=8, fisher_bn="batch", support_score="saliency", stages=stages)
    assert result.flops_kept <= 0.5
    assert result.record["options"]["fisher_bn"] == "batch"
    assert result.record["options"]["support_score"] == "saliency"
    assert len(result.history) == stages and result.history[-1]["solver_info"]["score"] == "saliency"
