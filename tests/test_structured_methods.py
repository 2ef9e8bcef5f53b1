"""AutoBot, the tapering Lagrangian and torch-pruning baselines meet their MAC budgets; saving,
reloading and ONNX export of shrunk models."""

import copy
import re

import onnx
import pytest
import torch

import prunekit

from prunekit import zoo
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.loading import load_model
from prunekit.structured.autobot import flops_loss
from prunekit.structured.baselines import tp_prune
from prunekit.export import export_onnx
from prunekit.record import save_pruned

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads


def prune_structured(model, method, flops, x, data, **options):
    """A channel method through the one Python entry."""
    return prunekit.prune(model, data, method=method, flops=flops, example_input=x, **options)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = zoo.build("resnet20-b").eval()
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    return model, x, data


def test_flops_loss_matches_the_paper_formula():
    assert float(flops_loss(torch.tensor(80.0), 50.0, 100.0)) == pytest.approx(30 / 50)
    assert float(flops_loss(torch.tensor(40.0), 50.0, 100.0)) == pytest.approx(1 - 40 / 50)
    assert float(flops_loss(torch.tensor(50.0), 50.0, 100.0)) == 0.0


@pytest.mark.parametrize("flops, gate_bn", [(0.7, "frozen"), (0.4, "frozen"), (0.4, "batch")])
def test_autobot_meets_the_target_exactly(tiny, flops, gate_bn):
    model, x, data = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = prune_structured(model, "autobot", flops, x, lambda: data, gate_batches=4, gate_bn=gate_bn)
    costs = CostModel(model, x)
    counted = costs.count(r.model)
    assert counted.macs == r.macs <= flops * costs.macs
    assert counted.macs >= (flops - 0.05) * costs.macs        # the bisection leaves little on the table
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # weights frozen
    assert all(k >= 1 for k in r.record["kept_channels"]) and r.mode == "structured"


@pytest.mark.parametrize("gate_bn", ["frozen", "batch"])
def test_autobot_gates_train_on_the_loss_with_the_chosen_batchnorm_statistics(tiny, gate_bn):
    """The first gate step's cross-entropy is the gated model's (gates at their 0.9 start) with
    BatchNorm on running statistics ("frozen") or on the batch's own ("batch")."""
    from prunekit.fisher import batchnorm_on_batch_statistics
    from prunekit.structured.gates import GateHooks
    from prunekit.structured.groups import find_groups
    model, x, data = tiny
    r = prune_structured(model, "autobot", 0.5, x, lambda: data, gate_batches=2, gate_bn=gate_bn)
    groups = find_groups(model, x)
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = [torch.full((g.size,), 0.9) for g in groups]
        with batchnorm_on_batch_statistics(model):
            on_batch = float(torch.nn.functional.cross_entropy(model(data[0][0]), data[0][1]))
        frozen = float(torch.nn.functional.cross_entropy(model(data[0][0]), data[0][1]))
    assert abs(on_batch - frozen) > 1e-3 * frozen        # the two modes are told apart here
    expected = on_batch if gate_bn == "batch" else frozen
    assert r.record["history"][0]["ce"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method", ["autobot", "taper"])
def test_residual_channels_keep_leaves_option_a_block_outputs_at_full_width(method):
    torch.manual_seed(0)
    model = zoo.build("resnet20").eval()
    x = torch.randn(1, 3, 16, 16)
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(3)]
    # max_hold_steps: the structure is checked here, not how long the taper holds the budget to settle
    options = {"gate_batches": 4} if method == "autobot" else {"taper_epochs": 4, "max_hold_steps": 10}
    kept = prune_structured(zoo.build("resnet20").eval(), method, 0.3, x, lambda: data, residual_channels="keep",
                            **options)
    pruned = prune_structured(zoo.build("resnet20").eval(), method, 0.3, x, lambda: data, **options)
    costs = CostModel(model, x)
    assert costs.count(kept.model).macs <= 0.3 * costs.macs
    assert kept.record["groups"] < pruned.record["groups"]       # no stage-output groups in "keep"

    def block_outputs(net):
        return [block.conv2.out_channels for stage in (net.layer1, net.layer2, net.layer3) for block in stage]
    assert block_outputs(kept.model) == block_outputs(model)


