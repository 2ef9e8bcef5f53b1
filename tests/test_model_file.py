"""A model of the user's own on the command line (``--model net.py:FUNCTION``): trained, pruned
(weights and channels), evaluated, counted, exported and resumed like a zoo model."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import prunekit
from prunekit.cli import main
from prunekit.costs import CostModel
from prunekit import user_models
from prunekit.loading import load_model

MNIST = ["--data", "mnist", "--data-dir", str(Path(prunekit.__file__).parent / "assets" / "mnist")]
NORMALIZE = ["--normalize", "0.1307/0.3081"]

NET = """from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
"""


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """net.py and a checkpoint of it trained by `prunekit train` (sidecar: shape, normalization)."""
    folder = tmp_path_factory.mktemp("mine")
    (folder / "net.py").write_text(NET)
    spec = f"{folder}/net.py:build"
    assert main(["train", "--model", spec, *MNIST, *NORMALIZE, "--epochs", "2", "--lr", "0.2",
                 "--out", str(folder / "trained"), "--json"]) == 0
    return spec, folder / "trained" / "model.safetensors"


def test_pruned_model_file_reloads_recounts_and_exports(capsys, tmp_path, trained):
    spec, checkpoint = trained
    out = run_json(capsys, ["prune", "--model", spec, "--checkpoint", str(checkpoint), *MNIST, "--method", "falcon",
                            "--sparsity", "0.5", "--flops", "0.5", "--fisher-samples", "64",
                            "--layer-search", "0",          # the file round trip is the point, not the search
                            "--out", str(tmp_path / "run"), "--json"])
    assert out["model"] == spec and out["flops_kept"] <= 0.5 and out["sparsity"] >= 0.5 - 1e-9
    saved = str(tmp_path / "run" / "model.safetensors")
    again = run_json(capsys, ["eval", "--model", spec, "--checkpoint", saved, *MNIST, "--json"])
    assert again["accuracy"] == pytest.approx(out["accuracy"])
    # independent recount: rebuild from the file, load the weights, count the nonzero MACs
    loaded = load_model(spec, saved)
    assert loaded.input_shape == (1, 28, 28)
    costs = CostModel(loaded.model, loaded.example_input())
    assert costs.count(loaded.model).macs == out["macs"]
    info = run_json(capsys, ["info", spec, "--checkpoint", saved, "--json"])
    assert info["macs"] == out["macs"]
    written = run_json(capsys, ["export", str(tmp_path / "run"), "--model", spec, "--onnx", "--json"])["files"]
    assert Path(written[0]["path"]).stat().st_size > 0


def test_channels_of_a_model_file_are_removed_and_reload(capsys, tmp_path, trained):
    spec, checkpoint = trained
    out = run_json(capsys, ["prune", "--model", spec, "--checkpoint", str(checkpoint), *MNIST, "--method", "autobot",
                            "--flops", "0.5", "--out", str(tmp_path / "run"), "--json"])
    assert out["flops_kept"] <= 0.5
    saved = str(tmp_path / "run" / "model.safetensors")
    loaded = load_model(spec, saved)
    assert loaded.model[0].out_channels < 8 or loaded.model[4].out_channels < 16     # shrunk, not masked
    again = run_json(capsys, ["eval", "--model", spec, "--checkpoint", saved, *MNIST, "--json"])
    assert again["accuracy"] == pytest.approx(out["accuracy"])
    assert run_json(capsys, ["info", spec, "--checkpoint", saved, "--json"])["shrunk"]["flops_kept"] == \
        pytest.approx(out["flops_kept"])


def test_a_run_of_a_model_file_resumes_from_another_directory(capsys, tmp_path, trained, monkeypatch):
    spec, checkpoint = trained
    folder = Path(spec.rpartition(":")[0]).parent
    monkeypatch.chdir(folder)               # a relative model path, resolved into the run's config
    first = run_json(capsys, ["prune", "--model", "net.py:build", "--checkpoint", str(checkpoint), *MNIST,
                              "--method", "chita", "--sparsity", "0.7", "--fisher-samples", "64",
                              "--out", str(tmp_path / "run"), "--json"])
    assert f'model = "{folder / "net.py"}:build"' in (tmp_path / "run" / "config.toml").read_text()
    monkeypatch.chdir(tmp_path)
    again = run_json(capsys, ["prune", "--resume", str(tmp_path / "run"), "--json"])
    assert again["accuracy"] == pytest.approx(first["accuracy"]) and again["nonzeros"] == first["nonzeros"]


def test_normalization_is_remembered_and_a_conflict_refused(capsys, tmp_path, trained):
    spec, checkpoint = trained
    loaded = load_model(spec, checkpoint)
    assert loaded.normalization.mean == (0.1307,) and loaded.normalization.std == (0.3081,)
    assert main(["eval", "--model", spec, "--checkpoint", str(checkpoint), *MNIST, "--normalize", "none"]) == 2
    assert "leave --normalize out" in capsys.readouterr().err


def test_plain_state_dict_of_a_model_file_with_the_data_shape(capsys, tmp_path, trained):
    spec, _ = trained
    model = load_model(spec).model
    torch.save(model.state_dict(), tmp_path / "mine.pth")
    out = run_json(capsys, ["eval", "--model", spec, "--checkpoint", str(tmp_path / "mine.pth"), *MNIST,
                            "--normalize", "none", "--json"])
    assert 0 <= out["accuracy"] <= 100 and out["images"] == 10000


def test_a_changed_model_file_is_told(tmp_path, trained):
    spec, checkpoint = trained
    changed = tmp_path / "net.py"
    changed.write_text(NET + "\n# edited\n")
    with pytest.warns(UserWarning, match="changed since"):
        load_model(f"{changed}:build", checkpoint)


@pytest.mark.parametrize("edit, first", [
    (("nn.Linear(16, 10)", "nn.Linear(16, 11)"), "'9.weight' is (10, 16) in the file but (11, 16) in the model"),
    (("nn.Conv2d(8, 16, 3", "nn.Conv2d(8, 24, 3"), "'4.weight' is (16, 8, 3, 3) in the file but (24, 8, 3, 3)"),
    (("nn.Conv2d(8, 16, 3", "nn.Conv2d(8, 12, 3"), "'4.weight' is (16, 8, 3, 3) in the file but (12, 8, 3, 3)"),
])
def test_a_model_file_widened_or_narrowed_after_train_is_named_as_changed(capsys, tmp_path, trained, edit, first):
    """A model file edited after `prunekit train` saved it (its head widened, a layer wider or
    narrower): the file's tensors no longer fit, and the fix is the code, not a channel layout."""
    spec, checkpoint = trained
    (tmp_path / "net.py").write_text(NET.replace(*edit))
    assert main(["eval", "--model", f"{tmp_path}/net.py:build", "--checkpoint", str(checkpoint.parent),
                 *MNIST]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if "error:" in line]
    assert len(error) == 1 and "no longer fits the model file" in error[0] and first in error[0]
    assert "restore that code, or train (or prune) again" in error[0]
    assert "channels removed" not in err and "load_pruned" not in err


