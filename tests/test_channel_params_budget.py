"""A MAC and a params budget together, met by removing whole channels (``--method autobot --flops F
--params P``): the shrunk model keeps at most both, counted afresh (MACs by a new ``CostModel`` of
the shrunk model, parameters by ``sum(p.numel())``), and the cut lands on whichever budget binds:
one more channel of any group would break one of them."""

import random
import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit import zoo
from prunekit.cli import main
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.structured.autobot import flops_loss
from prunekit.structured.groups import find_groups
from prunekit.structured.shrink import shrink

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads


def cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.Conv2d(24, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(),
                         nn.Linear(40, 10))


def depthwise():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


MODELS = {"cnn": cnn, "residual": lambda: zoo.build("resnet20-b"), "mlp": mlp, "depthwise": depthwise}


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def counts_of(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(MACs by a cost model traced afresh, parameters by numel) of ``model``."""
    return CostModel(model, x).macs, numel(model)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_autobot_meets_both_budgets_and_stops_at_the_binding_one(name, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    dense_macs, dense_params = counts_of(model, x)
    flops, params = round(rng.uniform(0.3, 0.9), 3), round(rng.uniform(0.25, 0.9), 3)
    r = prunekit.prune(model, lambda: data, method="autobot", flops=flops, params=params, example_input=x,
                       gate_batches=3, seed=seed)
    macs, kept = counts_of(r.model, x)
    max_macs, max_params = flops * dense_macs, int(params * dense_params)
    assert macs == r.macs <= max_macs
    assert kept == r.record["params"] <= max_params
    assert r.record["budget_max_params"] == max_params
    # one more channel of any group that has one closed breaks a budget (counted afresh on a real shrink)
    groups = find_groups(model, x)
    kept_channels = r.record["kept_channels"]
    assert len(kept_channels) == len(groups)

    def shrunk(ks):
        masks = [torch.arange(g.size) < k for g, k in zip(groups, ks)]
        return counts_of(shrink(model, groups, masks, x), x)

    assert shrunk(kept_channels) == (macs, kept)     # every channel of a group costs the same
    grown = [i for i, (g, k) in enumerate(zip(groups, kept_channels)) if k < g.size]
    assert grown, "the cut removed no channel"
    for i in grown:
        more_macs, more_params = shrunk([k + (j == i) for j, k in enumerate(kept_channels)])
        assert more_macs > max_macs or more_params > max_params, (i, more_macs, more_params)
    # the bound it names is the one a MAC-only cut would break
    binding = "params" if r.record["flops_alone_params"] > max_params else "flops"
    assert r.record["bound"] == binding


def test_attention_heads_carry_their_parameters_too():
    """ViT-tiny: head groups (q, k, v rows and out_proj columns) and MLP channels, both budgets met,
    the counts those of the shrunk model counted afresh."""
    torch.manual_seed(0)
    model = zoo.build("vit-tiny").eval()
    x = torch.randn(1, 1, 28, 28)
    data = [(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))]
    dense_macs, dense_params = counts_of(model, x)
    r = prunekit.prune(model, lambda: data, method="autobot", flops=0.6, params=0.5, example_input=x, gate_batches=2)
    macs, kept = counts_of(r.model, x)
    assert macs == r.macs <= 0.6 * dense_macs and kept == r.record["params"] <= 0.5 * dense_params
    assert kept >= 0.45 * dense_params          # the binding budget (params here) met, not undershot far
    assert r.record["bound"] == "params"


def test_the_binding_budget_is_named_and_both_counts_printed(tmp_path, capsys):
    """On the command line: the params budget binds (a small one) or the flops budget does (a large
    one), each said on the params line with both counts."""
    assets = prunekit.__file__.rsplit("/", 1)[0] + "/assets"
    base = ["prune", "--model", "mlpnet", "--checkpoint", f"{assets}/mlpnet.safetensors", "--data", "mnist",
            "--data-dir", f"{assets}/mnist", "--method", "autobot", "--gate-batches", "3", "--flops", "0.5"]
    assert main([*base, "--params", "0.3"]) in (0, None)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("params"))
    assert "the params budget bound (at most 9,708): the gates cut to the flops budget alone keep" in line, out
    assert main([*base, "--params", "0.9"]) in (0, None)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("params"))
    assert "(at most 29,124); the flops budget bound" in line, out
    macs = next(line for line in out.splitlines() if line.strip().startswith("MACs kept"))
    assert float(macs.split("%")[0].split()[-1]) <= 50.0


def test_budget_loss_is_autobots_alone_and_follows_the_binding_budget():
    from prunekit.structured.autobot import budget_loss
    f = torch.tensor(40.0)
    assert float(budget_loss(f, 50.0, 100.0)) == float(flops_loss(f, 50.0, 100.0))
    # both under: the one nearer its target binds (params at 90% of its target: loss 0.1)
    assert float(budget_loss(f, 50.0, 100.0, torch.tensor(90.0), 100.0, 200.0)) == pytest.approx(0.1)
    # params over: its over-budget loss, whatever the MACs' under-budget one
    assert float(budget_loss(f, 50.0, 100.0, torch.tensor(150.0), 100.0, 200.0)) == pytest.approx(0.5)
    # both over: the larger
    assert float(budget_loss(torch.tensor(90.0), 50.0, 100.0, torch.tensor(110.0), 100.0, 200.0)) == \
        pytest.approx(0.8)


def test_an_unreachable_params_budget_is_refused_before_any_work():
    torch.manual_seed(0)
    model = cnn().eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=r"params budget of 50 parameters is below the .* ask for at least"):
        prunekit.prune(model, lambda: data, method="autobot", flops=0.5, params="0.05k", example_input=x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_taper_takes_no_params_budget_and_names_autobot_and_hybrid():
    model, x = cnn().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(PrunekitError, match="takes no params: .* use method autobot .* or method hybrid"):
        prunekit.prune(model, lambda: [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)))], method="taper",
                       flops=0.5, params=0.5, example_input=x)


@pytest.mark.parametrize("params", [0.3, 0.9])
def test_hybrid_meets_a_params_budget_in_its_weights_phase(params):
    """The hybrid: channels to structured_flops, then FALCON's zeros to flops and params (zeros count as
    removed, as for a weights method); a params budget the channel cut already meets asks FALCON for MACs only."""
    torch.manual_seed(0)
    model = zoo.build("resnet20-b").eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    r = prunekit.prune(model, lambda: data, method="hybrid", flops=0.4, structured_flops=0.6, params=params,
                       example_input=x, gate_batches=2, fisher_samples=16)
    fresh = CostModel(zoo.build("resnet20-b"), x)      # a cost model traced afresh counts the result
    counted = fresh.count(r.model)
    assert counted.macs == r.macs <= 0.4 * fresh.macs
    assert counted.params == r.record["params"] <= params * fresh.params
    assert sum(int(torch.count_nonzero(p)) for p in r.model.parameters()) <= params * fresh.params
    if params == 0.3:      # binds: FALCON removed weights down to it
        assert counted.params >= 0.29 * fresh.params


@pytest.mark.parametrize("method", ["autobot", "hybrid"])
def test_a_run_folder_records_a_channel_params_budget_as_its_result_does(tmp_path, capsys, method):
    """metrics.json's budget holds what result.json's budget_max_* hold: a channel method's params
    budget as max_params (all parameters kept), no nonzeros budget (was the dense count, as if
    asked); compare's table then shows the parameters kept."""
    import json
    torch.manual_seed(0)
    model, x = cnn().eval(), torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    dense_params = numel(model)
    extra = {"structured_flops": 0.7, "fisher_samples": 16} if method == "hybrid" else {}
    r = prunekit.prune(model, lambda: data, method=method, flops=0.5, params=0.4, example_input=x, gate_batches=2,
                       out=str(tmp_path / "run"), **extra)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    budget = json.loads((tmp_path / "run" / "metrics.json").read_text())["budget"]
    assert result["budget_max_params"] == budget["max_params"] == int(0.4 * dense_params)
    assert result["budget_max_nonzeros"] is budget["max_nonzeros"] is None
    assert budget["max_macs"] == result["budget_max_macs"]
    assert r.record["params"] <= budget["max_params"]
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "run")]) in (0, None)
    header, _, row = capsys.readouterr().out.splitlines()[:3]
    assert "params kept" in header and f"{100 * result['params_kept']:.2f}%" in row