def test_taper_reaches_every_snapshot_under_its_budget(tiny):
    model, x, data = tiny
    r = prune_structured(zoo.build("resnet20-b").eval(), "taper", 0.4, x, lambda: data,
                         taper_epochs=10, settle_steps=2, snapshots=[0.8, 0.6])
    costs = CostModel(model, x)
    shots = {0.4: r, **r.snapshots}
    assert sorted(shots) == [0.4, 0.6, 0.8]
    for budget, res in shots.items():
        assert costs.count(res.model).macs <= budget * costs.macs
        assert res.record["request"]["flops"] == budget          # each record its own budget, not the last one's
        assert res.record["budget_max_macs"] == int(budget * costs.macs)
    steps = r.record["snapshot_steps"]
    assert steps["0.8"] < steps["0.6"] < steps["0.4"]           # one run passes every budget on the way down
    assert len({p.data_ptr() for s in shots.values() for p in s.model.parameters()}) == \
        sum(len(list(s.model.parameters())) for s in shots.values())   # independent models


@pytest.mark.parametrize("method", ["tp-magnitude", "tp-taylor"])
def test_torch_pruning_baselines_meet_the_budget(tiny, method):
    model, x, data = tiny
    pruned, info = tp_prune(model, method, 0.5, x, data, iterations=8)
    costs = CostModel(model, x)
    assert costs.count(pruned).macs <= 0.5 * costs.macs
    assert costs.count(pruned).macs >= 0.4 * costs.macs


def test_bad_requests(tiny):
    model, x, data = tiny
    for flops in (0.0, 1.0, 1.5, "-0.5", True):
        with pytest.raises(PrunekitError, match="flops"):
            prune_structured(model, "autobot", flops, x, lambda: data)
    with pytest.raises(PrunekitError, match="at least"):
        prune_structured(model, "autobot", 0.001, x, lambda: data)
    with pytest.raises(PrunekitError, match="unknown method"):
        prune_structured(model, "l1", 0.5, x, lambda: data)
    with pytest.raises(PrunekitError, match="takes no option snapshots"):
        prune_structured(model, "autobot", 0.5, x, lambda: data, snapshots=[0.7])
    with pytest.raises(PrunekitError, match="takes no option taper_epochs"):
        prune_structured(model, "autobot", 0.5, x, lambda: data, taper_epochs=3)
    with pytest.raises(PrunekitError, match="not sparsity"):
        prunekit.prune(model, lambda: data, method="taper", sparsity=0.5, example_input=x)


def test_save_reload_and_onnx(tiny, tmp_path):
    model, x, data = tiny
    r = prune_structured(model, "autobot", 0.5, x, lambda: data, gate_batches=2)
    meta = {"model": "resnet20-b", "build_kwargs": {}, "input_shape": [3, 8, 8],
            "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    save_pruned(tmp_path, r.model, meta, r.record, shrunk=True)
    loaded = load_model("resnet20-b", tmp_path / "model.safetensors")
    assert torch.equal(loaded.model(x), r.model(x))
    assert CostModel(model, x).count(loaded.model).macs == r.macs
    path = export_onnx(r.model, x, tmp_path / "model.onnx")
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version == 17
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in r.model.modules())


@pytest.mark.parametrize("residual", [True, False])
def test_torch_pruning_on_option_a_in_both_modes(residual):
    """Residual mode: torch-pruning prunes the block outputs through our shortcut pruner (the
    shortcuts' maps rewritten, the model still runs); inner-only: every block output stays 16/32/64."""
    torch.manual_seed(0)
    model = zoo.build("resnet20").eval()
    x = torch.randn(2, 3, 8, 8)
    pruned, info = tp_prune(model, "tp-magnitude", 0.5, x[:1], iterations=8, pads_residual=residual)
    costs = CostModel(model, x[:1])
    assert 0.4 * costs.macs <= costs.count(pruned).macs <= 0.5 * costs.macs
    assert pruned(x).shape == (2, 10) and info["residual_channels"] is residual
    widths = {pruned.layer1[0].bn2.num_features, pruned.layer2[0].bn2.num_features, pruned.layer3[0].bn2.num_features}
    if residual:
        assert widths != {16, 32, 64} and pruned.layer2[0].shortcut.out_channels == pruned.layer2[0].bn2.num_features
        assert pruned.layer2[0].shortcut.in_channels == pruned.layer1[2].bn2.num_features
    else:
        assert widths == {16, 32, 64}