def test_readme_model_file_block_runs(capsys, tmp_path, monkeypatch):
    """The README's net.py and its commands, run exactly (the bundled data path made absolute)."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text().split("<!-- model file block -->", 1)[1]
    net = text.split("```python\n", 1)[1].split("```", 1)[0]
    commands = text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    (tmp_path / "net.py").write_text(net)
    monkeypatch.chdir(tmp_path)
    for line in commands.splitlines():
        argv = shlex.split(line.replace("src/prunekit/assets/mnist", MNIST[3]))
        assert argv[0] == "prunekit" and main(argv[1:] + ["--json"]) == 0, line
        capsys.readouterr()
    record = json.loads((tmp_path / "runs" / "mine-falcon" / "result.json").read_text())
    assert record["flops_kept"] <= 0.3 and record["accuracy"] > 80
    assert (tmp_path / "runs" / "mine-falcon" / "export" / "model.onnx").stat().st_size > 0


def test_a_model_file_on_an_image_folder_of_many_sizes(capsys, tmp_path):
    """Photos of any size, brought to one by --resize/--crop, for a 3-channel model of one's own."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        for label in ("cat", "dog"):
            (tmp_path / "photos" / split / label).mkdir(parents=True)
            for k in range(count):
                size = (int(rng.integers(12, 30)), int(rng.integers(12, 30)))       # (width, height)
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels, "RGB").save(tmp_path / "photos" / split / label / f"{k}.png")
    (tmp_path / "rgb.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential("
                                     "nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))\n")
    spec = f"{tmp_path}/rgb.py:build"
    photos = ["--data", "imagefolder", "--data-dir", str(tmp_path / "photos"), "--resize", "12", "--crop", "10"]
    assert main(["train", "--model", spec, *photos, "--normalize", "0.5,0.5,0.5/0.25,0.25,0.25", "--epochs", "1",
                 "--batch-size", "4", "--out", str(tmp_path / "trained"), "--json"]) == 0
    capsys.readouterr()
    out = run_json(capsys, ["prune", "--model", spec, "--checkpoint", str(tmp_path / "trained" / "model.safetensors"),
                            *photos, "--method", "chita", "--sparsity", "0.5", "--fisher-samples", "8", "--json"])
    assert out["sparsity"] >= 0.5 - 1e-9
    assert main(["eval", "--model", spec, "--checkpoint", str(tmp_path / "trained" / "model.safetensors"),
                 *photos[:4], "--resize", "12"]) == 2
    assert "--crop N" in capsys.readouterr().err
    # the same final size from another resize would change every input silently: refused
    assert main(["eval", "--model", spec, "--checkpoint", str(tmp_path / "trained" / "model.safetensors"),
                 *photos[:4], "--resize", "14", "--crop", "10"]) == 2
    assert "pass --resize 12 --crop 10 again" in capsys.readouterr().err


