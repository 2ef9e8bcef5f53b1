"""prunekit.prune on a user's own model: the README example, run exactly, and the data forms."""

import copy
import re
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.costs import CostModel

ROOT = Path(__file__).resolve().parent.parent


def readme_api_example(marker: str = "<!-- runs block") -> str:
    text = (ROOT / "README.md").read_text()
    block = text[text.index(marker):]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_readme_autobot_block_runs_through_prunekit_prune(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    scope = {}
    exec(compile(readme_api_example("<!-- python block: autobot"), "README.md", "exec"), scope)
    result, loaded = scope["result"], scope["loaded"]
    assert result.method == "autobot" and result.mode == "structured" and result.flops_kept <= 0.5
    assert CostModel(loaded.model, loaded.example_input()).count(result.model).flops_kept == result.flops_kept
    assert result.accuracy > 50 and result.dense_accuracy > 90          # chance is 10%
    assert sum(result.record["kept_channels"]) < sum(result.record["group_sizes"])
    assert sorted(result.record["group_roots"]) == ["fc1", "fc2"]       # MLPNet's hidden layers, by name
    assert "MACs kept" in capsys.readouterr().out


def test_readme_own_method_block_runs():
    scope = {}
    exec(compile(readme_api_example("<!-- python block: own method"), "README.md", "exec"), scope)
    scored, result, net = scope["scored"], scope["result"], scope["net"]
    assert scored.sparsity == pytest.approx(0.8, abs=0.002) and result.method == "keep-first"
    assert result.nonzeros == int(0.1 * (64 * 32 + 32 * 4))          # floor: at most 10% kept
    flat = torch.cat([net[1].weight.flatten(), net[3].weight.flatten()])
    assert bool((flat[result.nonzeros:] == 0).all())                   # the user's method decided


def test_importance_changes_what_magnitude_keeps():
    net, x, y = _tiny()
    reference = [p.detach().clone() for p in net.parameters()]
    inverted = prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, recalibrate_bn=False,
                              importance=lambda name, w: 1 / (w.abs() + 1e-3))    # keep the smallest
    kept = torch.cat([p.flatten() for p, r in zip(net.parameters(), reference) if p.dim() > 1]) != 0
    weights = torch.cat([r.flatten() for r in reference if r.dim() > 1]).abs()
    assert inverted.sparsity == pytest.approx(0.5, abs=0.01)
    assert weights[kept].max() <= weights[~kept].min()                 # the smallest weights were kept
    with pytest.raises(prunekit.PrunekitError, match="importance"):
        prunekit.prune(_tiny()[0], (x, y), method="magnitude", sparsity=0.5, importance=lambda n, w: w.sum())


def test_readme_example_runs_and_meets_its_budget(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    scope = {}
    exec(compile(readme_api_example(), "README.md", "exec"), scope)
    result, net = scope["result"], scope["net"]
    assert result.model is net and result.method == "falcon"
    assert result.flops_kept <= 0.3
    assert CostModel(net, torch.zeros(1, 1, 28, 28)).count(net).flops_kept == pytest.approx(result.flops_kept)
    assert result.dense_accuracy > 80 and result.accuracy > 50    # chance is 10%
    assert len(result.history) == 1 and result.history[0]["accuracy"] is not None
    assert "MACs kept" in capsys.readouterr().out


def _tiny():
    torch.manual_seed(0)
    x = torch.randn(256, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    return net, x, y


@pytest.mark.parametrize("method, budget", [("magnitude", {"sparsity": 0.5}),
                                            ("magnitude-uniform", {"sparsity": 0.5}),
                                            ("magnitude-flops", {"sparsity": 0.5, "flops": 0.6})])
def test_batchnorm_left_unrecalibrated_for_want_of_data_is_said(method, budget):
    """The magnitude methods run without data; BatchNorm recalibration (on by default) then cannot
    run: one warning naming both ways out, not a silent ``bn_recalibrated: False``."""
    import warnings

    from prunekit.errors import PrunekitWarning
    net, x, _ = _tiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = prunekit.prune(net, None, method=method, example_input=x[:1], **budget)
    said = [str(w.message) for w in caught if issubclass(w.category, PrunekitWarning)
            and "BatchNorm" in str(w.message)]
    assert result.record["bn_recalibrated"] is False
    assert len(said) == 1 and "data=" in said[0] and "recalibrate_bn=False" in said[0], said
    # an explicit recalibrate_bn=False, or a model without BatchNorm: nothing to say
    for model, recalibrate in ((_tiny()[0], False), (nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrunekitWarning)
            prunekit.prune(model, None, method=method, example_input=x[:1], recalibrate_bn=recalibrate, **budget)


def test_tensor_data_and_run_folder_resume(tmp_path):
    net, x, y = _tiny()
    kwargs = dict(method="chita++", sparsity=0.8, eval_data=(x, y), stages=3, fisher_samples=32,
                  out=str(tmp_path / "run"))
    first = prunekit.prune(net, (x, y), **kwargs)
    assert first.sparsity == pytest.approx(0.8, abs=0.01) and len(first.history) == 3
    for name in ("config.toml", "metrics.json", "model.safetensors", "report.md", "checkpoints/stage-003.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    # A finished run is not redone: a fresh dense model gets the saved pruned weights.
    again_net = _tiny()[0]
    again = prunekit.prune(again_net, (x, y), **kwargs)
    assert all(a.equal(b) for a, b in zip(again_net.state_dict().values(), net.state_dict().values()))
    assert again.accuracy == first.accuracy
    with pytest.raises(prunekit.PrunekitError, match="holds another run"):
        prunekit.prune(_tiny()[0], (x, y), **{**kwargs, "sparsity": 0.5})


def test_a_run_folder_refuses_another_model_or_other_data_of_the_same_call(tmp_path):
    """The same call with another model of the same class (other weights) was taken as a resume of
    the finished run: that model's weights were replaced by the first model's pruned ones and the
    first run's record came back. The starting weights (and the data) are fingerprinted in the
    config: another model or other data is refused, the model it pruned in place is not."""
    import json
    import warnings
    net, x, y = _tiny()
    kwargs = dict(method="magnitude", sparsity=0.8, eval_data=(x, y), out=str(tmp_path / "run"))
    first = prunekit.prune(net, (x, y), **kwargs)
    torch.manual_seed(1)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(prunekit.PrunekitError, match=r"holds a run that started from other weights than this "
                                                     r"model's \(weights-sha256 differs\): .*force=True\)$"):
        prunekit.prune(other, (x, y), **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())      # left as it was
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other data-sha256\)"):
        prunekit.prune(_tiny()[0], (x, y.flip(0)), **kwargs)
    # the model the run pruned in place (a notebook cell run twice), and a fresh dense copy: the run's result
    for same in (net, _tiny()[0]):
        again = prunekit.prune(same, (x, y), **kwargs)
        assert again.record == first.record
        assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), first.model.state_dict().values()))
    # force clears that run and prunes the other model
    forced = prunekit.prune(other, (x, y), **kwargs, force=True)
    assert forced.dense_accuracy != first.dense_accuracy or forced.record != first.record
    kept = {k: other.state_dict()[k] for k in ("0.weight", "4.weight")}     # its own weights, pruned
    assert all(torch.equal(v[v != 0], before[k][v != 0]) and bool((v == 0).any()) for k, v in kept.items())
    # a folder written before the fingerprint: carried on, with a warning that says it is not checked
    config = tmp_path / "run" / "config.toml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.startswith(("weights-sha256", "data-sha256", "data-samples"))))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        old = prunekit.prune(_tiny()[0], (x, y), **kwargs)
    assert old.record == forced.record
    told = [str(w.message) for w in said if "recorded no fingerprint" in str(w.message)]
    assert len(told) == 1 and "force=True" in told[0], [str(w.message) for w in said]
    assert "its stored result is given back without checking" in told[0]      # finished: nothing carried on
    assert "final_weights_sha256" in json.loads((tmp_path / "run" / "metrics.json").read_text())
    # another call on that folder is another run, not other weights (it recorded none to compare)
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other sparsity\): pick another out"):
        prunekit.prune(_tiny()[0], (x, y), **{**kwargs, "sparsity": 0.5})
    (tmp_path / "run" / "data-rng.json").write_text("{not json")      # a damaged file of the run's: named
    with pytest.raises(prunekit.PrunekitError, match=r"data-rng.json cannot be read \(JSONDecodeError\): restore "
                                                     r"it to carry that run on, or clear the run first \(force=True\)$"):
        prunekit.prune(_tiny()[0], (x, y), **kwargs)



