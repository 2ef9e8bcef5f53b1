"""Structured pruning beyond plain CNNs: attention heads, MLP hidden units, grouped convolutions
and concatenations as groups; what cannot be grouped is named. Shrunk models are recounted by
the independent hook counter of ``gallery.py`` (no code shared with prunekit.costs)."""

import pytest
import torch
from torch import nn

from gallery import BranchyCNN, DenseBlockCNN, RowEncoder, independent_count, small_vit
from prunekit.costs import CostModel
from prunekit.errors import PrunekitError, PrunekitWarning
from prunekit.layers import SlimAttention
from prunekit.structured.gates import GatedMacs, GateHooks
from prunekit.structured.groups import find_groups
import prunekit
from prunekit.structured.shrink import MISMATCH, checked_groups, shrink

torch.set_num_threads(1)
MAKERS = {"vit": small_vit, "cnn": BranchyCNN, "densenet": DenseBlockCNN, "encoder": RowEncoder}


def _model(name):
    torch.manual_seed(0)
    model = MAKERS[name]().eval()
    for m in model.modules():          # non-trivial BN so that a wrongly kept channel would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model, torch.randn(2, 1, 28, 28)


def test_groups_of_a_vit_are_heads_and_mlp_units_and_the_residual_stream_is_named():
    model, x = _model("vit")
    groups = find_groups(model, x)
    kinds = sorted((g.kind, g.root, g.size) for g in groups)
    assert kinds == [("channels", "blocks.0.mlp.0", 64), ("channels", "blocks.1.mlp.0", 64),
                     ("heads", "blocks.0.attn", 4), ("heads", "blocks.1.attn", 4)]
    reasons = " ".join(why for _, why in groups.skipped)
    assert "LayerNorm" in reasons                   # the embedding width stays whole, by name


def test_grouped_conv_and_concatenation_are_groups():
    model, x = _model("cnn")
    groups = find_groups(model, x)
    by_root = {g.root: g for g in groups}
    assert by_root["grouped.0"].segments == 2 and by_root["grouped.0"].size == 16
    assert by_root["dw.3"].segments == 2
    concat = {(m.module, m.offset) for m in by_root["branch_b.0"].members if m.role == "in"}
    assert concat == {("res.0", 16), ("proj.0", 16)}          # the second half of the concatenation
    assert [root for root, _ in groups.skipped] == ["fc"]       # only the logits


def test_densenet_features_are_groups_with_batchnorm_at_their_offset():
    """Every layer's new features are a group, although the BatchNorm after each concatenation
    sees them at an offset (they were left dense before): only the logits are skipped."""
    model, x = _model("densenet")
    groups = find_groups(model, x)
    by_root = {g.root: g for g in groups}
    assert sorted(by_root) == ["layer1.2", "layer2.2", "stem", "transition.2"]
    bn = {(m.module, m.offset) for m in by_root["layer1.2"].members if m.role == "bn"}
    assert bn == {("layer2.0", 8), ("transition.0", 8)}
    assert [root for root, _ in groups.skipped] == ["head"]


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("seed", [0, 1])
def test_shrunk_equals_gated_and_every_count_agrees(name, seed):
    model, x = _model(name)
    groups = find_groups(model, x)
    costs = CostModel(model, x)
    counter = GatedMacs(model, groups, costs)
    gen = torch.Generator().manual_seed(seed)
    masks = [torch.rand(g.size, generator=gen) < 0.5 for g in groups]
    for m in masks:
        m[torch.randint(m.numel(), (1,), generator=gen)] = True
    small = shrink(model, groups, masks, x)
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = [m.float() for m in masks]
        gated = model(x)
    with torch.no_grad():
        assert (small(x) - gated).abs().max() <= 1e-5 * gated.abs().max()
    assert counter.macs_of_masks(masks) == costs.count(small).macs == independent_count(small, x)["macs"]
    assert costs.count(small).params == sum(p.numel() for p in small.parameters())
    for group, mask in zip(groups, masks):
        if group.kind == "heads":
            slim = small.get_submodule(group.root)
            kept = int(mask.sum())
            if kept < group.size:
                assert isinstance(slim, SlimAttention) and slim.num_heads == kept
                assert slim.in_proj_weight.shape == (3 * kept * slim.head_dim, slim.embed_dim)
                assert slim.out_proj.weight.shape == (slim.embed_dim, kept * slim.head_dim)


@pytest.mark.parametrize("method", ["autobot", "taper"])
@pytest.mark.parametrize("name", ["vit", "cnn", "densenet"])
def test_structured_methods_give_valid_smaller_models_at_half_the_macs(name, method):
    model, x = _model(name)
    torch.manual_seed(1)
    data = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(3)]
    dense = independent_count(model, x)
    options = {"gate_batches": 6} if method == "autobot" else {"taper_epochs": 6, "settle_steps": 2}
    result = prunekit.prune(model, lambda: data, method=method, flops=0.5, example_input=x, **options)
    recount = independent_count(result.model, x)
    assert result.macs == recount["macs"] <= 0.5 * dense["macs"]
    assert result.dense_macs == dense["macs"]
    assert result.flops_kept == pytest.approx(recount["macs"] / dense["macs"], rel=1e-12)
    assert result.record["params"] == sum(p.numel() for p in result.model.parameters())
    assert result.record["params"] < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert result.model(x).shape == (2, 10) and torch.isfinite(result.model(x)).all()