def test_a_resumed_run_says_when_the_model_file_changed(capsys, tmp_path, trained):
    spec, checkpoint = trained
    (tmp_path / "net.py").write_text(NET)
    mine = f"{tmp_path}/net.py:build"
    run = tmp_path / "run"
    assert main(["prune", "--model", mine, "--checkpoint", str(checkpoint), *MNIST, "--method", "chita++",
                 "--stages", "2", "--sparsity", "0.6", "--fisher-samples", "32", "--out", str(run), "--json"]) == 0
    capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["status"] = "running"                       # as if killed after its last stage checkpoint
    (run / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "net.py").write_text(NET + "\n# edited\n")
    assert main(["prune", "--resume", str(run), "--json"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: warning:")]
    assert any("model file changed since this run started" in line for line in said)   # the run's stages left
    assert any("was saved" in line for line in said)                    # and the checkpoint it started from
    assert "model file changed" in (run / "run.log").read_text()


UNEXPORTABLE = """from torch import nn


def build():     # a 28 -> 5 pool then 2 x 2: the ONNX exporter takes output sizes that divide the input only
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=6), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(),
                         nn.Linear(32, 10))
"""


def test_a_model_onnx_cannot_express_is_refused_in_one_line_before_any_work(capfd, tmp_path):
    """`prune --onnx` refuses before pruning (it used to prune, save, then fail with exit 2 and
    no record); `export --onnx` fails in one line; neither lets the exporter's graph dump (written
    to the C++ stdout) reach stdout, so --json output stays one object."""
    (tmp_path / "net.py").write_text(UNEXPORTABLE)
    spec = f"{tmp_path}/net.py:build"
    torch.save(load_model(spec, input_shape=(1, 28, 28)).model.state_dict(), tmp_path / "mine.pth")
    common = ["--model", spec, "--checkpoint", str(tmp_path / "mine.pth"), *MNIST, *NORMALIZE]
    assert main(["prune", *common, "--method", "magnitude", "--sparsity", "0.5", "--train-samples", "64",
                 "--out", str(tmp_path / "run"), "--onnx", "--json"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and "leave out --onnx" in err and "adaptive_avg_pool2d" in err
    assert not (tmp_path / "run").exists()
    assert main(["prune", *common, "--method", "magnitude", "--sparsity", "0.5", "--train-samples", "64",
                 "--out", str(tmp_path / "run"), "--json"]) == 0
    capfd.readouterr()
    assert main(["export", str(tmp_path / "run"), "--model", spec, "--onnx", "--json"]) == 2
    out, err = capfd.readouterr()
    assert out == "" and err.count("\n") == 1 and "ONNX export failed" in err and "Caused by" not in err
    # the exporter's dump waits in C's stdout buffer: a process of its own would print it at exit
    done = subprocess.run([sys.executable, "-m", "prunekit", "export", str(tmp_path / "run"), "--model", spec,
                           "--onnx", "--json"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(prunekit.__file__).parent.parent)})
    assert done.returncode == 2 and done.stdout == "", done.stdout[:300]


def test_a_run_saved_from_python_is_read_on_the_command_line_with_its_file(capsys, tmp_path, trained):
    """``prunekit.prune(model, ..., out=)`` records the model's class and input shape only: the
    command line reads the folder once the file that builds it is named (info, export, latency),
    says so in one line when it is not, and refuses a file that builds another class."""
    spec, checkpoint = trained
    model = load_model(spec, checkpoint).model
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    result = prunekit.prune(model, (x, y), method="magnitude-flops", flops=0.5, out=str(tmp_path / "run"))
    saved = str(tmp_path / "run" / "model.safetensors")
    assert json.loads((tmp_path / "run" / "model.json").read_text())["input_shape"] == [1, 28, 28]
    assert run_json(capsys, ["info", spec, "--checkpoint", saved, "--json"])["macs"] == result.record["macs"]
    # the refusal's fix, given beside the folder: the folder is the weights (it was "two models named")
    assert run_json(capsys, ["info", str(tmp_path / "run"), "--model", spec, "--json"])["macs"] == result.record["macs"]
    written = run_json(capsys, ["export", str(tmp_path / "run"), "--model", spec, "--onnx", "--json"])["files"]
    assert Path(written[0]["path"]).stat().st_size > 0
    latency = run_json(capsys, ["bench-latency", "--model", spec, "--checkpoint", str(checkpoint), "--pruned",
                                str(tmp_path / "run"), "--threads", "1", "--batch-sizes", "2", "--warmup", "1",
                                "--repeats", "5", "--json"])
    assert latency["flops_kept"] == pytest.approx(result.flops_kept)
    for argv in (["export", str(tmp_path / "run"), "--onnx"], ["info", "--checkpoint", saved]):
        assert main(argv) == 2
        assert "saved from Python: name the file and function that build it" in capsys.readouterr().err
    other = tmp_path / "other.py"
    other.write_text("from torch import nn\n\n\ndef build():\n    return nn.Linear(784, 10)\n")
    assert main(["info", f"{other}:build", "--checkpoint", saved]) == 2
    assert "builds a Linear: name the function that builds a Sequential" in capsys.readouterr().err


def test_a_model_file_on_cifar10_data_is_told_that_its_training_images_are_augmented(capsys, tmp_path):
    """``--data cifar10`` crops and flips the training images (as the zoo's CIFAR models were
    trained); a model of the user's own may not have been trained so, hence a one-line note."""
    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential("
                                     "nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), "
                                     "nn.Flatten(), nn.Linear(4, 10))\n")
    rng = np.random.default_rng(0)
    images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)   # noqa: E731
    labels = lambda n: rng.integers(0, 10, (n, 1))                           # noqa: E731
    np.savez(tmp_path / "data.npz", x_train=images(64), y_train=labels(64), x_test=images(16), y_test=labels(16))
    common = ["prune", "--model", f"{tmp_path}/net.py:build", "--normalize", "none", "--data", "cifar10",
              "--data-dir", str(tmp_path / "data.npz"), "--method", "magnitude-flops", "--flops", "0.9", "--json"]
    assert main(common) == 0
    assert "prunekit: note: the training images for gradients and BatchNorm are randomly cropped" in capsys.readouterr().err
    assert main([*common, "--no-train-augment"]) == 0
    assert "note" not in capsys.readouterr().err


def test_a_token_model_saved_from_python_is_read_by_info_and_bench_latency(capsys, tmp_path):
    """A model of token ids saved from Python: its sidecar records the input's dtype (info traced
    it on float zeros: 'Expected Long'), and --input-shape takes shapes other than C,H,W."""
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Tokens(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, 3)\n\n"
        "    def forward(self, ids):\n        return self.fc(self.emb(ids).mean(1))\n\n\n"
        "def build():\n    torch.manual_seed(0)\n    return Tokens()\n\n\n"
        "def audio():\n    return nn.Sequential(nn.Conv1d(2, 4, 5), nn.Flatten(), nn.Linear(4 * 96, 3))\n")
    spec = f"{tmp_path}/net.py:build"
    model = user_models.build_model(spec)
    ids, y = torch.randint(0, 50, (32, 16)), torch.randint(0, 3, (32,))
    result = prunekit.prune(model, (ids, y), method="magnitude-uniform", sparsity=0.5, out=str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "model.json").read_text())["input_dtype"] == "int64"
    info = run_json(capsys, ["info", str(tmp_path / "run"), "--model", spec, "--json"])
    assert (info["macs"], info["input_shape"]) == (result.record["macs"], [16])
    latency = run_json(capsys, ["bench-latency", "--model", spec, "--pruned", str(tmp_path / "run"), "--threads",
                                "1", "--batch-sizes", "2", "--warmup", "1", "--repeats", "5", "--json"])
    assert latency["flops_kept"] == pytest.approx(result.flops_kept)
    audio = run_json(capsys, ["info", f"{tmp_path}/net.py:audio", "--input-shape", "2,100", "--json"])
    assert audio["macs"] == 2 * 4 * 5 * 96 + 4 * 96 * 3