@pytest.mark.parametrize("damage", ["{not json", "torch byte 300", "numpy key -1", "torch byte 1.5"])
def test_a_damaged_data_rng_json_is_refused_in_one_line_and_force_clears_it(tmp_path, damage):
    """A data-rng.json with a byte over 255 or a negative key escaped as a RuntimeError or
    OverflowError traceback (a float byte was truncated), and force=True, the fix the refusal
    names, was refused too: it read the file it clears."""
    import json
    net, x, y = _tiny()
    kwargs = dict(method="magnitude", sparsity=0.5, out=str(tmp_path / "run"))
    prunekit.prune(net, (x, y), **kwargs)
    path = tmp_path / "run" / "data-rng.json"
    good = path.read_text()
    if damage == "{not json":
        path.write_text(damage)
    else:
        saved = json.loads(good)
        where, at = {"torch byte 300": (saved["data"]["torch"], 300), "torch byte 1.5": (saved["data"]["torch"], 1.5),
                     "numpy key -1": (saved["data"]["numpy"]["keys"], -1)}[damage]
        where[0] = at
        path.write_text(json.dumps(saved))
    with pytest.raises(prunekit.PrunekitError, match=r"data-rng.json cannot be read \(\w+\): restore it to carry "
                                                     r"that run on, or clear the run first \(force=True\)$"):
        prunekit.prune(_tiny()[0], (x, y), **kwargs)
    prunekit.prune(_tiny()[0], (x, y), **kwargs, force=True)
    json.loads(path.read_text())                     # the forced run kept states of its own
    prunekit.prune(_tiny()[0], (x, y), **kwargs)     # and carries on from them

def test_same_data_forms_give_the_same_result():
    net, x, y = _tiny()
    dataset = torch.utils.data.TensorDataset(x, y)
    a = prunekit.prune(net, dataset, method="chita", sparsity=0.5, fisher_samples=32)
    net2 = _tiny()[0]
    b = prunekit.prune(net2, (x, y), method="chita", sparsity=0.5, fisher_samples=32)
    assert all(p.equal(q) for p, q in zip(net.state_dict().values(), net2.state_dict().values()))
    assert a.nonzeros == b.nonzeros and a.accuracy is None


@pytest.mark.parametrize("method, options", [("chita", {"fisher_samples": 32}), ("taper", {"taper_epochs": 1})])
def test_integer_labels_of_any_dtype_are_class_indices(method, options):
    """int32 / int16 labels (cross-entropy takes only long and uint8) give the long labels' result."""
    budget = {"sparsity": 0.5} if method == "chita" else {"flops": 0.5}
    results = []
    for dtype in (torch.long, torch.int32):
        net, x, y = _tiny()
        torch.manual_seed(0)
        r = prunekit.prune(net, (x, y.to(dtype)), method=method, eval_data=(x, y.to(torch.int16)), batch_size=16,
                           **budget, **options)
        results.append((r.accuracy, r.loss, [p.clone() for p in r.model.state_dict().values()]))
    assert results[0][:2] == results[1][:2]
    assert all(p.equal(q) for p, q in zip(results[0][2], results[1][2]))