class ShuffleUnitNet(nn.Module):
    """A ShuffleNet unit: grouped 1x1 conv, channel shuffle (view, transpose, reshape), depthwise
    3x3, grouped 1x1 conv, residual add."""

    def __init__(self, c=8, g=2):
        super().__init__()
        self.g = g
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.gc1, self.bn1 = nn.Conv2d(c, c, 1, groups=g, bias=False), nn.BatchNorm2d(c)
        self.dw, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.gc2, self.bn3 = nn.Conv2d(c, c, 1, groups=g, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.gc1(x)))
        b, c, h, w = y.shape
        y = y.view(b, self.g, c // self.g, h, w).transpose(1, 2).reshape(b, c, h, w)
        y = self.bn3(self.gc2(self.bn2(self.dw(y))))
        return self.head(torch.relu(x + y).mean((2, 3)))


def test_a_channel_shuffle_group_is_left_dense_and_named():
    """torch-pruning reads the shuffle as elementwise: gc1's output channel j and the depthwise
    conv's channel j become one group, though the shuffle sends j elsewhere, so removing them did
    not compute what their gates do. checked_groups leaves that group dense, by name; the
    residual group (no shuffle) is still pruned, and the channel methods run."""
    torch.manual_seed(0)
    model, x = ShuffleUnitNet().eval(), torch.randn(2, 1, 28, 28)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    found = find_groups(model, x)
    assert sorted(g.root for g in found) == ["dw", "gc2"]     # dw: through the shuffle
    groups = checked_groups(model, found, x)
    assert [g.root for g in groups] == ["gc2"] and groups.groups[0].index == 0
    assert ("dw", MISMATCH) in groups.skipped
    masks = [torch.arange(g.size) % 2 == 0 for g in groups]
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = [m.float() for m in masks]
        gated = model(x)
    with torch.no_grad():
        assert (shrink(model, groups, masks, x)(x) - gated).abs().max() <= 1e-5 * gated.abs().max()
    data = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(3)]
    with pytest.warns(PrunekitWarning, match="group left dense.*dw: removing its channels"):
        result = prunekit.prune(model, lambda: data, method="autobot", flops=0.7, example_input=x, gate_batches=4)
    assert result.macs == independent_count(result.model, x)["macs"] <= 0.7 * result.dense_macs
    assert any(entry.startswith("dw: removing its channels") for entry in result.record["skipped_groups"])


def test_a_model_with_nothing_to_group_is_refused_with_the_reasons():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.LayerNorm(32), nn.Linear(32, 10))
    with pytest.raises(PrunekitError, match=r"no prunable channel group.*LayerNorm"):
        find_groups(model, torch.zeros(1, 1, 28, 28))


class _GroupNorms(nn.Module):
    """Five convs, each followed by a GroupNorm: every group touches a norm that cannot be resized."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(1 if i == 0 else 8, 8, 3, padding=1) for i in range(5))
        self.norms = nn.ModuleList(nn.GroupNorm(2, 8) for _ in range(5))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return self.fc(x.mean((2, 3)))


def test_the_refusal_of_a_model_without_a_group_says_why_counts_the_rest_and_names_the_fix():
    from prunekit.options import cli_message
    with pytest.raises(PrunekitError) as caught:
        find_groups(_GroupNorms(), torch.zeros(1, 1, 8, 8))
    text = str(caught.value)
    assert "channel surgery cannot resize" in text and "cannot map" not in text
    assert "convs.4: touches norms.4 (GroupNorm)" in text and "and 2 more" in text
    assert "fc: reaches" not in text           # said once as a cause, not listed among the reasons
    assert text.endswith("prune its weights instead, e.g. method falcon")
    assert cli_message(caught.value).endswith("e.g. --method falcon")


class _ScaledStem(nn.Module):
    """A learned per-channel scale on c1's output (a bare parameter): c1's group is left dense."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, 2, 1), nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x))) * self.scale.view(1, -1, 1, 1)
        return self.fc(torch.relu(self.b2(self.c2(x))).mean((2, 3)))


def test_a_group_left_dense_by_a_parameter_is_named_in_a_warning_the_log_and_the_summary(tmp_path):
    from prunekit.commands.prune import prune_lines
    torch.manual_seed(0)
    data = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    with pytest.warns(PrunekitWarning, match=r"1 channel group left dense.*c1: touches parameter scale"):
        result = prunekit.prune(_ScaledStem(), lambda: data, method="autobot", flops=0.7, gate_batches=2, eval_data=data,
                                out=str(tmp_path / "run"))
    assert "c1: touches parameter scale" in (tmp_path / "run" / "run.log").read_text()
    said = [line for line in prune_lines(result.record) if line.startswith("  left dense")]
    assert said == ["  left dense c1: touches parameter scale outside a Conv/Linear/BatchNorm layer"]
    assert any(entry.startswith("fc: reaches the network output") for entry in result.record["skipped_groups"])


