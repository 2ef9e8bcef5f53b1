"""Gated model == shrunk model, and gated MACs == CostModel.count of the shrunk model."""

import copy
import pytest
import torch

from closeness import assert_close_to_scale
from prunekit import zoo
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError
from prunekit.structured.gates import GatedMacs, GateHooks, fold_gates
from prunekit.structured.groups import find_groups
from prunekit.structured.shrink import shrink
from prunekit.zoo.layout import apply_layout, channel_layout
from prunekit.structured.threshold import masks_at, threshold_to_budget

torch.set_num_threads(1)   # the machine is shared; tiny models gain nothing from threads


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = zoo.build(name).eval()
    for m in model.modules():      # non-trivial BN so that a wrongly kept bias would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    shape = zoo.spec(name).input_shape
    hw = 16 if name in ("resnet20", "resnet20-b", "resnet32", "resnet44", "resnet56", "mobilenetv1-cifar") else 32
    x = torch.randn(2, *shape) if name == "mlpnet" else torch.randn(2, shape[0], hw, hw)
    return model, x


def _random_masks(groups, gen, p=0.5):
    masks = [torch.rand(g.size, generator=gen) < p for g in groups]
    for m in masks:
        m[torch.randint(m.numel(), (1,), generator=gen)] = True
    return masks


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_shrunk_equals_gated_on_every_zoo_model(name):
    model, x = _model(name)
    groups = find_groups(model, x)
    masks = _random_masks(groups, torch.Generator().manual_seed(1))
    small = shrink(model, groups, masks, x)
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = [m.float() for m in masks]
        gated = model(x)
    assert_close_to_scale(small(x), gated, rel=1e-5)   # outputs reach ~400: relative, not 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert type(small) is type(model)