def test_bad_calls_name_the_fix():
    net, x, y = _tiny()
    with pytest.raises(prunekit.PrunekitError, match="fisher_sample"):
        prunekit.prune(net, (x, y), method="chita", sparsity=0.5, fisher_sample=32)
    with pytest.raises(prunekit.PrunekitError, match="one-pass iterator"):
        prunekit.prune(net, iter([(x, y)]), method="chita", sparsity=0.5)
    with pytest.raises(prunekit.PrunekitError, match="example_input"):
        prunekit.prune(net, method="magnitude", sparsity=0.5)
    with pytest.raises(prunekit.PrunekitError, match="flops budget") as refused:
        prunekit.prune(net, (x, y), method="falcon", sparsity=0.5)
    assert "--" not in str(refused.value)          # Python messages name parameters, not flags


def test_data_checks_leave_the_users_data_stream_untouched():
    """The checks peek at the first batch; the run must still see the batches it would have seen
    (a prunekit loader counts epochs per iter(); a shuffling DataLoader draws from torch's RNG)."""
    from prunekit.api_checks import first_batch
    from prunekit.data.dataset import ImageDataset
    from prunekit.data.loaders import Normalization, make_loader

    gen = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 10, (40,), generator=gen), [str(k) for k in range(10)])
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    loader = make_loader(ds, norm, batch_size=8, shuffle=True, augment=True, seed=3)
    peeked = first_batch(lambda: loader, "data")
    assert loader.epoch == 0
    fresh = next(iter(make_loader(ds, norm, batch_size=8, shuffle=True, augment=True, seed=3)))
    for a, b, c in zip(peeked, next(iter(loader)), fresh):
        assert torch.equal(a, b) and torch.equal(b, c)

    torch_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(20.0), torch.arange(20)),
                                               batch_size=4, shuffle=True)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first_batch(lambda: torch_loader, "data")
    assert torch.equal(torch.get_rng_state(), before)


def _image_loader(seed: int = 3):
    """A shuffling, augmenting prunekit loader over 48 random 3x8x8 images of 10 classes (6 batches)."""
    from prunekit.data.dataset import ImageDataset
    from prunekit.data.loaders import Normalization, make_loader

    gen = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 10, (48,), generator=gen), [str(k) for k in range(10)])
    return make_loader(ds, Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), batch_size=8, shuffle=True,
                       augment=True, seed=seed)


@pytest.mark.parametrize("method, options", [("taper", {"taper_epochs": 1, "channel_multiple": 1, "gate_batch_size": 8}),
                                             ("autobot", {"gate_batches": 6, "finetune_epochs": 0, "gate_batch_size": 8})])
def test_a_function_returning_a_prunekit_loader_trains_from_its_epoch_0(method, options):
    """``lambda: loader`` (prunekit.prune replays it through a ReplayedLoader): the first-batch
    checks peek through the wrapper and must not use up epochs of the user's loader, so the first
    training pass reads the batches of the loader's epoch 0, in order (its labels, as the loss sees them).
    The channel methods read a prunekit loader in ``gate_batch_size`` batches (s54: through
    ``lambda:`` too), here the loader's own 8."""
    loader = _image_loader()
    epoch0 = [y.clone() for _, y in _image_loader()]          # a twin's epoch 0, iterated alone
    assert not all(torch.equal(a, y) for a, (_, y) in zip(epoch0, _second_epoch()))     # epochs differ
    seen = []

    def loss(outputs, targets):
        if outputs.requires_grad:                     # a training step (the checks run without autograd)
            seen.append(targets.clone())
        return nn.functional.cross_entropy(outputs, targets)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                        nn.Linear(16, 10))
    prunekit.prune(net, lambda: loader, method=method, flops=0.6, loss=loss, recalibrate_bn=False, **options)
    assert len(seen) >= len(epoch0)
    first_pass = seen[:len(epoch0)]
    assert all(torch.equal(a, b) for a, b in zip(first_pass, epoch0)), \
        "the first training pass is not the loader's epoch 0: the data checks used up epochs"


def _second_epoch():
    loader = _image_loader()
    next(iter(loader))
    return iter(loader)


