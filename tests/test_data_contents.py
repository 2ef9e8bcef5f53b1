"""A `prune --out` (or `train --out`) run over a data set read whole (MNIST and Fashion-MNIST's IDX files, CIFAR-10's
python batches or ``.npz``) records what its images and labels are (``contents_fingerprint``), so
that a killed run carried on after those files changed is refused in one line, as over an image
folder (tests/test_imagefolder_contents.py). It used to carry on silently: a walk flipped every 7th
byte of MNIST's training images between a kill after stage 1 and `prune --resume`, which printed
"resuming ... after stage 1", exited 0 and pruned stages 2-3 on the other images (81.58% against
the uninterrupted run's 89.95%)."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from prunekit.cli import main

NET = ("from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Conv2d({c}, 4, 1), nn.ReLU(), "
       "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))\n")
RNG = np.random.default_rng(0)


def _idx(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder: Path, compress: bool) -> None:
    for prefix, n in (("train", 8), ("t10k", 6)):
        for stem, array in ((f"{prefix}-images-idx3-ubyte", RNG.integers(0, 256, (n, 28, 28))),
                            (f"{prefix}-labels-idx1-ubyte", RNG.integers(0, 10, n))):
            raw = _idx(array)
            (folder / (f"{stem}.gz" if compress else stem)).write_bytes(gzip.compress(raw) if compress else raw)


def _write_batches(folder: Path) -> None:
    for name, n in [(f"data_batch_{k}", 2) for k in range(1, 6)] + [("test_batch", 6)]:
        batch = {b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in RNG.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def _write_npz(folder: Path) -> None:
    np.savez(folder / "cifar.npz", x_train=RNG.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_train=RNG.integers(0, 10, (8, 1)), x_test=RNG.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
             y_test=RNG.integers(0, 10, 6).astype(np.uint8))


def _flip_idx(folder: Path, stem: str) -> None:
    """Every 7th pixel of an IDX file inverted in place, its size kept (the walk's change)."""
    path = next(folder.glob(f"{stem}*"))
    packed = path.suffix == ".gz"
    raw = bytearray(gzip.decompress(path.read_bytes()) if packed else path.read_bytes())
    for i in range(16, len(raw), 7):
        raw[i] = 255 - raw[i]
    path.write_bytes(gzip.compress(bytes(raw)) if packed else bytes(raw))


def _relabel_idx(folder: Path, stem: str) -> None:
    """Each label of an IDX labels file one class on (its size kept)."""
    path = next(folder.glob(f"{stem}*"))
    raw = bytearray(path.read_bytes())
    for i in range(8, len(raw)):
        raw[i] = (raw[i] + 1) % 10
    path.write_bytes(bytes(raw))


def _relabel_batch(folder: Path, name: str) -> None:
    batch = pickle.loads((folder / name).read_bytes())
    batch[b"labels"] = [(v + 1) % 10 for v in batch[b"labels"]]
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def _change_npz(folder: Path, key: str) -> None:
    with np.load(folder / "cifar.npz") as archive:
        arrays = dict(archive)
    arrays[key] = 255 - arrays[key]
    np.savez(folder / "cifar.npz", **arrays)


# kind: (--data, writer, where --data-dir points under the data folder, change of the test split)
KINDS = {
    "mnist-gz": ("mnist", lambda d: _write_idx(d, True), ".", lambda d: _flip_idx(d, "t10k-images")),
    "fashion-mnist-raw": ("fashion-mnist", lambda d: _write_idx(d, False), ".", lambda d: _relabel_idx(d, "t10k-labels")),
    "cifar10-batches": ("cifar10", _write_batches, ".", lambda d: _relabel_batch(d, "test_batch")),
    "cifar10-npz": ("cifar10", _write_npz, "cifar.npz", lambda d: _change_npz(d, "x_test")),
}


def _setup(tmp_path: Path, kind: str) -> tuple[Path, list[str]]:
    data, write, where, _ = KINDS[kind]
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder)
    channels = 1 if data.endswith("mnist") else 3
    (tmp_path / "net.py").write_text(NET.format(c=channels))
    norm = "/".join([",".join(["0.5"] * channels), ",".join(["0.25"] * channels)])
    argv = ["prune", "--model", f"{tmp_path}/net.py:build", "--data", data, "--data-dir", str(folder / where),
            "--normalize", norm, "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "run"),
            "--json"]
    return folder, argv


def _interrupted(monkeypatch, argv, point: str = "prune_weights") -> None:
    from prunekit import executor

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(executor, point, interrupt)
    assert main(argv) == 130
    monkeypatch.undo()