@pytest.mark.parametrize("residual", [True, False])
def test_torch_pruning_baseline_saved_as_the_structured_bench_saves_it_loads_back(residual, tmp_path):
    """bench_structured saves a tp row with save_pruned(..., shrunk=True): the layout recorded the
    cut widths as the widths the model was built with (torch-pruning marks none of its cuts), so
    loading it into a fresh resnet20 was refused ("layer 'layer1.0.conv1' is built with in 16, out 16
    ... but had in 16, out 6 in the model the file was pruned from"). Also saved naming no zoo model."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    pruned, _ = tp_prune(zoo.build("resnet20").eval(), "tp-magnitude", 0.5, x[:1], iterations=6,
                         pads_residual=residual)
    path = save_pruned(tmp_path / "bench", pruned, {"model": "resnet20", "build_kwargs": {}}, {}, shrunk=True)
    assert torch.equal(load_model("resnet20", path).model.eval()(x), pruned(x))
    prunekit.save_model(pruned, tmp_path / "plain.safetensors", {})
    fresh = prunekit.load_pruned(zoo.build("resnet20"), tmp_path / "plain.safetensors").eval()
    assert torch.equal(fresh(x), pruned(x))


def test_hybrid_cuts_channels_then_sparsifies_to_one_budget_and_holds_the_zeros(tiny):
    model, x, data = tiny
    costs = CostModel(model, x)
    r = prune_structured(model, "hybrid", 0.25, x, lambda: data, structured_flops=0.6, gate_batches=2,
                         fisher_samples=16, finetune_epochs=1)
    assert costs.count(r.model).macs <= 0.25 * costs.macs == pytest.approx(0.25 * costs.macs)
    assert 0.25 * costs.macs < r.record["structured_macs"] <= 0.6 * costs.macs       # the channel phase alone
    assert sum(p.numel() for p in r.model.parameters()) < sum(p.numel() for p in model.parameters())
    sparsified = r.record["sparsify"]["0.25"]
    assert r.record["nonzeros"] == sparsified["nonzeros"] < sparsified["prunable_weights"]   # zeros held by the fine-tune
    assert r.record["macs"] == sparsified["macs"] == costs.count(r.model).macs               # counted one way
    with pytest.raises(PrunekitError, match="structured_flops 0.2 must be above flops 0.25"):
        prune_structured(model, "hybrid", 0.25, x, lambda: data, structured_flops=0.2, gate_batches=2)



def test_hybrid_weights_phase_keeps_excluded_layers_dense_and_counts_as_info_does(tiny):
    """resnet20-b's 1x1 projections stay dense in the FALCON phase (the command line passes the
    model's default exclude, as to a weights method); the sparsity counts the same weights."""
    from prunekit.cli import build_parser
    from prunekit.commands.prune import request_of
    from prunekit.params import ParamSpace
    model, x, data = tiny
    exclude = ["*.downsample.*"]
    r = prune_structured(copy.deepcopy(model), "hybrid", 0.25, x, lambda: data, structured_flops=0.6, gate_batches=2,
                         fisher_samples=16, exclude=exclude)
    projections = {n: m.weight for n, m in r.model.named_modules() if n.endswith("downsample.0")}
    assert len(projections) == 2 and all(bool((w != 0).all()) for w in projections.values())
    dense_prunable = ParamSpace(model, exclude=exclude, costs=CostModel(model, x)).numel
    assert r.sparsity == pytest.approx(1 - r.nonzeros / dense_prunable)
    assert r.nonzeros == r.record["sparsify"]["0.25"]["nonzeros"]
    args = build_parser().parse_args(["prune", "--model", "resnet20-b", "--data", "cifar10", "--data-dir", "none",
                                      "--method", "hybrid", "--flops", "0.3"])
    assert request_of(args, load_model("resnet20-b")).exclude == exclude


def test_hybrid_whose_channel_cut_lands_under_the_final_budget_keeps_it_without_falcon(tiny, monkeypatch):
    # The channel phase keeps the largest cut <= structured_flops, which may already be under
    # flops (a channel's worth apart: DenseBlockCNN, flops 0.3 and structured_flops 0.33 cut to
    # 0.2955): FALCON was then asked for more MACs than the shrunk model has, and refused the run.
    from prunekit.structured import hybrid
    model, x, data = tiny
    costs = CostModel(model, x)
    real = hybrid.autobot_masks
    monkeypatch.setattr(hybrid, "autobot_masks", lambda m, groups, counter, target, *a, **k:
                        real(m, groups, counter, 0.3 * counter.dense, *a, **k))   # cut to 0.3, not 0.6
    r = prune_structured(model, "hybrid", 0.5, x, lambda: data, structured_flops=0.6, gate_batches=2,
                         fisher_samples=16)
    assert r.record["structured_macs"] == r.record["macs"] == costs.count(r.model).macs <= 0.3 * costs.macs
    sparsified = r.record["sparsify"]["0.5"]
    assert sparsified["nonzeros"] == sparsified["prunable_weights"] and sparsified["sparsity_of_shrunk"] == 0

