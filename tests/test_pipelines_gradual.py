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


KILL = {}     # {"at": call}: the call at which a spy raises ``Killed``, once (taken when it does)


def _spy(name, calls, kill_at=None):
    """A weights method of our own (magnitude underneath) that records each event's support and
    raises ``Killed`` at call ``kill_at``: the table takes users' methods as they are. The kill
    switch is a global the run function takes from (not a closure value), so the killed run and
    its resume run the same code, as a user's would (a run folder fingerprints a method's code)."""
    KILL.clear()
    if kill_at is not None:
        KILL["at"] = kill_at

    def run(ctx, opts):
        if KILL.get("at") == len(calls) + 1:
            KILL.pop("at")
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


def _record_finetune_orders(monkeypatch) -> list[torch.Tensor]:
    """Every fine-tune epoch's samples in the order it read them, one (N,) tensor an epoch (each
    sample's input summed: which sample, as far as the order goes). The method's own reads are
    not in it (``train_epoch`` is only the fine-tunes')."""
    import prunekit.train as train_module
    real, orders = train_module.train_epoch, []

    def recording(model, loader, *args, **kwargs):
        seen = []

        class Tap:
            def __len__(self):
                return len(loader)

            def __iter__(self):
                for x, y in loader:
                    seen.append(x.flatten(1).sum(1))
                    yield x, y
        out = real(model, Tap(), *args, **kwargs)
        orders.append(torch.cat(seen))
        return out
    monkeypatch.setattr(train_module, "train_epoch", recording)
    return orders


def _every_epoch_reads_a_new_order(orders: list[torch.Tensor], epochs: int) -> None:
    assert len(orders) == epochs
    same_samples = orders[0].sort().values
    for i, order in enumerate(orders):
        assert torch.equal(order.sort().values, same_samples)          # one whole pass of the data each
        for j in range(i):
            assert not torch.equal(order, orders[j]), f"fine-tune epochs {j} and {i} read one order"


# events 3 x 2 epochs, then 1: before the fix the events' epochs read orders 0 1 | 0 1 | 0
SHUFFLED = dict(sparsity=0.8, gradual=True, events=3, epochs_per_event=2, final_epochs=1, lr=0.05)


def _shuffled_data(kind: str, seed: int = 0):
    from prunekit.data.dataset import ImageDataset
    from prunekit.data.loaders import Normalization, make_loader
    torch.manual_seed(seed)
    images = torch.randint(0, 256, (256, 1, 4, 4), dtype=torch.uint8)
    x = (images.float() / 255 - 0.5) / 0.5
    y = x.flatten(1)[:, :4].argmax(1)
    if kind == "BatchLoader":
        return make_loader(ImageDataset(images, y, ["a", "b", "c", "d"]), Normalization((0.5,), (0.5,)),
                           batch_size=32, shuffle=True, seed=seed)
    if kind == "tensors":
        return x, y
    if kind == "Dataset":
        return torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)


@pytest.mark.parametrize("kind", ["DataLoader", "BatchLoader", "tensors", "Dataset"])
def test_every_fine_tune_epoch_of_a_gradual_run_reads_a_new_shuffle(kind, monkeypatch):
    """Event k's fine-tune carries on the run's epochs (a plain training loop's shuffles), where
    each event's used to start again at the first: 3 events of 2 epochs read one order 3 times.
    (X, Y) tensors and a Dataset are shuffled by prunekit's own loader, every epoch in the order
    (seed, epoch) draws (every epoch read one order before)."""
    orders = _record_finetune_orders(monkeypatch)
    model, example, _ = _tiny_setup()
    prunekit.prune(model, _shuffled_data(kind), method="magnitude", example_input=example, batch_size=32,
                   **SHUFFLED)
    _every_epoch_reads_a_new_order(orders, 2 + 2 + 1)


def test_every_fine_tune_epoch_of_a_gradual_cli_run_reads_a_new_shuffle(monkeypatch, capsys):
    orders = _record_finetune_orders(monkeypatch)
    assert main([*BASE, "--no-stage-eval", "--method", "magnitude", "--sparsity", "0.8", "--gradual", "--events", "3",
                 "--epochs-per-event", "2", "--final-epochs", "1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["events"]) == 3
    _every_epoch_reads_a_new_order(orders, 2 + 2 + 1)


def test_the_methods_own_data_stays_the_same_at_every_event(monkeypatch):
    """Only the fine-tunes move on: the method reads the one stream it read at event 1."""
    first_batches = []

    def method(ctx, opts):
        first_batches.append(next(iter(ctx.train_batches()))[0].clone())
        return run_magnitude(ctx, opts)
    model, example, _ = _tiny_setup()
    prunekit.prune(model, _shuffled_data("DataLoader"), method=Method("firsts", "weights", MagnitudeOptions, method),
                   example_input=example, **SHUFFLED)
    assert len(first_batches) == 3 and all(torch.equal(b, first_batches[0]) for b in first_batches)


@pytest.mark.parametrize("kind", ["DataLoader", "BatchLoader"])
def test_a_resumed_gradual_run_reads_the_shuffles_of_an_uninterrupted_one(kind, tmp_path):
    model, example, _ = _tiny_setup()
    prunekit.prune(model, _shuffled_data(kind), method=_spy("spy", []), example_input=example, batch_size=32,
                   **SHUFFLED)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    out = str(tmp_path / "run")
    model, example, _ = _tiny_setup()
    with pytest.raises(Killed):
        prunekit.prune(model, _shuffled_data(kind), method=_spy("spy", [], kill_at=3), example_input=example,
                       batch_size=32, out=out, **SHUFFLED)
    torch.manual_seed(123)                           # another process: other global RNG states
    model, example, _ = _tiny_setup()
    calls = []
    resumed = prunekit.prune(model, _shuffled_data(kind), method=_spy("spy", calls), example_input=example,
                             batch_size=32, out=out, **SHUFFLED)
    assert [e["event"] for e in resumed.history] == [1, 2, 3] and len(calls) == 1    # events 1, 2 from checkpoints
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_folder_of_the_version_that_restarted_every_fine_tune_is_carried_on_as_it_began(tmp_path, monkeypatch):
    """A run killed under the version whose every event's fine-tune started at the loader's first
    epoch (its event records have no first_epoch) resumes to the weights that version would have
    ended with uninterrupted, not to a mix of the two numberings."""
    from prunekit.pipelines import gradual
    from prunekit.runs import RunCheckpointer
    with monkeypatch.context() as old:                # the previous version: train_batches() as it comes
        old.setattr(gradual, "finetune_batches", lambda train_batches, first_epoch: train_batches())
        model, example, _ = _tiny_setup()
        prunekit.prune(model, _shuffled_data("DataLoader"), method=_spy("spy", []), example_input=example,
                       batch_size=32, **SHUFFLED)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        save = RunCheckpointer.save

        def save_as_old(self, state, model):
            for record in state.history:
                record.pop("first_epoch", None)
            save(self, state, model)
        old.setattr(RunCheckpointer, "save", save_as_old)
        out = str(tmp_path / "run")
        model, example, _ = _tiny_setup()
        with pytest.raises(Killed):
            prunekit.prune(model, _shuffled_data("DataLoader"), method=_spy("spy", [], kill_at=3),
                           example_input=example, batch_size=32, out=out, **SHUFFLED)
    model, example, _ = _tiny_setup()
    calls = []
    resumed = prunekit.prune(model, _shuffled_data("DataLoader"), method=_spy("spy", calls), example_input=example,
                             batch_size=32, out=out, **SHUFFLED)
    assert len(calls) == 1 and resumed.history[-1]["first_epoch"] == 0
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