def test_a_weights_method_records_its_params_budget_as_nonzeros_only(tmp_path):
    import json
    torch.manual_seed(0)
    model, x = mlp().eval(), torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    prunekit.prune(model, lambda: data, method="magnitude", params=0.4, example_input=x, out=str(tmp_path / "run"))
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    budget = json.loads((tmp_path / "run" / "metrics.json").read_text())["budget"]
    assert budget["max_nonzeros"] == result["budget_max_nonzeros"] is not None
    assert budget["max_params"] is result["budget_max_params"] is None


@pytest.mark.parametrize("params, binding", [("0.3", "params"), ("0.5", "flops")])
def test_the_hybrid_names_the_binding_budget_and_its_params_limit(params, binding, capsys):
    """``--method hybrid --flops F --params P``: the record says which budget bound (``bound``, as
    autobot's) and the params line gives the limit and what the other budget allowed. MLPNet's
    weights each cost one MAC, so the smaller share binds."""
    import json
    assets = prunekit.__file__.rsplit("/", 1)[0] + "/assets"
    base = ["prune", "--model", "mlpnet", "--checkpoint", f"{assets}/mlpnet.safetensors", "--data", "mnist",
            "--data-dir", f"{assets}/mnist", "--method", "hybrid", "--gate-batches", "3", "--structured-flops", "0.7",
            "--fisher-samples", "64", "--flops", "0.4" if binding == "params" else "0.3", "--params", params]
    assert main([*base, "--json"]) in (0, None)
    record = json.loads(capsys.readouterr().out)
    most = int(float(params) * record["dense_params"])
    assert record["bound"] == binding and record["budget_max_params"] == most
    assert record["params"] <= most and record["macs"] <= record["budget_max_macs"]
    assert main(base) in (0, None)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("params"))
    if binding == "params":
        assert line.endswith(f"({record['params']:,}); the params budget bound (at most {most:,}): the flops budget "
                             "allowed 40.00% of the MACs"), line
    else:
        assert line.endswith(f"({record['params']:,}) (at most {most:,}); the flops budget bound: the params budget "
                             "allowed 50.00% of the parameters"), line