def test_a_function_returning_a_torch_dataloader_reads_the_order_due_at_the_call():
    """``lambda: torch_loader`` (a shuffling DataLoader drawing from torch's global RNG): the first
    training pass reads the order the loader would have given next at the call (the checks' peeks
    and the replay draw nothing from the caller's RNG before it), as before the replay's wrapper."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 3, 8, 8, generator=gen), torch.randint(0, 10, (48,), generator=gen)
    torch_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                        nn.Linear(16, 10))
    torch.manual_seed(5)
    with torch.random.fork_rng(devices=[]):
        due = [t.clone() for _, t in torch_loader]
    seen = []

    def loss(outputs, targets):
        if outputs.requires_grad:
            seen.append(targets.clone())
        return nn.functional.cross_entropy(outputs, targets)

    prunekit.prune(net, lambda: torch_loader, method="taper", flops=0.6, loss=loss, recalibrate_bn=False, seed=0,
                   taper_epochs=1, channel_multiple=1)
    assert len(seen) >= len(due) and all(torch.equal(a, b) for a, b in zip(seen[:len(due)], due))


def test_prune_gives_torchs_global_rng_back_as_it_was():
    """``seed=`` seeds the run's own draws inside ``fork_rng``: the caller's global RNG is not reseeded."""
    net, x, y = _tiny()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    prunekit.prune(net, (x, y), method="chita", sparsity=0.5, fisher_samples=16, seed=3)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_resumed_prune_leaves_the_callers_random_and_numpy_rngs_as_they_were(tmp_path, monkeypatch):
    """s54: a run resumed from its folder restores torch's RNG states of its last checkpoint alone
    (``capture_rng`` / ``restore_rng``): Python's ``random`` and NumPy's, which prunekit never seeds,
    are neither kept in a checkpoint nor set from one, so after a resumed ``prune`` the caller's
    stand where the caller left them (before, they stood where the killed run's checkpoint caught
    them: seeded with 1 here), as torch's does (``fork_rng``)."""
    import random

    import numpy as np

    from prunekit import runs
    net, x, y = _tiny()
    save = runs.RunCheckpointer.save

    def saved_then_killed(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.RunCheckpointer, "save", saved_then_killed)
    options = dict(method="chita", sparsity=0.8, stages=2, fisher_samples=16, seed=3, out=str(tmp_path / "run"))
    random.seed(1), np.random.seed(1)                  # where the caller's stand when the run is killed
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(copy.deepcopy(net), (x, y), **options)
    monkeypatch.undo()
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    expected = torch.rand(1).item(), random.random(), float(np.random.rand())
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    result = prunekit.prune(copy.deepcopy(net), (x, y), **options)
    assert result.record["nonzeros"] > 0 and len(result.history) == 2      # resumed and finished
    assert (torch.rand(1).item(), random.random(), float(np.random.rand())) == expected


def test_a_stop_while_prune_writes_its_report_is_said_in_run_log_as_after_the_run_finished(tmp_path, monkeypatch):
    """The part of ``prunekit.prune(out=)`` after the run (its final-weights note and report) lay outside the
    try that says a stop: a Ctrl-C (under torchrun, the SIGTERM of a lost rank, which was to raise LostRank
    "the run had finished") there left a bare KeyboardInterrupt and run.log silent. Now it is said there."""
    from prunekit import api
    net, x, y = _tiny()

    def stopped(folder):
        raise KeyboardInterrupt
    monkeypatch.setattr(api, "_write_report", stopped)
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, out=str(tmp_path / "run"))
    last = (tmp_path / "run" / "run.log").read_text().splitlines()[-1]
    assert "interrupted (Ctrl-C)" in last and last.endswith("after the run finished (its result stands)"), last
    assert '"done"' in (tmp_path / "run" / "metrics.json").read_text()


class _SlowEvaluation:
    """Evaluation batches that take ``pause`` seconds to start, every pass."""

    def __init__(self, x, y, pause: float):
        self.x, self.y, self.pause = x, y, pause

    def __iter__(self):
        time.sleep(self.pause)
        yield self.x, self.y


def test_pruning_seconds_leave_out_the_stage_evaluations():
    net, x, y = _tiny()
    start = time.perf_counter()
    result = prunekit.prune(net, (x, y), method="chita++", sparsity=0.8, stages=3, fisher_samples=32,
                            eval_data=_SlowEvaluation(x, y, pause=0.5))
    wall = time.perf_counter() - start
    evaluations = [stage["eval_seconds"] for stage in result.history]
    assert len(evaluations) == 3 and min(evaluations) >= 0.5
    # the stage evaluations lie outside result.seconds, whatever the machine's speed (a bound on
    # result.seconds itself failed under load)
    assert wall - result.seconds >= 0.99 * sum(evaluations)


def test_the_last_stage_record_measures_the_final_model():
    net, x, y = _tiny()
    result = prunekit.prune(net, (x, y), method="chita++", sparsity=0.8, stages=3, fisher_samples=32,
                            eval_data=(x, y))
    last = result.history[-1]
    assert last["bn_recalibrated"] and result.record["bn_recalibrated"]
    assert last["loss"] == result.record["loss"] and last["accuracy"] == result.accuracy


def test_readme_loss_block_runs(capsys):
    scope = {}
    exec(compile(readme_api_example("<!-- python block: loss"), "README.md", "exec"), scope)
    result = scope["result"]
    assert result.accuracy is None and result.loss > result.dense_loss > 0
    assert "loss " in capsys.readouterr().out


