"""A residual add onto a concatenation (``y = x + torch.cat([a(x), b(x)], 1)``, Inception/DenseNet-style
or split-transform-merge blocks) is pruned, not left dense: its channels are cut into parts at every
concatenation boundary, each part a channel group whose members are slices (offset, size) of their
layers' channels (``concat_add._concat_parts``). Shrunk models are recounted by the independent hook
counter of ``gallery.py`` and compared with the gated (masked dense) model."""

import pytest
import torch
from torch import nn

import prunekit
from gallery import independent_count
from prunekit.costs import CostModel
from prunekit.structured import autobot as autobot_module
from prunekit.structured import hybrid as hybrid_module
from prunekit.structured import taper as taper_module
from prunekit.structured.gates import GatedMacs, GatedParams, GateHooks
from prunekit.structured.groups import find_groups
from prunekit.structured.shrink import checked_groups, shrink

torch.set_num_threads(1)


def _cbr(cin, cout, k=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


class InceptionAdd(nn.Module):
    """Inception-like: stem (16), y = relu(x + cat([a (4), b (1x1 8 -> 3x3 6), c (6)])), twice; branch
    a's output also feeds a layer of its own (a consumer of part of the stream). (B,3,12,12) -> (B,10)."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.ModuleDict({"a": _cbr(16, 4), "b": nn.Sequential(_cbr(16, 8), _cbr(8, 6, 3)),
                                              "c": _cbr(16, 6, 3)}))
        self.side = _cbr(4, 8)
        self.head = nn.Linear(16 + 8, 10)

    def forward(self, x):
        x = self.stem(x)
        side = None
        for block in self.blocks:
            a = block["a"](x)
            side = self.side(a) if side is None else side
            x = torch.relu(x + torch.cat([a, block["b"](x), block["c"](x)], 1))
        return self.head(torch.cat([x.mean((2, 3)), side.mean((2, 3))], 1))


class CatOfCat(nn.Module):
    """y = x + cat([cat([a, b]), c]) (3 + 5 + 8 of 16). (B,3,12,12) -> (B,10)."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.a, self.b, self.c = _cbr(16, 3), _cbr(16, 5, 3), _cbr(16, 8)
        self.mix = _cbr(16, 12, 3)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.cat([torch.cat([self.a(x), self.b(x)], 1), self.c(x)], 1)
        return self.fc(self.mix(x).mean((2, 3)))


class CatAddCat(nn.Module):
    """y = x + cat([a, b]), then z = cat([y, w]) consumed by a conv: y's parts reach it at offsets 0
    and 4, w's channels at 12. (B,3,12,12) -> (B,10)."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 12, 3)
        self.a, self.b = _cbr(12, 4), _cbr(12, 8, 3)
        self.w = _cbr(3, 6, 3)
        self.mix = _cbr(18, 10)
        self.fc = nn.Linear(10, 10)

    def forward(self, x):
        w = self.w(x)
        x = self.stem(x)
        y = x + torch.cat([self.a(x), self.b(x)], 1)
        return self.fc(self.mix(torch.cat([y, w], 1)).mean((2, 3)))


class TwoSplits(nn.Module):
    """cat([a1 (3), b1 (5)]) + cat([a2 (4), b2 (4)]): two concatenations added with different splits,
    cut at the boundaries of both ([0, 3), [3, 4), [4, 8)). (B,3,12,12) -> (B,10)."""

    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 8, 3)
        self.a1, self.b1, self.a2, self.b2 = _cbr(8, 3), _cbr(8, 5, 3), _cbr(8, 4, 3), _cbr(8, 4)
        self.mix = _cbr(8, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.a1(x), self.b1(x)], 1) + torch.cat([self.a2(x), self.b2(x)], 1)
        return self.fc(self.mix(y).mean((2, 3)))


class LinearAdd(nn.Module):
    """x + cat([a (2), b (4)]) on 2 x 2 positions, mixed by a conv and flattened into a Linear, then an
    MLP's h + cat([la (5), lb (7)], 1). (B,3,12,12) -> (B,10)."""

    def __init__(self, flatten_the_add=False):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3, stride=6, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.a, self.b = nn.Conv2d(6, 2, 1), nn.Conv2d(6, 4, 1)
        self.mix = nn.Identity() if flatten_the_add else nn.Conv2d(6, 6, 1)
        self.hidden = nn.Linear(6 * 4, 12)
        self.la, self.lb = nn.Linear(12, 5), nn.Linear(12, 7)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = self.conv(x)                                                         # (B, 6, 2, 2)
        x = x + torch.cat([self.a(x), self.b(x)], 1)
        h = torch.relu(self.hidden(self.mix(x).flatten(1)))
        h = torch.relu(h + torch.cat([self.la(h), self.lb(h)], 1))
        return self.fc(h)


MAKERS = {"inception": InceptionAdd, "cat_of_cat": CatOfCat, "cat_add_cat": CatAddCat, "two_splits": TwoSplits,
          "linear": LinearAdd}


def _model(name):
    torch.manual_seed(0)
    model = MAKERS[name]().eval()
    for m in model.modules():          # non-trivial BN so that a wrongly kept channel would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model, torch.randn(2, 3, 12, 12)


def _assert_close_to_scale(a, b, rel=1e-5):
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= rel * float(a.abs().max()), float((a - b).abs().max())


def _assert_shrink_is_masked(model, groups, masks, x):
    """The shrunk model computes what the gated (masked dense) model computes, and its MACs and
    parameters are what the per-channel counts say, by an independent recount."""
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = [m.float() for m in masks]
        gated = model(x)
    small = shrink(model, groups, masks, x)
    with torch.no_grad():
        _assert_close_to_scale(gated, small(x))
    assert independent_count(small, x)["macs"] == GatedMacs(model, groups, CostModel(model, x)) \
        .macs_of_masks(masks)
    assert sum(p.numel() for p in small.parameters()) == GatedParams(model, groups).params_of_masks(masks)
    return small


def test_an_add_onto_a_concatenation_is_cut_into_parts_whose_members_are_slices():
    """On main this block was left dense ("a concatenation of a and b is added to stem's output")."""
    model, x = _model("inception")
    groups = find_groups(model, x)
    assert not any("concatenation" in why for _, why in groups.skipped), groups.skipped
    stem = sorted((m.offset, g.size, g.root) for g in groups for m in g.members if m.module == "stem.0")
    assert stem == [(0, 4, "blocks.0.a.0"), (4, 6, "blocks.0.b.1.0"), (10, 6, "blocks.0.c.0")]
    by_root = {g.root: g for g in groups}
    first = {(m.module, m.role, m.offset) for m in by_root["blocks.0.a.0"].members}
    # x's channel i < 4 is branch a's channel i in both blocks, and the side layer's input i
    assert {("stem.0", "out", 0), ("stem.1", "bn", 0), ("blocks.0.a.0", "out", 0), ("blocks.1.a.0", "out", 0),
            ("side.0", "in", 0), ("blocks.0.b.0.0", "in", 0), ("head", "in", 0)} <= first
    second = {(m.module, m.role, m.offset) for m in by_root["blocks.0.b.1.0"].members}
    assert {("stem.0", "out", 4), ("blocks.0.b.1.0", "out", 0), ("blocks.1.b.1.0", "out", 0),
            ("blocks.1.c.0", "in", 4), ("head", "in", 4)} <= second
    assert len(checked_groups(model, groups, x)) == len(groups)


@pytest.mark.parametrize("name, parts", [("cat_of_cat", [3, 5, 8]), ("cat_add_cat", [4, 8]),
                                         ("two_splits", [3, 1, 4]), ("linear", [2, 4]),
                                         ("mlp", [5, 7])])
def test_concatenation_shapes_are_cut_at_every_boundary(name, parts):
    model, x = _model("linear" if name == "mlp" else name)
    groups = find_groups(model, x)
    assert not any("concatenation" in why for _, why in groups.skipped), groups.skipped
    first = {"cat_of_cat": ("stem.0", "out"), "cat_add_cat": ("stem.0", "out"), "two_splits": ("mix.0", "in"),
             "linear": ("conv.0", "out"), "mlp": ("hidden", "out")}[name]
    held = sorted((m.offset, g.size) for g in groups for m in g.members if (m.module, m.role) == first)
    assert [size for _, size in held] == parts
    assert len(checked_groups(model, groups, x)) == len(groups)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_shrunk_models_compute_the_masked_model_and_count_as_recounted(name):
    model, x = _model(name)
    groups = find_groups(model, x)
    gen = torch.Generator().manual_seed(1)
    for trial in range(4):
        masks = []
        for g in groups:
            m = torch.rand(g.size, generator=gen) < (0.3 + 0.2 * trial)
            m[int(torch.randint(g.size, (1,), generator=gen))] = True
            masks.append(m)
        small = _assert_shrink_is_masked(model, groups, masks, x)
    if name == "inception":        # one channel left per part: each branch keeps one
        ones = [torch.arange(g.size) == 0 for g in groups]
        small = _assert_shrink_is_masked(model, groups, ones, x)
        assert small.stem[0].out_channels == 3 and small.blocks[0]["b"][1][0].out_channels == 1


@pytest.fixture
def captured(monkeypatch):
    """Every (model, groups, masks) a channel method shrinks, checked there against the gated model."""
    calls = []

    def checking(model, groups, masks, x):
        calls.append(_assert_shrink_is_masked(model, groups, masks, x))
        return calls[-1]
    monkeypatch.setattr(autobot_module, "shrink", checking)
    monkeypatch.setattr(taper_module, "shrink", checking)
    monkeypatch.setattr(hybrid_module, "shrink", checking)
    return calls


@pytest.mark.parametrize("method", ["autobot", "taper"])
@pytest.mark.parametrize("name", ["inception", "two_splits"])
def test_channel_methods_prune_through_the_add_and_meet_the_budget(captured, method, name):
    model, x = _model(name)
    torch.manual_seed(0)
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))) for _ in range(2)]
    options = {"gate_batches": 4} if method == "autobot" else {"taper_epochs": 4, "settle_steps": 2}
    r = prunekit.prune(model, lambda: data, method=method, flops=0.5, example_input=x[:1], finetune_epochs=0,
                       **options)
    assert captured                                       # the method's shrink was checked
    dense = CostModel(model, x[:1]).macs
    assert r.macs == independent_count(r.model, x[:1])["macs"] <= 0.5 * dense
    # the channels through the add were cut
    if name == "inception":
        assert r.model.stem[0].out_channels < model.stem[0].out_channels
    else:
        assert r.model.mix[0].in_channels < model.mix[0].in_channels


