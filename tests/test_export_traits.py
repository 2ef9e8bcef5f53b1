"""Export of models with the traits HuggingFace models have (a dict or a cache object in the
output, integer token-id inputs, an op without an ONNX form) and of models trained on
normalized inputs; tiny torch models only (no transformers needed). ONNX graphs are run with
onnx's ReferenceEvaluator (no onnxruntime needed)."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import main
from prunekit.data import Normalization
from prunekit.export import export_all
from closeness import assert_close_to_scale

onnx = pytest.importorskip("onnx")
from onnx.reference import ReferenceEvaluator  # noqa: E402

ASSETS = Path(prunekit.__file__).parent / "assets"
MLP = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
       "--data-dir", str(ASSETS / "mnist"), "--train-samples", "256", "--fisher-samples", "64"]


class _Cache:
    """Stands for a HuggingFace DynamicCache: an object, not a tensor, in the output."""

    def __init__(self, keys):
        self.keys = keys


class _WithCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), _Cache(x * 2)


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return {"logits": self.fc(x)}


class _Diff(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.diff(x, dim=-1, prepend=x[:, :1]))


class _Tokens(nn.Module):
    """Token ids (N, T) -> per-token logits (N, T, 5), with position embeddings taken by the
    input's own length (any T up to 32)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos, self.head = nn.Embedding(50, 8), nn.Embedding(32, 8), nn.Linear(8, 5)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.tok(ids) + self.pos(positions))


