"""Rows of the model's Fisher (fisher_kind="model"): the seeds, the output directions' covariance,
rows against brute force on both collectors, the expectation of XᵀX/n against the exact Fisher,
the options refused where they cannot hold, and a tiny model end to end."""

import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit import fisher
from prunekit.cli import main
from prunekit.fisher import collect_gradients
from prunekit.model_fisher import output_direction_loss, sample_seeds, standard_normal, with_sample_seeds
from prunekit.options import OptionError
from prunekit.params import ParamSpace
from closeness import assert_close_to_scale


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)).eval()


def data(n, per_batch=5):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + per_batch], y[i:i + per_batch]) for i in range(0, n, per_batch)]


def test_a_sample_gets_the_same_seed_in_any_batch_and_other_samples_other_seeds():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 8, 8, generator=g)
    whole = sample_seeds(x, seed=7)
    assert torch.equal(torch.cat([sample_seeds(x[i:i + 5], seed=7) for i in range(0, 12, 5)]), whole)
    assert torch.equal(sample_seeds(x[[3, 0]], seed=7), whole[[3, 0]])
    assert len(set(whole.tolist())) == 12
    assert not torch.equal(sample_seeds(x, seed=8), whole)           # the run's seed changes the draws
    big = torch.randn(2, 3, 100, 100, generator=g)                   # more bytes than one hashed slice
    assert torch.equal(sample_seeds(big, 0), torch.cat([sample_seeds(big[:1], 0), sample_seeds(big[1:], 0)]))


def test_the_draws_are_standard_normal_and_independent():
    z = standard_normal(torch.arange(100000, dtype=torch.int64) * 7 + 1, 6).double()
    assert float(z.mean(0).abs().max()) < 0.02                          # ±0.003 one standard error
    assert_close_to_scale(z.T @ z / z.shape[0], torch.eye(6, dtype=torch.float64), rel=0.03)
    assert_close_to_scale((z ** 4).mean(0), torch.full((6,), 3.0, dtype=torch.float64), rel=0.05)
    assert torch.equal(standard_normal(torch.tensor([8, 15]), 6), standard_normal(torch.tensor([1, 8, 15]), 6)[1:])


def test_output_directions_sum_to_zero_and_have_the_predictive_covariance():
    scores = torch.tensor([[2.0, 0.5, -1.0, 0.0]]).repeat(20000, 1).requires_grad_(True)
    seeds = torch.arange(20000, dtype=torch.int64) * 7919 + 3
    output_direction_loss(scores, seeds).backward()
    v = scores.grad * scores.shape[0]                    # the per-sample directions (the loss is a mean)
    assert float(v.sum(dim=1).abs().max()) <= 1e-6 * float(v.abs().max())
    p = torch.softmax(scores.detach()[0], dim=0)
    exact = torch.diag(p) - torch.outer(p, p)
    # 20,000 draws: each entry of the sample covariance within a few percent of the largest
    assert_close_to_scale(v.T @ v / v.shape[0], exact, rel=0.05)


def brute_force_rows(model, batches, seed):
    """Per-sample gradients of ⟨scores, v⟩ by plain autograd on a copy, one sample at a time."""
    twin = copy.deepcopy(model)
    rows = []
    for x, seeds in with_sample_seeds(batches, seed):
        for i in range(x.shape[0]):
            twin.zero_grad()
            output_direction_loss(twin(x[i:i + 1]), seeds[i:i + 1]).backward()
            rows.append(torch.cat([w.grad.reshape(-1) for w in ParamSpace(twin).weights()]))
    return torch.stack(rows)


