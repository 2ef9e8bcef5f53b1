"""`prunekit prune --out` (and ``prunekit.prune(out=)``) of a folder holding a `prunekit train` run:
refused in one line that says the folder holds a training run and its trained model, offers no
--resume (which prune refuses for a train folder) and says that --force would delete that model;
the folder is left as it is. --force does what the line says."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit import zoo
from prunekit.cli import main
from prunekit.errors import PrunekitError

ASSETS = Path(prunekit.__file__).parent / "assets"
MNIST = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist")]
PRUNE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), *MNIST,
         "--method", "magnitude", "--sparsity", "0.5"]


def contents(folder: Path) -> dict:
    """Every file under ``folder``: its SHA-1."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished `prunekit train` run (one short epoch)."""
    folder = tmp_path_factory.mktemp("train") / "mine"
    assert main(["train", "--model", "mlpnet", *MNIST, "--epochs", "1", "--train-samples", "256",
                 "--out", str(folder), "--json"]) == 0
    assert (folder / "model.safetensors").is_file() and not (folder / "metrics.json").exists()
    return folder


@pytest.fixture
def unfinished(trained, tmp_path):
    """A training run killed before it saved its model: its config.toml and an epoch checkpoint."""
    folder = tmp_path / "killed"
    folder.mkdir()
    shutil.copy(trained / "config.toml", folder / "config.toml")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "epoch-1.safetensors").write_bytes(b"stand-in")
    return folder


def test_prune_out_a_train_folder_names_the_trained_model_and_no_resume(trained, capsys):
    capsys.readouterr()
    before = contents(trained)
    assert main([*PRUNE, "--out", str(trained)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert (f"--out {trained} holds a `prunekit train` run (its trained model.safetensors): pick another --out"
            in err), err
    assert "--resume" not in err and "resume" not in err, err          # prune --resume refuses a train folder
    assert "--force would delete that trained model" in err, err
    assert contents(trained) == before


def test_prune_out_an_unfinished_train_folder_says_so(unfinished, capsys):
    capsys.readouterr()
    before = contents(unfinished)
    assert main([*PRUNE, "--out", str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a `prunekit train` run (an unfinished training: its epoch checkpoints): " \
        "pick another --out (--force would delete that training run)" in err, err
    assert contents(unfinished) == before


def test_python_prune_out_a_train_folder_names_the_trained_model(trained):
    before = contents(trained)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    model = zoo.build("mlpnet")
    with pytest.raises(PrunekitError) as err:
        prunekit.prune(model, (x, y), sparsity=0.5, out=str(trained))
    message = str(err.value)
    assert "\n" not in message
    assert f"out={str(trained)!r} holds a `prunekit train` run (its trained model.safetensors): pick another out" \
        in message, message
    assert "force=True would delete that trained model" in message and "carry" not in message, message
    assert contents(trained) == before


def test_force_deletes_the_trained_model_as_the_line_says(trained, tmp_path, capsys):
    folder = tmp_path / "mine"
    shutil.copytree(trained, folder)
    trained_model = (folder / "model.safetensors").read_bytes()
    assert main([*PRUNE, "--out", str(folder), "--force", "--json"]) == 0
    capsys.readouterr()
    assert (folder / "metrics.json").is_file() and 'method = "magnitude"' in (folder / "config.toml").read_text()
    assert (folder / "model.safetensors").read_bytes() != trained_model