def test_a_regression_model_prunes_with_its_own_loss():
    """loss= (here MSE) is what the gradients, the layer search's judge, the final pick, the gradual
    mode's fine-tunes and the evaluation use; the budget holds as for a classifier, and CHITA's backsolve beats magnitude
    on the loss it was given."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 3) + 0.1 * torch.randn(256, 3)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
    mse = nn.MSELoss()
    results = {}
    for method, options in [("magnitude", {"sparsity": 0.7}), ("chita", {"sparsity": 0.7, "fisher_samples": 128}),
                            ("falcon++", {"flops": 0.3, "fisher_samples": 64, "stages": 2, "layer_search": 3})]:
        model = copy.deepcopy(net)
        result = prunekit.prune(model, (x, y), method=method, eval_data=(x, y), loss=mse, **options)
        results[method] = result
        assert result.accuracy is None and result.dense_accuracy is None
        with torch.no_grad():
            assert result.loss == pytest.approx(float(mse(model(x), y)), rel=1e-5)
            assert result.record["dense_loss"] == pytest.approx(float(mse(net(x), y)), rel=1e-5)
        assert f"loss {result.dense_loss:.4g} -> {result.loss:.4g}" in result.summary()
    assert results["chita"].loss < 0.5 * results["magnitude"].loss
    assert results["chita"].record["loss_function"] == "MSELoss"
    gradual = prunekit.prune(copy.deepcopy(net), (x, y), method="chita", sparsity=0.7, eval_data=(x, y), loss=mse,
                             fisher_samples=128, gradual=True, events=2, epochs_per_event=1, final_epochs=2)
    unfitted = prunekit.prune(copy.deepcopy(net), (x, y), method="chita", sparsity=0.7, eval_data=(x, y), loss=mse,
                              fisher_samples=128, refit_batches=0)
    assert gradual.loss < unfitted.loss                 # fine-tuned on the MSE between events
    assert gradual.sparsity >= 0.7 and all(event["accuracy"] is None for event in gradual.history)
    recount = CostModel(results["falcon++"].model, x[:1]).count(results["falcon++"].model)
    assert recount.flops_kept <= 0.3 + 1e-12
    assert results["falcon++"].history[-1]["layer_search_loss"] <= results["falcon++"].history[-1]["layer_search_start_loss"]


@pytest.mark.parametrize("method, options", [("autobot", {"gate_batches": 6, "finetune_epochs": 1}),
                                             ("taper", {"taper_epochs": 2, "finetune_epochs": 1}),
                                             ("hybrid", {"gate_batches": 6, "structured_flops": 0.7,
                                                         "fisher_samples": 32})])
def test_channel_methods_train_on_the_users_loss(method, options):
    """The gates, the fine-tune (and the hybrid's FALCON) use loss=: every training step calls it.
    The model passed in is left untouched (the taper trains a copy)."""
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = x @ torch.randn(8, 3)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    before = copy.deepcopy(net.state_dict())
    calls = []

    def mse(outputs, targets):
        calls.append(outputs.requires_grad)
        return nn.functional.mse_loss(outputs, targets)

    result = prunekit.prune(net, (x, y), method=method, flops=0.5, eval_data=(x, y), loss=mse, batch_size=32,
                            **options)
    assert result.accuracy is None and result.loss is not None and result.flops_kept <= 0.5
    trained = sum(calls)                              # calls with autograd on: training steps
    assert trained >= 4 + 4 * options.get("finetune_epochs", 0)
    assert CostModel(net, x[:1]).count(result.model).flops_kept == pytest.approx(result.flops_kept)
    assert all(before[k].equal(v) for k, v in net.state_dict().items())


class _Computed(torch.utils.data.Dataset):
    """A Dataset whose items are computed by code (prunekit cannot fingerprint its contents)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_a_run_folder_refuses_a_loader_of_other_data_of_the_same_size(tmp_path, caplog):
    """A DataLoader's data were fingerprinted by their sample count only: the same call over other
    data of the same size got the old run's result (and its pruned weights written into the
    model). What a loader holds is hashed where that is exact (a TensorDataset, a Subset of one),
    whatever order its batches come in; other Datasets are said to be unchecked."""
    import logging
    import warnings
    from torch.utils.data import DataLoader, Subset, TensorDataset
    from prunekit.errors import PrunekitWarning
    net, x, y = _tiny()
    kwargs = dict(method="magnitude", sparsity=0.8, out=str(tmp_path / "run"))
    loader = lambda x, y, **kw: DataLoader(TensorDataset(x, y), batch_size=32, **kw)     # noqa: E731
    first = prunekit.prune(net, loader(x, y, shuffle=True), **kwargs)
    assert 'data-form = "DataLoader"' in (tmp_path / "run" / "config.toml").read_text()
    for other in (loader(x, y.flip(0), shuffle=True), loader(x + 1e-3, y),
                  DataLoader(Subset(TensorDataset(torch.cat([x, x]), torch.cat([y, 1 - y])), range(256, 512)),
                             batch_size=32)):
        fresh = _tiny()[0]
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other data-sha256\)"):
            prunekit.prune(fresh, other, **kwargs)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())    # left as it was
    # the same data in another order, or a Subset taking all of it in order: the same run (given back, said once)
    caplog.set_level(logging.INFO, logger="prunekit")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        again = prunekit.prune(_tiny()[0], loader(x, y, shuffle=False), **kwargs)
    assert again.record == first.record
    said = [str(w.message) for w in said if issubclass(w.category, PrunekitWarning)]
    assert not said, said           # the given-back note is a note (errors.note), not a warning
    assert "holds this run, finished: its stored result is given back" in caplog.text
    # a Subset's indices are part of its contents
    sub = dict(kwargs, out=str(tmp_path / "sub"))
    prunekit.prune(_tiny()[0], DataLoader(Subset(TensorDataset(x, y), range(128)), batch_size=32), **sub)
    with pytest.raises(prunekit.PrunekitError, match=r"other data-sha256"):
        prunekit.prune(_tiny()[0], DataLoader(Subset(TensorDataset(x, y), range(128, 256)), batch_size=32), **sub)
    # a Dataset of the user's: its contents cannot be checked, and a finished run called again says so, once
    computed = dict(kwargs, out=str(tmp_path / "computed"))
    done = prunekit.prune(_tiny()[0], DataLoader(_Computed(x, y), batch_size=32), **computed)
    assert "data-sha256" not in (tmp_path / "computed" / "config.toml").read_text()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        given = prunekit.prune(_tiny()[0], DataLoader(_Computed(x, y.flip(0)), batch_size=32), **computed)
    assert given.record == done.record
    told = [str(w.message) for w in said if "could not be checked" in str(w.message)]
    assert len(told) == 1 and "its stored result is given back" in told[0] and "force=True" in told[0], told
    # a folder of a prunekit that recorded a loader's data by sample count only: carried on, said so
    config = tmp_path / "run" / "config.toml"
    config.write_text("".join(line for line in config.read_text().splitlines(keepends=True)
                              if not line.startswith(("data-sha256", "data-form"))))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        old = prunekit.prune(_tiny()[0], loader(x, y), **kwargs)
    assert old.record == first.record
    told = [str(w.message) for w in said if "sample count only" in str(w.message)]
    assert len(told) == 1 and "without checking that this data" in told[0], [str(w.message) for w in said]


