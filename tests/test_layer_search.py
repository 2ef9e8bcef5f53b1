"""The per-layer allocation search (``layer_search``): the search itself on losses with a known
optimum, the recalibrated-loss judge against a hand computation (and the model left as it was),
and the option end to end on a tiny BatchNorm network (both budgets met, recounted)."""

import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import main
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.params import ParamSpace
from prunekit.pipelines.allocation import LoaderWindow, RecalibratedLoss
from prunekit.solvers.falcon import falcon
from prunekit.solvers.layer_search import layer_index, search_layer_scales
from prunekit.solvers.quadratic import QuadraticModel
from prunekit.train import recalibrate_batchnorm


def test_the_search_moves_toward_a_known_optimum_and_never_ends_worse():
    target = torch.tensor([1.5, -0.5, 0.0, 0.75], dtype=torch.float64)

    def loss(scales):
        return float(((scales.log2() - target) ** 2).sum())

    found = search_layer_scales(loss, 4, 300, seed=3)
    assert found.start_loss == pytest.approx(float((target ** 2).sum()))
    assert found.loss <= found.start_loss
    assert found.loss < 0.05 * found.start_loss           # most of the way to θ = target
    assert loss(found.scales) == pytest.approx(found.loss)
    assert [t for t, _ in found.history] == sorted(t for t, _ in found.history)
    assert all(a[1] > b[1] for a, b in zip(found.history, found.history[1:]))   # accepted moves only go down


def test_the_search_is_reproducible_and_zero_trials_keep_the_plain_score():
    loss = lambda scales: float((scales - 2).abs().sum())       # noqa: E731
    a = search_layer_scales(loss, 5, 40, seed=7)
    b = search_layer_scales(loss, 5, 40, seed=7)
    assert torch.equal(a.scales, b.scales) and a.loss == b.loss
    none = search_layer_scales(loss, 5, 0)
    assert torch.equal(none.scales, torch.ones(5, dtype=torch.float64)) and none.accepted == 0


def test_the_search_refuses_a_non_finite_loss_and_bad_sizes():
    with pytest.raises(PrunekitError, match="finite"):
        search_layer_scales(lambda s: float("nan"), 3, 2)
    with pytest.raises(PrunekitError, match="at least one layer"):
        search_layer_scales(lambda s: 0.0, 0, 2)
    with pytest.raises(PrunekitError, match="trials"):
        search_layer_scales(lambda s: 0.0, 2, -1)


def test_layer_index_tiles_the_vector():
    assert layer_index([slice(0, 2), slice(2, 5)], 5).tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(PrunekitError, match="cover"):
        layer_index([slice(0, 2)], 5)
    with pytest.raises(PrunekitError, match="tile"):
        layer_index([slice(1, 5)], 5)


def test_score_weights_move_falcons_support_between_layers():
    """With layer 1's scores multiplied by a large factor, the ILP keeps all of layer 1 it can."""
    torch.manual_seed(0)
    q = QuadraticModel(torch.randn(6, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), 1e-2)
    costs = torch.ones(8, dtype=torch.float64)
    plain = falcon(q, costs, 4, 4.0, variant="magnitude")
    favour = torch.tensor([1.0] * 4 + [1e6] * 4, dtype=torch.float64)
    moved = falcon(q, costs, 4, 4.0, variant="magnitude", score_weights=favour)
    assert moved.mask[4:].all() and not moved.mask[:4].any()
    assert int(plain.mask.sum()) == int(moved.mask.sum()) == 4
    with pytest.raises(PrunekitError, match="score_weights"):
        falcon(q, costs, 4, 4.0, score_weights=-favour)


def bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 3))


def batches(count, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=g), torch.randint(0, 3, (size,), generator=g))
            for _ in range(count)]