def test_groups_left_dense_by_design_get_no_warning():
    import warnings
    from prunekit.commands.prune import prune_lines
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    data = [(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = prunekit.prune(model, lambda: data, method="autobot", flops=0.7, gate_batches=2, eval_data=data)
    assert result.record["skipped_groups"] == ["3: reaches the network output (no consuming layer)"]
    assert not any(line.startswith("  left dense") for line in prune_lines(result.record))


class _LastStepGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.gru = nn.GRU(32, 48, batch_first=True)
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        h, _ = self.gru(torch.relu(self.embed(x)))
        return self.head(h[:, -1])


class _EinsumWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.w = nn.Parameter(torch.randn(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.relu(torch.einsum("bf,fg->bg", torch.relu(self.a(x)), self.w)))


@pytest.mark.parametrize("method", ["autobot", "taper", "hybrid"])
def test_a_recurrent_model_torch_pruning_cannot_trace_is_refused_naming_the_layer(method):
    # torch-pruning's group enumeration raised IndexError on this GRU model (a traceback from
    # prunekit.prune before).
    torch.manual_seed(0)
    X, Y = torch.randn(32, 5, 8), torch.randint(0, 4, (32,))
    extra = {"structured_flops": 0.7} if method == "hybrid" else {}
    with pytest.raises(PrunekitError, match=r"channel dependency analysis.*'gru' \(GRU\).*weights instead"):
        prunekit.prune(_LastStepGRU(), (X, Y), method=method, flops=0.5, progress=False, **extra)


def test_a_model_whose_channels_meet_an_einsum_weight_names_that_weight():
    with pytest.raises(PrunekitError, match=r"no prunable channel group.*w: a weight held outside a known layer"):
        find_groups(_EinsumWeight(), torch.zeros(1, 8))


def test_a_vit_with_heads_removed_saves_and_reloads(tmp_path):
    from prunekit import zoo
    from prunekit.loading import load_model
    from prunekit.record import save_pruned
    torch.manual_seed(0)
    model = zoo.build("vit-tiny").eval()
    x = torch.randn(2, 1, 28, 28)
    groups = find_groups(model, x)
    masks = [torch.arange(g.size) % 2 == 0 for g in groups]     # half the heads and MLP units
    small = shrink(model, groups, masks, x)
    path = save_pruned(tmp_path, small, {"model": "vit-tiny"}, {}, shrunk=True)
    again = load_model("vit-tiny", str(path)).model.eval()
    assert isinstance(again.blocks[0].attn, SlimAttention) and again.blocks[0].attn.num_heads == 2
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_gates_turn_the_fused_attention_path_off_and_back_on():
    from prunekit.costs import get_mha_fastpath
    model, x = _model("encoder")
    groups = find_groups(model, x)
    before = get_mha_fastpath()
    with GateHooks(model, groups) as hooks:
        assert not get_mha_fastpath()          # else TransformerEncoderLayer would skip the gated attention
        hooks.values = [torch.zeros(g.size) if g.kind == "heads" else torch.ones(g.size) for g in groups]
        hooks.values = [v.index_fill(0, torch.tensor([0]), 1.0) for v in hooks.values]
        with torch.no_grad():
            gated = model(x)
    assert get_mha_fastpath() == before
    with torch.no_grad():
        assert not torch.allclose(gated, model(x))   # one head left per layer changes the output


@pytest.mark.parametrize("name", ["vit", "cnn"])
def test_a_saved_shrunk_model_reloads_into_a_fresh_instance(name, tmp_path):
    """prunekit.load_pruned: a fresh model of the user's class, resized to the saved channel and
    head counts, gives the pruned model's outputs."""
    model, x = _model(name)
    torch.manual_seed(1)
    data = (torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    result = prunekit.prune(model, data, method="autobot", flops=0.5, example_input=x, out=str(tmp_path / "run"),
                            gate_batches=2, finetune_epochs=0, batch_size=16)
    fresh = prunekit.load_pruned(MAKERS[name](), tmp_path / "run")
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in result.model.parameters())
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), result.model.eval()(x))
    with pytest.raises(PrunekitError, match="no saved model"):
        prunekit.load_pruned(MAKERS[name](), tmp_path / "elsewhere")


def test_layers_the_channel_methods_do_not_shrink_are_named_as_such():
    """A ConvTranspose2d was 'a weight held outside a known layer (used by einsum or matmul, say)',
    and an LSTM was not named at all."""
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.fc = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1), nn.Linear(200, 3)

        def forward(self, x):
            return self.fc(self.up(x).flatten(1))

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    with pytest.raises(PrunekitError, match=r"up: ConvTranspose2d: the channel methods do not shrink this layer type"):
        find_groups(Up(), torch.zeros(1, 4, 5, 5))
    with pytest.raises(PrunekitError, match=r"lstm: LSTM: the channel methods"):
        find_groups(Recurrent(), torch.zeros(1, 6, 8))


def test_the_output_channels_of_a_conv_transpose_are_a_group_left_dense_by_name():
    """The 16 output channels of a ConvTranspose1d feeding a Conv1d were whole but in no group and not in
    skipped_groups (only the group feeding it was named): every group left dense must be listed."""
    import torch.nn.functional as F

    class Net(nn.Module):                         # x (B, 4, 64) -> logits (B, 5)
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(4, 32, 3, padding=1)
            self.t1 = nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1)
            self.c2 = nn.Conv1d(16, 24, 3, padding=1)
            self.head = nn.Linear(24, 5)

        def forward(self, x):
            x = F.relu(self.t1(F.relu(self.c1(x))))
            return self.head(F.relu(self.c2(x)).mean(-1))

    torch.manual_seed(0)
    groups = find_groups(Net(), torch.randn(1, 4, 64))
    assert [g.root for g in groups] == ["c2"]
    skipped = dict(groups.skipped)
    assert set(skipped) == {"c1", "t1", "head"}
    assert "ConvTranspose1d" in skipped["t1"] and "do not shrink" in skipped["t1"]
    with pytest.warns(PrunekitWarning, match=r"2 channel groups left dense.*c1: .*t1: output channels"):
        result = prunekit.prune(Net(), (torch.randn(32, 4, 64), torch.randint(0, 5, (32,))), method="autobot",
                                flops=0.8, gate_batches=2)
    assert result.record["group_roots"] == ["c2"]
    assert sorted(s.split(":")[0] for s in result.record["skipped_groups"]) == ["c1", "head", "t1"]


