"""Gradual pruning: event budgets, masks held between events, budgets met at the end."""

import json
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.budget import ResolvedBudget
from prunekit.cli import main
from prunekit.errors import PrunekitError
from prunekit.methods import Method
from prunekit.pipelines.gradual import GradualOptions, event_budgets
from prunekit.pipelines.magnitude_methods import MagnitudeOptions, run_magnitude

ASSETS = Path(prunekit.__file__).parent / "assets"
BASE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"),
        "--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256", "--json"]


def test_event_budgets_shrink_to_the_target_on_both_budgets():
    budget = ResolvedBudget(max_nonzeros=100, max_macs=3000, total_prunable=1000, fixed_macs=7)
    budgets = event_budgets(budget, dense_macs=10_000, opts=GradualOptions(events=5))
    counts = [b.max_nonzeros for b in budgets]
    macs = [b.max_macs for b in budgets]
    assert budgets[-1] == budget and len(budgets) == 5
    assert counts == sorted(counts, reverse=True) and counts[0] < 1000
    assert macs == sorted(macs, reverse=True) and macs[0] <= 9000
    assert all(b.fixed_macs == 7 for b in budgets)


def _tiny_setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = torch.randn(256, 1, 4, 4)
    y = (x.flatten(1)[:, :4].argmax(1))
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    return model, x[:1], (lambda: batches)


def _spy(name, calls, kill_at=None):
    """A weights method of our own (magnitude underneath) that records each event's support and
    raises ``Killed`` at call ``kill_at``: the table takes users' methods as they are."""

    def run(ctx, opts):
        if kill_at is not None and len(calls) + 1 == kill_at:
            raise Killed
        pruned = run_magnitude(ctx, opts)
        calls.append(pruned.weights != 0)
        return pruned
    return Method(name, "weights", MagnitudeOptions, run)


class Killed(Exception):
    pass


GRADUAL = dict(sparsity=0.9, gradual=True, events=3, epochs_per_event=1, final_epochs=1, lr=0.05)


def test_pruned_weights_stay_pruned_across_events():
    model, example, loader = _tiny_setup()
    supports = []
    result = prunekit.prune(model, loader, method=_spy("spy", supports), example_input=example, eval_data=loader(),
                            **GRADUAL)
    assert len(supports) == 3 and len(result.history) == 3 and result.mode == "gradual"
    for earlier, later in zip(supports, supports[1:]):
        assert not (later & ~earlier).any()                 # nothing revived by fine-tuning
    assert result.nonzeros <= 0.1 * (16 * 32 + 32 * 4)
    final = torch.cat([model[1].weight.flatten(), model[3].weight.flatten()]) != 0
    assert torch.equal(final, supports[-1])                  # the final fine-tune held the mask
    assert all(r["accuracy"] is not None and r["loss"] is not None for r in result.history)


def test_gradual_cli_meets_both_budgets(capsys):
    assert main([*BASE, "--method", "falcon", "--sparsity", "0.8", "--flops", "0.15", "--fisher-samples", "32",
                 "--gradual", "--events", "2", "--epochs-per-event", "1", "--final-epochs", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gradual"] and len(out["events"]) == 2
    assert out["nonzeros"] <= 0.2 * 32360 and out["flops_kept"] <= 0.15
    assert out["events"][0]["max_nonzeros"] > out["events"][1]["max_nonzeros"]
    assert out["accuracy"] > 50


@pytest.mark.parametrize("field,value", [("events", 0), ("final_epochs", -1), ("lr", 0.0)])
def test_bad_options_are_refused(field, value):
    model, example, loader = _tiny_setup()
    with pytest.raises(PrunekitError, match=field):
        prunekit.prune(model, loader, method="magnitude", example_input=example, **{**GRADUAL, field: value})


def test_an_interrupted_gradual_run_resumes_to_the_same_weights(tmp_path):
    model, example, loader = _tiny_setup()
    prunekit.prune(model, loader, method=_spy("spy", []), example_input=example, **GRADUAL)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    out = str(tmp_path / "run")
    model, example, loader = _tiny_setup()
    with pytest.raises(Killed):
        prunekit.prune(model, loader, method=_spy("spy", [], kill_at=2), example_input=example, out=out, **GRADUAL)
    model, example, loader = _tiny_setup()            # a fresh process: dense weights again
    calls = []
    resumed = prunekit.prune(model, loader, method=_spy("spy", calls), example_input=example, out=out, **GRADUAL)
    assert [e["event"] for e in resumed.history] == [1, 2, 3]
    assert len(calls) == 2                             # event 1 came from the checkpoint
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
