"""An image folder without train/ and test/ folders is both splits: it is scanned once and its
pixels decoded and held once, shared by training and evaluation (session 50: a passing run
decoded 10,000 CIFAR-10 JPEGs at 224 twice, 2 x 1.5 GB and ~20 s, and the plan counted both).
Sharing is safe only because nothing changes the images in place: checked by training on them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from prunekit import memory_plan
from prunekit.cli import main
from prunekit.data import imagefolder, load_dataset
from prunekit.data import load as load_module
from prunekit.data.dataset import DeferredImageDataset, pending_bytes
from prunekit.errors import PrunekitError, PrunekitWarning


def write_tree(root: Path, classes: dict[str, int], size=(32, 32), seed=0) -> None:
    """``classes[name]`` RGB PNGs of ``size`` (width, height) per class folder, random pixels."""
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(root / name / f"{k}.png")


@pytest.fixture
def counted(monkeypatch):
    """Scans (``scan_image_folder`` calls), images decoded (``_fitted`` calls) and the bytes each
    memory plan was told are still to load."""
    scans, decoded, told = [], [], []
    real_scan, real_fitted, real_plan = load_module.scan_image_folder, imagefolder._fitted, memory_plan.plan
    monkeypatch.setattr(load_module, "scan_image_folder", lambda *a, **k: scans.append(a[1]) or real_scan(*a, **k))
    monkeypatch.setattr(imagefolder, "_fitted", lambda *a: decoded.append(1) or real_fitted(*a))

    def plan(*args, **kwargs):
        told.append(kwargs.get("data_to_load", 0))
        return real_plan(*args, **kwargs)
    monkeypatch.setattr(memory_plan, "plan", plan)
    return scans, decoded, told


def test_a_folder_without_splits_is_one_data_set_for_both(tmp_path, counted):
    scans, decoded, _ = counted
    write_tree(tmp_path, {"b": 3, "a": 2})
    test = load_dataset("imagefolder", tmp_path, "test", defer=True)
    with pytest.warns(PrunekitWarning, match="no train/ and test/ folders"):      # said as before
        train = load_dataset("imagefolder", tmp_path, "train", defer=True, same_as=test)
    assert train is test and scans == ["test"] and decoded == []
    assert pending_bytes(test, train) == 5 * 3 * 32 * 32                           # planned once
    # a limit not below the count is every image: shared too (and the usual warning of it)
    with pytest.warns(PrunekitWarning) as said:
        assert load_dataset("imagefolder", tmp_path, "train", limit=9, seed=1, defer=True, same_as=test) is test
    assert any("fewer than the 9 asked for" in str(w.message) for w in said)
    # the model's own class names, the folder's: the same labels, shared
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_dataset("imagefolder", tmp_path, "train", classes=["a", "b"], defer=True, same_as=test) is test
        # without defer: its decoded images, decoded once
        eager = load_dataset("imagefolder", tmp_path, "train", same_as=test)
    assert eager is test.dataset and len(decoded) == 5 and scans == ["test"]
    assert torch.equal(eager.images, load_dataset("imagefolder", tmp_path, "test").images)


def test_a_decoded_split_as_same_as_is_refused_not_ignored(tmp_path):
    """same_as=ImageDataset (a split loaded without defer) was silently ignored: the folder was
    scanned and decoded again, with no word. Nothing tells which images a decoded data set holds,
    so it is refused in one line naming defer=True; for a data set read at once it means nothing."""
    write_tree(tmp_path, {"b": 3, "a": 2})
    decoded = load_dataset("imagefolder", tmp_path, "test")
    with pytest.raises(PrunekitError, match=r"same_as must be a split as load_dataset\(\.\.\., defer=True\) "
                                            r"returns it .*got ImageDataset"):
        load_dataset("imagefolder", tmp_path, "train", same_as=decoded)
    mnist = Path(load_module.__file__).parents[1] / "assets" / "mnist"
    test = load_dataset("mnist", mnist, "test")
    assert len(load_dataset("mnist", mnist, "train", limit=8, same_as=test)) == 8


def test_a_limit_takes_its_rows_of_the_shared_images_decoding_none_again(tmp_path, counted):
    scans, decoded, _ = counted
    write_tree(tmp_path, {"b": 4, "a": 3, "c": 3})
    test = load_dataset("imagefolder", tmp_path, "test", defer=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = load_dataset("imagefolder", tmp_path, "train", limit=4, seed=7, defer=True, same_as=test)
        alone = load_dataset("imagefolder", tmp_path, "train", limit=4, seed=7)        # its own scan and decode
    assert scans == ["test", "train"] and len(decoded) == 4
    assert isinstance(train, DeferredImageDataset) and train is not test and len(train) == 4
    assert torch.equal(train.labels, alone.labels) and train.classes == alone.classes == ["a", "b", "c"]
    # planned: the one array and the 4 rows copied out of it; nothing decoded yet
    assert pending_bytes(test, train) == (10 + 4) * 3 * 32 * 32 and len(decoded) == 4
    assert torch.equal(train.images, alone.images) and len(decoded) == 4 + 10      # the test split's decode only
    assert test.decoded and pending_bytes(test, train) == 0
    train.images.zero_()                              # a copy: the shared array is not touched
    assert torch.equal(test.images, load_dataset("imagefolder", tmp_path, "test").images)


@pytest.mark.parametrize("case", ["resize", "crop", "classes", "split folders"])     # a decoded set: refused
def test_other_images_are_scanned_on_their_own(tmp_path, counted, case):
    scans, _, _ = counted
    root = tmp_path / "imgs"
    if case == "split folders":
        write_tree(root / "train", {"a": 2, "b": 2})
        write_tree(root / "test", {"a": 2, "b": 2}, seed=1)
    else:
        write_tree(root, {"a": 3, "b": 3}, size=(40, 36))
    test = load_dataset("imagefolder", root, "test", resize=36 if case == "resize" else None,
                        crop=32 if case == "crop" else None, defer=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = load_dataset("imagefolder", root, "train", classes=["a", "b", "c"] if case == "classes" else None,
                             defer=True, same_as=test)
    assert train is not test and len(scans) == 2
    assert len(train) == (4 if case == "split folders" else 6)
    if case == "classes":
        assert train.classes == ["a", "b", "c"]


def test_the_same_split_twice_is_shared_and_a_missing_one_still_refused(tmp_path, counted):
    scans, _, _ = counted
    write_tree(tmp_path / "train", {"a": 2, "b": 2})
    train = load_dataset("imagefolder", tmp_path, "train", defer=True)
    assert load_dataset("imagefolder", tmp_path, "train", defer=True, same_as=train) is train
    with pytest.raises(Exception, match="has no test/ folder"):
        load_dataset("imagefolder", tmp_path, "test", defer=True, same_as=train)
    assert scans == ["train", "test"]


@pytest.mark.parametrize("train_samples", [None, 6])
def test_prune_on_a_folder_without_splits_scans_plans_and_decodes_it_once(tmp_path, capsys, counted, train_samples):
    scans, decoded, told = counted
    write_tree(tmp_path / "imgs", {"a": 4, "b": 4})
    subset = ["--train-samples", str(train_samples)] if train_samples else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["prune", "--model", "resnet20", "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                     "--method", "chita", "--sparsity", "0.5", "--fisher-samples", "4", "--max-memory", "64G",
                     "--refit-batches", "0", "--json", *subset])
    out = capsys.readouterr().out
    assert code == 0, out
    assert scans == ["test"], scans                   # the training split is the evaluation split's scan
    # counted once: one array will be held (and the rows of --train-samples, copied out of it)
    assert told[0] == (8 + (train_samples or 0)) * 3 * 32 * 32, told
    assert len(decoded) == 8                          # one decode of 8 images, not two
    assert json.loads(out)["sparsity"] == pytest.approx(0.5, rel=1e-3)


def _train(tmp_path: Path, data: Path, name: str) -> dict[str, torch.Tensor]:
    """Train ResNet-20 two augmented epochs on ``data`` (both splits); its weights."""
    out = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", "--model", "resnet20", "--data", "imagefolder", "--data-dir", str(data),
                     "--epochs", "2", "--batch-size", "4", "--lr", "0.05", "--augment", "--seed", "3",
                     "--out", str(out), "--json"])
    assert code == 0
    return load_file(out / "model.safetensors")


def test_training_on_the_shared_images_leaves_evaluation_as_two_decodes_would(tmp_path, capsys, counted,
                                                                                 monkeypatch):
    scans, decoded, _ = counted
    data = tmp_path / "imgs"
    write_tree(data, {"a": 5, "b": 5, "c": 2})
    made = []                                          # every decoded array, to check afterwards
    real_decode = imagefolder.ImageFolderScan.decode
    monkeypatch.setattr(imagefolder.ImageFolderScan, "decode", lambda self: made.append(real_decode(self)) or made[-1])

    shared_weights = _train(tmp_path, data, "shared")
    shared = json.loads(capsys.readouterr().out)
    assert scans == ["train"] and len(decoded) == 12 and len(made) == 1
    # after two epochs of augmented batches, the one array evaluation reads is still the images
    fresh = load_dataset("imagefolder", data, "test")
    assert torch.equal(made[0].images, fresh.images) and torch.equal(made[0].labels, fresh.labels)

    monkeypatch.setattr(load_module, "scans_again", lambda *a, **k: False)   # as before: each split its own
    separate_weights = _train(tmp_path, data, "separate")
    separate = json.loads(capsys.readouterr().out)
    assert len(made) == 4 and torch.equal(made[2].images, made[3].images)    # made[1]: `fresh`
    assert shared["accuracy"] == separate["accuracy"]
    assert shared_weights.keys() == separate_weights.keys()
    for key, value in shared_weights.items():
        assert torch.equal(value, separate_weights[key]), key


def test_augmented_batches_are_new_tensors(tmp_path):
    from prunekit.data import Normalization, make_loader
    write_tree(tmp_path, {"a": 3, "b": 3})
    ds = load_dataset("imagefolder", tmp_path, "test", defer=True)
    before = ds.images.clone()
    for augment, shuffle in ((True, True), (True, False), (False, False)):
        for x, _ in make_loader(ds, Normalization((0.5,) * 3, (0.5,) * 3), batch_size=4, shuffle=shuffle,
                                augment=augment):
            x.add_(1.0)                               # a consumer changing its batch in place
    assert torch.equal(ds.images, before)
    assert isinstance(ds, DeferredImageDataset)