def test_a_split_in_the_stream_leaves_the_add_dense_naming_the_concatenation():
    class Chunked(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = _cbr(3, 8, 3), _cbr(8, 3), _cbr(8, 5)
            self.u, self.v = _cbr(4, 6), _cbr(4, 6)
            self.fc = nn.Linear(12, 10)

        def forward(self, x):
            x = self.stem(x)
            y = x + torch.cat([self.a(x), self.b(x)], 1)
            p, q = y.chunk(2, 1)
            return self.fc(torch.cat([self.u(p), self.v(q)], 1).mean((2, 3)))

    model = Chunked().eval()
    x = torch.randn(2, 3, 12, 12)
    groups = find_groups(model, x)
    reasons = [why for _, why in groups.skipped if "concatenation" in why]
    assert reasons and "a concatenation of a.0 and b.0" in reasons[0], groups.skipped
    assert not any(m.module == "stem.0" for g in groups for m in g.members)
    _assert_shrink_is_masked(model, groups, [torch.arange(g.size) % 2 == 0 for g in groups], x)


def test_an_add_whose_concatenation_sizes_torch_pruning_cannot_find_stays_dense_with_the_reason():
    """Flattened straight into a Linear, the concatenation's sizes are not found by torch-pruning
    (it compares them with the Linear's 24 inputs): the add's channels stay dense, named."""
    torch.manual_seed(0)
    model, x = LinearAdd(flatten_the_add=True).eval(), torch.randn(2, 3, 12, 12)
    groups = find_groups(model, x)
    reasons = [why for _, why in groups.skipped if "concatenation" in why]
    assert reasons and "a concatenation of a and b" in reasons[0] and "sizes" in reasons[0], groups.skipped
    assert not any(m.module in ("conv.0", "a", "b") for g in groups for m in g.members if m.role == "out")
    assert [g.size for g in groups if g.root in ("la", "lb")] == [5, 7]        # the MLP's add is pruned
    _assert_shrink_is_masked(model, groups, [torch.arange(g.size) % 2 == 0 for g in groups], x)


def test_the_hybrid_cuts_channels_through_the_add_then_sparsifies(captured):
    model, x = _model("inception")
    torch.manual_seed(0)
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))) for _ in range(2)]
    r = prunekit.prune(model, lambda: data, method="hybrid", flops=0.3, example_input=x[:1], structured_flops=0.6,
                       gate_batches=2, fisher_samples=16, finetune_epochs=0)
    assert len(captured) == 1 and captured[0].stem[0].out_channels < 16
    dense = CostModel(model, x[:1]).macs
    assert r.record["structured_macs"] <= 0.6 * dense and r.macs == independent_count(r.model, x[:1])["macs"] <= 0.3 * dense


def test_a_model_cut_through_the_add_saves_and_reloads_to_the_same_outputs(tmp_path):
    model, x = _model("inception")
    torch.manual_seed(0)
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))) for _ in range(2)]
    r = prunekit.prune(model, lambda: data, method="autobot", flops=0.4, example_input=x[:1], finetune_epochs=0,
                       gate_batches=2)
    assert r.model.stem[0].out_channels < 16
    prunekit.save_model(r.model, tmp_path / "m.safetensors", {})
    back = prunekit.load_pruned(InceptionAdd(), tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), r.model.eval()(x), rtol=0, atol=0)


def test_residual_channels_keep_leaves_the_add_dense_as_a_residual_stream():
    model, x = _model("inception")
    groups = find_groups(model, x, pads_residual=False)
    assert not any(m.module == "stem.0" for g in groups for m in g.members)
    reasons = [why for _, why in groups.skipped if "residual stream" in why]
    assert reasons and not any("cannot be followed" in why for _, why in groups.skipped), groups.skipped
    assert {g.root for g in groups} >= {"blocks.0.b.0.0", "side.0"}          # inside the blocks: pruned