def test_the_input_of_a_depthwise_conv_with_a_channel_multiplier_is_named_as_left_dense():
    """Conv2d(16, 32, groups=16) after a stem conv: the stem's 16 channels can never lose one (each is
    a whole conv group) but were recorded as a pruned group '1 of 1 kept', with no warning."""
    class DWM(nn.Module):                          # x (B, 3, 8, 8) -> (B, 10)
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.dwm = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, groups=16), nn.BatchNorm2d(32), nn.ReLU())
            self.pw = nn.Sequential(nn.Conv2d(32, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
            self.head = nn.Linear(24, 10)

        def forward(self, x):
            return self.head(self.pw(self.dwm(self.stem(x))).mean((2, 3)))

    torch.manual_seed(0)
    groups = find_groups(DWM(), torch.randn(1, 3, 8, 8))
    assert sorted(g.root for g in groups) == ["dwm.0", "pw.0"]
    why = dict(groups.skipped)["stem.0"]
    assert "dwm.0" in why and "channel multiplier" in why
    with pytest.warns(PrunekitWarning, match=r"1 channel group left dense.*stem\.0: .*channel multiplier"):
        result = prunekit.prune(DWM(), (torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))), method="autobot",
                                flops=0.5, gate_batches=2)
    assert "stem.0" not in result.record["group_roots"]
    assert any(s.startswith("stem.0: ") for s in result.record["skipped_groups"])
    assert result.model.stem[0].out_channels == 16


def test_a_transformers_residual_stream_is_kept_whole_without_a_warning_and_a_surprise_still_warns():
    """A ViT's residual stream runs through LayerNorms (and attention's embedding width): kept at full
    width by design, said in the record as expected, with no warning (every channel run warned). A
    LayerNorm outside a residual stream leaves its group dense unexpectedly: still warned."""
    import warnings
    from prunekit.commands.prune import prune_lines
    model, x = _model("vit")
    torch.manual_seed(0)
    data = [(torch.randn(8, *x.shape[1:]), torch.randint(0, 10, (8,))) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunekitWarning)
        result = prunekit.prune(model, lambda: data, method="autobot", flops=0.7, gate_batches=2, eval_data=data)
    stream = [e for e in result.record["skipped_groups"] if "residual stream" in e]
    assert len(stream) == 1 and "(LayerNorm)" in stream[0] and "kept at full width, as expected" in stream[0], stream
    assert not any(line.startswith("  left dense") for line in prune_lines(result.record))
    surprise = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 256),
                             nn.ReLU(), nn.Linear(256, 10))
    flat = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    with pytest.warns(PrunekitWarning, match=r"1 channel group left dense.*1: touches 2 \(LayerNorm\)"):
        prunekit.prune(surprise, lambda: flat, method="autobot", flops=0.7, gate_batches=2, eval_data=flat)


def test_a_model_load_pruned_returned_saves_its_layout_after_fine_tuning_and_reloads(tmp_path):
    """The everyday flow: prune -> save_model -> load_pruned -> a step of one's own training ->
    save_model -> load_pruned gives the trained model back (load_pruned marks the model it resizes,
    so save_model records its channel layout), wrapped in another module too; a dense model's
    sidecar records no layout (it would narrow a fresh model built wider instead of refusing it)."""
    import json
    model, x = _model("cnn")
    torch.manual_seed(1)
    data = (torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    result = prunekit.prune(model, data, method="autobot", flops=0.5, example_input=x, gate_batches=2,
                            finetune_epochs=0, batch_size=16)
    prunekit.save_model(result.model, tmp_path / "a.safetensors", {})
    loaded = prunekit.load_pruned(BranchyCNN(), tmp_path / "a.safetensors").train()
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)
    nn.functional.cross_entropy(loaded(data[0][:16]), data[1][:16]).backward()
    optimizer.step()
    loaded.eval()
    prunekit.save_model(loaded, tmp_path / "b.safetensors", {})
    again = prunekit.load_pruned(BranchyCNN(), tmp_path / "b.safetensors")
    assert sum(p.numel() for p in again.parameters()) < sum(p.numel() for p in BranchyCNN().parameters())
    with torch.no_grad():
        assert not torch.equal(loaded(x), result.model.eval()(x))      # the step changed it
        torch.testing.assert_close(again(x), loaded(x), rtol=0, atol=0)
    wrapped = nn.Sequential(nn.Identity(), again)                        # the user's wrapper of it
    prunekit.save_model(wrapped, tmp_path / "c.safetensors", {})
    back = prunekit.load_pruned(nn.Sequential(nn.Identity(), BranchyCNN()), tmp_path / "c.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(back(x), loaded(x), rtol=0, atol=0)
    prunekit.save_model(BranchyCNN(), tmp_path / "dense.safetensors", {})
    assert "channel_layout" not in json.loads((tmp_path / "dense.json").read_text())


class AddOntoConcat(nn.Module):
    """x + cat([a(x), b(x)]): a residual add onto a concatenation. (B,1,28,28) -> (B,10)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 4, 1)
        self.b = nn.Conv2d(16, 12, 3, padding=1)
        self.hidden = nn.Linear(16, 32)                   # a group to prune
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.cat([self.a(x), self.b(x)], 1)
        return self.fc(torch.relu(self.hidden(x.mean((2, 3)))))


def test_a_residual_add_onto_a_concatenation_is_pruned_in_parts_one_per_branch():
    """It was left dense ("a concatenation of a and b is added to stem's output"); now x's channels
    are cut at the concatenation's boundary: channels [0, 4) go with branch a, [4, 16) with branch b
    (tests/test_structured_concat_add.py covers the shapes and the methods)."""
    x = torch.randn(2, 1, 28, 28)
    for model, stem, branches in ((AddOntoConcat(), "stem", ("a", "b")),
                                  (_AddOntoConcatSE(nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16))),
                                   "stem.0", ("a.0", "b.0"))):
        groups = find_groups(model.eval(), x)
        assert [why for _, why in groups.skipped] == ["reaches the network output (no consuming layer)"]
        by_root = {g.root: g for g in groups}
        assert [(by_root[b].size, next(m.offset for m in by_root[b].members if m.module == stem)) for b in branches] \
            == [(4, 0), (12, 4)]
        assert len(checked_groups(model, groups, x)) == len(groups)


class _GLUPlusConsumedConcat(nn.Module):
    """A GLU inside a residual add, and elsewhere in the same stream a concatenation a conv consumes
    (nothing is added onto it). (B,1,28,28) -> (B,10)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.up = nn.Conv2d(16, 32, 1)                    # GLU: 32 -> 16
        self.a, self.b = nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)
        self.mix = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + nn.functional.glu(self.up(x), dim=1)
        y = self.mix(torch.cat([x, self.a(x), self.b(x)], 1))
        return self.fc(y.mean((2, 3)))