class _AttentionNet(torch.nn.Module):
    """A functional weight (``t @ w``), 4 heads whose only channel group is the heads, a head."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 8) / 4)
        self.attn = torch.nn.MultiheadAttention(8, 4, batch_first=True)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):                                   # (B, 1, 4, 16): 4 tokens of 16
        t = x.flatten(1, 2) @ self.w
        return self.head(self.attn(t, t, t, need_weights=False)[0].mean(1))


@pytest.mark.filterwarnings("ignore:per-(layer|sample) gradients")
def test_hybrid_holds_the_zeros_of_slim_attention_and_functional_weights_through_the_fine_tune():
    """The fine-tune held only weights prunable by module type: a SlimAttention's in_proj_weight
    and a functional weight, sparsified by FALCON, grew back (the run stopped on its MAC budget
    check) and the record's nonzeros left them out."""
    from prunekit.layers import SlimAttention
    torch.manual_seed(0)
    model, x = _AttentionNet(), torch.randn(1, 1, 4, 16)
    data = [(torch.randn(8, 1, 4, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    costs = CostModel(model, x)
    r = prune_structured(model, "hybrid", 0.3, x, lambda: data, structured_flops=0.7, gate_batches=2,
                         fisher_samples=8, finetune_epochs=1, finetune_lr=0.1)
    assert isinstance(r.model.attn, SlimAttention) and r.model.attn.num_heads < 4
    assert r.macs == costs.count(r.model).macs <= 0.3 * costs.macs
    weights = [r.model.w, r.model.attn.in_proj_weight, r.model.attn.out_proj.weight, r.model.head.weight]
    nonzeros = sum(int((w != 0).sum()) for w in weights)
    assert r.record["nonzeros"] == r.record["sparsify"]["0.3"]["nonzeros"] == nonzeros
    assert int((r.model.attn.in_proj_weight == 0).sum()) > 0 and int((r.model.w == 0).sum()) > 0


class _MostlyFixed(torch.nn.Module):
    """Most MACs in a layer no channel cut can shrink (flattened pixels -> classes) beside a small
    branch of prunable channels: one channel per group and the rest already cost about 40%."""

    def __init__(self):
        super().__init__()
        self.direct = torch.nn.Linear(64, 4)
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                          torch.nn.Flatten(), torch.nn.Linear(8, 4))

    def forward(self, x):
        return self.direct(x.flatten(1)) + self.branch(x)


def test_hybrid_checks_its_channel_floor_against_structured_flops_not_the_final_budget():
    """A final budget below what channels alone can reach is the hybrid's point: FALCON removes
    the rest. Only a structured_flops below the channel floor is refused, and named."""
    torch.manual_seed(0)
    model, x = _MostlyFixed(), torch.randn(1, 1, 8, 8)
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))) for _ in range(3)]
    costs = CostModel(model, x)
    with pytest.raises(PrunekitError, match=r"flops 0.3 asks for .* already cost .*\(([0-9.]+)%\)") as refused:
        prune_structured(model, "autobot", 0.3, x, lambda: data, gate_batches=2)
    floor = float(re.search(r"already cost [0-9,]+ \(([0-9.]+)%\)", refused.value.args[0]).group(1)) / 100
    assert 0.3 < floor < 0.95
    r = prune_structured(model, "hybrid", 0.3, x, lambda: data, structured_flops=0.95, gate_batches=2,
                         fisher_samples=8)          # refused before: the channel floor was checked against 0.3
    assert costs.count(r.model).macs <= 0.3 * costs.macs
    with pytest.raises(PrunekitError, match=r"^structured_flops 0.35 asks for"):
        prune_structured(model, "hybrid", 0.3, x, lambda: data, structured_flops=0.35, gate_batches=2)


