"""Depth pruning (``structured.depth``): which blocks count, which go first, and a channel method
after a depth cut (budget, record, save / reload / ONNX, refusals)."""

import copy

import onnx
import pytest
import torch
from torch import nn

import prunekit
from prunekit import zoo
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.export import export_onnx
from prunekit.layers import RemovedBlock
from prunekit.loading import load_model
from prunekit.record import save_pruned
from prunekit.structured.depth import depth_cut, removable_blocks

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    return x, data


def test_blocks_are_the_shape_keeping_children_of_sequentials(tiny):
    x, _ = tiny
    # option B ResNet-20: the first block of stages 2 and 3 changes the shape; BN-only children hold no weight
    assert removable_blocks(zoo.build("resnet20-b").eval(), x) == \
        ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    assert removable_blocks(zoo.build("mlpnet"), torch.randn(1, 1, 28, 28)) == []        # 784-40-20-10: none
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), nn.Linear(4, 2))
    assert removable_blocks(nested, torch.randn(1, 4)) == ["0.0", "0.2"]                # innermost only


def test_the_block_whose_removal_costs_nothing_goes_first_and_the_macs_stay_above_the_target():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3))
    with torch.no_grad():                 # block 1 is the identity: removing it changes nothing
        net[1].weight.copy_(torch.eye(6))
        net[1].bias.zero_()
    x = torch.randn(1, 6)
    batches = [(torch.randn(16, 6), torch.randint(0, 3, (16,)))]
    costs = CostModel(net, x)
    cut, info = depth_cut(net, costs, 0.7 * costs.macs, batches)       # room for one 36-MAC block of 126
    assert info["removed"] == ["1"] and isinstance(cut[1], RemovedBlock)
    assert info["rounds"][0]["loss_rise"] == pytest.approx(0.0, abs=1e-6)
    assert info["macs"] == costs.count(cut).macs == 90 >= 0.7 * costs.macs
    assert isinstance(net[1], nn.Linear)                               # the model given is not changed


def test_greedy_rounds_match_removals_tried_by_hand():
    torch.manual_seed(1)
    net = nn.Sequential(*[nn.Linear(5, 5) for _ in range(4)], nn.Linear(5, 2))
    x, (xs, ys) = torch.randn(1, 5), (torch.randn(32, 5), torch.randint(0, 2, (32,)))
    costs = CostModel(net, x)                                 # 4 blocks of 25 MACs and a head of 10

    def loss_without(names):
        with torch.no_grad():
            kept = nn.Sequential(*[nn.Identity() if str(i) in names else m for i, m in enumerate(net)])
            return float(nn.functional.cross_entropy(kept(xs), ys))

    first = min("0123", key=lambda a: loss_without({a}))
    second = min(set("0123") - {first}, key=lambda b: loss_without({first, b}))
    cut, info = depth_cut(net, costs, 60, [(xs, ys)])         # 110 MACs: two removals fit, three do not
    assert info["removed"] == [first, second] and info["macs"] == 60
    assert info["rounds"][1]["loss"] == pytest.approx(loss_without({first, second}), rel=1e-5)
    assert torch.allclose(cut(xs), nn.Sequential(*[nn.Identity() if str(i) in (first, second) else m
                                                   for i, m in enumerate(net)])(xs))


