"""Run folders of ``prunekit.prune(model, lambda: loader, out=DIR)`` started by a prunekit before the
replay read a prunekit loader at its pass (``replay.at_pass``, s54): said, never silent.

That version read the user's loader itself, pass after pass, in its own batches; this one reads a
copy at the loader's epoch moved on by the replay's, in ``gate_batch_size`` batches for the channel
methods. A folder killed under it and carried on here mixes the two streams: its model is neither
version's. Such a folder's ``data-rng.json`` has no ``prunekit_loader`` (this version writes
``"at_pass"`` with each stream's states); here it is made by removing that key from a folder this
version wrote."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit import runs
from prunekit.cli import main
from prunekit.data.dataset import ImageDataset
from prunekit.data.loaders import BatchLoader, Normalization
from prunekit.errors import PrunekitWarning

OTHERWISE = "was written by a prunekit that read `lambda: loader` (a function giving a prunekit loader) otherwise: " \
            "carried on, this run's weights match no uninterrupted run (of either version); run it anew with " \
            "force=True for a reproducible result"
OPTIONS = dict(method="chita", sparsity=0.6, stages=3, fisher_samples=16, seed=0)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def _loader() -> BatchLoader:
    """A shuffling prunekit loader of 48 random 3x8x8 images, 3 classes, batches of 16."""
    gen = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 3, (48,), generator=gen), ["a", "b", "c"])
    return BatchLoader(ds, Normalization((0.5,) * 3, (0.25,) * 3), 16, True, False, 1, False)


def _tensors():
    x, y = next(iter(BatchLoader(_loader().dataset, Normalization((0.5,) * 3, (0.25,) * 3), 48, False, False, 0,
                                 False)))
    return x, y


DATA = {       # each a fresh object per call, as a rerun of the script makes it
    "lambda-loader": lambda: (lambda loader: (lambda: loader))(_loader()),
    "loader": _loader,
    "tensors": _tensors,
    "lambda-dataloader": lambda: (lambda dl: (lambda: dl))(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*_tensors()), batch_size=16, shuffle=True)),
}


def _prune(kind: str, out: Path):
    """``prunekit.prune`` on ``DATA[kind]``; the PrunekitWarnings it gave, by message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = prunekit.prune(_net(), DATA[kind](), out=str(out), **OPTIONS)
    return result, [str(w.message) for w in caught if issubclass(w.category, PrunekitWarning)]


def _killed(kind: str, out: Path, monkeypatch) -> None:
    """A run of ``kind`` into ``out`` stopped after its first stage's checkpoint."""
    save = runs.RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.RunCheckpointer, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _prune(kind, out)
    monkeypatch.undo()


def _as_older(folder: Path) -> None:
    """Rewrite ``folder``'s data-rng.json as a prunekit before at_pass wrote it: no ``prunekit_loader``."""
    path = folder / runs.DATA_RNG
    saved = json.loads(path.read_text())
    for entry in saved.values():
        assert entry.pop("prunekit_loader") == "at_pass"        # this version writes the marker
    path.write_text(json.dumps(saved))


def test_an_older_lambda_loader_folder_carried_on_says_its_weights_match_neither_version(tmp_path, monkeypatch):
    """Killed after its first checkpoint: the copy as an older prunekit wrote it warns once (and in
    run.log) naming force=True; the folder as this version wrote it carries on without that warning,
    to the uninterrupted run's model."""
    new, old = tmp_path / "new", tmp_path / "old"
    _killed("lambda-loader", new, monkeypatch)
    shutil.copytree(new, old)
    _as_older(old)
    _, said = _prune("lambda-loader", old)
    assert [m for m in said if "otherwise" in m] == [f"{old} {OTHERWISE}"], said
    assert (old / "run.log").read_text().count(f"{old} {OTHERWISE}") == 1
    resumed, said = _prune("lambda-loader", new)
    assert not [m for m in said if "otherwise" in m], said
    assert "otherwise" not in (new / "run.log").read_text()
    whole, _ = _prune("lambda-loader", tmp_path / "whole")
    a, b = resumed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_older_lambda_loader_folder_is_given_back_with_a_note_that_it_was_read_otherwise(tmp_path):
    """A finished folder is given back as stored (documented), its warning saying that this version
    would compute another model; this version's finished folder is given back without that."""
    new, old = tmp_path / "new", tmp_path / "old"
    first, _ = _prune("lambda-loader", new)
    shutil.copytree(new, old)
    _as_older(old)
    for folder, older in ((old, True), (new, False)):
        again, said = _prune("lambda-loader", folder)
        assert ["lambda: loader` otherwise" in m for m in said if "given back" in m] == [older], said
        assert not [m for m in said if OTHERWISE in m], said
        a, b = again.model.state_dict(), first.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["loader", "tensors", "lambda-dataloader"])
def test_other_data_of_an_older_folder_carries_on_without_the_lambda_loader_warning(kind, tmp_path, monkeypatch):
    """A prunekit loader passed as it is, (X, Y) tensors and ``lambda: DataLoader`` are read as before:
    their folders, the marker removed, carry on without the warning."""
    out = tmp_path / "run"
    _killed(kind, out, monkeypatch)
    if (out / runs.DATA_RNG).exists():           # (a prunekit loader passed as it is keeps no states)
        _as_older(out)
    _, said = _prune(kind, out)
    assert ", after stage 1 from stage-001.safetensors" in (out / "run.log").read_text()
    assert not [m for m in said if "otherwise" in m], said


def test_a_command_line_folder_carries_on_without_the_lambda_loader_warning(tmp_path, monkeypatch, capsys):
    """The command line reads its own loaders (no function of the user's): no such warning."""
    assets = Path(prunekit.__file__).parent / "assets"
    args = ["prune", "--model", "mlpnet", "--checkpoint", str(assets / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(assets / "mnist"), "--train-samples", "256", "--method", "chita", "--sparsity", "0.8",
            "--stages", "2", "--fisher-samples", "32", "--out", str(tmp_path / "run"), "--json"]
    save = runs.RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.RunCheckpointer, "save", save_then_stop)
    assert main(args) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args) == 0
    assert ", after stage 1 from stage-001.safetensors" in (tmp_path / "run" / "run.log").read_text()
    assert "otherwise" not in capsys.readouterr().err


@pytest.mark.parametrize("gate_batch_size, warned", [(16, False), (64, True)])
def test_an_older_autobot_folder_is_warned_only_where_the_older_reading_changes_its_model(
        gate_batch_size, warned, tmp_path, monkeypatch):
    """AutoBot reads one replay pass after pass: the older reading (the user's loader itself, in its
    own batches of 16) gave it the batches this version gives where its gate_batch_size is the
    loader's, and a folder of the older reading carried on ends at the uninterrupted model, with no
    warning (s54 warned); in batches of another size the older reading was another stream: warned."""
    options = dict(method="autobot", flops=0.6, gate_batches=4, finetune_epochs=1, gate_batch_size=gate_batch_size,
                   seed=0)

    def run(out: Path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = prunekit.prune(_net(), DATA["lambda-loader"](), out=str(out), **options)
        return result, [str(w.message) for w in caught if issubclass(w.category, PrunekitWarning)]
    save = runs.RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    old = tmp_path / "old"
    monkeypatch.setattr(runs.RunCheckpointer, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(old)
    monkeypatch.undo()
    _as_older(old)
    carried, said = run(old)
    assert [m for m in said if "otherwise" in m] == ([f"{old} {OTHERWISE}"] if warned else []), said
    if not warned:
        whole, _ = run(tmp_path / "whole")
        a, b = carried.model.state_dict(), whole.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