def test_a_concatenation_a_layer_consumes_is_not_said_to_be_added_to_a_residual_stream():
    """An add and a concatenation in one torch-pruning group: the reason said "a concatenation of a
    branch, a and b is added to up's output", though the add takes the GLU and a conv the concat."""
    groups = find_groups(_GLUPlusConsumedConcat().eval(), torch.randn(2, 1, 28, 28))
    reasons = [why for _, why in groups.skipped if "reaches the network output" not in why]
    assert reasons and not any("is added to" in why or "concatenation" in why for why in reasons), reasons


class _AddOntoConcatSE(nn.Module):
    """The walk's net3 in small: branches with BatchNorm and SiLU, an add onto their concatenation,
    then a squeeze-excitation gating the stream. (B,1,28,28) -> (B,10)."""

    def __init__(self, stem):
        super().__init__()
        self.stem = stem
        self.a = nn.Sequential(nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4), nn.SiLU())
        self.b = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.SiLU())
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.cat([self.a(x), self.b(x)], 1)
        x = x * torch.sigmoid(self.se2(torch.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        return self.fc(x.mean((2, 3)))


class _Recurrent(nn.Module):
    """x (B, 12, 10) -> LSTM(16) -> GRU(16) -> last step -> Linear(32) -> logits (B, 5): the recurrent
    layers hold 98% of the MACs."""

    def __init__(self):
        super().__init__()
        self.lstm, self.gru = nn.LSTM(10, 16, batch_first=True), nn.GRU(16, 16, batch_first=True)
        self.fc1, self.fc = nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, x):
        h, _ = self.lstm(x)
        h, _ = self.gru(h)
        return self.fc(torch.relu(self.fc1(h[:, -1])))


class _Embeddings(nn.Module):
    """Token ids (B, 10) -> [Embedding mean, EmbeddingBag] (B, 32) -> Linear(32) -> logits (B, 5): the
    embeddings hold 57% of the parameters."""

    def __init__(self):
        super().__init__()
        self.emb, self.bag = nn.Embedding(50, 16), nn.EmbeddingBag(50, 16, mode="mean")
        self.fc1, self.fc = nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, t):
        return self.fc(torch.relu(self.fc1(torch.cat([self.emb(t).mean(1), self.bag(t)], 1))))


def test_recurrent_layers_and_embeddings_are_named_as_left_dense_in_the_record_warning_and_refusals():
    """An LSTM/GRU or Embedding/EmbeddingBag stays at full width under the channel methods, but only the
    output layer fc was named: a refusal said "the unprunable layers already cost ... (98.3%)" without
    saying which, and a run that met its budget warned of nothing."""
    from prunekit.commands.prune import prune_lines
    from prunekit.options import OptionError
    torch.manual_seed(0)
    x, y = torch.randn(32, 12, 10), torch.randint(0, 5, (32,))
    skipped = dict(find_groups(_Recurrent(), x[:1]).skipped)
    assert set(skipped) == {"fc", "lstm", "gru"}, skipped
    assert skipped["lstm"].startswith("LSTM: the channel methods do not shrink recurrent layers (hidden width 16)")
    assert skipped["gru"].startswith("GRU: the channel methods do not shrink recurrent layers")
    with pytest.raises(OptionError, match=r"2 layers and 1 channel group left dense among them \(lstm: LSTM: .*; "
                                          r"gru: GRU: .*; fc: reaches"):
        prunekit.prune(_Recurrent(), (x, y), method="autobot", flops=0.5, gate_batches=2)
    with pytest.warns(PrunekitWarning, match=r"^2 layers left dense \(the budget.*lstm: LSTM.*gru: GRU"):
        result = prunekit.prune(_Recurrent(), (x, y), method="autobot", flops=0.99, gate_batches=2,
                                eval_data=(x, y))
    dense = [line for line in prune_lines(result.record) if line.startswith("  left dense")]
    assert len(dense) == 1 and "lstm" in dense[0] and "gru" in dense[0], dense

    t = torch.randint(0, 50, (32, 10))
    skipped = dict(find_groups(_Embeddings(), t[:1]).skipped)
    assert set(skipped) == {"fc", "emb", "bag"}, skipped
    assert skipped["bag"].startswith("EmbeddingBag: the channel methods do not shrink embeddings (width 16)")
    with pytest.raises(OptionError, match=r"params budget .* 2 layers and 1 channel group left dense among them "
                                          r"\(emb: Embedding: .*; bag: "):
        prunekit.prune(_Embeddings(), (t, y), method="autobot", flops=0.99, params=0.5, gate_batches=2)