@pytest.mark.parametrize("path", ["hooks", "vmap"])
def test_model_rows_equal_brute_force_on_both_collectors(path, monkeypatch):
    model = small_net()
    if path == "vmap":
        monkeypatch.setattr(fisher.layer_grads, "supported", lambda module: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = collect_gradients(model, ParamSpace(model), data(12), n=12, chunk=4, progress=False, kind="model", seed=3)
    assert not any("one sample at a time" in str(w.message) for w in caught)      # vmap runs the draws batched
    expected = brute_force_rows(model, data(12), seed=3)
    assert_close_to_scale(rows, expected, rel=1e-5)
    empirical = collect_gradients(model, ParamSpace(model), data(12), n=12, chunk=4, progress=False)
    assert float((rows - empirical).norm()) > 0.1 * float(empirical.norm())      # really other rows


def test_the_rows_estimate_the_models_fisher():
    """E[XᵀX/n] = (1/N) Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i, with J_i the Jacobian of sample i's
    scores: checked on a linear classifier (J_i = I ⊗ x_i) with many draws per sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3, bias=False)).eval()
    x = torch.randn(4, 3)
    copies = 6000                       # each sample repeated, with a draw per copy (seeds differ by the run seed)
    rows = torch.cat([collect_gradients(model, ParamSpace(model), [(x, torch.zeros(4, dtype=torch.long))], n=4,
                                        progress=False, kind="model", seed=s) for s in range(copies)])
    estimate = rows.T @ rows / rows.shape[0]
    exact = torch.zeros(9, 9)
    with torch.no_grad():
        for xi in x:
            p = torch.softmax(model(xi), dim=0)
            jacobian = torch.kron(torch.eye(3), xi[None])       # d scores / d W (row-major W)
            exact += jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian / len(x)
    assert_close_to_scale(estimate, exact, rel=0.08)


def test_options_that_cannot_hold_are_refused_in_one_line():
    model = small_net()
    with pytest.raises(OptionError, match="fisher_kind"):
        collect_gradients(model, ParamSpace(model), data(4), n=2, progress=False, kind="true")
    for loss in (nn.functional.cross_entropy, nn.L1Loss(), nn.MSELoss(reduction="sum"),
                 nn.BCEWithLogitsLoss(pos_weight=torch.ones(4))):
        with pytest.raises(OptionError, match="use fisher_kind empirical"):
            collect_gradients(model, ParamSpace(model), data(4), n=2, progress=False, kind="model", loss_fn=loss)
    with pytest.raises(OptionError, match="fisher_kind empirical") as caught:       # before any work
        prunekit.prune(small_net(), data(20), method="falcon", flops=0.5, fisher_kind="model",
                       loss=nn.functional.cross_entropy, progress=False)
    assert caught.value.params == ("fisher_kind", "loss")
    with pytest.raises(OptionError, match="first_order"):
        prunekit.prune(small_net(), data(20), method="falcon", flops=0.5, fisher_kind="model", first_order=True,
                       progress=False)


def test_falcon_with_model_rows_meets_the_budget_and_repeats_itself():
    def run():
        return prunekit.prune(small_net(), data(40), method="falcon", flops=0.5, fisher_kind="model",
                              fisher_samples=30, progress=False)
    result, again = run(), run()
    assert result.flops_kept <= 0.5
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(),
                                                 again.model.state_dict().values()))    # seeded draws


def test_the_flag_reaches_the_method_and_a_bad_value_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "mlpnet", "--method", "falcon", "--flops", "0.5", "--fisher-kind", "true",
              "--out", "unused"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--fisher-kind" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def gauss_newton_estimate(loss, targets, copies=6000):
    """(XᵀX/n over ``copies`` draws per sample, the exact Gauss-Newton matrix) of a linear model
    with 3 outputs under ``loss`` (nn.MSELoss or nn.BCEWithLogitsLoss)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3, bias=False)).eval()
    x = torch.randn(4, 3)
    rows = torch.cat([collect_gradients(model, ParamSpace(model), [(x, targets)], n=4, progress=False,
                                        kind="model", seed=s, loss_fn=loss) for s in range(copies)])
    exact = torch.zeros(9, 9)
    with torch.no_grad():
        for xi in x:
            jacobian = torch.kron(torch.eye(3), xi[None])           # d outputs / d W (row-major W)
            if isinstance(loss, nn.MSELoss):
                curvature = 2 / 3 * torch.eye(3)
            else:
                prob = torch.sigmoid(model(xi))
                curvature = torch.diag(prob * (1 - prob)) / 3
            exact += jacobian.T @ curvature @ jacobian / len(x)
    return rows.T @ rows / rows.shape[0], exact


@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.BCEWithLogitsLoss()])
def test_the_rows_of_a_users_loss_estimate_its_gauss_newton_matrix(loss):
    estimate, exact = gauss_newton_estimate(loss, torch.rand(4, 3))
    assert_close_to_scale(estimate, exact, rel=0.08)


def test_a_users_mse_gets_model_rows_and_the_record_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 16))
    x = torch.randn(40, 1, 4, 4)
    result = prunekit.prune(model, (x, x.flatten(1)), method="chita", sparsity=0.5, loss=nn.MSELoss(),
                            fisher_kind="model", fisher_samples=20, progress=False)
    assert result.record["fisher_kind"] == "model" and result.sparsity >= 0.5


@pytest.mark.parametrize("extra, kind", [({}, "model"), ({"fisher_batch": 4}, "empirical"),
                                         ({"first_order": True}, "empirical"),
                                         ({"loss": nn.functional.cross_entropy}, "empirical"),
                                         ({"fisher_kind": "empirical"}, "empirical")])
def test_auto_takes_model_rows_for_per_sample_rows_under_the_default_loss_and_says_so(extra, kind):
    result = prunekit.prune(small_net(), data(40), method="falcon", flops=0.5, fisher_samples=8, progress=False,
                            **extra)
    assert result.record["fisher_kind"] == kind
