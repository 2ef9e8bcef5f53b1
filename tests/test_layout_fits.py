"""A channel-pruned model's saved layout records each layer's counts in the model it was pruned
from ("dense"), and loading refuses a model built otherwise: a wider one (100 classes where the file
has 10, a wider stem) was narrowed to the saved counts quietly, a wrong model that then ran."""

import json
import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import main
from prunekit.errors import PrunekitError, PrunekitWarning
from prunekit.structured.groups import find_groups
from prunekit.structured.shrink import shrink
from prunekit.zoo.layout import channel_layout

NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, classes=10, stem=8, inputs=3, extra=False, second=True, c2=None):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(inputs, stem, 3, padding=1), nn.BatchNorm2d(stem)
        if second:
            self.c2, self.bn2 = nn.Conv2d(stem, 12, **{"kernel_size": 3, "padding": 1, **(c2 or {})}), nn.BatchNorm2d(12)
        if extra:
            self.extra = nn.Linear(4, 4)
        self.fc = nn.Linear(12 if second else stem, classes)
        self.second = second

    def forward(self, x):
        h = torch.relu(self.bn1(self.c1(x)))
        if self.second:
            h = torch.relu(self.bn2(self.c2(h)))
        return self.fc(h.mean((2, 3)))


def build():
    return Net(**KWARGS)