def _resumed(capsys, out: Path) -> tuple[int, str]:
    from prunekit.commands import common
    common.evaluation_split.cache_clear()        # read once per process: a command line run is a new one
    capsys.readouterr()
    rc = main(["prune", "--resume", str(out), "--json"])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_resumed_prune_over_changed_data_is_refused_and_carries_on_once_it_is_back(kind, capsys, tmp_path,
                                                                                      monkeypatch):
    folder, argv = _setup(tmp_path, kind)
    _interrupted(monkeypatch, argv)
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["data_fingerprint"]
    assert list(recorded) == ["test"] and recorded["test"]["images"] == 6, recorded
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    KINDS[kind][3](folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} != before
    rc, err = _resumed(capsys, tmp_path / "run")
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    where = folder / "cifar.npz" if kind == "cifar10-npz" else folder
    assert f"the images in {where} changed since the run" in err and "the test split" in err, err
    assert "put the files back as they were" in err and "--force" in err, err
    assert not (tmp_path / "run" / "model.json").exists()
    for name, data in before.items():           # put back: carried on
        (folder / name).write_bytes(data)
    rc, err = _resumed(capsys, tmp_path / "run")
    assert rc == 0 and (tmp_path / "run" / "model.json").exists(), err


def test_a_change_to_the_training_split_a_run_reads_is_refused(capsys, tmp_path, monkeypatch):
    """A gradual run fine-tunes on the training split: its images are fingerprinted too (the test
    split's unchanged)."""
    folder, argv = _setup(tmp_path, "mnist-gz")
    argv[-3:-3] = ["--gradual", "--events", "2", "--epochs-per-event", "1", "--final-epochs", "0", "--lr", "0.01",
                   "--batch-size", "4"]
    _interrupted(monkeypatch, argv, "prune_gradual")
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["data_fingerprint"]
    assert sorted(recorded) == ["test", "train"], recorded
    _flip_idx(folder, "train-images")
    rc, err = _resumed(capsys, tmp_path / "run")
    assert rc == 2 and "the train split: its images or labels changed" in err, err


def test_an_older_folder_without_a_fingerprint_of_its_data_is_carried_on_with_one_warning(capsys, tmp_path,
                                                                                        monkeypatch):
    from prunekit import runs
    _, argv = _setup(tmp_path, "mnist-gz")
    argv[-3:-3] = ["--gradual", "--events", "2", "--epochs-per-event", "1", "--final-epochs", "0", "--lr", "0.01",
                   "--batch-size", "4"]
    save = runs.RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.RunCheckpointer, "save", save_then_stop)
    assert main(argv) == 130
    monkeypatch.undo()
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"] and metrics.pop("data_fingerprint")
    (out / "metrics.json").write_text(json.dumps(metrics))
    rc, err = _resumed(capsys, out)
    said = [line for line in err.splitlines() if "fingerprint" in line]
    assert rc == 0 and len(said) == 1 and "recorded no fingerprint of its images" in said[0], err
    assert "data_fingerprint" in json.loads((out / "metrics.json").read_text())      # recorded from now on


def test_the_fingerprint_is_of_the_data_not_its_file_form(tmp_path):
    """The same images gzipped or not give one fingerprint (the pixels are hashed, not the files);
    one pixel changed gives another."""
    from prunekit.data import load_dataset
    from prunekit.data.dataset import contents_fingerprint
    (tmp_path / "a").mkdir()
    _write_idx(tmp_path / "a", True)
    (tmp_path / "b").mkdir()
    for path in (tmp_path / "a").iterdir():
        (tmp_path / "b" / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
    a, b = (contents_fingerprint(load_dataset("mnist", tmp_path / d, "train"), "mnist", tmp_path / d) for d in "ab")
    assert a["sha256"] == b["sha256"] and a["folder"] != b["folder"]
    raw = bytearray((tmp_path / "b" / "train-images-idx3-ubyte").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "b" / "train-images-idx3-ubyte").write_bytes(bytes(raw))
    c = contents_fingerprint(load_dataset("mnist", tmp_path / "b", "train"), "mnist", tmp_path / "b")
    assert c["sha256"] != a["sha256"]


def test_a_resumed_training_over_changed_data_is_refused(capsys, tmp_path, monkeypatch):
    """`train --out`: each epoch checkpoint records the training split's fingerprint; carried on
    after its images changed, refused (put back: carried on)."""
    from prunekit.commands import train as train_command
    folder, argv = _setup(tmp_path, "mnist-gz")
    argv = ["train", *argv[1:argv.index("--method")], "--epochs", "2", "--lr", "0.1", "--batch-size", "4",
            "--out", str(tmp_path / "run"), "--json"]
    real_epoch, calls = train_command.train_epoch, []

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main(argv) == 130
    monkeypatch.undo()
    before = (folder / "train-labels-idx1-ubyte.gz").read_bytes()
    raw = bytearray(gzip.decompress(before))
    raw[8] = (raw[8] + 1) % 10                   # one label changed
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the training images in {folder} changed since the run" in err, err
    assert "its images or labels changed" in err and "put the files back as they were" in err, err
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(before)
    assert main(argv) == 0 and (tmp_path / "run" / "model.safetensors").exists()