def test_the_same_data_in_another_form_is_refused_naming_the_form(tmp_path):
    """A finished (X, Y)-tensor run called with the same tensors in a DataLoader was refused as
    "other data-sha256": the data are the same, the form changed (which reads other batches)."""
    from torch.utils.data import DataLoader, TensorDataset
    net, x, y = _tiny()
    kwargs = dict(method="magnitude", sparsity=0.8, out=str(tmp_path / "run"))
    prunekit.prune(net, (x, y), **kwargs)
    with pytest.raises(prunekit.PrunekitError, match=r"holds a run over the same data in another form \(\(X, Y\) "
                                                     r"tensors, now DataLoader; batch size 128, now 32\), which "
                                                     r"reads other batches: pass "
                                                     r"the data as that run did.*force=True\)$"):
        prunekit.prune(_tiny()[0], DataLoader(TensorDataset(x, y), batch_size=32), **kwargs)
    with pytest.raises(prunekit.PrunekitError, match=r"other data-sha256"):       # other data in a loader
        prunekit.prune(_tiny()[0], DataLoader(TensorDataset(x, y.flip(0)), batch_size=32), **kwargs)
    with pytest.raises(prunekit.PrunekitError, match=r"in another form \(\(X, Y\) tensors, now DataLoader; "
                                                     r"their contents could not be compared; batch size 128, now 32\)"):
        prunekit.prune(_tiny()[0], DataLoader(_Computed(x, y), batch_size=32), **kwargs)


def test_a_run_folder_refuses_other_eval_data_or_another_batch_size(tmp_path):
    """The same call with other eval_data, or another batch size (the argument for tensors, a
    DataLoader's own), was handed the first run's result back: neither was recorded. eval_data is
    fingerprinted as data is, the batch size recorded; a folder written before either carries on,
    with one warning that says they are not checked."""
    import warnings
    from torch.utils.data import DataLoader, TensorDataset
    net, x, y = _tiny()
    kwargs = dict(method="magnitude", sparsity=0.8, out=str(tmp_path / "run"))
    first = prunekit.prune(net, (x, y), eval_data=(x, y), **kwargs)
    config = (tmp_path / "run" / "config.toml").read_text()
    assert "eval-data-sha256 = " in config and "batch-size = 128" in config, config
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other eval-data-sha256\): pick another "
                                                     r"out.*force=True\)$"):
        prunekit.prune(_tiny()[0], (x, y), eval_data=(x, 1 - y), **kwargs)
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other eval-data-sha256, "
                                                     r"eval-data-samples\)"):
        prunekit.prune(_tiny()[0], (x, y), eval_data=(x[:64], y[:64]), **kwargs)
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other eval-data-sha256, eval-data-samples\)"):
        prunekit.prune(_tiny()[0], (x, y), **kwargs)            # no eval_data: no accuracy to give back
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other batch-size\)"):
        prunekit.prune(_tiny()[0], (x, y), eval_data=(x, y), batch_size=32, **kwargs)
    again = prunekit.prune(_tiny()[0], (x, y), eval_data=(x, y), **kwargs)         # the same call: its result
    assert again.record == first.record
    # a DataLoader's own batch size is what its batches hold (the argument does not change them)
    loaded = dict(kwargs, out=str(tmp_path / "loader"))
    prunekit.prune(_tiny()[0], DataLoader(TensorDataset(x, y), batch_size=32), **loaded)
    assert "batch-size = 32" in (tmp_path / "loader" / "config.toml").read_text()
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other batch-size\)"):
        prunekit.prune(_tiny()[0], DataLoader(TensorDataset(x, y), batch_size=64), **loaded)
    prunekit.prune(_tiny()[0], DataLoader(TensorDataset(x, y), batch_size=32), batch_size=7, **loaded)
    # eval_data whose contents cannot be hashed: compared by form and samples, and said so once
    computed = dict(kwargs, out=str(tmp_path / "computed"))
    prunekit.prune(_tiny()[0], (x, y), eval_data=_Computed(x, y), **computed)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        prunekit.prune(_tiny()[0], (x, y), eval_data=_Computed(x, y), **computed)
    told = [str(w.message) for w in said if "could not be checked" in str(w.message)]
    assert len(told) == 1 and "this eval_data (Dataset)" in told[0], [str(w.message) for w in said]
    # a folder of a prunekit that recorded neither: carried on, with one warning
    path = tmp_path / "run" / "config.toml"
    path.write_text("".join(line for line in config.splitlines(keepends=True)
                            if not line.startswith(("eval-data-", "batch-size"))))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        old = prunekit.prune(_tiny()[0], (x, y), eval_data=(x, y), **kwargs)
    assert old.record == first.record
    told = [str(w.message) for w in said if "neither the eval_data nor the batch size" in str(w.message)]
    assert len(told) == 1 and "force=True" in told[0], [str(w.message) for w in said]
    with pytest.raises(prunekit.PrunekitError, match=r"holds another run \(other sparsity\)"):     # the rest: compared
        prunekit.prune(_tiny()[0], (x, y), eval_data=(x, y), **{**kwargs, "sparsity": 0.5})