def test_taper_after_a_depth_cut_meets_the_budget_and_reloads(tiny, tmp_path):
    x, data = tiny
    model = zoo.build("resnet20-b").eval()
    r = prunekit.prune(model, lambda: data, method="taper", flops=0.3, example_input=x, depth_flops=0.6,
                       taper_epochs=10)
    costs = CostModel(model, x)
    depth = r.record["depth"]
    assert depth["removed"] and depth["flops_kept"] >= 0.6
    assert sum(isinstance(m, RemovedBlock) for m in r.model.modules()) == len(depth["removed"])
    assert costs.count(r.model).macs == r.macs <= 0.3 * costs.macs
    meta = {"model": "resnet20-b", "build_kwargs": {}, "input_shape": [3, 8, 8],
            "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    save_pruned(tmp_path, r.model, meta, r.record, shrunk=True)
    loaded = load_model("resnet20-b", tmp_path / "model.safetensors")
    assert torch.equal(loaded.model(x), r.model(x))
    graph = onnx.load(str(export_onnx(r.model, x, tmp_path / "model.onnx")))
    onnx.checker.check_model(graph)
    assert sum(n.op_type == "Conv" for n in graph.graph.node) == sum(isinstance(m, nn.Conv2d)
                                                                      for m in r.model.modules())


def test_autobot_after_a_depth_cut_meets_the_budget(tiny):
    x, data = tiny
    model = zoo.build("resnet20-b").eval()
    r = prunekit.prune(model, lambda: data, method="autobot", flops=0.4, example_input=x, depth_flops=0.7,
                       gate_batches=2)
    assert r.record["depth"]["removed"]
    assert CostModel(model, x).count(r.model).macs == r.macs <= 0.4 * CostModel(model, x).macs
    from prunekit.commands.prune import prune_lines         # the summary says which blocks went
    record = {**r.record, "dense_accuracy": 0.0, "accuracy": 0.0}          # (no eval_data here)
    said = next(line for line in prune_lines(record) if line.startswith("  depth"))
    assert said.startswith(f"  depth      {len(r.record['depth']['removed'])} block") and r.record["depth"]["removed"][0] in said
    nothing = {**record, "depth": {**record["depth"], "removed": []}}
    assert any("no block removed" in line for line in prune_lines(nothing))


def test_per_time_takes_the_block_that_is_slow_for_its_macs():
    # Two blocks with the same weights (so the same MACs and the same loss rise when either goes):
    # per MAC the first found goes; per second the one made slow by a sleep in a forward hook.
    import time as clock
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2))
    with torch.no_grad():
        for block in net[:2]:                 # 2I plus a little everywhere (no zero weight: full MACs)
            block.weight.copy_(2 * torch.eye(8) + 1e-3)
            block.bias.zero_()
    net[1].register_forward_hook(lambda *_: clock.sleep(0.002))
    xs = torch.randn(16, 8)
    with torch.no_grad():                     # labels the net gets right: halving its logits costs loss
        batches = [(xs, net(xs).argmax(1))]
    costs = CostModel(net, torch.randn(1, 8))
    _, by_macs = depth_cut(net, costs, costs.macs - 64, batches)
    _, by_time = depth_cut(net, costs, costs.macs - 64, batches, per="time")
    assert by_macs["removed"] == ["0"] and by_time["removed"] == ["1"]
    assert by_time["rounds"][0]["loss_rise"] > 0
    assert by_time["block_seconds"]["1"] > by_time["block_seconds"]["0"]


def test_depth_requests_that_cannot_work_are_refused(tiny):
    x, data = tiny
    model = zoo.build("resnet20-b").eval()
    with pytest.raises(PrunekitError, match="depth_flops 0.3 must be above flops 0.5"):
        prunekit.prune(model, lambda: data, method="taper", flops=0.5, example_input=x, depth_flops=0.3)
    with pytest.raises(PrunekitError, match="takes no option depth_flops"):
        prunekit.prune(model, lambda: data, method="hybrid", flops=0.3, example_input=x, depth_flops=0.6)
    with pytest.raises(PrunekitError, match="depth_flops"):
        prunekit.prune(model, lambda: data, method="taper", flops=0.3, example_input=x, depth_flops=1.5)
    with pytest.raises(PrunekitError, match="depth_per must be one of macs, time"):
        prunekit.prune(model, lambda: data, method="taper", flops=0.3, example_input=x, depth_flops=0.6,
                       depth_per="seconds")