def test_the_judge_is_the_loss_after_recalibration_and_leaves_the_model_as_it_was():
    model = bn_net().eval()
    space = ParamSpace(model)
    before = copy.deepcopy(model.state_dict())
    data = batches(5)
    judge = RecalibratedLoss.from_batches(model, space, data, calibration=2, judge=3)
    w = space.vector() * (torch.rand(space.numel, generator=torch.Generator().manual_seed(2)) > 0.5)
    got = judge(w)
    twin = copy.deepcopy(model)
    ParamSpace(twin).assign(w)
    recalibrate_batchnorm(twin, data[:2])
    twin.eval()
    with torch.no_grad():
        expected = sum(float(nn.functional.cross_entropy(twin(x), y, reduction="sum")) for x, y in data[2:]) / 24
    assert got == pytest.approx(expected, rel=1e-6)
    judge.restore()
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("method, extra", [("magnitude-flops", {}), ("falcon", {"fisher_samples": 12}),
                                           ("falcon++", {"fisher_samples": 8, "stages": 2})])
def test_layer_search_end_to_end_meets_both_budgets(method, extra):
    net = bn_net()
    x, y = torch.randn(200, 1, 6, 6), torch.randint(0, 3, (200,))
    result = prunekit.prune(net, (x, y), method=method, flops=0.4, sparsity=0.7, batch_size=10,
                            layer_search=6, **extra)
    record = result.record
    assert record["layer_search_loss"] <= record["layer_search_start_loss"] if method == "magnitude-flops" \
        else result.history[-1]["layer_search_loss"] <= result.history[-1]["layer_search_start_loss"]
    space = ParamSpace(result.model)
    recount = CostModel(result.model, torch.zeros(1, 1, 6, 6)).count(result.model)
    assert recount.flops_kept <= 0.4 + 1e-12
    assert int(torch.count_nonzero(space.vector())) <= round(0.3 * space.numel)


def test_layer_search_is_refused_where_it_does_not_belong(capsys):
    net = bn_net()
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    with pytest.raises(PrunekitError, match="layer_search"):
        prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, layer_search=3)
    with pytest.raises(PrunekitError, match="layer_search"):
        prunekit.prune(net, (x, y), method="magnitude-flops", flops=0.5, layer_search=-1)
    assert main(["prune", "--model", "mlpnet", "--method", "magnitude-flops", "--flops", "0.5",
                 "--layer-search", "-2", "--data", "mnist", "--data-dir", "src/prunekit/assets/mnist"]) == 2
    err = capsys.readouterr().err
    assert "layer" in err and len(err.strip().splitlines()) == 1


def test_the_search_starts_where_it_is_told():
    loss = lambda scales: float(((scales.log2() - 1.0) ** 2).sum())       # noqa: E731
    found = search_layer_scales(loss, 3, 0, start=torch.full((3,), 2.0, dtype=torch.float64))
    assert found.start_loss == 0.0 and torch.equal(found.scales, torch.full((3,), 2.0, dtype=torch.float64))
    with pytest.raises(PrunekitError, match="start"):
        search_layer_scales(loss, 3, 1, start=torch.zeros(3))


def test_the_judge_splits_few_batches_between_calibration_and_judging():
    model = bn_net()
    space = ParamSpace(model)
    few = RecalibratedLoss.from_batches(model, space, batches(6), calibration=4, judge=8)
    assert (len(few.calibration), len(few.judge)) == (2, 4)
    one = RecalibratedLoss.from_batches(model, space, batches(1))
    assert len(one.calibration) == len(one.judge) == 1
    with pytest.raises(PrunekitError, match="training batches"):
        RecalibratedLoss.from_batches(model, space, [])


def test_a_judge_over_loader_windows_reads_the_loader_afresh_and_equals_one_over_held_batches():
    """``LoaderWindow``: the same batches as held lists give the same loss, each pass a new read."""
    data = batches(7)
    calls = []

    def loader():
        calls.append(1)
        return iter(data)
    model = bn_net()
    space = ParamSpace(model)
    w = space.vector() * (torch.rand(space.numel, generator=torch.Generator().manual_seed(4)) > 0.4)
    held = RecalibratedLoss(model, space, data[1:3], data[3:7])(w)
    windowed = RecalibratedLoss(model, space, LoaderWindow(loader, 1, 3), LoaderWindow(loader, 3, 7))
    assert (len(windowed.calibration), len(windowed.judge)) == (2, 4)
    assert windowed(w) == pytest.approx(held, rel=1e-6) and len(calls) == 2
    assert windowed(w) == pytest.approx(held, rel=1e-6) and len(calls) == 4