def test_an_unreachable_channel_budget_names_the_groups_left_dense_and_why():
    """The refusal said only 'the unprunable layers already cost 88.99%': not which groups are left
    dense (here both GroupNorm-fed ones), so a user could not tell what to change."""
    class GNNet(torch.nn.Module):              # x (B, 3, 16, 16) -> (B, 10)
        def __init__(self):
            super().__init__()
            self.c1, self.g1 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(4, 16)
            self.c2, self.g2 = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.GroupNorm(4, 16)
            self.fc, self.head = torch.nn.Linear(16 * 8 * 8, 32), torch.nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.g2(self.c2(torch.relu(self.g1(self.c1(x))))))
            return self.head(torch.relu(self.fc(x.flatten(1))))

    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    data = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    with pytest.raises(PrunekitError) as refused:
        prune_structured(GNNet(), "autobot", 0.5, x, lambda: data, gate_batches=2)
    line = refused.value.args[0]
    assert "\n" not in line and line.endswith("ask for at least 89.0%")
    listed = line.split("3 channel groups left dense among them (", 1)[1]
    assert listed.startswith(("c2: touches g2 (GroupNorm)", "c1: touches g1 (GroupNorm)"))
    assert "c1: touches g1 (GroupNorm)" in listed and "c2: touches g2 (GroupNorm)" in listed
    assert "head: reaches the network output" in listed


def test_taper_temperature_anneals_from_one_to_the_final_value_and_cools_only_while_held():
    from prunekit.structured.taper import TaperOptions, _temperature
    opts = TaperOptions(final_temperature=0.04, hold_cooling=0.5)
    assert _temperature(opts, 1.0, 0.3, 0) == pytest.approx(1.0)
    assert _temperature(opts, 0.3, 0.3, 0) == pytest.approx(0.04)
    assert _temperature(opts, 0.65, 0.3, 0) == pytest.approx(0.2)          # geometric: halfway is sqrt(0.04)
    assert _temperature(opts, 0.65, 0.3, 2) == pytest.approx(0.05)         # two steps cooled while held
    assert _temperature(TaperOptions(final_temperature=1.0), 0.3, 0.3, 50) == 1.0    # no annealing at all


def test_settled_share_counts_gates_near_zero_or_one():
    from prunekit.structured.taper import settled_share
    gates = [torch.tensor([0.0, 0.04, 0.5, 0.96]), torch.tensor([1.0, 0.2, 0.06, 0.97])]
    assert settled_share(gates, 0.05) == pytest.approx(5 / 8)


def test_taper_snapshots_record_whether_the_gates_settled(tiny):
    model, x, data = tiny
    r = prune_structured(zoo.build("resnet20-b").eval(), "taper", 0.5, x, lambda: data, taper_epochs=10,
                         settle_steps=2, max_hold_steps=60)
    cut = r.record["snapshot_cuts"]["0.5"]
    assert set(cut) >= {"settled", "held_steps", "temperature", "constraint_error", "mean_abs_gate_change"}
    assert 2 <= cut["held_steps"] <= 60 and cut["temperature"] < 1
    if cut["settled"]:          # cut on settled gates: few of them moved far
        assert cut["mean_abs_gate_change"] < 0.1
    else:
        assert cut["held_steps"] == 60


def test_taper_gates_follow_the_budget_down_to_every_snapshot(tiny):
    # Before the logits were bounded and the temperature followed the gated MACs, this run's gates
    # stuck at 65% of the MACs while the budget was 40% (constraint error 0.25, cut unsettled).
    model, x, data = tiny
    r = prune_structured(zoo.build("resnet20-b").eval(), "taper", 0.4, x, lambda: data, taper_epochs=10,
                         snapshots=[0.7])
    cuts = r.record["snapshot_cuts"]
    assert sorted(cuts) == ["0.4", "0.7"]
    for cut in cuts.values():
        assert cut["settled"] and abs(cut["constraint_error"]) < 0.05


@pytest.mark.parametrize("flops", [0.7, 0.4])
def test_taper_temperature_never_jumps_back_up(tiny, flops):
    # The temperature once followed max(budget, gated MACs) step by step: gates that overshot the
    # budget re-warmed it at once (0.05 -> 0.7 on a depth-cut ResNet-56), the warm gates then fell
    # far under it, and the two states alternated until the hold ran out (cut unsettled, every
    # group at one channel). Only the hold's own warming (two cooling steps per step) may raise it.
    from prunekit.structured.taper import TaperOptions
    r = prune_structured(zoo.build("resnet20-b").eval(), "taper", flops, tiny[1], lambda: tiny[2], taper_epochs=10)
    temps = [h["temperature"] for h in r.record["history"]]
    rise = 1 / TaperOptions().hold_cooling ** 2
    assert all(b <= a * rise * (1 + 1e-9) for a, b in zip(temps, temps[1:])), temps