def test_info_counts_a_channel_pruned_token_model_against_its_dense_model(capsys, tmp_path):
    """info's "shrunk" line rebuilt the dense model with float32 inputs, ignoring the sidecar's
    input_dtype int64: an embedding model failed ('got torch.FloatTensor')."""
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Tokens(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.emb = nn.Embedding(50, 8)\n"
        "        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))\n\n"
        "    def forward(self, ids):\n        return self.mlp(self.emb(ids).mean(1))\n\n\n"
        "def build():\n    torch.manual_seed(0)\n    return Tokens()\n")
    spec = f"{tmp_path}/net.py:build"
    ids, y = torch.randint(0, 50, (32, 16)), torch.randint(0, 3, (32,))
    result = prunekit.prune(user_models.build_model(spec), (ids, y), method="autobot", flops=0.5, gate_batches=2,
                            out=str(tmp_path / "run"))
    assert "channel_layout" in json.loads((tmp_path / "run" / "model.json").read_text())
    info = run_json(capsys, ["info", "--model", spec, "--checkpoint", str(tmp_path / "run" / "model.safetensors"),
                             "--json"])
    dense_macs = 8 * 32 + 32 * 3
    assert info["shrunk"]["dense_macs"] == dense_macs == result.record["dense_macs"]
    assert info["shrunk"]["flops_kept"] == pytest.approx(result.flops_kept, rel=1e-9)