def _falcon_pp_with_spy(monkeypatch, stages=3, **options):
    """FALCON++ on the tiny BatchNorm network; returns (result, [(k, score_weights) of every stage's solve])."""
    from prunekit.pipelines import fisher_methods
    solve, solved = fisher_methods._solve_stage_falcon, []

    def spy(q, k, max_macs, macs, opts, score_weights=None, variant=None, **more):
        if variant is None:                 # the stage's own solve, not a search candidate
            solved.append((k, None if score_weights is None else score_weights.clone()))
        return solve(q, k, max_macs, macs, opts, score_weights, variant, **more)
    monkeypatch.setattr(fisher_methods, "_solve_stage_falcon", spy)
    net = bn_net()
    x, y = torch.randn(200, 1, 6, 6), torch.randint(0, 3, (200,))
    result = prunekit.prune(net, (x, y), method="falcon++", flops=0.4, sparsity=0.7, batch_size=10,
                            fisher_samples=8, stages=stages, **options)
    return result, solved


def test_allocation_first_searches_the_dense_model_at_the_final_budget_and_every_stage_uses_it(monkeypatch):
    result, solved = _falcon_pp_with_spy(monkeypatch, layer_search=30, layer_search_mode="first")
    first, *later = result.history
    final_k = result.history[-1]["max_nonzeros"]
    assert first["max_nonzeros"] > final_k and first["layer_search_judged_at"] == final_k
    assert first["max_macs"] > result.history[-1]["max_macs"] == first["layer_search_judged_at_macs"]
    assert first["layer_search_accepted"] > 0             # the multipliers are not all 1
    assert all("layer_search_loss" not in h and h["layer_scales"] == first["layer_scales"] for h in later)
    space = ParamSpace(result.model)
    per_weight = torch.tensor(first["layer_scales"], dtype=torch.float64)[layer_index(space.layer_slices(), space.numel)]
    for stage, (k, weights) in enumerate(solved[1:], start=2):   # stage s's free weights: stage s-1's support
        assert weights is not None and weights.numel() == result.history[stage - 2]["nonzeros"]
        assert set(weights.tolist()) <= set(per_weight.tolist()) and not torch.all(weights == 1)


def test_refine_searches_again_at_the_last_stage_only(monkeypatch):
    result, _ = _falcon_pp_with_spy(monkeypatch, layer_search=6, layer_search_mode="first", layer_search_refine=4)
    searched = ["layer_search_loss" in h for h in result.history]
    assert searched == [True, False, True]
    last = result.history[-1]
    assert last["layer_search_judged_at"] == last["max_nonzeros"]
    assert last["layer_search_loss"] <= last["layer_search_start_loss"]


def test_look_ahead_judges_every_stage_at_the_final_budget_and_is_the_default(monkeypatch):
    ahead, solved = _falcon_pp_with_spy(monkeypatch, layer_search=4)
    assert ahead.record["options"]["layer_search_mode"] == "ahead"
    final_k = ahead.history[-1]["max_nonzeros"]
    assert [h["layer_search_judged_at"] for h in ahead.history] == [final_k] * 3
    assert [h["layer_search_judged_at_macs"] for h in ahead.history] == [ahead.history[-1]["max_macs"]] * 3
    # each stage prunes to its own budget, within the support the previous stage left (no revival)
    left = [None] + [h["nonzeros"] for h in ahead.history[:-1]]
    assert [k for k, _ in solved] == [h["max_nonzeros"] if n is None else min(h["max_nonzeros"], n)
                                      for h, n in zip(ahead.history, left)]
    stage, _ = _falcon_pp_with_spy(monkeypatch, layer_search=4, layer_search_mode="stage")
    left = [None] + [h["nonzeros"] for h in stage.history[:-1]]
    assert [(h["layer_search_judged_at"], h["layer_search_judged_at_macs"]) for h in stage.history] == \
        [(h["max_nonzeros"] if n is None else min(h["max_nonzeros"], n), h["max_macs"])
         for h, n in zip(stage.history, left)]