def test_channel_gate_training_shows_progress(tiny, capsys):
    """The CLI's progress (not --json) covers a channel method's gate training too: AutoBot's
    default 200 gate batches run for minutes on ResNet-56, which printed nothing until the cut."""
    model, x, data = tiny
    prune_structured(copy.deepcopy(model), "autobot", 0.5, x, data, gate_batches=3, progress=True)
    shown = capsys.readouterr().err
    assert "gate" in shown and "/3" in shown          # AutoBot's step count is known: the bar has its total
    prune_structured(copy.deepcopy(model), "autobot", 0.5, x, data, gate_batches=3)
    assert "gate" not in capsys.readouterr().err


def test_the_taper_gate_bar_has_its_planned_steps_as_total(tiny, capsys):
    """The taper's step count is known once it has seen the loader: its bar shows the plan
    (taper_epochs x batches per epoch) as the total, not a bare count."""
    model, x, data = tiny
    batches = len(data)
    prune_structured(copy.deepcopy(model), "taper", 0.5, x, data, taper_epochs=2, progress=True)
    assert f"/{2 * batches}" in capsys.readouterr().err


def _cbr(i, o, k, **kw):
    return torch.nn.Sequential(torch.nn.Conv2d(i, o, k, padding=k // 2, **kw), torch.nn.BatchNorm2d(o),
                               torch.nn.ReLU())


class _ShuffleBlock(torch.nn.Module):
    """ShuffleNet-style: grouped 1x1, channel shuffle (view, transpose, reshape), depthwise, grouped 1x1."""

    def __init__(self, shuffle=True):
        super().__init__()
        self.shuffle = shuffle
        self.stem, self.g1 = _cbr(3, 16, 3), _cbr(16, 16, 1, groups=4)
        self.dw = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.BatchNorm2d(16))
        self.g2, self.head = _cbr(16, 24, 1, groups=4), torch.nn.Linear(24, 10)

    def forward(self, x):                         # (B, 3, H, W) -> (B, 10)
        x = self.g1(self.stem(x))
        if self.shuffle:
            b, c, h, w = x.shape
            x = x.view(b, 4, c // 4, h, w).transpose(1, 2).reshape(b, c, h, w)
        x = self.g2(self.dw(x))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("shuffle", [True, False])
def test_torch_pruning_baseline_is_a_true_pruning_across_a_channel_shuffle(shuffle):
    """tp_prune cut the channels around a channel shuffle (which torch-pruning reads as elementwise):
    the shrunk model differed from the dense one with those channels closed. It now leaves the groups
    our numeric check rejects to torch-pruning as ignored: shrunk == dense with the removed channels gated."""
    torch.manual_seed(0)
    dense = _ShuffleBlock(shuffle)
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
    dense.eval()
    x = torch.randn(8, 3, 8, 8)
    small, _ = tp_prune(copy.deepcopy(dense), "tp-magnitude", 0.7, x[:1], iterations=8)
    costs = CostModel(dense, x[:1])
    assert costs.count(small).macs <= 0.7 * costs.macs
    D, S = dict(dense.named_modules()), dict(small.named_modules())
    hooks = []
    for name, conv in (("stem", "stem.0"), ("g1", "g1.0"), ("dw", "dw.0"), ("g2", "g2.0")):
        kept = torch.tensor([bool((S[conv].bias == b).any()) for b in D[conv].bias], dtype=torch.float32)
        hooks.append(D[name].register_forward_hook(lambda m, i, o, k=kept: o * k.view(1, -1, 1, 1)))
    with torch.no_grad():
        gated, shrunk = dense(x), small(x)
    assert float((gated - shrunk).abs().max()) <= 1e-5 * float(gated.abs().max())


@pytest.mark.parametrize("affine", [True, False])
def test_torch_pruning_baseline_leaves_a_layernorm_over_time_whole(affine):
    """Tokens (B, T=16, C=16), LayerNorm(16) over T (by transpose): torch-pruning resized the norm with
    fc1's 16 channels, and the pruned model's failure blamed the input shape. Norms are now ignored
    layers for torch-pruning (our groups never resize them): the norm keeps its 16, the model runs."""

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16, elementwise_affine=affine)
            self.fc2, self.fc3, self.head = torch.nn.Linear(16, 48), torch.nn.Linear(48, 16), torch.nn.Linear(16, 10)

        def forward(self, x):                      # (B, T, C) -> (B, 10)
            h = torch.relu(self.fc1(x))
            h = self.norm(h.transpose(1, 2)).transpose(1, 2)
            return self.head(torch.relu(self.fc3(torch.relu(self.fc2(h)))).mean(1))

    torch.manual_seed(0)
    model, x = Tokens().eval(), torch.randn(4, 16, 16)
    small, _ = tp_prune(copy.deepcopy(model), "tp-magnitude", 0.6, x[:1], iterations=8)
    assert small.norm.normalized_shape == (16,) and small.fc1.out_features == 16
    costs = CostModel(model, x[:1])
    assert costs.count(small).macs <= 0.6 * costs.macs and small(x).shape == (4, 10)