def test_info_names_the_model_itself_in_its_note_on_modules_without_an_element_wise_rule(capsys, tmp_path):
    """A model whose own forward calls F.conv2d / F.linear: info's note ended with an empty name (the
    root module's is ""); it is "(model)" as in the table, and "" in the JSON, as named_modules() says."""
    (tmp_path / "net.py").write_text(
        "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n\n"
        "class Functional(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.w = nn.Parameter(torch.randn(16, 3, 3, 3))\n        self.w2 = nn.Parameter(torch.randn(10, 16))\n\n"
        "    def forward(self, x):\n        return F.linear(F.conv2d(x, self.w, stride=2, padding=1).mean((2, 3)), self.w2)\n"
        "\n\ndef build():\n    return Functional()\n")
    spec = f"{tmp_path}/net.py:build"
    assert main(["info", spec, "--input-shape", "3,8,8"]) == 0
    note = capsys.readouterr().out.strip().splitlines()[-1]
    assert note.startswith("note: no element-wise rule for 1 module(s)") and note.endswith(": (model)")
    info = run_json(capsys, ["info", spec, "--input-shape", "3,8,8", "--json"])
    assert info["unknown_modules"] == [""] and "" in {row["name"] for row in info["layers"]}


def test_a_model_file_returning_an_output_with_logits_runs_on_the_command_line(capsys, tmp_path):
    """A HuggingFace classifier returns a ModelOutput (a dict with "logits"): Python read its logits,
    the command line refused it ("returns a ImageClassifierOutput ... wrap it")."""
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Output(dict):\n    pass\n\n\n"
        "class Classifier(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))\n\n"
        "    def forward(self, x):\n        return Output(logits=self.body(x))\n\n\n"
        "def build():\n    torch.manual_seed(0)\n    return Classifier()\n")
    spec = f"{tmp_path}/net.py:build"
    pruned = run_json(capsys, ["prune", "--model", spec, *NORMALIZE, *MNIST, "--method", "magnitude", "--sparsity",
                               "0.5", "--train-samples", "256", "--out", str(tmp_path / "run"), "--json"])
    assert pruned["sparsity"] == pytest.approx(0.5, abs=1e-3) and pruned["accuracy"] is not None
    evaluated = run_json(capsys, ["eval", "--model", spec, "--checkpoint", str(tmp_path / "run"), *MNIST, "--json"])
    assert evaluated["accuracy"] == pruned["accuracy"]