def test_a_run_judged_at_the_final_budget_ends_with_the_best_candidate_the_judge_saw(monkeypatch):
    """"ahead" keeps each stage's final-budget candidate if it is the best judged so far; the last
    stage's result is then compared with it on the same judge and the lower loss wins."""
    from prunekit.pipelines import fisher_methods
    result, _ = _falcon_pp_with_spy(monkeypatch, layer_search=4, layer_search_mode="ahead")
    choice = result.history[-1]["final_choice"]
    assert choice["kept_candidate_stage"] in (1, 2)
    losses = {"kept candidate": choice["kept_candidate_loss"], "last stage": choice["last_stage_loss"]}
    assert choice["used"] == min(losses, key=losses.get)
    one_stage, _ = _falcon_pp_with_spy(monkeypatch, stages=1, layer_search=4, layer_search_mode="ahead")
    assert "final_choice" not in one_stage.history[-1]                  # one shot: nothing to compare
    last, _ = _falcon_pp_with_spy(monkeypatch, layer_search=4, layer_search_mode="ahead", final_pick="last")
    assert "final_choice" not in last.history[-1]

    # The choice itself, on weights whose order is known: the dense weights against a tenth of them.
    model = bn_net()
    space = ParamSpace(model)
    dense = space.vector().clone()
    sparse = dense * (torch.rand(space.numel, generator=torch.Generator().manual_seed(0)) < 0.1)
    data = batches(12)
    ctx = type("Ctx", (), {"model": model, "space": space, "recalibrate_bn": True, "loss_fn": None,
                           "train_batches": staticmethod(lambda: iter(data))})()
    judge = RecalibratedLoss.from_batches(model, space, data)
    dense_loss, sparse_loss = judge(dense), judge(sparse)
    judge.restore()
    assert dense_loss < sparse_loss
    for last, candidate, used in ((sparse, dense, "kept candidate"), (dense, sparse, "last stage")):
        record = {}
        kept = {"candidate": candidate.clone(), "candidate_loss_stage": torch.tensor([0.0, 1.0])}
        chosen = fisher_methods._best_of_last_and_kept(ctx, last.clone(), kept, record)
        assert record["final_choice"]["used"] == used and torch.equal(chosen, dense)
        assert torch.equal(space.vector(), dense)            # the model is left as it was
    kept = {}
    fisher_methods._keep_if_best(kept, 1, 0.5, lambda: sparse)
    fisher_methods._keep_if_best(kept, 2, 0.7, lambda: dense)     # worse: not kept
    assert torch.equal(kept["candidate"], sparse) and kept["candidate_loss_stage"].tolist() == [0.5, 1.0]
    fisher_methods._keep_if_best(kept, 3, 0.4, lambda: dense)
    assert torch.equal(kept["candidate"], dense) and kept["candidate_loss_stage"].tolist() == [0.4, 3.0]


@pytest.mark.parametrize("method", ["falcon++", "chita++"])
def test_a_multi_stage_run_without_a_search_weighs_its_result_against_the_one_shot_solution(method):
    net = bn_net()
    x, y = torch.randn(200, 1, 6, 6), torch.randint(0, 3, (200,))
    # falcon++ searches by default since layer_search auto (685ed8a): 0 keeps this run without one
    budget = {"flops": 0.4, "sparsity": 0.7, "layer_search": 0} if method == "falcon++" else {"sparsity": 0.7}
    runs = {pick: prunekit.prune(copy.deepcopy(net), (x, y), method=method, batch_size=10, fisher_samples=8,
                                 stages=3, final_pick=pick, **budget) for pick in ("judge", "last")}
    choice = runs["judge"].history[-1]["final_choice"]
    assert choice["kept_candidate_stage"] == 1 and "final_choice" not in runs["last"].history[-1]
    losses = {"kept candidate": choice["kept_candidate_loss"], "last stage": choice["last_stage_loss"]}
    assert choice["used"] == min(losses, key=losses.get)
    judged, last = (ParamSpace(runs[pick].model).vector() for pick in ("judge", "last"))
    assert torch.equal(judged != 0, last != 0) == (choice["used"] == "last stage")
    space = ParamSpace(runs["judge"].model)
    assert int(torch.count_nonzero(space.vector())) <= round(0.3 * space.numel)
    if method == "falcon++":
        recount = CostModel(runs["judge"].model, torch.zeros(1, 1, 6, 6)).count(runs["judge"].model)
        assert recount.flops_kept <= 0.4 + 1e-12