def test_a_run_folder_belongs_to_one_loss(tmp_path):
    """The loss is part of the request a run folder holds: the same call resumes (a finished run
    is read back), another loss is refused."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randn(64, 2)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    run = dict(method="chita", sparsity=0.5, fisher_samples=32, out=str(tmp_path / "run"))
    first = prunekit.prune(copy.deepcopy(net), (x, y), loss=nn.MSELoss(), **run)
    again = prunekit.prune(copy.deepcopy(net), (x, y), loss=nn.MSELoss(), **run)
    assert again.record == first.record
    with pytest.raises(prunekit.PrunekitError, match="holds another run") as refused:
        prunekit.prune(copy.deepcopy(net), (x, y), loss=nn.L1Loss(), **run)
    assert "force=True" in str(refused.value) and "resume" not in str(refused.value)    # the API's words


def test_an_example_batch_counts_per_example_work_that_does_not_grow_with_the_batch():
    # learned latents through a layer cost the same whatever the batch: traced at batch 4 and
    # divided by 4 they were rounded down (256 MACs counted as 64), and the budget with them
    class Latents(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.latents = torch.nn.Parameter(torch.randn(4, 8))
            self.proj = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):                                   # x (B, 8)
            return self.head(x + self.proj(self.latents).mean(0))

    torch.manual_seed(0)
    X, Y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    result = prunekit.prune(Latents(), (X, Y), method="magnitude-flops", flops=0.5, example_input=X[:4])
    assert result.record["dense_macs"] == 4 * 8 * 8 + 8 * 3


def test_readme_own_fine_tune_block_holds_each_events_zeros():
    """The README's gradual pruning with the user's own fine-tune loop: after every event's
    training under MaskHold the weights pruned stay zero, and the last event meets its budget."""
    scope = {}
    exec(compile(readme_api_example("<!-- python block: own fine-tune"), "README.md", "exec"), scope)
    net, space = scope["net"], scope["space"]
    weights = torch.cat([w.detach().flatten() for w in space.weights()])
    assert [e.module_name for e in space.entries] == ["1", "3"]
    assert float((weights == 0).float().mean()) == pytest.approx(0.9, abs=0.002)
    assert net[1].weight.grad is not None                   # the loop trained the pruned net


def test_a_python_run_folder_records_the_class_names_its_data_carries(tmp_path):
    """prunekit.prune(..., out=) records the data's class names in model.json, as the command line
    does for an image folder (a later folder is then labelled by the model's own names): a loader of
    prunekit's ImageDataset, a torch DataLoader of a Subset of an ImageFolder-like dataset (its
    ``.classes``). Names of some outputs only, and (X, Y) tensors, record none."""
    import json
    from torch.utils.data import DataLoader, Dataset, Subset

    from prunekit.data import Normalization, make_loader
    from prunekit.data.dataset import ImageDataset

    names = ["cat", "dog", "eel"]

    def net(outputs=3):
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, outputs))

    def recorded(out):
        return json.loads((out / "model.json").read_text()).get("class_names")

    images = torch.randint(0, 256, (24, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    own = make_loader(ImageDataset(images, torch.arange(24) % 3, names), Normalization((0.5,), (0.5,)), batch_size=8)
    prunekit.prune(net(), own, method="magnitude", sparsity=0.5, out=tmp_path / "own")
    assert recorded(tmp_path / "own") == names

    class Folder(Dataset):          # what torchvision's ImageFolder offers: .classes, (image, label) items
        classes = names

        def __len__(self):
            return 24

        def __getitem__(self, i):
            return images[i].float() / 255, i % 3
    loader = DataLoader(Subset(Folder(), range(20)), batch_size=8)
    prunekit.prune(net(), loader, method="magnitude", sparsity=0.5, out=tmp_path / "torch")
    assert recorded(tmp_path / "torch") == names
    prunekit.prune(net(), (images.float(), torch.arange(24) % 3), method="magnitude", sparsity=0.5,
                   eval_data=loader, out=tmp_path / "eval")            # eval_data's, when data has none
    assert recorded(tmp_path / "eval") == names
    prunekit.prune(net(4), loader, method="magnitude", sparsity=0.5, out=tmp_path / "some")
    assert recorded(tmp_path / "some") is None                         # 3 names for 4 outputs
    prunekit.prune(net(), (images.float(), torch.arange(24) % 3), method="magnitude", sparsity=0.5,
                   out=tmp_path / "tensors")
    assert recorded(tmp_path / "tensors") is None


def test_data_identity_of_prunekit_loaders_is_their_contents_not_their_order():
    from prunekit.api import data_identity
    from prunekit.data.dataset import ImageDataset
    from prunekit.data.loaders import Normalization, make_loader
    ds = ImageDataset(torch.randint(0, 255, (10, 1, 4, 4), dtype=torch.uint8), torch.arange(10) % 2, ["a", "b"])
    norm = Normalization((0.5,), (0.5,))
    first = data_identity(make_loader(ds, norm, shuffle=True))
    assert first[1] == "prunekit loader" and len(first[0]) == 64
    assert data_identity(make_loader(ds, norm, batch_size=3)) == first             # order and batching: the same
    assert data_identity(make_loader(ImageDataset(ds.images, 1 - ds.labels, ["a", "b"]), norm)) != first
    assert data_identity(make_loader(ds, Normalization((0.4,), (0.5,)))) != first     # other inputs
    assert data_identity(iter([]))[0] is None                                          # an iterable: unchecked


def test_a_channel_run_without_fine_tune_names_it_in_python_terms():
    """``Result.summary()`` of a channel method with finetune_epochs 0 ends with the CLI's fine-tune
    hint in Python terms (finetune_epochs=3, or ``prunekit.train.train_epochs`` on ``result.model``,
    the hybrid's zeros held); the call it names runs; no such line after a fine-tune or a weights method."""
    import prunekit.train
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]

    def run(method, **options):
        return prunekit.prune(copy.deepcopy(net), lambda: data, method=method, flops=0.5, example_input=x, **options)

    for method, options in [("autobot", {"gate_batches": 2}),
                            ("hybrid", {"gate_batches": 2, "structured_flops": 0.7, "fisher_samples": 16})]:
        result = run(method, **options)
        lines = result.summary().splitlines()
        assert len(lines) == 2 and lines[0].startswith(f"{method}: "), lines
        assert "finetune_epochs=3" in lines[1] and "prunekit.train.train_epochs(result.model, TRAIN_DATA" in lines[1]
        call = lines[1][lines[1].index("prunekit.train.train_epochs("):]
        layers = [m for m in result.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        zeros = [m.weight.detach() == 0 for m in layers]
        before = [m.weight.detach().clone() for m in layers]
        eval(call[:-1] + ", progress=False)", {"prunekit": prunekit, "result": result, "TRAIN_DATA": data}, {})
        assert any(not torch.equal(m.weight, b) for m, b in zip(layers, before)), "the call named trained nothing"
        if method == "hybrid":       # FALCON's zeros held by the call named
            assert 'zeros="keep"' in call and sum(int(z.sum()) for z in zeros) > 0
            assert all(bool((m.weight[z] == 0).all()) for m, z in zip(layers, zeros))
    tuned = run("autobot", gate_batches=2, finetune_epochs=1)
    assert len(tuned.summary().splitlines()) == 1 and "finetune_epochs" not in tuned.summary()
    assert "finetune_epochs" not in run("magnitude").summary()


def test_summary_says_the_parameters_kept_as_the_cli_counts_them():
    """``Result.summary()`` has a params line beside its MACs line: "params kept P% (N of M)", N the
    parameters of the returned model (a zero weight not counted), counted again here by a cost model of
    the dense net, as the CLI's ``params`` line counts them: for a weights method (masked) and for a
    channel method given a params budget (a smaller model)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    dense_params = sum(p.numel() for p in net.parameters())
    for method, budget in [("magnitude", {"sparsity": 0.6}), ("autobot", {"flops": 0.9, "params": 0.4, "gate_batches": 2})]:
        result = prunekit.prune(copy.deepcopy(net), lambda: data, method=method, example_input=x, **budget)
        counts = CostModel(copy.deepcopy(net), x).count(result.model)
        assert counts.dense_params == dense_params and 0 < counts.params < 0.9 * dense_params, counts
        line = result.summary().splitlines()[0]
        kept = re.search(r"params kept ([\d.]+)% \(([\d,]+) of ([\d,]+)\)", line)
        assert kept, line
        assert int(kept[2].replace(",", "")) == counts.params and int(kept[3].replace(",", "")) == dense_params
        assert float(kept[1]) == pytest.approx(100 * counts.params / dense_params, abs=0.006)
        assert line.index("MACs kept") < kept.start() < line.rindex(", ")      # beside the MACs, before the time
        if method == "autobot":
            assert counts.params <= 0.4 * dense_params                       # the params budget it was given


def test_train_epochs_on_a_function_returning_a_prunekit_loader_starts_at_its_epoch_0():
    """``prunekit.train.train_epochs(model, lambda: loader)``: its first-batch check peeks through
    the per-pass wrapper and puts its pass count back, so epoch 1 of training reads the loader's
    epoch 0; the user's loader is read from copies and stays at its epoch (s55: it moved on by one
    epoch per training epoch, where ``prunekit.prune``'s replay of the same function leaves it)."""
    from prunekit.train import train_epochs

    loader = _image_loader()
    epoch0 = [y.clone() for _, y in _image_loader()]
    seen = []

    def loss(outputs, targets):
        seen.append(targets.clone())
        return nn.functional.cross_entropy(outputs, targets)

    torch.manual_seed(0)
    train_epochs(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)), lambda: loader, epochs=1, loss_fn=loss,
                 progress=False)
    assert loader.epoch == 0
    assert len(seen) == len(epoch0) and all(torch.equal(a, b) for a, b in zip(seen, epoch0))