def test_a_model_with_class_names_on_an_npz_of_bare_labels_is_warned_and_the_file_is_named(capsys, tmp_path):
    """A model pruned on an image folder records its class names; an .npz read as --data cifar10
    carries bare integer labels whose order cannot be checked: one warning, and the record names
    the file rather than only "cifar10"."""
    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential("
                                     "nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), "
                                     "nn.Flatten(), nn.Linear(4, 3))\n")
    rng = np.random.default_rng(0)
    for name in ("circle", "cross", "square"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "folder" / name / f"{i}.png")
    model = ["--model", f"{tmp_path}/net.py:build", "--normalize", "none"]
    assert main(["prune", *model, "--data", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--method",
                 "magnitude-flops", "--flops", "0.9", "--out", str(tmp_path / "run"), "--json"]) == 0
    capsys.readouterr()
    np.savez(tmp_path / "mine.npz", x_train=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 3, (8, 1)), x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 3, (8, 1)))
    evaluate = ["eval", *model, "--checkpoint", str(tmp_path / "run"), "--data", "cifar10", "--data-dir",
                str(tmp_path / "mine.npz")]
    assert main([*evaluate, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["data_file"] == str(tmp_path / "mine.npz")
    assert err.count("warning:") == 1 and "0=circle, 1=cross, 2=square" in err and "bare integer labels" in err
    assert main(evaluate) == 0
    assert f"on {tmp_path / 'mine.npz'} (read as cifar10) test" in capsys.readouterr().out
    # the image folder labelled by the model's own names: no such warning
    assert main(["eval", *model, "--checkpoint", str(tmp_path / "run"), "--data", "imagefolder", "--data-dir",
                 str(tmp_path / "folder")]) == 0
    assert "bare integer labels" not in capsys.readouterr().err


def test_prune_on_an_npz_names_the_file_in_its_record_and_summary(capsys, tmp_path):
    """An .npz read as --data cifar10: prune's record (result.json, metrics.json, --json) gave
    no word of the file (its config.toml says data = "cifar10"); eval named it (data_file). prune
    records data_file the same way and names the file in its summary."""
    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential("
                                     "nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), "
                                     "nn.Flatten(), nn.Linear(4, 10))\n")
    rng = np.random.default_rng(0)
    npz = tmp_path / "mine.npz"
    np.savez(npz, x_train=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, (16, 1)),
             x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, (8, 1)))
    argv = ["prune", "--model", f"{tmp_path}/net.py:build", "--normalize", "none", "--data", "cifar10",
            "--data-dir", str(npz), "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "run")]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data_file"] == str(npz)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["data_file"] == str(npz)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]["data_file"] == str(npz)
    assert main(argv) == 0           # the finished run again: its record, the file named in the summary
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("pruned with magnitude (one-shot):") and lines[1] == f"  data       {npz}", lines
    # data read from a folder of the data set's own files: no data_file, no such line
    argv = ["prune", "--model", "mlpnet", "--checkpoint", str(Path(prunekit.__file__).parent / "assets" /
            "mlpnet.safetensors"), "--data", "mnist", "--data-dir", str(Path(prunekit.__file__).parent / "assets" /
            "mnist"), "--method", "magnitude", "--sparsity", "0.5", "--json"]
    assert main(argv) == 0
    assert "data_file" not in json.loads(capsys.readouterr().out)