def test_layers_and_channel_groups_left_dense_are_counted_apart():
    """Recurrent layers and embeddings are layers, not channel groups: "2 layers and 1 channel group left
    dense", in the warning (which run.log keeps) and in the refusals below the floor."""
    from prunekit.structured.left_dense import dense_groups_text, dense_groups_warning
    layers = [(n, why) for n, why in find_groups(_Recurrent(), torch.randn(1, 12, 10)).skipped if n != "fc"]
    model, x = _Norms(True).eval(), torch.randn(1, 3, 8, 8)
    norm = [(n, why) for n, why in checked_groups(model, find_groups(model, x), x).skipped if n == "c1"]
    assert len(layers) == 2 and len(norm) == 1
    assert dense_groups_warning(layers + norm).startswith("2 layers and 1 channel group left dense (the budget")
    assert dense_groups_warning(layers[:1]).startswith("1 layer left dense (")
    assert dense_groups_warning(norm).startswith("1 channel group left dense (")
    assert dense_groups_text(norm + layers[:1]).startswith(", 1 layer and 1 channel group left dense among them (c1:")


class _Norms(nn.Module):
    """x (B, 3, 8, 8): c1 -> GroupNorm -> c2 -> mean -> fc1 -> LayerNorm -> fc; with or without the norms'
    affine parameters."""

    def __init__(self, affine: bool):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16, affine=affine)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1, self.ln = nn.Linear(32, 32), nn.LayerNorm(32, elementwise_affine=affine)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.gn(self.c1(x)))))
        return self.fc(torch.relu(self.ln(self.fc1(x.mean((2, 3))))))


@pytest.mark.parametrize("affine", [True, False])
def test_a_norm_without_affine_parameters_is_named_as_what_leaves_its_channels_dense(affine):
    """Without affine parameters the GroupNorm/LayerNorm went unseen by the analysis and the numerical
    check named "an operation ... e.g. a channel shuffle"; now the norm is named either way."""
    torch.manual_seed(0)
    model, x = _Norms(affine).eval(), torch.randn(1, 3, 8, 8)
    groups = checked_groups(model, find_groups(model, x), x)
    skipped = dict(groups.skipped)
    assert [g.root for g in groups] == ["c2"]
    for root, norm in (("c1", "gn (GroupNorm)"), ("fc1", "ln (LayerNorm)")):
        assert skipped[root].startswith(f"touches {norm}, a norm whose statistics mix its channels"), skipped[root]
        assert "channel shuffle" not in skipped[root]


class _SpatialNorm(nn.Module):
    """x (B, 3, 8, 8): c1 (8 channels) -> norm -> c2 [-> fc]; the norm's input (B, 8, 8, 8) has as many
    channels as rows and columns, so only its normalised axes tell whether it mixes channels."""

    def __init__(self, norm: nn.Module, head: bool = True):
        super().__init__()
        self.c1, self.n, self.c2 = nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 10) if head else None

    def forward(self, x):
        x = self.c2(torch.relu(self.n(self.c1(x))))
        return self.fc(x.flatten(1)) if self.fc is not None else x


NOT_MIXING = {"layernorm_hw": lambda: nn.LayerNorm([8, 8], elementwise_affine=False),
              "layernorm_w": lambda: nn.LayerNorm(8, elementwise_affine=False),
              "rmsnorm_hw": lambda: nn.RMSNorm([8, 8], elementwise_affine=False)}
MIXING = {"layernorm_chw": (lambda: nn.LayerNorm([8, 8, 8], elementwise_affine=False), "LayerNorm"),
          "groupnorm": (lambda: nn.GroupNorm(2, 8, affine=False), "GroupNorm")}


@pytest.mark.parametrize("norm", sorted(NOT_MIXING))
def test_a_norm_over_other_axes_than_the_channels_does_not_leave_them_dense(norm):
    """A norm without affine parameters whose statistics never mix channels (LayerNorm/RMSNorm over H, W
    or W only, GroupNorm with a group per channel) is not named: the numeric check judges, and c1's
    channels are pruned, shrink computing what the gates compute; without the Linear head the model
    (c1 its only group) is not refused."""
    torch.manual_seed(0)
    model, x = _SpatialNorm(NOT_MIXING[norm]()).eval(), torch.randn(2, 3, 8, 8)
    groups = checked_groups(model, find_groups(model, x), x)
    assert sorted(g.root for g in groups) == ["c1", "c2"], groups.skipped
    masks = [torch.arange(g.size) % 3 != 1 for g in groups]
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = [m.float() for m in masks]
        gated = model(x)
    with torch.no_grad():
        small = shrink(model, groups, masks, x)
        assert small.c1.out_channels == 5
        assert (small(x) - gated).abs().max() <= 1e-5 * gated.abs().max()
    headless = _SpatialNorm(NOT_MIXING[norm](), head=False).eval()
    assert [g.root for g in checked_groups(headless, find_groups(headless, x), x)] == ["c1"]


@pytest.mark.parametrize("norm", sorted(MIXING))
def test_a_norm_over_the_channel_axis_is_named_even_when_other_axes_have_as_many_entries(norm):
    make, kind = MIXING[norm]
    model, x = _SpatialNorm(make()).eval(), torch.randn(2, 3, 8, 8)
    groups = checked_groups(model, find_groups(model, x), x)
    assert [g.root for g in groups] == ["c2"]
    assert dict(groups.skipped)["c1"].startswith(f"touches n ({kind}), a norm whose statistics mix its channels")


def test_a_norm_that_mixes_no_channels_but_cannot_be_resized_is_named_without_a_false_reason():
    """GroupNorm(8, 8): a group per channel mixes none, but its channel count stays (the surgery resizes
    BatchNorm only); an RMSNorm over C, H, W runs as plain tensor operations (the trace sees no module):
    its mean over the channel axis names it. Neither is said to mix channels it does not, and c1 stays whole."""
    x = torch.randn(2, 3, 8, 8)
    model = _SpatialNorm(nn.GroupNorm(8, 8, affine=False)).eval()
    groups = checked_groups(model, find_groups(model, x), x)
    assert [g.root for g in groups] == ["c2"]
    assert dict(groups.skipped)["c1"] == "touches n (GroupNorm), whose channels channel surgery cannot resize: kept dense"
    model = _SpatialNorm(nn.RMSNorm([8, 8, 8], elementwise_affine=False)).eval()
    groups = checked_groups(model, find_groups(model, x), x)
    assert [g.root for g in groups] == ["c2"]
    assert dict(groups.skipped)["c1"].startswith("touches n (RMSNorm), whose forward takes a mean over the channel "
                                                 "axis, which mixes its channels"), groups.skipped