def test_train_helpers_read_lambda_loader_as_prune_does_and_a_carried_on_training_reads_the_same():
    """``lambda: loader`` over a prunekit loader in ``train_epochs``, ``evaluate`` and
    ``recalibrate_batchnorm``: pass k reads the loader's epoch moved on by k, from a copy (the
    replay's rule, ``at_pass``), and the user's loader stays at its epoch. Two epochs at once read
    what one epoch, then one more with ``loader.epoch = 1`` (a training carried on), read; the
    batches differ from epoch to epoch (the loader shuffles), so reading one epoch twice would show."""
    from prunekit.train import batches_of, evaluate, recalibrate_batchnorm, train_epochs

    def read(epochs: int, start: int = 0) -> list[torch.Tensor]:
        loader = _image_loader()
        loader.epoch = start
        seen = []

        def loss(outputs, targets):
            seen.append(targets.clone())
            return nn.functional.cross_entropy(outputs, targets)
        torch.manual_seed(0)
        train_epochs(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)), lambda: loader, epochs=epochs,
                     loss_fn=loss, progress=False)
        assert loader.epoch == start
        return seen

    def epoch(k: int) -> list[torch.Tensor]:
        loader = _image_loader()
        loader.epoch = k
        return [y.clone() for _, y in loader]

    whole, first, then = read(2), read(1), read(1, start=1)
    assert len(whole) == len(first) + len(then) == 2 * len(epoch(0))
    assert all(torch.equal(got, want) for got, want in zip(whole, epoch(0) + epoch(1)))
    assert all(torch.equal(a, b) for a, b in zip(whole, first + then))
    assert not all(torch.equal(a, b) for a, b in zip(epoch(0), epoch(1)))
    loader = _image_loader()
    loader.epoch = 2
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    evaluate(net, lambda: loader)
    assert recalibrate_batchnorm(net, batches_of(lambda: loader))
    assert loader.epoch == 2