@pytest.mark.parametrize("name", ["resnet20", "resnet20-b", "mobilenetv1-cifar", "mlpnet"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gated_macs_equal_costmodel_count_of_shrunk(name, seed):
    model, x = _model(name)
    groups = find_groups(model, x)
    costs = CostModel(model, x)
    counter = GatedMacs(model, groups, costs)
    masks = _random_masks(groups, torch.Generator().manual_seed(seed), p=0.2 + 0.3 * seed)
    assert counter.macs_of_masks(masks) == costs.count(shrink(model, groups, masks, x)).macs
    assert counter.macs_of_masks([torch.ones(g.size, dtype=torch.bool) for g in groups]) == costs.macs


def test_gated_macs_are_differentiable_and_count_depthwise_once():
    model, x = _model("mobilenetv1-cifar")
    groups = find_groups(model, x)
    costs = CostModel(model, x)
    counter = GatedMacs(model, groups, costs)
    gates = [torch.full((g.size,), 0.5, dtype=torch.float64, requires_grad=True) for g in groups]
    counter.macs(gates).backward()
    assert all(g.grad is not None and bool((g.grad > 0).all()) for g in gates)
    # Closing one channel of a depthwise group saves the depthwise conv's k*k*HW MACs once,
    # plus the pointwise convs on both sides: never the (in x out) a dense conv formula would give.
    g = next(g for g in groups if any(m.module == "features.2.depthwise.0" for m in g.members))
    masks = [torch.ones(h.size, dtype=torch.bool) for h in groups]
    masks[g.index][0] = False
    dw, pw1, pw2 = (costs.layer(n) for n in ("features.2.depthwise.0", "features.1.pointwise.0",
                                             "features.2.pointwise.0"))
    saved = dw.macs // dw.weight_shape[0] + pw1.macs // pw1.weight_shape[0] + pw2.macs // pw2.weight_shape[1]
    assert costs.macs - counter.macs_of_masks(masks) == saved


def test_fold_gates_is_exact():
    model, x = _model("resnet20-b")
    groups = find_groups(model, x)
    gates = [torch.rand(g.size) for g in groups]
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = gates
        gated = model(x)
    fold_gates(model, groups, gates)
    with torch.no_grad():
        assert_close_to_scale(model(x), gated, rel=1e-5)


class _SharedWeight(torch.nn.Module):
    """``b.weight = a.weight``: one weight, two consumers of the same channel group."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(16, 8)
        self.a, self.b = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)
        self.b.weight = self.a.weight
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        return self.head(torch.relu(self.a(h)) + torch.relu(self.b(h)))


def test_fold_gates_scales_a_shared_weight_once():
    """The taper folds its gates before the cut; a weight shared by two consumers was scaled by
    its gate once per consumer (g² where the gated model has g)."""
    torch.manual_seed(0)
    model, x = _SharedWeight().eval(), torch.randn(4, 1, 4, 4)
    groups = find_groups(model, x)
    assert any({("a", "in"), ("b", "in")} <= {(m.module, m.role) for m in g.members} for g in groups)
    gates = [torch.rand(g.size) for g in groups]
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = gates
        gated = model(x)
    fold_gates(model, groups, gates)
    with torch.no_grad():
        assert_close_to_scale(model(x), gated, rel=1e-5)


def test_threshold_meets_budget_exactly_and_never_empties_a_group():
    model, x = _model("resnet20-b")
    groups = find_groups(model, x)
    counter = GatedMacs(model, groups, CostModel(model, x))
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(g.size, generator=gen) for g in groups]
    scores[0] = scores[0] * 0.01                       # a group that a plain threshold would empty
    # brute force: the MACs of every candidate threshold
    reachable = [counter.macs_of_masks(masks_at(scores, float(t)))
                 for t in torch.cat([torch.tensor([-1.0]), torch.cat(scores)])]
    for share in (0.9, 0.6, 0.3, 0.15):
        budget = share * counter.dense
        masks, threshold = threshold_to_budget(scores, counter, budget)
        macs = counter.macs_of_masks(masks)
        assert macs <= budget and all(bool(m.any()) for m in masks)
        assert macs >= max(m for m in reachable if m <= budget)   # no threshold keeps more within the budget
    with pytest.raises(PrunekitError, match="larger --flops"):
        threshold_to_budget(scores, counter, counter.minimum - 1)


def test_channels_tied_at_the_threshold_fill_the_budget_in_tiebreak_order():
    # Taper gates clipped to their logit bound tie by the hundred; one threshold then had to keep
    # all of them or none (a snapshot at 15% of the MACs for a 50% budget).
    model, x = _model("resnet20-b")
    groups = find_groups(model, x)
    counter = GatedMacs(model, groups, CostModel(model, x))
    gen = torch.Generator().manual_seed(0)
    scores = [torch.where(torch.rand(g.size, generator=gen) < 0.3, torch.tensor(5.0), torch.tensor(-5.0))
              for g in groups]                             # 30% open, the rest tied at the lower bound
    tiebreak = [torch.rand(g.size, generator=gen) for g in groups]
    open_only = counter.macs_of_masks(masks_at(scores, -5.0))
    for share in (0.5, 0.7):
        budget = share * counter.dense
        assert open_only < budget < counter.dense
        masks, threshold = threshold_to_budget(scores, counter, budget, tiebreak)
        assert threshold == -5.0 and counter.macs_of_masks(masks) <= budget
        tied = sorted(((float(tiebreak[g][j]), g, j) for g, s in enumerate(scores)
                       for j in range(s.numel()) if s[j] == -5.0), reverse=True)
        taken = [bool(masks[g][j]) for _, g, j in tied]
        count = sum(taken)
        assert taken == [True] * count + [False] * (len(taken) - count)      # a run, best first
        with_next = [m.clone() for m in masks]
        with_next[tied[count][1]][tied[count][2]] = True
        assert counter.macs_of_masks(with_next) > budget                     # the run is the longest
        assert counter.macs_of_masks(masks) > budget - counter.dense * 0.05  # within a channel or so


def test_channel_norms_are_the_norms_of_each_channels_producing_weights():
    from prunekit.structured.channel_norms import channel_norms
    model, x = _model("resnet20-b")
    groups = find_groups(model, x)
    norms = channel_norms(model, groups)
    modules = dict(model.named_modules())
    for group, norm in zip(groups, norms):
        expected = torch.zeros(group.size, dtype=torch.float64)
        for member in group.layers("out"):
            weight = modules[member.module].weight.detach().double()
            for j in range(group.size):
                for row in group.channels(member, torch.tensor([j])):
                    expected[j] += weight[row].pow(2).sum()
        torch.testing.assert_close(norm, expected.sqrt())


def test_shrink_refuses_an_empty_group():
    model, x = _model("mlpnet")
    groups = find_groups(model, x)
    masks = [torch.ones(g.size, dtype=torch.bool) for g in groups]
    masks[0][:] = False
    with pytest.raises(PrunekitError, match="every channel"):
        shrink(model, groups, masks, x)


def test_layout_rebuilds_the_architecture():
    model, x = _model("mobilenetv1-cifar")
    groups = find_groups(model, x)
    small = shrink(model, groups, _random_masks(groups, torch.Generator().manual_seed(3)), x)
    rebuilt = apply_layout(zoo.build("mobilenetv1-cifar"), channel_layout(small))
    rebuilt.load_state_dict(small.state_dict())
    rebuilt.eval()
    assert torch.equal(rebuilt(x), small(x))
    with pytest.raises(PrunekitError, match="another architecture"):
        apply_layout(zoo.build("mlpnet"), channel_layout(small))
    # the same architecture built for 3 classes, not 10: its classifier would silently grow to 10
    with pytest.raises(PrunekitError, match=r"'fc' is built with in \d+, out 3 in the model passed but had in \d+, "
                                            r"out 10 .*constructor arguments"):
        apply_layout(zoo.build("mobilenetv1-cifar", num_classes=3), channel_layout(small))
    # an instance already shrunk, narrower than the saved layout: not a damaged sidecar
    with pytest.raises(PrunekitError, match="pass a fresh, dense instance") as err:
        apply_layout(copy.deepcopy(small), channel_layout(model))
    assert "damaged" not in str(err.value)


def test_option_a_shortcut_copies_kept_channels_and_keeps_zeros():
    """Stage-1 channel i reaches stage-2 channel 8 + i through the zero pad (16 -> 32): after the
    cut, a kept stage-2 channel copies its stage-1 channel if that was kept, else it is zero."""
    model, x = _model("resnet20")
    groups = find_groups(model, x)
    stage1 = next(g for g in groups if g.root == "conv1")
    stage2 = next(g for g in groups if g.root == "layer2.0.conv2")
    masks = [torch.ones(g.size, dtype=torch.bool) for g in groups]
    masks[stage1.index][[0, 3]] = False                       # stage-1 channels 0, 3 closed
    masks[stage2.index][[1, 11, 30]] = False                  # a pad channel, a copy of 3, a pad channel
    small = shrink(model, groups, masks, x)
    shortcut = small.layer2[0].shortcut
    kept2 = [c for c in range(32) if c not in (1, 11, 30)]
    renumber = {old: new for new, old in enumerate(c for c in range(16) if c not in (0, 3))}
    expected = [renumber.get(c - 8, -1) if 8 <= c < 24 else -1 for c in kept2]
    assert shortcut.source_list() == expected and (shortcut.in_channels, shortcut.out_channels) == (14, 29)
    block_in = torch.randn(2, 14, 8, 8)
    out = shortcut(block_in)
    for new, src in enumerate(expected):
        assert torch.equal(out[:, new], block_in[:, src, ::2, ::2] if src >= 0 else torch.zeros_like(out[:, new]))


def test_option_a_shrunk_saves_reloads_and_exports_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    from prunekit.export import export_onnx
    model, x = _model("resnet20")
    groups = find_groups(model, x)
    small = shrink(model, groups, _random_masks(groups, torch.Generator().manual_seed(4)), x)
    rebuilt = apply_layout(zoo.build("resnet20"), channel_layout(small))
    rebuilt.load_state_dict(small.state_dict())
    rebuilt.eval()
    assert torch.equal(rebuilt(x), small(x))
    graph = onnx.load(str(export_onnx(small, x, tmp_path / "model.onnx")))
    onnx.checker.check_model(graph)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("Conv") == sum(isinstance(m, torch.nn.Conv2d) for m in small.modules())
    assert "Gather" in ops                     # the shortcuts' channel maps


def test_threshold_cut_leaves_no_channel_out_that_still_fits():
    # DenseBlockCNN's channels differ in price by 6x (a layer's output feeds every later layer;
    # a transition channel only the head): one global threshold stopped at a dear channel that
    # did not fit and left cheaper ones out that did (AutoBot at 43% of the MACs for a 50% budget).
    from gallery import DenseBlockCNN
    torch.manual_seed(0)
    model, x = DenseBlockCNN().eval(), torch.randn(2, 1, 28, 28)
    groups = find_groups(model, x)
    counter = GatedMacs(model, groups, CostModel(model, x))
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        scores = [torch.rand(g.size, generator=gen) for g in groups]
        for share in (0.9, 0.7, 0.5, 0.3, 0.15):
            budget = share * counter.dense
            masks, _ = threshold_to_budget(scores, counter, budget)
            macs = counter.macs_of_masks(masks)
            assert macs <= budget and all(bool(m.any()) for m in masks)
            for g, m in enumerate(masks):
                for j in torch.nonzero(~m).flatten():
                    grown = [k.clone() for k in masks]
                    grown[g][j] = True
                    assert counter.macs_of_masks(grown) > budget, (trial, share, macs / counter.dense)


def test_a_finished_weights_run_over_a_loaded_shrunk_model_gives_back_into_the_model_passed(tmp_path):
    """A channel-pruned file loaded with load_pruned, then pruned by a weights method with out=RUN:
    the run's model.json records the channel layout; given back finished, the weights went into a
    reshaped copy and the model passed in kept its dense weights (the first run prunes it in place)."""
    import prunekit
    model, x = _model("mobilenetv1-cifar")
    groups = find_groups(model, x)
    small = shrink(model, groups, _random_masks(groups, torch.Generator().manual_seed(3)), x)
    prunekit.save_model(small, tmp_path / "small.safetensors", {})
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 3, 16, 16, generator=gen), torch.randint(0, 10, (32,), generator=gen))
    zeros = lambda m: sum(int((p == 0).sum()) for p in m.parameters())   # noqa: E731
    for attempt in ("first", "given back"):
        passed = prunekit.load_pruned(zoo.build("mobilenetv1-cifar"), tmp_path / "small.safetensors")
        dense_zeros = zeros(passed)
        result = prunekit.prune(passed, data, method="magnitude", sparsity=0.5, example_input=x[:1],
                                out=str(tmp_path / "run"))
        assert result.model is passed, attempt
        assert zeros(passed) > dense_zeros + 0.4 * sum(p.numel() for p in passed.parameters() if p.dim() > 1), attempt


def _conv_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3, padding=1, groups=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 4)).eval()


def _channels_last(model):
    """Whether each conv weight of ``model`` is channels-last (and not also contiguous: 3x3 kernels, several inputs)."""
    return [m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
            for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_shrink_and_apply_layout_keep_channels_last_weights():
    """A model converted to channels_last keeps its conv weights so after the cut (cut on inputs too)
    and after resizing a fresh channels_last instance to the saved layout; outputs unchanged."""
    model = _conv_net().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8)
    groups = find_groups(model, x)
    masks = [torch.arange(g.size) % 2 == 0 for g in groups]
    small = shrink(model, groups, masks, x)
    assert _channels_last(small) == [True, True, True]
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = [m.float() for m in masks]
        gated = model(x)
    assert_close_to_scale(small(x), gated, rel=1e-5)
    rebuilt = apply_layout(_conv_net(seed=1).to(memory_format=torch.channels_last), channel_layout(small))
    assert _channels_last(rebuilt) == [True, True, True]
    rebuilt.load_state_dict(small.state_dict())
    assert _channels_last(rebuilt) == [True, True, True]
    assert torch.equal(rebuilt(x), small(x))
    plain = apply_layout(_conv_net(seed=1), channel_layout(small))      # a default-layout model stays so
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))


def test_apply_layout_keeps_dtype_and_a_conv_transpose_or_3d_weights_layout():
    """Resized layers keep the model's dtype (float64 here) and each weight its memory format, a
    ConvTranspose's (in, out, k, k) and a Conv3d's (channels_last_3d) too; BatchNorm buffers their dtype."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ConvTranspose2d(8, 6, 3),
                              torch.nn.Linear(6, 5)).double().to(memory_format=torch.channels_last)
    net3d = torch.nn.Conv3d(4, 6, 3).double().to(memory_format=torch.channels_last_3d)
    net.append(net3d)
    layout = {"0": {"in": 3, "out": 5, "groups": 1, "dense": {"in": 3, "out": 8, "groups": 1}},
              "1": {"features": 5, "dense": {"features": 8}},
              "2": {"in": 5, "out": 4, "groups": 1, "dense": {"in": 8, "out": 6, "groups": 1}},
              "3": {"in": 6, "out": 3, "dense": {"in": 6, "out": 5}},
              "4": {"in": 4, "out": 2, "groups": 1, "dense": {"in": 4, "out": 6, "groups": 1}}}
    apply_layout(net, layout)
    assert net[0].weight.shape == (5, 3, 3, 3) and net[2].weight.shape == (5, 4, 3, 3)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last) and not net[0].weight.is_contiguous()
    assert net[2].weight.is_contiguous(memory_format=torch.channels_last) and not net[2].weight.is_contiguous()
    assert net[4].weight.is_contiguous(memory_format=torch.channels_last_3d) and not net[4].weight.is_contiguous()
    assert {t.dtype for t in net.parameters()} == {torch.float64}
    assert net[1].running_mean.dtype == net[1].running_var.dtype == torch.float64