class _AttentionNoNorm(nn.Module):
    """x (B, 8, 16): x + MHA(x), then x + mlp(x), mean over tokens -> fc: a residual stream without
    any LayerNorm."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp1, self.mlp2, self.fc = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, x):
        x = x + self.mha(x, x, x, need_weights=False)[0]
        x = x + self.mlp2(torch.relu(self.mlp1(x)))
        return self.fc(x.mean(1))


def test_a_residual_stream_around_attention_without_a_norm_is_expected_and_not_warned_of():
    """README: the residual stream touching the attention's embedding width is named in skipped_groups
    without a warning; without a LayerNorm it was warned of as a surprise ("touches mha ... whose
    channels channel surgery cannot resize"). Heads are pruned, the embedding width stays by design."""
    import warnings
    torch.manual_seed(0)
    x, y = torch.randn(32, 8, 16), torch.randint(0, 5, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrunekitWarning)
        result = prunekit.prune(_AttentionNoNorm(), (x, y), method="autobot", flops=0.6, gate_batches=2)
    stream = [e for e in result.record["skipped_groups"] if e.startswith("mlp2: ")]
    assert len(stream) == 1 and "residual stream" in stream[0] and "mha (MultiheadAttention)" in stream[0], stream
    assert "kept at full width, as expected" in stream[0]
    assert sorted(result.record["group_roots"]) == ["mha", "mlp1"]


class _EinsumHeads(nn.Module):
    """x (B, 8, 16): hand-written attention, q/k/v viewed as (B, T, 2 heads, 8), einsum, merged back."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (f(x).view(B, T, 2, 8) for f in (self.q, self.k, self.v))
        a = torch.einsum("bthd,bshd->bhts", q, k).softmax(-1)
        return self.fc(self.o(torch.einsum("bhts,bshd->bthd", a, v).reshape(B, T, D)).mean(1))


def test_a_width_split_into_heads_by_a_reshape_is_named_as_the_reason():
    """The q/k/v group of hand-written attention was left dense for "an operation ... moves or mixes
    channels, e.g. a channel shuffle": the reason is the reshape into 2 heads of 8."""
    torch.manual_seed(0)
    model, x = _EinsumHeads().eval(), torch.randn(1, 8, 16)
    groups = checked_groups(model, find_groups(model, x), x)
    why = dict(groups.skipped)["v"]
    assert "split into 2 heads of 8 by a reshape" in why and "view(B, T, 2, 8)" in why, why
    assert "channel shuffle" not in why


def test_a_conv3d_refusal_names_each_layer_once():
    """c2 was named twice (two wordings of one reason), c1's entry hidden behind "and 1 more"."""
    class Video(nn.Module):                  # x (B, 3, 4, 8, 8) -> (B, 5)
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8)
            self.c2, self.b2 = nn.Conv3d(8, 16, 3, stride=2, padding=1), nn.BatchNorm3d(16)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
            return self.fc(x.mean((2, 3, 4)))

    with pytest.raises(PrunekitError) as err:
        find_groups(Video(), torch.zeros(1, 3, 4, 8, 8))
    text = str(err.value)
    assert text.count("c2: ") == 1 and text.count("c1: ") == 1 and "more" not in text, text
    assert "c1: Conv3d: the channel methods do not shrink" in text


class _HandRMSNorm(nn.Module):
    """RMSNorm written by hand (as many models carry their own): x * rsqrt(mean(x², last axis)) [* weight]."""

    def __init__(self, width: int, weight: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width)) if weight else None

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * self.weight if self.weight is not None else x


class _Tokens(nn.Module):
    """x (B, T, 6): a (16 channels) -> norm -> b (12) -> c, mean over the T tokens."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.a, self.norm, self.b, self.c = nn.Linear(6, 16), norm, nn.Linear(16, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.norm(self.a(x)))))).mean(1)


RMS_NORMS = {"torch": (lambda: nn.RMSNorm(16), "RMSNorm"),
             "torch_plain": (lambda: nn.RMSNorm(16, elementwise_affine=False), "RMSNorm"),
             "hand": (lambda: _HandRMSNorm(16), "_HandRMSNorm"),
             "hand_plain": (lambda: _HandRMSNorm(16, weight=False), "_HandRMSNorm")}


@pytest.mark.parametrize("norm", sorted(RMS_NORMS))
def test_an_rmsnorm_over_the_channels_is_named_as_what_leaves_them_dense(norm):
    """torch.nn.RMSNorm runs as pow, mean, rsqrt on the CPU (the trace sees no module) and a hand-written
    one the same: with a weight the group was left dense as "touches parameter norm.weight", without one
    the numeric check named "an operation ... e.g. a channel shuffle". Now the norm is named by its
    module and its mean over the channels, in the warning's words."""
    from prunekit.structured.left_dense import dense_groups_warning
    make, kind = RMS_NORMS[norm]
    torch.manual_seed(0)
    model, x = _Tokens(make()).eval(), torch.randn(2, 7, 6)
    groups = checked_groups(model, find_groups(model, x), x)
    assert [g.root for g in groups] == ["b"], groups.skipped
    why = dict(groups.skipped)["a"]
    assert why.startswith(f"touches norm ({kind}), whose forward takes a mean over the channel axis, which mixes "
                          "its channels"), why
    assert "channel shuffle" not in why and "parameter" not in why
    assert f"a: touches norm ({kind})" in dense_groups_warning(groups.skipped)