def test_search_modes_are_refused_without_a_search(capsys):
    net = bn_net()
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    for mode in ("first", "stage", "ahead"):          # the default too, when given
        with pytest.raises(PrunekitError, match=f"layer_search_mode {mode} needs layer_search"):
            prunekit.prune(net, (x, y), method="falcon++", flops=0.5, layer_search_mode=mode)
    with pytest.raises(PrunekitError, match="layer_search_refine"):
        prunekit.prune(net, (x, y), method="falcon++", flops=0.5, layer_search=3, layer_search_refine=2)
    with pytest.raises(PrunekitError, match="layer_search_mode must be one of"):
        prunekit.prune(net, (x, y), method="falcon++", flops=0.5, layer_search=3, layer_search_mode="last")
    assert main(["prune", "--model", "mlpnet", "--method", "falcon++", "--flops", "0.5", "--layer-search-mode",
                 "ahead", "--data", "mnist", "--data-dir", "src/prunekit/assets/mnist"]) == 2
    err = capsys.readouterr().err
    assert "--layer-search-mode ahead needs --layer-search" in err and len(err.strip().splitlines()) == 1


def test_allocation_first_offers_the_one_shot_search_result_as_a_final_candidate(monkeypatch):
    """Stage 1 of ``first`` runs the one-shot search; FALCON's own solve with its multipliers (the
    one-shot form's result, to the last digit) is one of the candidates the final pick weighs."""
    from prunekit.pipelines import fisher_methods
    keep, offered = fisher_methods._keep_if_best, []

    def spy(kept, stage, loss, candidate):
        offered.append((stage, loss, candidate().clone()))
        keep(kept, stage, loss, candidate)
    monkeypatch.setattr(fisher_methods, "_keep_if_best", spy)
    net = bn_net()
    x, y = torch.randn(200, 1, 6, 6), torch.randint(0, 3, (200,))
    # refit_batches 0: the candidates are weighed before any re-fit, so one shot's must be unfitted too
    options = dict(flops=0.4, sparsity=0.7, batch_size=10, fisher_samples=8, layer_search=6, refit_batches=0)
    one_shot = prunekit.prune(copy.deepcopy(net), (x, y), method="falcon", **options)
    assert offered == []                                   # one stage: nothing to weigh
    staged = prunekit.prune(copy.deepcopy(net), (x, y), method="falcon++", stages=3, layer_search_mode="first",
                            **options)
    stage_one = [candidate for stage, _, candidate in offered if stage == 1]
    assert len(stage_one) == 2                             # the searched ILP + backsolve one, and FALCON's
    one_shot_weights = ParamSpace(one_shot.model).vector()
    assert any(torch.equal(candidate, one_shot_weights) for candidate in stage_one)
    choice = staged.history[-1]["final_choice"]
    assert choice["kept_candidate_loss"] == min(loss for _, loss, _ in offered)


