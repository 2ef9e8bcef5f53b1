"""A run over an image folder records what its images are (``ImageFolderScan.fingerprint``: each
file's path, size and first bytes), so that a killed `train --out` or `prune --out` carried on over
a folder whose images were added, removed or replaced is refused in one line naming what changed.
It used to carry on silently: the epochs (or stages) left trained on other images than the first,
a result equal to neither the old images' uninterrupted run nor the new ones'."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from prunekit.cli import main

COLOURS = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220)}
NET = ("from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), "
       "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n")
NORM = ["--normalize", "0.5,0.5,0.5/0.25,0.25,0.25"]


def _png(path: Path, colour, seed: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-20, 21, (8, 8, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path)


def write_colours(folder: Path, count: int, seed: int = 0) -> None:
    for i, (name, colour) in enumerate(COLOURS.items()):
        (folder / name).mkdir(parents=True)
        for k in range(count):
            _png(folder / name / f"{k}.png", colour, seed * 1000 + i * 100 + k)


def _photos(tmp_path: Path) -> Path:
    write_colours(tmp_path / "photos" / "train", 4, seed=0)
    write_colours(tmp_path / "photos" / "test", 2, seed=1)
    (tmp_path / "net.py").write_text(NET)
    return tmp_path / "photos"


def _train_argv(tmp_path: Path) -> list[str]:
    return ["train", "--model", f"{tmp_path}/net.py:build", "--data", "imagefolder", "--data-dir",
            str(tmp_path / "photos"), *NORM, "--epochs", "2", "--lr", "0.2", "--batch-size", "4",
            "--out", str(tmp_path / "run"), "--json"]


def _killed_after_first_epoch(monkeypatch, argv) -> None:
    from prunekit.commands import train as train_command
    real_epoch, calls = train_command.train_epoch, []

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main(argv) == 130
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)


def _refused(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _add(photos: Path) -> None:
    _png(photos / "train" / "b" / "new.png", COLOURS["a"], 7)        # a red image labelled b


def _remove(photos: Path) -> None:
    (photos / "train" / "c" / "3.png").unlink()


def _replace(photos: Path) -> None:
    path = photos / "train" / "a" / "1.png"          # the same name, other pixels
    _png(path, COLOURS["c"], 9)


CHANGES = {"added": (_add, "1 images added to class b"), "removed": (_remove, "1 images removed from class c"),
           "replaced": (_replace, "images replaced, renamed or changed in class a")}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_resumed_training_over_changed_images_is_refused_naming_the_change(change, capsys, tmp_path,
                                                                             monkeypatch):
    photos = _photos(tmp_path)
    argv = _train_argv(tmp_path)
    _killed_after_first_epoch(monkeypatch, argv)
    backup = tmp_path / "backup"
    shutil.copytree(photos, backup)                 # cp -r: other modification times, the same images
    edit, said = CHANGES[change]
    edit(photos)
    err = _refused(capsys, argv)
    assert "training images in" in err and "changed since the run" in err and said in err, err
    assert "--force" in err and "put the folder back" in err, err
    assert not (tmp_path / "run" / "model.json").exists()          # nothing trained on the other images
    shutil.rmtree(photos)
    shutil.copytree(backup, photos)                                  # put back (a copy: new mtimes): carried on
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["history"][0]["epoch"] == 1
    assert (tmp_path / "run" / "model.json").exists()


def test_a_resumed_training_over_changed_images_can_start_anew_with_force(capsys, tmp_path, monkeypatch):
    photos = _photos(tmp_path)
    argv = _train_argv(tmp_path)
    _killed_after_first_epoch(monkeypatch, argv)
    _add(photos)
    _refused(capsys, argv)
    assert main([*argv, "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["train_images"] == 13


def test_a_finished_training_over_changed_images_gives_its_result_back_as_for_other_data(capsys, tmp_path):
    """As prune does for a finished run whose --data file or checkpoint changed: its stored
    result, with the note that nothing ran and --force runs it anew."""
    photos = _photos(tmp_path)
    argv = _train_argv(tmp_path)
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    _add(photos)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == first and "nothing was trained (--force trains it anew)" in err


def test_an_older_training_checkpoint_without_a_fingerprint_is_carried_on_with_one_warning(capsys, tmp_path,
                                                                                          monkeypatch):
    _photos(tmp_path)
    argv = _train_argv(tmp_path)
    _killed_after_first_epoch(monkeypatch, argv)
    for path in (tmp_path / "run" / "checkpoints").glob("stage-*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            meta = dict(handle.metadata())
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        extra = json.loads(meta["extra"])
        assert extra.pop("data_fingerprint")["images"] == 12      # this version records it
        meta["extra"] = json.dumps(extra)
        save_file(tensors, str(path), metadata=meta)
    capsys.readouterr()
    assert main(argv) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "fingerprint" in line]
    assert len(said) == 1 and "recorded no fingerprint of its training images" in said[0], said
    assert "recorded no fingerprint" in (tmp_path / "run" / "run.log").read_text()


def _prune_argv(tmp_path: Path, *extra) -> list[str]:
    return ["prune", "--model", f"{tmp_path}/net.py:build", "--data", "imagefolder", "--data-dir",
            str(tmp_path / "photos"), *NORM, "--method", "magnitude", "--sparsity", "0.5", *extra,
            "--out", str(tmp_path / "run"), "--json"]


def _interrupted_prune(monkeypatch, argv) -> None:
    from prunekit import executor

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(executor, "prune_weights", interrupt)
    assert main(argv) == 130
    monkeypatch.undo()


@pytest.mark.parametrize("split", ["test", "train"])
def test_a_resumed_prune_over_changed_images_is_refused_naming_the_change(split, capsys, tmp_path, monkeypatch):
    """Interrupted after its dense measurement (on the test images): a change to the test images
    (the dense accuracy's and every stage's) or to the training images (a gradual run's fine-tuning:
    a BatchNorm-free magnitude run reads them only so) is refused on --resume."""
    from prunekit.commands import common
    photos = _photos(tmp_path)
    extra = ["--gradual", "--events", "2", "--epochs-per-event", "1", "--final-epochs", "0", "--lr", "0.01"] \
        if split == "train" else []
    argv = _prune_argv(tmp_path, *extra)
    if split == "train":
        from prunekit import executor
        monkeypatch.setattr(executor, "prune_gradual", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert main(argv) == 130
        monkeypatch.undo()
    else:
        _interrupted_prune(monkeypatch, argv)
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["data_fingerprint"]
    assert sorted(recorded) == (["test", "train"] if split == "train" else ["test"])
    _png(photos / split / "a" / "extra.png", COLOURS["a"], 5)
    common.evaluation_split.cache_clear()        # read once per process: a command line run is a new one
    err = _refused(capsys, ["prune", "--resume", str(tmp_path / "run"), "--json"])
    assert f"images in {photos / split}" in err and "1 images added to class a" in err, err
    assert "put the folder back" in err and "--force" in err, err
    assert not (tmp_path / "run" / "model.json").exists()
    (photos / split / "a" / "extra.png").unlink()
    common.evaluation_split.cache_clear()
    assert main(["prune", "--resume", str(tmp_path / "run"), "--json"]) == 0
    assert (tmp_path / "run" / "model.json").exists()


def test_a_finished_prune_over_changed_images_gives_its_result_back(capsys, tmp_path):
    from prunekit.commands import common
    photos = _photos(tmp_path)
    argv = _prune_argv(tmp_path)
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    _png(photos / "test" / "a" / "extra.png", COLOURS["a"], 5)
    common.evaluation_split.cache_clear()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["accuracy"] == first["accuracy"] and "its result again, nothing was run" in err


def test_an_older_prune_folder_without_a_fingerprint_is_carried_on_with_one_warning(capsys, tmp_path,
                                                                                   monkeypatch):
    from prunekit.commands import common
    _photos(tmp_path)
    out = tmp_path / "run"
    argv = _prune_argv(tmp_path, "--gradual", "--events", "2", "--epochs-per-event", "1", "--final-epochs", "0",
                       "--lr", "0.01")
    from prunekit import runs
    save = runs.RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.RunCheckpointer, "save", save_then_stop)
    assert main(argv) == 130
    monkeypatch.undo()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stages"] and metrics.pop("data_fingerprint")
    (out / "metrics.json").write_text(json.dumps(metrics))
    common.evaluation_split.cache_clear()
    capsys.readouterr()
    assert main(["prune", "--resume", str(out), "--json"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "fingerprint" in line]
    assert len(said) == 1 and "recorded no fingerprint of its images" in said[0], said
    assert "data_fingerprint" in json.loads((out / "metrics.json").read_text())      # recorded from now on


def test_the_fingerprint_sees_changes_but_not_copies(tmp_path):
    from prunekit.data.imagefolder import fingerprint_change, scan_image_folder
    photos = tmp_path / "photos"
    write_colours(photos, 3)
    before = scan_image_folder(photos, "test").fingerprint()
    assert before["images"] == 9 and sorted(before["classes"]) == ["a", "b", "c"]
    copy = tmp_path / "copy"
    shutil.copytree(photos, copy, copy_function=shutil.copyfile)       # no times kept
    os.utime(copy / "a" / "0.png", (1, 1))
    assert fingerprint_change(before, scan_image_folder(copy, "test").fingerprint()) is None
    (photos / "a" / "2.png").rename(photos / "a" / "9.png")            # renamed
    assert fingerprint_change(before, scan_image_folder(photos, "test").fingerprint()) == \
        "images replaced, renamed or changed in class a"
    (photos / "d").mkdir()
    _png(photos / "d" / "0.png", (1, 2, 3), 0)
    said = fingerprint_change(before, scan_image_folder(photos, "test").fingerprint())
    assert said == "images replaced, renamed or changed in class a, class folder d added (1 images)", said


def test_prune_force_over_changed_images_starts_the_unfinished_run_anew(capsys, tmp_path, monkeypatch):
    """--force over the same, unfinished run carries it on (it clears only another run or a finished
    one); over images that changed since it started, it starts the run anew on them, as it says."""
    from prunekit.commands import common
    photos = _photos(tmp_path)
    argv = _prune_argv(tmp_path)
    _interrupted_prune(monkeypatch, argv)
    _png(photos / "test" / "b" / "extra.png", COLOURS["b"], 5)
    common.evaluation_split.cache_clear()
    assert main([*argv, "--force"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["data_fingerprint"]["test"]["images"] == 7
    log = [line.split(" ", 2)[2] for line in (tmp_path / "run" / "run.log").read_text().splitlines()]
    anew = [i for i, line in enumerate(log) if "--force starts it anew" in line]
    assert len(anew) == 1, log
    # the one start line follows; no "resume: ..., after stage 1 from stage-001" logged before the stages went
    assert not any(line.startswith("resume:") for line in log) and log[anew[0] + 1].startswith("start:"), log


def test_a_sweep_resumed_over_changed_images_names_what_a_sweep_takes(capsys, tmp_path, monkeypatch):
    """A sweep's run refused over changed images was told "the original command with --force", and
    `sweep` takes no --force (an argparse error): its refusal names what a sweep takes."""
    from prunekit import executor
    from prunekit.commands import common
    photos = _photos(tmp_path)
    argv = ["sweep", "--model", f"{tmp_path}/net.py:build", "--data", "imagefolder", "--data-dir", str(photos), *NORM,
            "--method", "magnitude", "--sparsity", "0.5", "0.7", "--out", str(tmp_path / "sw"), "--json"]
    monkeypatch.setattr(executor, "prune_weights", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(argv) == 130
    monkeypatch.undo()
    _png(photos / "test" / "a" / "extra.png", COLOURS["a"], 5)
    common.evaluation_split.cache_clear()
    err = _refused(capsys, argv)
    assert "1 images added to class a" in err and "--force" not in err, err
    assert "put the folder back as it was" in err and "run the sweep anew over these images with another --out" in err


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux's /proc/self/io ``rchar``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts bytes read by /proc/self/io")
def test_the_fingerprint_reads_no_more_of_each_image_than_the_scan(tmp_path):
    """The fingerprint read the first 64 KiB of every image where the header scan reads its first
    block (4 KiB): 16 times the scan's bytes on 140 KiB JPEGs (tens of GB at ImageNet's size, at
    each start of a run). It hashes the block the scan read, no more."""
    from PIL import Image
    from prunekit.data.imagefolder import HEAD_BYTES, scan_image_folder
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(10):      # noise: some 100 KiB each, as a photo's JPEG
            Image.fromarray(rng.integers(0, 256, (190, 190, 3), dtype=np.uint8)).save(tmp_path / name / f"{k}.png")
    assert min(p.stat().st_size for p in tmp_path.rglob("*.png")) > 64 * 1024
    before = _bytes_read()
    scan = scan_image_folder(tmp_path, "test")
    scanned = _bytes_read() - before
    before = _bytes_read()
    fingerprint = scan.fingerprint()
    hashed = _bytes_read() - before
    assert fingerprint["images"] == 20 and HEAD_BYTES <= 4096
    slack = 512          # reading /proc/self/io itself
    assert hashed <= scanned + slack and hashed <= 20 * 4096 + slack, (hashed, scanned)


def test_a_finished_training_run_gives_its_result_back_without_fingerprinting_its_images(capsys, tmp_path,
                                                                                         monkeypatch):
    """As prune does: a finished run's result is given back without reading its images' first
    bytes again (train computed the fingerprint at every start, a finished run's too)."""
    from prunekit.data.imagefolder import ImageFolderScan
    _photos(tmp_path)
    argv = _train_argv(tmp_path)
    real, calls = ImageFolderScan.fingerprint, []

    def counted(self):
        calls.append(self.root)
        return real(self)
    monkeypatch.setattr(ImageFolderScan, "fingerprint", counted)
    assert main(argv) == 0
    assert calls == [tmp_path / "photos" / "train"]          # recorded with its epochs
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first and len(calls) == 1


def test_a_finished_training_run_gives_its_result_back_without_decoding_its_images(capsys, tmp_path, monkeypatch):
    """The same `train --out` again after the run finished: its result, said at once, without decoding an
    image (train decoded both splits before it looked at the folder: minutes on a big one); a run still
    to train decodes each split once, as before."""
    from prunekit.data.imagefolder import ImageFolderScan
    _photos(tmp_path)
    argv = _train_argv(tmp_path)
    real, decoded = ImageFolderScan.decode, []

    def counted(self):
        decoded.append(self.root)
        return real(self)
    monkeypatch.setattr(ImageFolderScan, "decode", counted)
    assert main(argv) == 0
    assert sorted(decoded) == [tmp_path / "photos" / "test", tmp_path / "photos" / "train"]
    first = json.loads(capsys.readouterr().out)
    decoded.clear()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == first and decoded == [], decoded
    assert err.count("\n") == 1 and "holds this training run, finished: its result again" in err, err


def test_an_image_that_cannot_be_decoded_is_refused_before_any_epoch_and_frees_the_folder(capsys, tmp_path):
    """Its header read (the scan passes), its pixels cut short: one line naming the file, before any epoch,
    and the run folder claimed for it released, so that the command after the file is fixed may use it."""
    photos = _photos(tmp_path)
    bad = photos / "train" / "b" / "2.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(bad)
    bad.write_bytes(bad.read_bytes()[:50])            # the IHDR chunk whole (33 bytes), the pixel data cut
    err = _refused(capsys, _train_argv(tmp_path))
    assert "cannot decode" in err and "2.png" in err, err
    assert not (tmp_path / "run" / "config.toml").exists() and not (tmp_path / "run" / "model.safetensors").exists()
    _png(bad, COLOURS["b"], 5)
    assert main(_train_argv(tmp_path)) == 0


def test_a_finished_training_run_gives_its_result_back_without_scanning_its_images(capsys, tmp_path, monkeypatch):
    """The same `train --out` again after the run finished: its result, said at once, without scanning
    either split (the scan reads every image's header: minutes on a big folder; it came before the
    folder was looked at) or building the model. --zeros, --force and another run's options go the
    way they went (a scan, then the result, the training or the refusal)."""
    from prunekit.data import load
    _photos(tmp_path)
    argv = _train_argv(tmp_path)
    real, scanned = load.scan_image_folder, []
    monkeypatch.setattr(load, "scan_image_folder", lambda path, split, *a, **k: scanned.append(split) or
                        real(path, split, *a, **k))
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert scanned == ["train", "test"]
    scanned.clear()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == first and scanned == [], scanned
    assert err.count("\n") == 1 and "holds this training run, finished: its result again" in err, err
    assert main(argv + ["--zeros", "train"]) == 0       # what --zeros resolves to needs the weights: scanned
    assert json.loads(capsys.readouterr().out) == first and scanned == ["train", "test"], scanned
    scanned.clear()
    err = _refused(capsys, [a if a != "0.2" else "0.1" for a in argv])      # another run's --lr: refused as before
    assert "holds another training run, finished (other lr)" in err and scanned == ["train", "test"], err
