"""falcon++'s stages "auto": the thorough schedule where the layer search over it is cheap."""

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import main
from prunekit.commands.prune import _event_choice_lines, _stages_lines
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.params import ParamSpace
from prunekit.pipelines import fisher_methods
from prunekit.pipelines.fisher_options import FalconOptions
from prunekit.pipelines.weights import PruneContext


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))


def data(count=400):
    g = torch.Generator().manual_seed(1)
    return torch.randn(count, 1, 6, 6, generator=g), torch.randint(0, 3, (count,), generator=g)


def resolve(net, x, y, raw: dict):
    """resolve_stages on falcon++'s options from the user's ``raw`` ones, batches of 10."""
    ctx = PruneContext(net, ParamSpace(net), CostModel(net, x[:1]), budget=None,
                       train_batches=lambda: [(x[i:i + 10], y[i:i + 10]) for i in range(0, len(x), 10)])
    opts = FalconOptions.from_user(raw, "falcon++", stages="auto", fisher_samples=500)
    return fisher_methods.resolve_stages(ctx, opts)


def test_falcon_pp_runs_the_thorough_schedule_where_the_search_over_it_is_cheap():
    net, (x, y) = mlp(), data()
    options = dict(flops=0.3, sparsity=0.7, batch_size=10, fisher_samples=4, layer_search=2, refit_batches=0)
    result = prunekit.prune(copy.deepcopy(net), (x, y), method="falcon++", **options)
    auto = result.record["stages_auto"]
    assert auto["thorough"] and auto["stages"] == 15 == len(result.history)
    assert result.record["mode"] == "multi-stage"
    # the given n is kept; fresh images are the schedule's, the rows the method's own
    assert (auto["fisher_samples"], auto["fisher_batch"], auto["fresh_samples"]) == (4, 1, True)
    assert result.record["fisher_samples"] == 4 and result.record["fisher_kind"] == "model"
    # 15 searches of 2 trials, each re-estimating BatchNorm on 4 batches and judging on 8, of 10 examples
    assert auto["forward_macs"] == 15 * 2 * 12 * 10 * CostModel(net, x[:1]).macs
    assert auto["weight_trials"] == 15 * 2 * ParamSpace(net).numel
    assert all("layer_search_loss" in stage for stage in result.history)
    recount = CostModel(result.model, x[:1]).count(result.model)
    kept = int((ParamSpace(result.model).vector() != 0).sum())
    assert recount.flops_kept <= 0.3 + 1e-12 and kept <= round(0.3 * ParamSpace(net).numel)


def test_elsewhere_five_stages_of_the_methods_own_rows(monkeypatch):
    net, (x, y) = mlp(), data()
    cheap, auto = resolve(net, x, y, {})
    assert auto["thorough"] and cheap.stages == 15 and auto["search_trials"] == 100
    for limit, over in (("AUTO_LAYER_SEARCH_MACS", "forward_macs"), ("AUTO_LAYER_SEARCH_WEIGHTS", "weight_trials")):
        with monkeypatch.context() as patch:
            patch.setattr(fisher_methods, limit, auto[over] - 1)
            costly, why = resolve(net, x, y, {})
        assert not why["thorough"] and costly.stages == why["stages"] == 5
        assert (costly.fisher_samples, costly.fresh_samples) == (500, False)
        assert why[over] == auto[over]
    # without the search the 15-stage schedule is not what was measured
    unsearched, why = resolve(net, x, y, {"layer_search": 0})
    assert unsearched.stages == 5 and not why["thorough"] and why["search_trials"] == 0 and "forward_macs" not in why
    given, why = resolve(net, x, y, {"stages": 3})
    assert given.stages == 3 and why == {}


def test_the_thorough_schedule_keeps_what_the_user_asked_for():
    net, (x, y) = mlp(), data()
    chosen, auto = resolve(net, x, y, {"fisher_batch": 2, "fresh_samples": False, "fisher_samples": 64})
    assert chosen.stages == 15 and (chosen.fisher_batch, chosen.fresh_samples, chosen.fisher_samples) == (2, False, 64)
    assert (auto["fisher_batch"], auto["fresh_samples"], auto["fisher_samples"]) == (2, False, 64)
    assert chosen.given == {"fisher_batch", "fresh_samples", "fisher_samples"}
    plain, auto = resolve(net, x, y, {})
    assert (plain.fisher_batch, plain.fresh_samples, plain.fisher_samples) == (1, True, 1000)
    first, auto = resolve(net, x, y, {"layer_search": 7, "layer_search_mode": "first"})
    assert first.stages == 15 and auto["search_trials"] == 7
    assert auto["weight_trials"] == 7 * ParamSpace(net).numel        # mode first: one search, at stage 1