AMBIGUOUS = {"layernorm": (lambda: nn.LayerNorm(16, elementwise_affine=False), "LayerNorm"),
             "rmsnorm": (lambda: nn.RMSNorm(16, elementwise_affine=False), "RMSNorm"),
             "hand": (lambda: _HandRMSNorm(16, weight=False), "_HandRMSNorm")}


@pytest.mark.parametrize("norm", sorted(AMBIGUOUS))
def test_a_norm_over_an_axis_as_long_as_the_channels_is_named_when_the_check_finds_it_mixes_them(norm):
    """16 tokens of 16 channels: the norm's last axis (the channels) has as many entries as the token
    axis, so the trace cannot tell which it normalises and the numeric check decides. It finds that
    removing channels changes the statistics, and its reason names the norm (it named a channel shuffle)."""
    make, kind = AMBIGUOUS[norm]
    torch.manual_seed(0)
    model, x = _Tokens(make()).eval(), torch.randn(2, 16, 6)
    found = find_groups(model, x)
    assert {g.root: g.norm for g in found}["a"] == f"norm ({kind})"
    groups = checked_groups(model, found, x)
    assert [g.root for g in groups] == ["b"], groups.skipped
    why = dict(groups.skipped)["a"]
    assert why.startswith(f"removing its channels does not compute what closing them computes: it passes norm "
                          f"({kind}), a norm over an axis as long as its channels"), why
    assert "channel shuffle" not in why


class _Sequence(nn.Module):
    """x (B, 3, 8): a Conv1d (8 channels) -> norm over the last axis (8 steps: as many as the channels)
    -> b -> fc."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.a, self.norm, self.b = nn.Conv1d(3, 8, 3, padding=1), norm, nn.Conv1d(8, 4, 3, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.norm(self.a(x))))).flatten(1))


@pytest.mark.parametrize("norm", sorted(AMBIGUOUS))
def test_a_norm_over_an_axis_as_long_as_the_channels_but_not_them_is_pruned_as_gated(norm):
    """(B, C, T) with C == T == 8, the norm over T: it mixes no channels, so the numeric check passes and
    a's channels are pruned; the shrunk model computes what the gated one does."""
    make = {"layernorm": lambda: nn.LayerNorm(8, elementwise_affine=False),
            "rmsnorm": lambda: nn.RMSNorm(8, elementwise_affine=False),
            "hand": lambda: _HandRMSNorm(8, weight=False)}[norm]
    torch.manual_seed(0)
    model, x = _Sequence(make()).eval(), torch.randn(2, 3, 8)
    groups = checked_groups(model, find_groups(model, x), x)
    assert sorted(g.root for g in groups) == ["a", "b"], groups.skipped
    masks = [torch.arange(g.size) % 3 != 1 for g in groups]
    with torch.no_grad(), GateHooks(model, groups) as hooks:
        hooks.values = [m.float() for m in masks]
        gated = model(x)
    with torch.no_grad():
        small = shrink(model, groups, masks, x)
        assert small.a.out_channels == 5
        assert (small(x) - gated).abs().max() <= 1e-5 * gated.abs().max()


class _SEShuffle(nn.Module):
    """x (B, 3, S, S): a (8 channels) -> squeeze-and-excitation (a spatial mean, fc1, fc2) -> a channel
    shuffle -> b -> head: with S == 8 the SE mean's axes (H, W) are as long as the channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.a(x))
        s = x.mean((2, 3), keepdim=True).flatten(1)
        x = x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))[:, :, None, None]
        B, C, H, W = x.shape
        x = x.view(B, 2, C // 2, H, W).transpose(1, 2).reshape(B, C, H, W)
        return self.head(torch.relu(self.b(x)).mean((2, 3)))


@pytest.mark.parametrize("side", [8, 9])
def test_a_squeeze_and_excitation_mean_is_not_taken_for_a_norm_when_its_spatial_size_equals_the_channels(side):
    """An SE block's spatial mean with C == H == W was recorded as a norm over an axis as long as the
    channels, and the channel shuffle's refusal blamed it ("a norm ... its statistics mix the channels").
    Its mean feeds Linear layers, not its own input: the same reason as with H == W == 9."""
    torch.manual_seed(0)
    model, x = _SEShuffle().eval(), torch.randn(2, 3, side, side)
    found = find_groups(model, x)
    assert all(g.norm is None for g in found), [(g.root, g.norm) for g in found]
    skipped = dict(checked_groups(model, found, x).skipped)
    assert skipped["fc2"].startswith("removing its channels does not compute what closing them computes (an "
                                     "operation between its layers moves or mixes channels"), skipped


class _InlineRMS(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.proj, self.head = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = self.up(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)     # an RMSNorm in the model's own forward
        return self.head(torch.relu(self.proj(h)))


def test_a_statistic_in_the_models_own_forward_is_not_pinned_on_the_layer_it_feeds():
    """"touches proj (Linear), whose forward takes a mean": proj's forward takes none, the model's does."""
    groups = find_groups(_InlineRMS().eval(), torch.randn(4, 12))
    why = dict(groups.skipped)["up"]
    assert why.startswith("touches a mean taken in the model's forward over the channel axis"), why
    assert "proj" not in why


def test_find_groups_works_on_a_model_with_a_torchscript_submodule():
    """A torch.jit.script submodule takes no forward hooks: find_groups raised (from register_forward_hook),
    refused as a torch-pruning failure; it finds the groups around it again."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.s, self.b = nn.Linear(8, 16), torch.jit.script(nn.ReLU()), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(self.s(self.a(x)))
    assert [g.root for g in find_groups(Net().eval(), torch.randn(2, 8))] == ["a"]
