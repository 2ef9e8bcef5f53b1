"""A model made from an image folder records its class names, and later folders are labelled by
them: a folder lacking one of the classes keeps the model's label indices (it used to label by its
own sorted names, shifting every label: 0% top-1 with exit 0), and a class the model does not know
is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from prunekit.cli import main
from prunekit.data import load_dataset
from prunekit.errors import PrunekitError

COLOURS = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220)}     # one colour per class: easy to learn
NET = ("from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), "
       "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n")


def write_colours(folder: Path, classes, count: int, seed: int = 0) -> None:
    """``folder/<class>/<k>.png``: 8x8 RGB images of the class's colour plus noise."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for k in range(count):
            pixels = np.clip(np.array(COLOURS.get(name, (128, 128, 128)))
                             + rng.integers(-20, 21, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / name / f"{k}.png")


def test_load_dataset_labels_a_folder_by_the_given_class_names(tmp_path):
    write_colours(tmp_path, ["c", "b"], 2)                  # no "a": b and c keep labels 1 and 2
    ds = load_dataset("imagefolder", tmp_path, "test", classes=["a", "b", "c"])
    assert ds.classes == ["a", "b", "c"] and ds.labels.tolist() == [1, 1, 2, 2]
    assert load_dataset("imagefolder", tmp_path, "test").labels.tolist() == [0, 0, 1, 1]   # none given: its own
    with pytest.raises(PrunekitError, match=r"class folder\(s\) the model was not trained on \(c; it knows a, b\)"):
        load_dataset("imagefolder", tmp_path, "test", classes=["a", "b"])


def _accuracy(capsys, argv) -> float:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["accuracy"]


def test_a_trained_model_labels_later_folders_by_its_recorded_class_names(capsys, tmp_path):
    from prunekit.commands import common
    write_colours(tmp_path / "photos" / "train", COLOURS, 8, seed=0)
    write_colours(tmp_path / "photos" / "test", COLOURS, 4, seed=1)
    (tmp_path / "net.py").write_text(NET)
    spec, trained = f"{tmp_path}/net.py:build", tmp_path / "trained"
    data = ["--data", "imagefolder", "--data-dir"]
    assert main(["train", "--model", spec, *data, str(tmp_path / "photos"), "--normalize", "0.5,0.5,0.5/0.25,0.25,0.25",
                 "--epochs", "30", "--lr", "0.2", "--batch-size", "4", "--out", str(trained), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 100.0        # the colours are learnt
    assert json.loads((trained / "model.json").read_text())["class_names"] == ["a", "b", "c"]
    model = ["--model", spec, "--checkpoint", str(trained)]

    write_colours(tmp_path / "flat", ["b", "c"], 3, seed=2)                      # DIR/<class>/, no "a"
    write_colours(tmp_path / "testonly" / "test", ["b", "c"], 3, seed=3)        # DIR/test/<class>/, no "a"
    assert _accuracy(capsys, ["eval", *model, *data, str(tmp_path / "flat")]) == 100.0      # was 0.00%
    assert _accuracy(capsys, ["eval", *model, *data, str(tmp_path / "testonly")]) == 100.0

    # prune on a folder whose splits both lack "a": judged against the model's labels, and recorded
    write_colours(tmp_path / "two" / "train", ["b", "c"], 8, seed=4)
    write_colours(tmp_path / "two" / "test", ["b", "c"], 3, seed=5)
    assert main(["prune", *model, *data, str(tmp_path / "two"), "--method", "magnitude", "--sparsity", "0.25",
                 "--out", str(tmp_path / "pruned"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dense_accuracy"] == 100.0
    assert json.loads((tmp_path / "pruned" / "model.json").read_text())["class_names"] == ["a", "b", "c"]

    # a class the model never learnt: one line naming it, exit 2
    write_colours(tmp_path / "other", ["b", "d"], 2, seed=6)
    assert main(["eval", *model, *data, str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not trained on (d;" in err and "Traceback" not in err

    # a model that records no names (an older prunekit's): a folder of fewer classes is labelled by
    # its own names, which a missing class shifts; said, and those partial names are not recorded
    sidecar = trained / "model.json"
    sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "class_names"}))
    assert main(["eval", *model, *data, str(tmp_path / "flat")]) == 0
    assert "has 2 class folders but the model has 3 outputs and records no class names" in capsys.readouterr().err
    # following its advice: an empty folder for the missing class keeps the labels (it was refused: "has no images")
    (tmp_path / "flat" / "a").mkdir()
    common.evaluation_split.cache_clear()
    assert _accuracy(capsys, ["eval", *model, *data, str(tmp_path / "flat")]) == 100.0
    assert main(["eval", *model, *data, str(tmp_path / "photos")]) == 0
    assert "class folders" not in capsys.readouterr().err


def test_a_sidecar_with_damaged_class_names_is_refused_in_one_line(capsys, tmp_path):
    import prunekit
    from prunekit import zoo
    from prunekit.saving import save_model
    saved = save_model(zoo.build("mlpnet"), tmp_path / "m.safetensors", {"model": "mlpnet", "class_names": "abc"})
    assert main(["eval", "--checkpoint", str(saved), "--data", "mnist", "--data-dir",
                 str(Path(prunekit.__file__).parent / "assets" / "mnist")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "class_names is not a list of class names" in err


def test_a_resumed_training_over_renamed_class_folders_is_refused(capsys, tmp_path, monkeypatch):
    """`train --out` killed after an epoch, a class folder renamed (a -> z: it now sorts last, so
    every label after it shifts), the same command again: it carried on with the shifted labels
    and recorded the new names for weights half-trained on the old ones. The epoch checkpoint
    records the class names its epochs learned; other names are refused in one line."""
    from prunekit.commands import train as train_command
    write_colours(tmp_path / "photos" / "train", COLOURS, 4, seed=0)
    write_colours(tmp_path / "photos" / "test", COLOURS, 2, seed=1)
    (tmp_path / "net.py").write_text(NET)
    argv = ["train", "--model", f"{tmp_path}/net.py:build", "--data", "imagefolder", "--data-dir",
            str(tmp_path / "photos"), "--normalize", "0.5,0.5,0.5/0.25,0.25,0.25", "--epochs", "2", "--lr", "0.2",
            "--batch-size", "4", "--out", str(tmp_path / "run"), "--json"]
    real_epoch, calls = train_command.train_epoch, []

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main(argv) == 130
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)
    for split in ("train", "test"):
        (tmp_path / "photos" / split / "a").rename(tmp_path / "photos" / split / "z")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "classes of the training data changed since the run" in err and "(a, b, c; now b, c, z)" in err, err
    assert not (tmp_path / "run" / "model.json").exists()           # nothing trained on the shifted labels
    for split in ("train", "test"):                                  # the folders as they were: carried on
        (tmp_path / "photos" / split / "z").rename(tmp_path / "photos" / split / "a")
    assert main(argv) == 0
    assert json.loads((tmp_path / "run" / "model.json").read_text())["class_names"] == ["a", "b", "c"]


def test_a_resumed_prune_over_renamed_class_folders_is_refused(capsys, tmp_path, monkeypatch):
    """A model that records no class names labels a folder by its sorted folder names: a prune run
    interrupted, a class folder renamed, then resumed went on with shifted labels. The run's
    metrics.json records the names it began with; other names are refused in one line."""
    from prunekit import executor
    from prunekit.commands import common
    write_colours(tmp_path / "photos" / "train", COLOURS, 4, seed=0)
    write_colours(tmp_path / "photos" / "test", COLOURS, 2, seed=1)
    (tmp_path / "net.py").write_text(NET)
    out = tmp_path / "run"
    argv = ["prune", "--model", f"{tmp_path}/net.py:build", "--data", "imagefolder", "--data-dir",
            str(tmp_path / "photos"), "--normalize", "0.5,0.5,0.5/0.25,0.25,0.25", "--method", "magnitude",
            "--sparsity", "0.5", "--out", str(out), "--json"]
    prune = executor.prune_weights

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "prune_weights", interrupt)
    assert main(argv) == 130
    assert json.loads((out / "metrics.json").read_text())["class_names"] == ["a", "b", "c"]
    monkeypatch.setattr(executor, "prune_weights", prune)
    for split in ("train", "test"):
        (tmp_path / "photos" / split / "a").rename(tmp_path / "photos" / split / "z")
    common.evaluation_split.cache_clear()      # read once per process: a command line run is a new one
    capsys.readouterr()
    assert main(["prune", "--resume", str(out), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "classes of the data changed since the run" in err and "(a, b, c; now b, c, z)" in err, err
    for split in ("train", "test"):
        (tmp_path / "photos" / split / "z").rename(tmp_path / "photos" / split / "a")
    common.evaluation_split.cache_clear()
    assert main(["prune", "--resume", str(out), "--json"]) == 0
    assert json.loads((out / "model.json").read_text())["class_names"] == ["a", "b", "c"]


def test_more_class_folders_than_outputs_record_no_class_names():
    """An image folder with a folder more than the model's outputs (a run folder made inside the
    data's folder) had all its names recorded: a later folder was labelled by a class the model
    cannot give. None are recorded, and a warning says why."""
    from types import SimpleNamespace

    from torch import nn

    from prunekit.commands.common import note_classes
    from prunekit.errors import PrunekitWarning
    loaded = SimpleNamespace(model=nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), class_names=None)
    args = SimpleNamespace(data="imagefolder", data_dir="imgs")
    with pytest.warns(PrunekitWarning, match=r"imgs has 3 class folders \(a, b, run\) but the model has 2 outputs"):
        note_classes(args, loaded, SimpleNamespace(classes=["a", "b", "run"]))
    assert loaded.class_names is None
    note_classes(args, loaded, SimpleNamespace(classes=["a", "b"]))     # as many as its outputs: recorded
    assert loaded.class_names == ["a", "b"]