@pytest.mark.parametrize("method, stages", [("falcon", 1), ("falcon++", 3)])
def test_auto_searches_where_its_forward_passes_are_cheap_and_not_elsewhere(monkeypatch, method, stages):
    from prunekit.pipelines import fisher_methods
    net = bn_net()
    x, y = torch.randn(200, 1, 6, 6), torch.randint(0, 3, (200,))
    options = dict(flops=0.4, sparsity=0.7, batch_size=10, fisher_samples=8, stages=stages, refit_batches=0)
    on = prunekit.prune(copy.deepcopy(net), (x, y), method=method, **options)
    auto = on.record["layer_search_auto"]
    # every stage searches (the default mode, ahead), 100 trials each; a trial re-estimates
    # BatchNorm on 4 batches and judges on 8, each of 10 examples
    assert auto["trials"] == fisher_methods.AUTO_LAYER_SEARCH_TRIALS == 100
    assert auto["forward_macs"] == stages * 100 * 12 * 10 * CostModel(net, x[:1]).macs
    assert all(h["layer_search_loss"] <= h["layer_search_start_loss"] for h in on.history)
    assert auto["weight_trials"] == stages * 100 * ParamSpace(net).numel
    for limit, over in (("AUTO_LAYER_SEARCH_MACS", "forward_macs"), ("AUTO_LAYER_SEARCH_WEIGHTS", "weight_trials")):
        with monkeypatch.context() as patch:
            patch.setattr(fisher_methods, limit, auto[over] - 1)
            off = prunekit.prune(copy.deepcopy(net), (x, y), method=method, **options)
        assert off.record["layer_search_auto"]["trials"] == 0
        assert not any("layer_search_loss" in h for h in off.history)
    given = prunekit.prune(copy.deepcopy(net), (x, y), method=method, layer_search=0, **options)
    assert "layer_search_auto" not in given.record
    assert torch.equal(ParamSpace(given.model).vector(), ParamSpace(off.model).vector())
    for result in (on, off):
        recount = CostModel(result.model, torch.zeros(1, 1, 6, 6)).count(result.model)
        assert recount.flops_kept <= 0.4 + 1e-12
    if method == "falcon":            # gradual: every event's search (and why) is in its record
        gradual = prunekit.prune(copy.deepcopy(net), (x, y), method=method, gradual=True, events=2,
                                 epochs_per_event=0, final_epochs=0, **options)
        assert [event["layer_search_auto"]["trials"] for event in gradual.history] == [100, 100]


def test_the_summary_says_what_the_search_ran_or_why_auto_left_it_off():
    from prunekit.commands.prune import _layer_search_lines
    stages = [{"layer_search_loss": 0.5, "layer_search_seconds": 1.5}, {"layer_search_loss": 0.4,
                                                                         "layer_search_seconds": 2.0}]
    limits = {"limit_macs": 1e11, "limit_weight_trials": 5e7}
    on = _layer_search_lines({"stages": stages, "options": {"layer_search": "auto"}, "layer_search_auto": {
        "trials": 100, "forward_macs": 2.5e10, "weight_trials": 1.6e7, **limits}})
    assert on == ["  search     2 layer searches of 100 trials, 3.5 s (auto: forward passes of 25.0 GMACs, "
                  "within 100 GMACs)"]
    off = _layer_search_lines({"stages": [{}], "options": {"layer_search": "auto"}, "layer_search_auto": {
        "trials": 0, "forward_macs": 3.1e13, "weight_trials": 1.3e8, **limits}})
    assert off == ["  search     off (auto: forward passes of 31,000.0 GMACs, over 100 GMACs); --layer-search 100 runs it"]
    many_weights = _layer_search_lines({"stages": [{}], "options": {"layer_search": "auto"}, "layer_search_auto": {
        "trials": 0, "forward_macs": 9.8e7, "weight_trials": 1.92e8, **limits}})
    assert many_weights == ["  search     off (auto: trials x weights 192.0M, over 50M); --layer-search 100 runs it"]
    given = _layer_search_lines({"stages": stages[:1], "options": {"layer_search": 30}})
    assert given == ["  search     1 layer search of 30 trials, 1.5 s"]
    assert _layer_search_lines({"stages": [{}], "options": {"layer_search": 0}}) == []


def test_auto_is_falcons_word_not_magnitudes(capsys):
    net = bn_net()
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    with pytest.raises(PrunekitError, match="layer_search must be a whole number"):
        prunekit.prune(net, (x, y), method="magnitude-flops", flops=0.5, layer_search="auto")
    assert main(["prune", "--model", "mlpnet", "--method", "magnitude-flops", "--flops", "0.5",
                 "--layer-search", "auto", "--data", "mnist", "--data-dir", "src/prunekit/assets/mnist"]) == 2
    err = capsys.readouterr().err
    assert "layer-search" in err and len(err.strip().splitlines()) == 1