def test_a_run_with_a_depth_cut_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    # the phase checkpoints rebuild the cut model from the dense one through the saved layout
    from prunekit.runs import RunCheckpointer
    from prunekit.structured import pipeline
    x, data = tiny
    dense = zoo.build("resnet20-b").eval()
    options = dict(method="taper", flops=0.3, example_input=x, depth_flops=0.6, taper_epochs=4, finetune_epochs=2)
    whole = prunekit.prune(copy.deepcopy(dense), lambda: data, out=str(tmp_path / "whole"), **options)
    save, saved = RunCheckpointer.save, []

    def save_then_stop(self, state, model):
        save(self, state, model)
        saved.append(state.stage)
        if len(saved) == 2:                 # after the cut and the BatchNorm phase
            raise KeyboardInterrupt
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(copy.deepcopy(dense), lambda: data, out=str(tmp_path / "cut"), **options)
    monkeypatch.setattr(RunCheckpointer, "save", save)

    def cut_again(*args, **kwargs):
        raise AssertionError("the resumed run cut the blocks again instead of loading its checkpoint")
    monkeypatch.setattr(pipeline, "depth_cut", cut_again)
    resumed = prunekit.prune(copy.deepcopy(dense), lambda: data, out=str(tmp_path / "cut"), **options)
    assert whole.record["depth"]["removed"] == resumed.record["depth"]["removed"] != []
    mine, theirs = whole.model.state_dict(), resumed.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


class _ResidualBody(nn.Module):
    """relu(x + body(x)), the body an nn.Sequential: a residual block written the common way."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class _BranchInParent(nn.Module):
    """The residual add written in the parent's forward: self.res is a branch, not a block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.res = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.res(x))
        return self.head(x.mean((2, 3)))


def test_a_residual_block_with_a_sequential_body_is_the_unit_never_a_conv_inside_its_branch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _ResidualBody(4), _ResidualBody(4),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert removable_blocks(net, torch.randn(1, 3, 8, 8)) == ["1", "2"]       # not 1.body.0, 1.body.3, ...
    kinds = {}
    assert removable_blocks(net, torch.randn(1, 3, 8, 8), kinds) == ["1", "2"]
    assert kinds == {"1": "residual block", "2": "residual block"}
    option_a = {}                         # an option-A ResNet's identity shortcut is an nn.Identity module
    assert len(removable_blocks(zoo.build("resnet20").eval(), torch.randn(1, 3, 8, 8), option_a)) == 7
    assert set(option_a.values()) == {"residual block"}
    # the add in the parent's forward: the convs of the branch are not blocks either
    assert removable_blocks(_BranchInParent(), torch.randn(1, 3, 8, 8)) == []
    # the depth cut records and the summary says what kind of unit went
    costs = CostModel(net, torch.randn(1, 3, 8, 8))
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,)))]
    cut, info = depth_cut(net, costs, 0.45 * costs.macs, batches)   # room for one block of two
    assert len(info["removed"]) == 1 and info["kinds"] == {info["removed"][0]: "residual block"}
    assert isinstance(cut.get_submodule(info["removed"][0]), RemovedBlock)
    from prunekit.commands.prune import prune_lines
    record = {"model": "net", "method": "autobot", "mode": "one-shot", "sparsity": None, "flops": 0.5,
              "flops_kept": 0.5, "macs": 1, "dense_macs": 2, "params_kept": 0.5, "params": 1,
              "dense_accuracy": 0.0, "accuracy": 0.0, "depth": info, "seconds": 1.0, "peak_rss_mb": 1.0}
    said = next(line for line in prune_lines(record) if line.startswith("  depth"))
    assert "residual blocks (each replaced by its identity shortcut)" in said
    # a model whose only shape-keeping layers sit in a residual branch: nothing to remove, and said so
    branchy = _BranchInParent()
    _, none = depth_cut(branchy, CostModel(branchy, torch.randn(1, 3, 8, 8)), 1, batches)
    assert none["removed"] == [] and none["candidates"] == 0
    said = next(line for line in prune_lines({**record, "depth": none}) if line.startswith("  depth"))
    assert "no residual block with an identity shortcut" in said