def test_the_hybrid_bound_is_the_budget_its_result_is_nearest():
    """Python: ``bound`` in the record is the budget the result is nearer (kept / most), or the MACs
    where the channel cut already met the params budget (FALCON asked for MACs alone)."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    for params, binding in ((0.3, "params"), (0.6, "flops"), (0.99, "flops")):
        r = prunekit.prune(cnn().eval(), lambda: data, method="hybrid", flops=0.5, structured_flops=0.7,
                           params=params, example_input=x, gate_batches=2, fisher_samples=16)
        record = r.record
        near_params = record["params"] / record["budget_max_params"] >= record["macs"] / record["budget_max_macs"]
        assert record["bound"] == binding == ("params" if near_params else "flops"), record
        assert record["params"] <= record["budget_max_params"] and record["macs"] <= record["budget_max_macs"]
        assert record["budget_max_params"] == int(params * record["dense_params"])


def test_a_params_budget_that_binds_is_no_saturation():
    """flops 0.9 with params 0.2: the params budget keeps a quarter of the MACs by design; the
    "gates saturated" warning (lower gate_lr, beta or gamma) named the wrong cause."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = prunekit.prune(m, (x, y), method="autobot", batch_size=16, gate_batches=5, flops=0.9, params=0.2)
    assert result.flops_kept < 0.45 and result.record["bound"] == "params"
    assert not [w for w in said if "saturated" in str(w.message)]