'''


def _write(folder, **kwargs):
    (folder / "net.py").write_text(NET.replace("KWARGS", repr(kwargs)))


def _net(tmp_path, **kwargs):
    from prunekit import user_models
    folder = tmp_path / ("net" + "_".join(f"{k}{v}" for k, v in kwargs.items()))
    folder.mkdir(exist_ok=True)
    _write(folder, **kwargs)
    return user_models.build_model(f"{folder}/net.py:build")


def _small(model):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    groups = find_groups(model, x)
    masks = [torch.arange(g.size) % 3 != 1 for g in groups]      # a third of each group's channels go
    return shrink(model, groups, masks, x).eval(), x


@pytest.mark.parametrize("built,layer,said", [
    ({"classes": 100}, "fc", "in 12, out 100 in the model passed but had in 12, out 10"),     # wider: was narrowed
    ({"classes": 3}, "fc", "in 12, out 3 in the model passed but had in 12, out 10"),
    ({"stem": 16}, "c1", "in 3, out 16 in the model passed but had in 3, out 8"),             # a wider stem
    ({"stem": 4}, "c1", "in 3, out 4 in the model passed but had in 3, out 8"),
    ({"inputs": 1}, "c1", "in 1, out 8 in the model passed but had in 3, out 8"),
], ids=["more classes", "fewer classes", "wider stem", "narrower stem", "other inputs"])
def test_load_pruned_refuses_a_model_built_otherwise_naming_the_layer_and_both_counts(tmp_path, built, layer, said):
    small, _ = _small(_net(tmp_path))
    prunekit.save_model(small, tmp_path / "small.safetensors", {})
    with pytest.raises(PrunekitError) as err:
        prunekit.load_pruned(_net(tmp_path, **built), tmp_path / "small.safetensors")
    message = str(err.value)
    assert f"layer {layer!r} is built with {said} in the model the file was pruned from" in message, message
    assert "\n" not in message and "constructor arguments" in message


def test_load_pruned_refuses_a_model_with_a_layer_more_or_less(tmp_path):
    small, _ = _small(_net(tmp_path))
    prunekit.save_model(small, tmp_path / "small.safetensors", {})
    with pytest.raises(PrunekitError, match=r"the model passed has layer 'extra' \(in 4, out 4\), which the saved "
                                            "model lacks"):
        prunekit.load_pruned(_net(tmp_path, extra=True), tmp_path / "small.safetensors")
    with pytest.raises(PrunekitError, match="names layer 'c2', which the model lacks"):
        prunekit.load_pruned(_net(tmp_path, second=False), tmp_path / "small.safetensors")


def test_the_model_it_was_pruned_from_loads_and_gives_the_same_outputs(tmp_path):
    small, x = _small(_net(tmp_path))
    assert small.fc.in_features < 12 and small.c1.out_channels < 8
    prunekit.save_model(small, tmp_path / "small.safetensors", {})
    back = prunekit.load_pruned(_net(tmp_path), tmp_path / "small.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    # pruned again (its layers' counts before any cut are the first model's) and saved: loads too
    smaller, _ = _small(back)
    prunekit.save_model(smaller, tmp_path / "smaller.safetensors", {})
    again = prunekit.load_pruned(_net(tmp_path), tmp_path / "smaller.safetensors")
    assert again.c1.out_channels == smaller.c1.out_channels < small.c1.out_channels
    with torch.no_grad():
        assert torch.equal(again(x), smaller(x))


def test_an_older_layout_without_dense_counts_still_loads(tmp_path):
    small, x = _small(_net(tmp_path))
    layout = {name: {k: v for k, v in spec.items() if k != "dense"} for name, spec in channel_layout(small).items()}
    prunekit.save_model(small, tmp_path / "old.safetensors", {"channel_layout": layout})
    with pytest.warns(PrunekitWarning, match="older prunekit"):        # its build cannot be checked
        back = prunekit.load_pruned(_net(tmp_path), tmp_path / "old.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    assert json.loads(json.dumps(channel_layout(back))) == layout          # resaved: the same layout, no guess


@pytest.mark.parametrize("command", ["bench-latency", "export"])
def test_the_command_line_refuses_a_model_file_built_wider_with_exit_2(tmp_path, capsys, command):
    folder = tmp_path / "code"
    folder.mkdir()
    _write(folder)
    model = f"{folder}/net.py:build"
    small, _ = _small(_net(tmp_path))
    (tmp_path / "run").mkdir()
    prunekit.save_model(small, tmp_path / "run" / "model.safetensors", {"model": model, "input_shape": [3, 8, 8],
                                                               "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    _write(folder, classes=100)                      # the user's function now builds 100 classes
    argv = {"bench-latency": ["bench-latency", "--model", model, "--pruned", str(tmp_path / "run"),
                              "--repeats", "5", "--warmup", "0", "--batch-sizes", "1", "--threads", "1"],
            "export": ["export", str(tmp_path / "run"), "--model", model, "--torchscript"]}[command]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "layer 'fc' is built with in 12, out 100 in the model passed but had in 12, out 10" in lines[0], err
    assert not (tmp_path / "run" / "export").exists()


def _narrowed_by_hand(model, keep=9):
    """``model`` with c2's out-channels cut to the first ``keep`` by the user's own code (bn2, fc follow)."""
    with torch.no_grad():
        c2 = nn.Conv2d(model.c2.in_channels, keep, 3, padding=1)
        c2.weight.copy_(model.c2.weight[:keep]), c2.bias.copy_(model.c2.bias[:keep])
        bn2 = nn.BatchNorm2d(keep)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn2, attr).copy_(getattr(model.bn2, attr)[:keep])
        fc = nn.Linear(keep, model.fc.out_features)
        fc.weight.copy_(model.fc.weight[:, :keep]), fc.bias.copy_(model.fc.bias)
    model.c2, model.bn2, model.fc = c2, bn2, fc
    return model.eval()


def test_a_model_narrowed_by_the_users_own_code_saves_with_pruned_from_and_loads(tmp_path):
    """Such a model was saved without its layer sizes and refused at load with a hint only about
    prunekit's own channel methods; pruned_from= records them (and the counts the model is built with)."""
    torch.manual_seed(0)
    mine = _narrowed_by_hand(_net(tmp_path))
    x = torch.randn(2, 3, 8, 8)
    prunekit.save_model(mine, tmp_path / "bare.safetensors", {})
    with pytest.raises(PrunekitError, match=r"one your own code narrowed: save it with prunekit\.save_model\(model, "
                                            r"path, meta, pruned_from=MODEL_AS_BUILT\)") as err:
        prunekit.load_pruned(_net(tmp_path), tmp_path / "bare.safetensors")
    assert "\n" not in str(err.value)
    prunekit.save_model(mine, tmp_path / "mine.safetensors", {}, pruned_from=_net(tmp_path))
    layout = prunekit.saving.read_meta(tmp_path / "mine.safetensors")["channel_layout"]
    assert layout["c2"] == {"in": 8, "out": 9, "groups": 1, "dense": {"in": 8, "out": 12, "groups": 1},
                            "geometry": {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
                                         "dilation": [1, 1], "padding_mode": "zeros"}}
    assert layout["fc"] == {"in": 9, "out": 10, "dense": {"in": 12, "out": 10}}
    back = prunekit.load_pruned(_net(tmp_path), tmp_path / "mine.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), mine(x))
    with pytest.raises(PrunekitError, match="layer 'fc' is built with in 12, out 100 in the model passed but had "
                                            "in 12, out 10"):
        prunekit.load_pruned(_net(tmp_path, classes=100), tmp_path / "mine.safetensors")


def test_save_refuses_a_pruned_from_that_is_not_what_the_model_was_narrowed_from(tmp_path):
    mine = _narrowed_by_hand(_net(tmp_path))
    for other, said in ((_narrowed_by_hand(_net(tmp_path), keep=5), "layer 'c2' has in 8, out 9 in the model but "
                                                                      "in 8, out 5 in pruned_from, narrower"),
                        (_net(tmp_path, second=False), "the model has layer 'c2' (in 8, out 9), which pruned_from lacks"),
                        (_net(tmp_path, extra=True), "pruned_from has layer 'extra', which the model lacks")):
        with pytest.raises(PrunekitError, match=said.replace("(", r"\(").replace(")", r"\)")):
            prunekit.save_model(mine, tmp_path / "x.safetensors", {}, pruned_from=other)
        assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.json").exists()
    # a model as built (nothing narrowed): no layout, as without pruned_from
    prunekit.save_model(_net(tmp_path), tmp_path / "dense.safetensors", {}, pruned_from=_net(tmp_path))
    assert "channel_layout" not in prunekit.saving.read_meta(tmp_path / "dense.safetensors")


def test_a_zoo_model_narrowed_by_hand_and_saved_naming_it_loads_on_the_command_line(tmp_path, capsys):
    """The sidecar names the zoo model (what --model builds): save_model compares with it as built
    and records the layout, so the command line loads the file; built for 100 classes it refuses."""
    from prunekit import zoo
    from prunekit.loading import load_model
    torch.manual_seed(0)
    model = zoo.build("mlpnet").eval()
    with torch.no_grad():
        fc1, fc2 = nn.Linear(784, 30, bias=False), nn.Linear(30, 20, bias=False)
        fc1.weight.copy_(model.fc1.weight[:30]), fc2.weight.copy_(model.fc2.weight[:, :30])
    model.fc1, model.fc2 = fc1, fc2
    (tmp_path / "run").mkdir()
    prunekit.save_model(model, tmp_path / "run" / "model.safetensors", {"model": "mlpnet", "build_kwargs": {}})
    assert prunekit.saving.read_meta(tmp_path / "run" / "model.safetensors")["channel_layout"]["fc1"] == {
        "in": 784, "out": 30, "dense": {"in": 784, "out": 40}}
    loaded = load_model("mlpnet", tmp_path / "run" / "model.safetensors").model
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert main(["bench-latency", "--model", "mlpnet", "--pruned", str(tmp_path / "run"), "--repeats", "5",
                 "--warmup", "0", "--batch-sizes", "1", "--threads", "1", "--json"]) == 0
    capsys.readouterr()
    with pytest.raises(PrunekitError, match="layer 'fc3' is built with in 20, out 100 in the model passed"):
        prunekit.load_pruned(zoo.build("mlpnet", num_classes=100), tmp_path / "run")


def _older(tmp_path, meta=None):
    """A file as an older prunekit saved it: its layout without "dense" counts."""
    small, x = _small(_net(tmp_path))
    layout = {name: {k: v for k, v in spec.items() if k != "dense"} for name, spec in channel_layout(small).items()}
    prunekit.save_model(small, tmp_path / "old.safetensors", {**(meta or {}), "channel_layout": layout})
    return small, x


def _ours(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PrunekitWarning)]


def test_an_older_layout_loaded_into_a_model_built_otherwise_says_it_cannot_be_checked(tmp_path):
    """Walk s53 (old artefacts): an older prunekit's file (no "dense" counts) loaded into a model built
    for 100 classes (the file's had 10) was narrowed to 10 quietly, though load_pruned's docstring
    promised a refusal. It still loads (older files keep loading), with one PrunekitWarning saying the
    file is an older prunekit's, so the build cannot be checked, and how to re-save it with the counts
    (save_model's pruned_from=, which then refuses the 100-class model); a file with them, none."""
    import warnings
    _older(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wide = prunekit.load_pruned(_net(tmp_path, classes=100), tmp_path / "old.safetensors")
    said = _ours(caught)
    assert len(said) == 1 and "\n" not in said[0], said
    assert f"{tmp_path / 'old.safetensors'} was saved by an older prunekit" in said[0]
    assert "layer 'c1' and 4 more" in said[0] and "(class count, widths) cannot be checked" in said[0]
    assert "pass a model built as that one was" in said[0] and "pruned_from=" in said[0], said
    assert wide.fc.out_features == 10                   # narrowed, as said (not refused: it may be a pruned layer)
    with warnings.catch_warnings(record=True) as caught:     # re-saved plainly: still unchecked, still said
        warnings.simplefilter("always")
        back = prunekit.load_pruned(_net(tmp_path), tmp_path / "old.safetensors")
        prunekit.save_model(back, tmp_path / "plain.safetensors", {})
        prunekit.load_pruned(_net(tmp_path), tmp_path / "plain.safetensors")
    assert len(_ours(caught)) == 2 and "older prunekit" in _ours(caught)[1]
    prunekit.save_model(back, tmp_path / "again.safetensors", {}, pruned_from=_net(tmp_path))   # the advice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prunekit.load_pruned(_net(tmp_path), tmp_path / "again.safetensors")
        with pytest.raises(PrunekitError, match="layer 'fc' is built with in 12, out 100 in the model passed"):
            prunekit.load_pruned(_net(tmp_path, classes=100), tmp_path / "again.safetensors")
        small, _ = _small(_net(tmp_path))
        prunekit.save_model(small, tmp_path / "new.safetensors", {})
        prunekit.load_pruned(_net(tmp_path), tmp_path / "new.safetensors")          # a file with them: nothing said


def test_the_command_line_says_so_of_an_older_layout_in_one_warning_line(tmp_path, capsys):
    """The same on the command line (a model file's run, loaded by bench-latency): one
    `prunekit: warning:` line, naming what to build, not a Python call; the run goes on."""
    folder = tmp_path / "code"
    folder.mkdir()
    _write(folder)
    model = f"{folder}/net.py:build"
    (tmp_path / "run").mkdir()
    small, _ = _small(_net(tmp_path))
    layout = {name: {k: v for k, v in spec.items() if k != "dense"} for name, spec in channel_layout(small).items()}
    prunekit.save_model(small, tmp_path / "run" / "model.safetensors", {
        "model": model, "input_shape": [3, 8, 8], "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "channel_layout": layout})
    assert main(["bench-latency", "--model", model, "--pruned", str(tmp_path / "run"), "--repeats", "5", "--warmup",
                 "0", "--batch-sizes", "1", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "older prunekit" in line]
    assert len(lines) == 1 and lines[0].startswith("prunekit: warning: "), err
    assert "build the model as that one was" in lines[0] and "save_model" not in lines[0], lines


def test_a_pruned_model_with_a_layer_replaced_by_the_users_code_records_no_dense_counts_for_it(tmp_path):
    """Transfer learning: a loaded pruned model gets a new 100-class head (the user's own nn.Linear,
    as wide as the narrowed features). Its size before any cut is not known, so no "dense" counts are
    recorded for it (its narrowed input count was, and the fresh 100-class model was refused)."""
    small, x = _small(_net(tmp_path))
    prunekit.save_model(small, tmp_path / "small.safetensors", {})
    mine = prunekit.load_pruned(_net(tmp_path), tmp_path / "small.safetensors")
    torch.manual_seed(1)
    mine.fc = nn.Linear(mine.fc.in_features, 100)
    mine.eval()
    prunekit.save_model(mine, tmp_path / "head.safetensors", {})
    layout = prunekit.saving.read_meta(tmp_path / "head.safetensors")["channel_layout"]
    assert layout["fc"] == {"in": mine.fc.in_features, "out": 100}, layout["fc"]
    assert layout["c1"]["dense"] == {"in": 3, "out": 8, "groups": 1}          # the cut layers keep theirs
    with warnings.catch_warnings():     # not an older file: no "cannot be checked" warning
        warnings.simplefilter("error", PrunekitWarning)
        back = prunekit.load_pruned(_net(tmp_path, classes=100), tmp_path / "head.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), mine(x))
    # saved again (not known after loading either): the same layout
    assert json.loads(json.dumps(channel_layout(back))) == layout
    with pytest.raises(PrunekitError, match="layer 'c1' is built with in 3, out 16"):   # still checked elsewhere
        prunekit.load_pruned(_net(tmp_path, classes=100, stem=16), tmp_path / "head.safetensors")


def test_pruned_from_a_loaded_pruned_model_records_the_counts_before_its_first_cut(tmp_path):
    """pruned_from= the model as it was before the user's own narrowing, itself a load_pruned model:
    its layers' counts before prunekit's cut are recorded as "dense" (not its narrowed ones)."""
    small, x = _small(_net(tmp_path))
    prunekit.save_model(small, tmp_path / "small.safetensors", {})
    before = prunekit.load_pruned(_net(tmp_path), tmp_path / "small.safetensors")
    import copy
    mine = _narrowed_by_hand(copy.deepcopy(before), keep=before.c2.out_channels - 2)
    prunekit.save_model(mine, tmp_path / "mine.safetensors", {}, pruned_from=before)
    layout = prunekit.saving.read_meta(tmp_path / "mine.safetensors")["channel_layout"]
    assert layout["c1"]["dense"] == {"in": 3, "out": 8, "groups": 1}, layout["c1"]
    assert layout["c2"]["dense"] == {"in": 8, "out": 12, "groups": 1}, layout["c2"]
    back = prunekit.load_pruned(_net(tmp_path), tmp_path / "mine.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), mine(x))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.attn = nn.Linear(6, 16), nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.emb(x)
        return self.fc((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))


def test_attention_with_heads_removed_records_its_output_projection_as_built():
    """attn.out_proj of an nn.MultiheadAttention with heads removed was recorded with its narrowed
    input count as "dense" (in 4 where the model as built has 16)."""
    from prunekit.layers import SlimAttention
    torch.manual_seed(0)
    model, x = _Attention().eval(), torch.randn(2, 7, 6)
    groups = find_groups(model, x)
    masks = [torch.arange(g.size) == 0 if g.kind == "heads" else torch.ones(g.size, dtype=torch.bool) for g in groups]
    small = shrink(model, groups, masks, x).eval()
    assert isinstance(small.attn, SlimAttention) and small.attn.out_proj.in_features == 4
    assert channel_layout(small)["attn.out_proj"] == {"in": 4, "out": 16, "dense": {"in": 16, "out": 16}}
    layout = json.loads(json.dumps(channel_layout(small)))
    fresh = prunekit.zoo.layout.apply_layout(_Attention(), layout)
    assert json.loads(json.dumps(channel_layout(fresh))) == layout


def test_pruned_from_the_model_as_built_allows_the_layers_of_removed_blocks(tmp_path):
    """A depth-cut model (blocks removed by prunekit) saved with pruned_from= the zoo model as built
    was refused: pruned_from has the layers of the removed blocks, which the model records as removed."""
    from prunekit import zoo
    from prunekit.structured.depth import remove_blocks
    torch.manual_seed(0)
    model = remove_blocks(zoo.build("resnet20").eval(), ["layer2.2"])
    prunekit.save_model(model, tmp_path / "cut.safetensors", {}, pruned_from=zoo.build("resnet20"))
    layout = prunekit.saving.read_meta(tmp_path / "cut.safetensors")["channel_layout"]
    assert layout["layer2.2"] == {"removed": True} and "layer2.2.conv1" not in layout
    back = prunekit.load_pruned(zoo.build("resnet20"), tmp_path / "cut.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back.eval()(x), model(x), rtol=1e-5, atol=1e-5 * float(model(x).abs().max()))


class _Heads(nn.Module):
    """_Attention with the head count (and batch_first) as build arguments."""

    def __init__(self, heads=4, batch_first=True, kdim=None, add_bias_kv=False):
        super().__init__()
        self.kdim = kdim
        self.emb = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, heads, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                          add_bias_kv=add_bias_kv)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.emb(x)
        kv = x if self.kdim else h          # keys and values: the raw 6 features where kdim=6
        return self.fc((h + self.attn(h, kv, kv, need_weights=False)[0]).mean(1))


@pytest.mark.parametrize("built,said", [
    ({"heads": 8}, "attention 'attn' is built with 8 heads of 2 (embed_dim 16) in the model passed but had 4 heads of "
                   "4 (embed_dim 16) in the model the file was pruned from"),
    ({"heads": 2}, "attention 'attn' is built with 2 heads of 8 (embed_dim 16) in the model passed but had 4 heads of "
                   "4 (embed_dim 16)"),
    ({"batch_first": False}, "attention 'attn' is built with bias=True, batch_first=False in the model passed but "
                             "bias=True, batch_first=True"),
    ({"kdim": 6}, "attention 'attn' is built with kdim=6, vdim=6 in the model passed but kdim=vdim=16 (its "
                  "embed_dim), add_bias_kv=False, add_zero_attn=False in the model the file was pruned from"),
    ({"add_bias_kv": True}, "attention 'attn' is built with add_bias_kv=True in the model passed but kdim=vdim=16"),
], ids=["more heads", "fewer heads", "not batch first", "kdim vdim", "add_bias_kv"])
def test_attention_with_heads_removed_refuses_a_model_built_with_another_head_count(tmp_path, built, said):
    """An nn.MultiheadAttention that lost heads is replaced by the saved SlimAttention: a model built
    with another head count (same embed_dim, so every Linear fits) loaded quietly as the saved one."""
    torch.manual_seed(0)
    model, x = _Heads().eval(), torch.randn(2, 7, 6)
    groups = find_groups(model, x)
    masks = [torch.arange(g.size) < 2 if g.kind == "heads" else torch.ones(g.size, dtype=torch.bool) for g in groups]
    small = shrink(model, groups, masks, x).eval()
    prunekit.save_model(small, tmp_path / "heads.safetensors", {})
    fresh = _Heads(**built)
    with pytest.raises(PrunekitError) as err:
        prunekit.load_pruned(fresh, tmp_path / "heads.safetensors")
    assert said in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert isinstance(fresh.attn, nn.MultiheadAttention)                  # refused before anything was resized
    back = prunekit.load_pruned(_Heads(), tmp_path / "heads.safetensors")  # as built: loads, the same outputs
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def _cut_resnet20():
    from prunekit import zoo
    torch.manual_seed(0)
    model, x = zoo.build("resnet20").eval(), torch.randn(2, 3, 32, 32)
    groups = find_groups(model, x)
    masks = [torch.arange(g.size) % 3 != 1 for g in groups]
    return shrink(model, groups, masks, x).eval(), x


@pytest.mark.parametrize("shortcut,said", [
    ("stride 1", "layer 'layer2.0.shortcut' is built with in 16, out 32, stride 1 in the model passed but had in 16, "
                 "out 32, stride 2 in the model the file was pruned from"),
    ("narrower in", "layer 'layer2.0.shortcut' is built with in 8, out 32, stride 2 in the model passed but had in 16, "
                    "out 32, stride 2"),
    ("identity", "layer 'layer2.0.shortcut' is an Identity in the model passed but a zero-pad (option-A) shortcut in "
                 "the model the file was pruned from"),
])
def test_a_cut_zero_pad_shortcut_refuses_a_model_whose_shortcut_is_built_otherwise(tmp_path, shortcut, said):
    """A zero-pad shortcut's saved channel map was set on whatever shortcut the model passed had: one
    built with another stride or channel count loaded quietly (a stride-1 one then failed in forward)."""
    from prunekit import zoo
    from prunekit.zoo.cifar_resnet import ZeroPadShortcut
    small, x = _cut_resnet20()
    layout = channel_layout(small)
    assert layout["layer2.0.shortcut"]["dense"] == {"in": 16, "out": 32, "stride": 2}, layout["layer2.0.shortcut"]
    prunekit.save_model(small, tmp_path / "r20.safetensors", {})
    fresh = zoo.build("resnet20")
    fresh.layer2[0].shortcut = {"stride 1": ZeroPadShortcut(16, 32, 1), "narrower in": ZeroPadShortcut(8, 32, 2),
                                "identity": nn.Identity()}[shortcut]
    with pytest.raises(PrunekitError) as err:
        prunekit.load_pruned(fresh, tmp_path / "r20.safetensors")
    assert said in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert fresh.conv1.out_channels == 16                                  # refused before anything was resized
    back = prunekit.load_pruned(zoo.build("resnet20"), tmp_path / "r20.safetensors")
    with torch.no_grad():
        assert torch.equal(back.eval()(x), small(x))
    assert json.loads(json.dumps(channel_layout(back))) == json.loads(json.dumps(layout))   # resaved: the same


@pytest.mark.parametrize("command", ["bench-latency", "export"])
def test_the_command_line_refuses_a_pruned_resnet_whose_shortcut_differs_with_exit_2(tmp_path, capsys, command):
    """eval/export/bench-latency of a cut option-A ResNet20 into a model file whose function builds the
    shortcut with stride 1: one line, exit 2 (it loaded, and failed in forward with a traceback)."""
    folder = tmp_path / "code"
    folder.mkdir()
    code = ("from prunekit import zoo\nfrom prunekit.zoo.cifar_resnet import ZeroPadShortcut\n\n\ndef build():\n"
            "    model = zoo.build('resnet20')\n    model.layer2[0].shortcut = ZeroPadShortcut(16, 32, STRIDE)\n"
            "    return model\n")
    (folder / "net.py").write_text(code.replace("STRIDE", "2"))
    model = f"{folder}/net.py:build"
    small, _ = _cut_resnet20()
    (tmp_path / "run").mkdir()
    prunekit.save_model(small, tmp_path / "run" / "model.safetensors", {"model": model, "input_shape": [3, 32, 32],
                                                               "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    (folder / "net.py").write_text(code.replace("STRIDE", "1"))
    argv = {"bench-latency": ["bench-latency", "--model", model, "--pruned", str(tmp_path / "run"), "--repeats", "5",
                              "--warmup", "0", "--batch-sizes", "1", "--threads", "1"],
            "export": ["export", str(tmp_path / "run"), "--model", model, "--torchscript"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "layer 'layer2.0.shortcut' is built with in 16, out 32, stride 1 in the model passed" in lines[0], err
    assert not (tmp_path / "run" / "export").exists()


MNIST_NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=WIDTH):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 14 * 14, width), nn.Linear(width, 10)

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.c1(x))), 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def build():
    return Net()
'''