class _FixedTokens(nn.Module):
    """Token ids (N, 6) only: the embeddings of all six tokens go into one Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.head = nn.Embedding(50, 4), nn.Linear(24, 3)

    def forward(self, ids):
        return self.head(self.tok(ids).flatten(1))


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "tensor(" not in text and "Traceback" not in text
    return text


def test_onnx_export_of_an_output_with_a_cache_object_names_use_cache_and_a_wrapper(tmp_path):
    with pytest.raises(prunekit.PrunekitError) as err:
        export_all(_WithCache(), torch.randn(2, 4), tmp_path, ["onnx"])
    text = _one_line(err)
    assert "output holds a _Cache" in text and "use_cache=False" in text
    assert "wrap it so forward returns a tensor or a tuple of tensors" in text
    assert not (tmp_path / "model.onnx").exists()


def test_onnx_export_of_an_op_without_an_onnx_form_names_the_op_the_opset_and_what_may_work(tmp_path):
    with pytest.raises(prunekit.PrunekitError) as err:
        export_all(_Diff(), torch.randn(2, 4), tmp_path, ["onnx"])
    text = _one_line(err)
    assert "the model uses aten::diff" in text and "at opset 17, nor at any later opset" in text
    assert "attention_mask=torch.ones_like(ids)" in text and "dynamo=True" in text


@pytest.mark.parametrize("model, what", [(_DictOut(), "returns dict (a dict)"),
                                         (_WithCache(), "returns _Cache (not a tensor)")])
def test_torchscript_export_of_a_dict_or_an_object_in_the_output_names_a_wrapper(tmp_path, model, what):
    """torch's tracer says "pass strict=False", which a prunekit user cannot, or prints the whole
    output, tensors and all; the refusal names the wrapper that works instead."""
    with pytest.raises(prunekit.PrunekitError) as err:
        export_all(model, torch.randn(2, 4), tmp_path, ["torchscript"])
    text = _one_line(err)
    assert what in text and "strict=False" not in text
    assert "wrap it so forward returns a tensor or a tuple of tensors" in text and "return self.m(x).logits" in text


def test_a_wrapper_returning_the_tensor_exports(tmp_path):
    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)["logits"]
    model = Logits(_DictOut())
    files = export_all(model, torch.randn(2, 4), tmp_path, ["torchscript", "onnx"])
    assert [f["format"] for f in files] == ["torchscript", "onnx"]


def test_torchs_error_text_is_cut_before_a_printed_tensor():
    from prunekit.export import _first_line
    err = RuntimeError("Tracer cannot infer type of Out(loss=None, logits=tensor([[[ 0.1177,  0.0106,\n 1.0]]]))")
    assert _first_line(err) == "Tracer cannot infer type of Out(loss=None, logits ..."
    assert len(_first_line(RuntimeError("x" * 1000))) <= 300


def test_the_onnx_of_a_token_model_takes_any_length(tmp_path):
    model = _Tokens().eval()
    ids = torch.randint(50, (2, 6))
    (entry,) = export_all(model, ids, tmp_path, ["onnx"])
    assert "note" not in entry
    graph = onnx.load(entry["path"])
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]
    assert {p.key: p.value for p in graph.metadata_props}["prunekit.dynamic_axes"] == "0: batch, 1: sequence"
    run = ReferenceEvaluator(graph)
    for length in (6, 11, 3):
        other = torch.randint(50, (3, length))
        (got,) = run.run(None, {"input": other.numpy()})
        with torch.no_grad():
            assert_close_to_scale(torch.from_numpy(got), model(other), rel=1e-5)


def test_the_onnx_of_a_token_model_of_one_length_keeps_it_and_says_so(tmp_path):
    (entry,) = export_all(_FixedTokens().eval(), torch.randint(50, (2, 6)), tmp_path, ["onnx"])
    assert "takes 6 tokens only" in entry["note"]
    graph = onnx.load(entry["path"])
    assert [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == ["batch", 6]


NORM = Normalization((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def test_graphs_record_the_normalization_they_expect(tmp_path):
    export_all(_conv(), torch.rand(1, 3, 8, 8), tmp_path, ["onnx", "dense"], normalization=NORM)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert meta["prunekit.normalize_mean"] == "0.5,0.4,0.3" and meta["prunekit.normalize_std"] == "0.2,0.25,0.3"
    assert meta["prunekit.normalize_in_graph"] == "false" and "(x - mean) / std" in meta["prunekit.input_range"]
    manifest = json.loads((tmp_path / "exported.json").read_text())
    assert manifest["graphs"]["model.onnx"]["mean"] == [0.5, 0.4, 0.3]
    assert manifest["graphs"]["model.onnx"]["in_graph"] is False and list(manifest["graphs"]) == ["model.onnx"]
    assert manifest["normalization"] == manifest["graphs"]["model.onnx"]        # one graph: its record
    assert sorted(manifest["files"]) == ["model-dense.safetensors", "model.onnx"]


def test_onnx_metadata_keeps_every_digit_of_the_normalization(tmp_path):
    """The metadata was written with %g (6 significant digits: CLIP's 0.48145466 read 0.481455)."""
    from prunekit.data import Normalization
    clip = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    export_all(_conv(), torch.rand(1, 3, 8, 8), tmp_path, ["onnx"], normalization=clip)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert tuple(float(v) for v in meta["prunekit.normalize_mean"].split(",")) == clip.mean
    assert tuple(float(v) for v in meta["prunekit.normalize_std"].split(",")) == clip.std


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_each_graph_keeps_its_own_normalization_record_across_exports(tmp_path):
    """exported.json held one "normalization", rewritten by each call while "files" kept listing the
    graphs of earlier calls: --onnx then --torchscript --normalize-in-graph said in_graph true for
    both, and a later --dense dropped the record. Now "graphs" holds each file's record, kept while
    the file is; "normalization" is left out where the graphs differ."""
    model, example = _conv(), torch.rand(1, 3, 8, 8)
    manifest = lambda: json.loads((tmp_path / "exported.json").read_text())       # noqa: E731
    export_all(model, example, tmp_path, ["onnx"], normalization=NORM)
    export_all(model, example, tmp_path, ["torchscript"], normalization=NORM, normalize_in_graph=True)
    graphs = manifest()["graphs"]
    assert (graphs["model.onnx"]["in_graph"], graphs["model.torchscript.pt"]["in_graph"]) == (False, True)
    assert "normalization" not in manifest()        # the two graphs take different inputs: no one record
    onnx_meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert onnx_meta["prunekit.normalize_in_graph"] == "false"         # what its record says
    export_all(model, example, tmp_path, ["dense"])
    assert manifest()["graphs"] == graphs                              # kept by a call that writes no graph
    export_all(model, example, tmp_path, ["onnx"], normalization=NORM, normalize_in_graph=True)
    assert manifest()["graphs"]["model.onnx"]["in_graph"] is True and manifest()["normalization"]["in_graph"] is True
    (tmp_path / "model.torchscript.pt").unlink()                       # a file gone: its record too
    export_all(model, example, tmp_path, ["dense"])
    assert list(manifest()["graphs"]) == ["model.onnx"]


def test_a_manifest_before_graph_records_is_still_read(tmp_path):
    """A manifest of the earlier form ("files" and one "normalization") is still ours to refresh; its
    record, which may be another call's, is not attributed to a file."""
    export_all(_conv(), torch.rand(1, 3, 8, 8), tmp_path, ["onnx"], normalization=NORM)
    old = {"files": ["model.onnx"], "normalization": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3],
                                                      "in_graph": True, "graph_input": "pixels"}}
    (tmp_path / "exported.json").write_text(json.dumps(old))
    export_all(_conv(), torch.rand(1, 3, 8, 8), tmp_path, ["dense"])
    assert json.loads((tmp_path / "exported.json").read_text()) == {"files": ["model-dense.safetensors",
                                                                              "model.onnx"]}


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_normalize_in_graph_takes_pixels_in_0_1(tmp_path):
    """The graph fed raw pixels gives what the model gives fed them normalized."""
    model = _conv()
    export_all(model, torch.rand(1, 3, 8, 8), tmp_path, ["onnx", "torchscript"], normalization=NORM,
               normalize_in_graph=True)
    pixels = torch.rand(4, 3, 8, 8)
    mean, std = torch.tensor(NORM.mean).view(1, 3, 1, 1), torch.tensor(NORM.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model((pixels - mean) / std)
        unnormalized = model(pixels)
    graph = onnx.load(str(tmp_path / "model.onnx"))
    (got,) = ReferenceEvaluator(graph).run(None, {"input": pixels.numpy()})
    assert_close_to_scale(torch.from_numpy(got), expected, rel=1e-5)
    assert (expected - unnormalized).abs().max() > 0.1 * expected.abs().max()      # the check can fail
    assert_close_to_scale(torch.jit.load(str(tmp_path / "model.torchscript.pt"))(pixels), expected, rel=1e-5)
    assert {p.key: p.value for p in graph.metadata_props}["prunekit.normalize_in_graph"] == "true"
    graphs = json.loads((tmp_path / "exported.json").read_text())["graphs"]
    assert graphs["model.onnx"]["in_graph"] is True and graphs["model.torchscript.pt"]["in_graph"] is True
    assert model[0].weight.shape == (4, 3, 3, 3) and not any(n.startswith("model.") for n, _ in model.named_buffers())


def test_normalize_in_graph_refuses_what_it_cannot_apply(tmp_path):
    with pytest.raises(prunekit.PrunekitError, match="needs the model's normalization"):
        export_all(_conv(), torch.rand(1, 3, 8, 8), tmp_path, ["onnx"], normalize_in_graph=True)
    with pytest.raises(prunekit.PrunekitError, match="is for image inputs"):
        export_all(_Tokens(), torch.randint(50, (1, 6)), tmp_path, ["onnx"], normalization=NORM,
                   normalize_in_graph=True)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_cli_export_says_what_inputs_the_graph_takes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["prune", *MLP[:-2], "--method", "magnitude", "--sparsity", "0.5", "--out", str(run), "--onnx"]) == 0
    capsys.readouterr()
    meta = {p.key: p.value for p in onnx.load(str(run / "model.onnx")).metadata_props}    # prune --onnx's file
    assert meta["prunekit.normalize_mean"] == "0.1307" and meta["prunekit.normalize_std"] == "0.3081"
    assert main(["export", str(run), "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "takes inputs normalized as in training" in out and "mean 0.1307, std 0.3081" in out
    assert "--normalize-in-graph" in out
    assert main(["export", str(run), "--dense", "--normalize-in-graph"]) == 2
    err = capsys.readouterr().err
    assert "add --onnx and/or --torchscript" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(run), "--onnx", "--normalize-in-graph", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["normalization"] == {"mean": [0.1307], "std": [0.3081], "in_graph": True,
                                        "graph_input": "pixels scaled to [0, 1] (the graph normalizes them)"}
    from prunekit.loading import load_model
    model = load_model("mlpnet", run / "model.safetensors").model.eval()
    pixels = torch.rand(3, 1, 28, 28)
    (got,) = ReferenceEvaluator(onnx.load(str(run / "export" / "model.onnx"))).run(None, {"input": pixels.numpy()})
    with torch.no_grad():
        assert_close_to_scale(torch.from_numpy(got), model((pixels - 0.1307) / 0.3081), rel=1e-5)


def test_the_input_line_of_an_export_names_what_the_graphs_take():
    from prunekit.commands.export import _input_line
    assert _input_line(["onnx"], NORM, False).startswith("the onnx graph takes inputs normalized as in training")
    assert "mean 0.5,0.4,0.3, std 0.2,0.25,0.3" in _input_line(["onnx"], NORM, False)
    assert _input_line(["onnx", "torchscript"], NORM, True) == (
        "the onnx and torchscript graphs take pixels scaled to [0, 1] ((x - mean) / std with mean 0.5,0.4,0.3, "
        "std 0.2,0.25,0.3 is built in)")
    assert _input_line(["torchscript"], Normalization((0.0,), (1.0,)), False) == (
        "the torchscript graph takes pixels scaled to [0, 1] (model.json: no normalization)")


class _TwoOut(nn.Module):
    """(N, 4) -> {"logits": (N, 3), "aux": (N, 2)} (``tuple=True``: the same two as a tuple)."""

    def __init__(self, tuple_out: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.aux, self.tuple_out = nn.Linear(4, 3), nn.Linear(4, 2), tuple_out

    def forward(self, x):
        logits, aux = self.fc(x), self.aux(torch.relu(x))
        return (logits, aux) if self.tuple_out else {"logits": logits, "aux": aux}


@pytest.mark.parametrize("tuple_out, names", [(False, ["logits", "aux"]), (True, ["output_0", "output_1"])])
def test_the_onnx_outputs_of_a_dict_or_tuple_are_named_by_key_or_position(tmp_path, tuple_out, names):
    """A dict's outputs were named "output" and an exporter number ("11"): the keys were lost. Now a
    dict's keys (a tuple's output_0, output_1), each with a batch axis, listed in the metadata too;
    the graph computes what the model does, output by output, at another batch size."""
    model, x = _TwoOut(tuple_out).eval(), torch.randn(2, 4)
    export_all(model, x, tmp_path, ["onnx"])
    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert [o.name for o in graph.graph.output] == names
    assert [o.type.tensor_type.shape.dim[0].dim_param for o in graph.graph.output] == ["batch", "batch"]
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["prunekit.outputs"] == ", ".join(names) and meta["prunekit.dynamic_axes"] == "0: batch"
    x5 = torch.randn(5, 4)
    got = ReferenceEvaluator(graph).run(None, {"input": x5.numpy()})
    want = model(x5)
    for name, value, expected in zip(names, got, want.values() if isinstance(want, dict) else want):
        assert value.shape == tuple(expected.shape), name
        assert_close_to_scale(torch.from_numpy(value), expected.detach(), 1e-5)


class _BatchAndNot(nn.Module):
    """(N, 4) -> {"b": (4,) a mean over the batch, "a": (N, 4), "k": (1, 4) keepdim mean} (``single``:
    the mean alone)."""

    def __init__(self, single: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.l, self.single = nn.Linear(4, 4), single

    def forward(self, x):
        if self.single:
            return self.l(x).mean(0)
        return {"b": self.l(x).mean(0), "a": self.l(x), "k": self.l(x).mean(0, keepdim=True)}


@pytest.mark.parametrize("batch", [1, 2])
def test_only_outputs_whose_axis_0_follows_the_batch_get_a_dynamic_batch_axis(tmp_path, batch):
    """s53 review: every output was declared with axis 0 "batch", a mean over the batch (always 4 rows)
    too. Now "batch" only where axis 0 follows the input's batch; the others keep their fixed size, and the
    graph computes what the model does at another batch size (at example batch 1 as well, where a
    keepdim mean's 1 row looks like the batch)."""
    model, x = _BatchAndNot().eval(), torch.randn(batch, 4)
    export_all(model, x, tmp_path, ["onnx"])
    graph = onnx.load(str(tmp_path / "model.onnx"))
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output}
    assert dims == {"b": [4], "a": ["batch", 4], "k": [1, 4]}
    x5 = torch.randn(5, 4)
    got = dict(zip(dims, ReferenceEvaluator(graph).run(None, {"input": x5.numpy()})))
    for name, expected in model(x5).items():
        assert_close_to_scale(torch.from_numpy(got[name]), expected.detach(), 1e-5)
    export_all(_BatchAndNot(single=True).eval(), x, tmp_path / "single", ["onnx"])
    graph = onnx.load(str(tmp_path / "single" / "model.onnx"))
    assert [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output] == [[4]]
    export_all(nn.Linear(4, 3).eval(), x, tmp_path / "plain", ["onnx"])
    graph = onnx.load(str(tmp_path / "plain" / "model.onnx"))
    assert [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.graph.output] == \
        [["batch", 3]]


def test_a_single_output_keeps_its_name_output(tmp_path):
    export_all(_DictOut().eval(), torch.randn(2, 4), tmp_path, ["onnx"])
    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert [o.name for o in graph.graph.output] == ["logits"]
    export_all(nn.Linear(4, 3).eval(), torch.randn(2, 4), tmp_path / "plain", ["onnx"])
    graph = onnx.load(str(tmp_path / "plain" / "model.onnx"))
    assert [o.name for o in graph.graph.output] == ["output"]
    assert "prunekit.outputs" not in {p.key for p in graph.metadata_props}