def test_a_layer_a_branch_skips_is_told_on_the_command_line_in_flags(capsys, tmp_path):
    """A layer only large inputs run is left dense with a warning; on the command line it told the
    user to "give an example input", which no flag does: it names --exclude (and --data) there,
    and Python keeps example_input."""
    (tmp_path / "net.py").write_text(
        "import torch.nn.functional as F\nfrom torch import nn\n\n\nclass Branchy(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.down = nn.Conv2d(3, 3, 3, stride=2, padding=1)\n"
        "        self.c1 = nn.Conv2d(3, 4, 3, padding=1)\n        self.fc = nn.Linear(4, 10)\n\n"
        "    def forward(self, x):\n        if x.shape[-1] > 32:\n            x = self.down(x)\n"
        "        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c1(x)), 1).flatten(1))\n\n\n"
        "def build():\n    return Branchy()\n")
    rng = np.random.default_rng(0)
    images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)   # noqa: E731
    labels = lambda n: rng.integers(0, 10, (n, 1))                           # noqa: E731
    np.savez(tmp_path / "data.npz", x_train=images(32), y_train=labels(32), x_test=images(8), y_test=labels(8))
    common = ["prune", "--model", f"{tmp_path}/net.py:build", "--normalize", "none", "--data", "cifar10",
              "--data-dir", str(tmp_path / "data.npz"), "--no-train-augment", "--method", "magnitude-flops",
              "--flops", "0.9", "--json"]
    assert main(common) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "did not run" in line]
    assert len(warned) == 1 and "example input" not in warned[0] and "--exclude down" in warned[0], warned
    assert main([*common, "--exclude", "down"]) == 0
    assert "did not run" not in capsys.readouterr().err
    assert main([*common, "--include", "down"]) == 2
    err = capsys.readouterr().err
    assert "example input" not in err and "--include layers that run" in err, err
    from prunekit.errors import PrunekitWarning
    x = torch.rand(8, 3, 32, 32)
    with pytest.warns(PrunekitWarning, match=r"down did not run .* give an example_input that runs"):
        prunekit.prune(user_models.build_model(f"{tmp_path}/net.py:build"), (x, torch.zeros(8, dtype=torch.long)),
                       method="magnitude", params=0.9)


def test_a_channel_run_without_fine_tune_names_how_to_fine_tune_and_that_command_runs(capsys, tmp_path, trained):
    """Session 51: a new user's AutoBot run on their own CNN lost 21 points and the summary said
    nothing of --finetune-epochs (default 0) or `train --checkpoint RUN`, which won most of them
    back. The summary's last line names both, the second written out in full and run as printed;
    no such line with a fine-tune, for a weights method, or on --json's stdout."""
    spec, checkpoint = trained
    base = ["prune", "--model", spec, "--checkpoint", str(checkpoint), *MNIST, "--method", "autobot", "--flops", "0.5",
            "--gate-batches", "2"]
    assert main([*base, "--out", str(tmp_path / "ab")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("  fine-tune  none (--finetune-epochs 0)") and "--finetune-epochs 3" in lines[-1]
    assert sum("fine-tune" in line for line in lines) == 1
    command = shlex.split(lines[-1].split("fine-tune this run: ", 1)[1])
    assert command[:2] == ["prunekit", "train"] and command[command.index("--checkpoint") + 1] == str(tmp_path / "ab")
    assert main(command[1:] + ["--json"]) == 0                      # the line as printed, run
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["pruned"]["family"] == "channels" and (tmp_path / "ab-ft" / "model.safetensors").is_file()
    assert main([*base, "--out", str(tmp_path / "ab-json"), "--json"]) == 0
    assert "fine-tune" not in json.dumps(json.loads(capsys.readouterr().out))          # one JSON object, no line
    assert main([*base, "--finetune-epochs", "1"]) == 0
    assert "fine-tune  none" not in capsys.readouterr().out
    assert main(["prune", "--model", spec, "--checkpoint", str(checkpoint), *MNIST, "--method", "magnitude-flops",
                 "--flops", "0.5"]) == 0
    assert "fine-tune" not in capsys.readouterr().out
