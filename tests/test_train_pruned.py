"""`prunekit train --checkpoint` of a pruned run fine-tunes the pruned model: its zero weights stay
zero (one line says so), a channel-pruned model keeps its channel layout (every command reads the
folder back), and the record counts the MACs kept as the prune run did. A dense checkpoint trains
every weight, as before."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import prunekit
from prunekit.cli import main
from prunekit.commands import train as train_command

MNIST = ["--data", "mnist", "--data-dir", str(Path(prunekit.__file__).parent / "assets" / "mnist")]

NET = """from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
"""


def run_json(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """net.py, a dense `train` run of it, and its magnitude (weights) and autobot (channels) prune runs."""
    folder = tmp_path_factory.mktemp("pruned")
    (folder / "net.py").write_text(NET)
    spec = f"{folder}/net.py:build"
    assert main(["train", "--model", spec, *MNIST, "--normalize", "0.1307/0.3081", "--epochs", "1", "--lr", "0.2",
                 "--train-samples", "512", "--out", str(folder / "dense"), "--json"]) == 0
    assert main(["prune", "--model", spec, "--checkpoint", str(folder / "dense"), *MNIST, "--method", "magnitude",
                 "--sparsity", "0.7", "--out", str(folder / "weights"), "--json"]) == 0
    assert main(["prune", "--model", spec, "--checkpoint", str(folder / "dense"), *MNIST, "--method", "autobot",
                 "--flops", "0.5", "--out", str(folder / "channels"), "--json"]) == 0
    return spec, folder


def train(spec, checkpoint, out, *extra):
    return ["train", "--model", spec, "--checkpoint", str(checkpoint), *MNIST, "--epochs", "1", "--lr", "0.05",
            "--train-samples", "256", "--out", str(out), *extra]


def test_training_a_weights_pruned_run_keeps_its_zeros(capsys, runs, tmp_path):
    spec, folder = runs
    capsys.readouterr()
    pruned = json.loads((folder / "weights" / "result.json").read_text())
    before = load_file(folder / "weights" / "model.safetensors")
    assert main(train(spec, folder / "weights", tmp_path / "ft")) == 0
    err = capsys.readouterr().err
    told = [line for line in err.splitlines() if "pruned" in line]
    assert len(told) == 1 and "held at zero" in told[0] and "stays pruned" in told[0]
    after = load_file(tmp_path / "ft" / "model.safetensors")
    for name in ("0.weight", "4.weight", "9.weight"):
        zeros = before[name] == 0
        assert zeros.any()                                   # the prune run made zeros here
        assert (after[name][zeros] == 0).all()               # ... and they are still zero
        assert (after[name] != before[name]).any()           # the kept weights did train
    record = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert record["macs"] == pruned["macs"] and record["dense_macs"] == pruned["dense_macs"]
    assert record["flops_kept"] == pytest.approx(pruned["flops_kept"], rel=1e-9)
    assert record["sparsity"] == pytest.approx(pruned["sparsity"], rel=1e-9)
    assert record["pruned"]["method"] == "magnitude"
    info = run_json(capsys, ["info", str(tmp_path / "ft"), "--model", spec, "--json"])
    assert info["macs"] == pruned["macs"]
    # a training of the fine-tuned model (its record says pruned) holds the zeros again
    again = run_json(capsys, train(spec, tmp_path / "ft", tmp_path / "ft2", "--json"))
    assert again["macs"] == pruned["macs"] and again["pruned"]["method"] == "magnitude"


def test_training_a_dense_checkpoint_trains_every_weight(capsys, runs, tmp_path):
    spec, folder = runs
    capsys.readouterr()
    assert main(train(spec, folder / "dense", tmp_path / "ft")) == 0
    assert "pruned" not in capsys.readouterr().err
    record = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert "pruned" not in record and "macs" not in record


def test_training_a_channel_pruned_run_saves_its_layout(capsys, runs, tmp_path):
    spec, folder = runs
    capsys.readouterr()
    pruned = json.loads((folder / "channels" / "result.json").read_text())
    trained = run_json(capsys, train(spec, folder / "channels", tmp_path / "ft", "--json"))
    assert trained["macs"] == pruned["macs"] and trained["flops_kept"] == pytest.approx(pruned["flops_kept"], rel=1e-9)
    assert "channel_layout" in json.loads((tmp_path / "ft" / "model.json").read_text())
    evaluated = run_json(capsys, ["eval", "--model", spec, "--checkpoint", str(tmp_path / "ft"), *MNIST, "--json"])
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"], rel=1e-6)
    info = run_json(capsys, ["info", str(tmp_path / "ft"), "--model", spec, "--json"])
    assert info["shrunk"]["flops_kept"] == pytest.approx(pruned["flops_kept"], rel=1e-9)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_training_an_export_of_a_weights_pruned_run_keeps_its_zeros(capsys, runs, tmp_path, kind):
    """model-dense / model-sparse.safetensors (`prunekit export`) carry no record, but their zeros
    are the prune run's: held as the run folder's are."""
    spec, folder = runs
    run = tmp_path / "weights"
    shutil.copytree(folder / "weights", run)
    assert main(["export", str(run), "--model", spec, f"--{kind}", "--json"]) == 0
    capsys.readouterr()
    pruned = json.loads((run / "result.json").read_text())
    exported = run / "export" / f"model-{kind}.safetensors"
    assert main(train(spec, exported, tmp_path / "ft", "--normalize", "0.1307/0.3081")) == 0
    assert "held at zero" in capsys.readouterr().err
    record = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert record["macs"] == pruned["macs"] and record["sparsity"] == pytest.approx(pruned["sparsity"], rel=1e-9)


def test_a_killed_training_of_a_pruned_run_resumes_to_the_same_pruned_weights(capsys, runs, tmp_path, monkeypatch):
    spec, folder = runs
    argv = train(spec, folder / "weights", tmp_path / "whole", "--json")
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv) == 0
    calls, real_epoch = [], train_command.train_epoch

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    cut = [a.replace(str(tmp_path / "whole"), str(tmp_path / "cut")) for a in argv]
    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main(cut) == 130
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)
    assert main(cut) == 0
    capsys.readouterr()
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    zeros = load_file(folder / "weights" / "model.safetensors")["4.weight"] == 0
    assert zeros.any() and (b["4.weight"][zeros] == 0).all()


def test_a_refused_out_folder_stays_one_line(capsys, runs):
    """The line about the pruned checkpoint comes once training starts: a refusal before it is alone."""
    spec, folder = runs
    capsys.readouterr()
    assert main(train(spec, folder / "weights", folder / "channels")) == 2      # a prune run's folder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a `prunekit prune` run" in err