def test_a_model_file_pruned_on_the_command_line_records_its_dense_counts_without_pruned_from(tmp_path, capsys):
    """Session 54 (b): `prunekit prune --model net.py:build` with a channel method saves every layer's
    counts as built ("dense") by itself (no pruned_from= to pass), and eval of the run with a model
    file now built otherwise is refused in one line, exit 2."""
    from pathlib import Path
    assets = Path(prunekit.__file__).parent / "assets"
    (tmp_path / "net.py").write_text(MNIST_NET.replace("WIDTH", "32"))
    model = f"{tmp_path / 'net.py'}:build"
    data = ["--data", "mnist", "--data-dir", str(assets / "mnist"), "--normalize", "0.1307/0.3081"]
    assert main(["prune", "--model", model, *data, "--train-samples", "256", "--method", "autobot", "--flops", "0.5",
                 "--gate-batches", "3", "--out", str(tmp_path / "run"), "--json"]) == 0
    capsys.readouterr()
    layout = prunekit.saving.read_meta(tmp_path / "run" / "model.safetensors")["channel_layout"]
    built = {"c1": {"in": 1, "out": 8, "groups": 1}, "bn1": {"features": 8}, "fc1": {"in": 8 * 14 * 14, "out": 32},
             "fc2": {"in": 32, "out": 10}}
    assert {name: spec["dense"] for name, spec in layout.items()} == built, layout
    assert layout["fc1"]["out"] < 32 or layout["c1"]["out"] < 8                      # it was cut
    assert main(["eval", "--model", model, "--checkpoint", str(tmp_path / "run"), *data[:4]]) == 0
    capsys.readouterr()
    (tmp_path / "net.py").write_text(MNIST_NET.replace("WIDTH", "64"))          # the file now builds fc1 wider
    assert main(["eval", "--model", model, "--checkpoint", str(tmp_path / "run"), *data[:4]]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("prunekit: warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "layer 'fc1' is built with in 1568, out 64 in the model passed but had in 1568, out 32" in lines[0], err


@pytest.mark.parametrize("built,said", [
    ({"stride": 2}, "stride 2x2 in the model passed but had stride 1x1"),
    ({"dilation": 2, "padding": 2}, "padding 2x2, dilation 2x2 in the model passed but had padding 1x1, dilation 1x1"),
    ({"padding": 0}, "padding 0x0 in the model passed but had padding 1x1"),
    ({"padding": "valid"}, "padding valid in the model passed but had padding 1x1"),
    ({"padding": "same", "dilation": 2}, "padding same, dilation 2x2 in the model passed but had padding 1x1, dilation 1x1"),
    ({"padding_mode": "reflect"}, "padding_mode reflect in the model passed but had padding_mode zeros"),
], ids=["stride", "dilation", "padding", "padding valid", "padding same dilated", "padding mode"])
def test_load_pruned_refuses_a_conv_built_with_another_geometry(tmp_path, built, said):
    """A conv's stride, padding, dilation (kernel size, padding mode) were not in the layout: a model built with
    stride 2 took the saved weights quietly and computed something else. Now recorded and refused in one line."""
    small, _ = _small(_net(tmp_path))
    prunekit.save_model(small, tmp_path / "small.safetensors", {})
    assert prunekit.saving.read_meta(tmp_path / "small.safetensors")["channel_layout"]["c2"]["geometry"] == {
        "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "padding_mode": "zeros"}
    with pytest.raises(PrunekitError) as err:
        prunekit.load_pruned(_net(tmp_path, c2=built), tmp_path / "small.safetensors")
    message = str(err.value)
    assert f"conv 'c2' is built with {said} in the model the file was pruned from" in message, message
    assert "\n" not in message and "constructor arguments" in message


def test_a_layout_without_conv_geometry_still_loads(tmp_path):
    """A file of a prunekit before the geometry was recorded loads as before (its geometry unchecked)."""
    small, x = _small(_net(tmp_path))
    layout = {name: {k: v for k, v in spec.items() if k != "geometry"} for name, spec in channel_layout(small).items()}
    prunekit.save_model(small, tmp_path / "old.safetensors", {"channel_layout": layout})
    back = prunekit.load_pruned(_net(tmp_path), tmp_path / "old.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    assert "geometry" in channel_layout(back)["c2"]          # resaved: now recorded


def test_the_command_line_refuses_a_conv_built_with_another_stride_with_exit_2(tmp_path, capsys):
    folder = tmp_path / "code"
    folder.mkdir()
    _write(folder)
    model = f"{folder}/net.py:build"
    small, _ = _small(_net(tmp_path))
    (tmp_path / "run").mkdir()
    prunekit.save_model(small, tmp_path / "run" / "model.safetensors", {"model": model, "input_shape": [3, 8, 8],
                                                               "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    _write(folder, c2={"stride": 2})
    assert main(["export", str(tmp_path / "run"), "--model", model, "--torchscript"]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith("warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "conv 'c2' is built with stride 2x2 in the model passed but had stride 1x1" in lines[0], err
    assert not (tmp_path / "run" / "export").exists()


def test_save_refuses_a_pruned_from_with_another_conv_geometry_naming_only_what_differs(tmp_path):
    mine = _narrowed_by_hand(_net(tmp_path))
    with pytest.raises(PrunekitError, match=r"conv 'c2' has stride 1x1 in the model but stride 2x2 in pruned_from: "):
        prunekit.save_model(mine, tmp_path / "mine.safetensors", {}, pruned_from=_net(tmp_path, c2={"stride": 2}))


@pytest.mark.parametrize("saved,built", [({"padding": 1}, {"padding": "same"}), ({"padding": 0}, {"padding": "valid"})],
                         ids=["same", "valid"])
def test_a_conv_padded_same_or_valid_fits_a_file_from_the_padding_it_computes(tmp_path, saved, built):
    """padding="same" at kernel 3, stride 1 computes what padding=1 does ("valid": 0): it was refused as another
    geometry (compared as written); now compared as computed, at load and in save_model(pruned_from=)."""
    small, x = _small(_net(tmp_path, c2=saved))
    prunekit.save_model(small, tmp_path / "small.safetensors", {})
    back = prunekit.load_pruned(_net(tmp_path, c2=built), tmp_path / "small.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    mine = _narrowed_by_hand(_net(tmp_path))          # its c2 has padding 1
    if saved["padding"] == 1:
        prunekit.save_model(mine, tmp_path / "mine.safetensors", {}, pruned_from=_net(tmp_path, c2=built))


class _UpNet(nn.Module):
    """A conv, a ConvTranspose2d (stride 2, ``output_padding``) and a 1x1 conv head: (N, 3, 8, 8) -> (N, 2, 15|16, 15|16)."""

    def __init__(self, width=8, output_padding=0):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.up = nn.ConvTranspose2d(width, 4, 3, stride=2, padding=1, output_padding=output_padding)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(torch.relu(self.c1(x)))))


def _up_narrowed(tmp_path):
    """A ``_UpNet`` whose c1 (so up's input) is cut 8 -> 5 by hand, saved with pruned_from; returns it and an input."""
    torch.manual_seed(0)
    built, small = _UpNet(), _UpNet(width=5)
    with torch.no_grad():
        small.c1.weight.copy_(built.c1.weight[:5]), small.c1.bias.copy_(built.c1.bias[:5])
        small.up.weight.copy_(built.up.weight[:5]), small.up.bias.copy_(built.up.bias)
        small.head.load_state_dict(built.head.state_dict())
    prunekit.save_model(small, tmp_path / "up.safetensors", {}, pruned_from=_UpNet())
    return small.eval(), torch.randn(1, 3, 8, 8)


def test_a_narrowed_conv_transpose_loads_and_its_output_padding_is_checked(tmp_path):
    """A ConvTranspose's weight is (in, out/groups, k, k): apply_layout rebuilt it as (out, in, k, k), so a
    narrowed one did not load; and its output_padding (which sets the output size) was not recorded, so a
    model built with output_padding=1 loaded a file from 0 quietly and computed a larger output."""
    small, x = _up_narrowed(tmp_path)
    back = prunekit.load_pruned(_UpNet(), tmp_path / "up.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x), small(x))
    with pytest.raises(PrunekitError) as err:
        prunekit.load_pruned(_UpNet(output_padding=1), tmp_path / "up.safetensors")
    assert "conv 'up' is built with output_padding 1x1 in the model passed but had output_padding 0x0" in str(err.value)
    meta = prunekit.saving.read_meta(tmp_path / "up.safetensors")       # an older file, without output_padding: loads
    for spec in meta["channel_layout"].values():
        spec.get("geometry", {}).pop("output_padding", None)
    prunekit.save_model(small, tmp_path / "old.safetensors", {"channel_layout": meta["channel_layout"]})
    with torch.no_grad():
        assert torch.equal(prunekit.load_pruned(_UpNet(), tmp_path / "old.safetensors")(x), small(x))


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_model_file_model_narrowed_by_hand_and_saved_without_pruned_from_is_named_so(tmp_path, capsys, command):
    """Saved without pruned_from, such a model records no layout (nothing tells it from a dense one): eval and
    export refused it saying the model's code had changed since prunekit saved it, which it had not. Now the
    one line names the fix (save it again with pruned_from), and the file so saved then loads."""
    folder = tmp_path / "code"
    folder.mkdir()
    _write(folder)
    model = f"{folder}/net.py:build"
    meta = {"model": model, "input_shape": [3, 32, 32], "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    mine = _narrowed_by_hand(_net(tmp_path))
    (tmp_path / "run").mkdir()
    prunekit.save_model(mine, tmp_path / "run" / "model.safetensors", meta)
    assert "channel_layout" not in prunekit.saving.read_meta(tmp_path / "run" / "model.safetensors")
    import numpy as np
    rng = np.random.default_rng(0)
    images = {f"x_{s}": rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8) for s in ("train", "test")}
    np.savez(tmp_path / "cifar.npz", **images, **{f"y_{s}": np.arange(20) % 10 for s in ("train", "test")})
    argv = {"eval": ["eval", "--model", model, "--checkpoint", str(tmp_path / "run" / "model.safetensors"),
                     "--data", "cifar10", "--data-dir", str(tmp_path / "cifar.npz")],
            "export": ["export", str(tmp_path / "run"), "--model", model, "--torchscript"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("warning")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "'c2.weight' is (9, 8, 3, 3) in the file but (12, 8, 3, 3) in the model" in lines[0], err
    assert "saved without its layer sizes; save it again with prunekit.save_model(model, path, meta, " \
           "pruned_from=MODEL_AS_BUILT)" in lines[0], err
    if command == "export":          # saved again so, it loads
        prunekit.save_model(mine, tmp_path / "run" / "model.safetensors", meta, pruned_from=_net(tmp_path))
        assert main(argv) == 0, capsys.readouterr().err
        assert (tmp_path / "run" / "export").exists()