def test_torch_pruning_baseline_failure_does_not_blame_the_input(monkeypatch):
    """A model torch-pruning pruned that fails on the example input (which the dense model ran) is
    refused naming torch-pruning, not the input's shape."""
    import prunekit.structured.baselines as baselines
    model, x = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval(), \
        torch.randn(1, 8)

    def broken(*args, **kwargs):
        return torch.nn.Sequential(torch.nn.Linear(5, 4))       # takes 5 features: fails on x
    monkeypatch.setattr(baselines, "_prune_once", broken)
    with pytest.raises(PrunekitError) as err:
        tp_prune(model, "tp-magnitude", 0.5, x, iterations=2)
    assert "torch-pruning pruned fails on the example input the dense model runs on" in str(err.value)
    assert "shaped as the model takes it" not in str(err.value) and "\n" not in str(err.value)


def test_torch_pruning_baseline_on_hand_written_grouped_query_attention():
    """Hand-written grouped-query attention (k/v repeated by repeat_interleave) crashed tp_prune in
    find_groups; q, k and v now stay whole, the MLP is pruned."""

    class GQA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
            self.o, self.up, self.down = torch.nn.Linear(16, 16), torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x):                      # (B, T, 16) -> (B, 10)
            b, n, _ = x.shape
            q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
            k = self.k(x).view(b, n, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
            v = self.v(x).view(b, n, 2, 4).transpose(1, 2).repeat_interleave(2, 1)
            a = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v
            h = self.o(a.transpose(1, 2).reshape(b, n, 16))
            return self.head(self.down(torch.relu(self.up(h))).mean(1))

    torch.manual_seed(0)
    model, x = GQA().eval(), torch.randn(2, 6, 16)
    small, _ = tp_prune(copy.deepcopy(model), "tp-magnitude", 0.7, x[:1], iterations=8)
    assert (small.q.out_features, small.k.out_features, small.v.out_features) == (16, 8, 8)
    assert small.up.out_features < 64 and small(x).shape == (2, 10)


class _Shuffled(torch.nn.Module):
    """Every channel group passes a channel shuffle (which torch-pruning reads as elementwise): the numeric
    check leaves no group; images (B, 3, H, W) -> logits (B, 10)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    @staticmethod
    def _shuffle(h):
        b, c, height, width = h.shape
        return h.view(b, 2, c // 2, height, width).transpose(1, 2).reshape(b, c, height, width)

    def forward(self, x):
        h = self._shuffle(torch.relu(self.c1(x)))
        h = self._shuffle(torch.relu(self.c2(h)))
        return self.fc(h.mean((2, 3)))


def test_torch_pruning_baseline_without_a_group_left_is_refused_in_one_line_naming_it():
    """The numeric check leaving no group refused tp_prune with the channel methods' words only (and the same
    no word of the baseline); now the line names it and why it cannot run."""
    torch.manual_seed(0)
    with pytest.raises(PrunekitError) as err:
        tp_prune(_Shuffled().eval(), "tp-magnitude", 0.5, torch.randn(1, 3, 8, 8), iterations=2)
    message = str(err.value)
    assert "\n" not in message and message.startswith("tp-magnitude (torch-pruning's baseline"), message
    assert "cannot run on this model: the model has no prunable channel group" in message, message
    assert "c1: removing its channels does not compute" in message and "c2: removing" in message, message