def test_the_summary_says_which_schedule_and_why():
    limits = {"limit_macs": 1e11, "limit_weight_trials": 5e7}
    thorough = {"stages": 15, "thorough": True, "fisher_samples": 1000, "fisher_batch": 1, "fresh_samples": True,
                "search_trials": 100, "forward_macs": 7.46e10, "weight_trials": 4.85e7, **limits}
    assert _stages_lines({"stages_auto": thorough}) == [
        "  stages     15 stages of 1,000 rows of per-sample gradients, each stage on fresh images (auto: the layer "
        "search over them cheap: forward passes of 74.6 GMACs, within 100 GMACs)"]
    assert _stages_lines({"stages_auto": thorough, "fresh_stages": 5})[0].startswith(
        "  stages     15 stages of 1,000 rows of per-sample gradients, fresh images for 5 stages (the data holds "
        "no more), then reused (auto:")
    costly = {**thorough, "stages": 5, "thorough": False, "fisher_samples": 500, "fisher_batch": 8,
              "fresh_samples": False, "forward_macs": 1.9e13, "weight_trials": 4.0e8}
    assert _stages_lines({"stages_auto": costly}) == [
        "  stages     5 stages of 500 rows of 8-image gradients (auto: the layer search over 15 stages not "
        "cheap: forward passes of 19,000.0 GMACs, over 100 GMACs)"]
    unsearched = {"stages": 5, "thorough": False, "fisher_samples": 500, "fisher_batch": 1, "fresh_samples": False,
                  "search_trials": 0}
    assert _stages_lines({"stages_auto": unsearched}) == [
        "  stages     5 stages of 500 rows of per-sample gradients (auto: no layer search; the 15-stage "
        "schedule is chosen only with it)"]
    assert _stages_lines({"options": {"stages": 5}}) == []


def test_a_gradual_runs_summary_says_what_its_events_chose():
    limits = {"limit_macs": 1e11, "limit_weight_trials": 5e7}
    thorough = {"stages": 15, "thorough": True, "fisher_samples": 1000, "fisher_batch": 1, "fresh_samples": True,
                "search_trials": 100, "forward_macs": 7.46e10, "weight_trials": 4.85e7, **limits}
    search = {"trials": 100, "forward_macs": 4.97e9, "weight_trials": 3.2e6, **limits}
    alike = {"events": [{"event": e, "stages_auto": thorough, "layer_search_auto": search} for e in (1, 2)]}
    assert _event_choice_lines(alike) == [
        "  stages     (every event) 15 stages of 1,000 rows of per-sample gradients, each stage on fresh images "
        "(auto: the layer search over them cheap: forward passes of 74.6 GMACs, within 100 GMACs)",
        "  search     (every event) on, 100 trials per layer search (auto: forward passes of 5.0 GMACs, within 100 GMACs)"]
    unlike = {"events": [{"event": 1, "stages_auto": thorough}, {"event": 2, "stages_auto": {**thorough, "stages": 5}}]}
    lines = _event_choice_lines(unlike)
    assert [line[:23] for line in lines] == ["  stages     (event 1) ", "  stages     (event 2) "]
    assert "15 stages" in lines[0] and "5 stages" in lines[1]
    assert _event_choice_lines({"events": [{"event": 1}]}) == [] and _event_choice_lines({}) == []


def test_auto_stages_is_falcons_word(capsys):
    net, (x, y) = mlp(), data(40)
    with pytest.raises(PrunekitError, match="stages must be a whole number"):
        prunekit.prune(net, (x, y), method="chita++", sparsity=0.5, stages="auto")
    assert main(["prune", "--model", "mlpnet", "--method", "chita", "--sparsity", "0.5", "--stages", "auto",
                 "--data", "mnist", "--data-dir", "src/prunekit/assets/mnist"]) == 2
    err = capsys.readouterr().err
    assert "--stages" in err and len(err.strip().splitlines()) == 1


def _no_run(*args, **kwargs):
    raise AssertionError("the run started (the dense model measured, a run folder made) before the refusal")


def test_the_five_stage_schedules_rows_are_checked_before_any_work(monkeypatch, tmp_path, capsys):
    """stages "auto" without a layer search (or where it is costly) is 5 stages of falcon++'s 500
    rows from one pass: more than the training data holds is refused before the run starts, on
    the command line (a sweep's earlier runs included) and in Python; the thorough schedule,
    which reads the data pass after pass, is not refused."""
    import prunekit.api
    import prunekit.commands.prune
    net, (x, y) = mlp(), data(100)
    monkeypatch.setattr(prunekit.api, "execute", _no_run)
    with pytest.raises(PrunekitError, match="holds 100 samples, 500 gradient rows of one sample asked "
                                            r"\(the method's default fisher_samples\): lower fisher_samples to 100"):
        prunekit.prune(net, (x, y), method="falcon++", flops=0.5, layer_search=0, batch_size=10,
                       out=tmp_path / "py")
    assert not (tmp_path / "py").exists()
    monkeypatch.setattr(prunekit.commands.prune, "execute", _no_run)
    mnist = ["--model", "mlpnet", "--data", "mnist", "--data-dir", "src/prunekit/assets/mnist", "--train-samples", "64"]
    for argv in (["prune", *mnist, "--method", "falcon++", "--flops", "0.5", "--layer-search", "0",
                  "--out", str(tmp_path / "cli")],
                 ["sweep", *mnist, "--method", "magnitude", "falcon++", "--flops", "0.5", "--layer-search", "0",
                  "--out", str(tmp_path / "sweep")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds 64 samples, 500 gradient rows" in err and "--fisher-samples to 64" in err
    assert not (tmp_path / "cli").exists() and not (tmp_path / "sweep").exists()
    # the thorough schedule (the search cheap on this MLP) reads its rows pass after pass: not refused
    request = prunekit.request.PruneRequest(net, x[:1], "falcon++", {"flops": 0.5, "sparsity": None, "params": None},
                                            None, None, 0, False, True, {})
    fisher_methods.check_planned_rows(request.plan(), 100, lambda: 10)
    with pytest.raises(PrunekitError, match="holds 100 samples, 500 gradient rows"):
        fisher_methods.check_planned_rows(request.plan(), 100, lambda: 10 ** 9)    # a costly search: 5 stages
