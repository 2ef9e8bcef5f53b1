"""An image folder is scanned (files, classes, count, shape after --resize / --crop), the memory
plan made counting the images still to decode, and the images decoded only if the plan passes.

Session 50: the README's refusal (MobileNetV1, 10,000 CIFAR-10 JPEGs at 224, --max-memory 16G)
took 42-62 s, nearly all of it decoding both splits (3.0 GB) before the plan refused; now the
plan counts those 3.0 GB as held and refuses in seconds with the same figures."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit import memory_plan
from prunekit.cli import main
from prunekit.data import imagefolder, load_dataset
from prunekit.data.dataset import ImageDataset
from prunekit.params import ParamSpace

RNG = np.random.default_rng(0)


def write_tree(root: Path, classes: dict[str, int], sizes=((32, 32),), mode="RGB", suffix=".png") -> None:
    """``classes[name]`` images per class folder, sizes (width, height) taken in turn."""
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            width, height = sizes[k % len(sizes)]
            pixels = RNG.integers(0, 256, (height, width, 3 if mode == "RGB" else 1), dtype=np.uint8)
            Image.fromarray(pixels if mode == "RGB" else pixels[..., 0], mode).save(root / name / f"{k}{suffix}")


@pytest.mark.parametrize("mode,sizes,resize,crop,suffix", [
    ("RGB", ((32, 32),), None, None, ".png"),
    ("RGB", ((48, 40), (40, 48)), 36, 32, ".jpg"),     # different sizes brought to one
    ("L", ((30, 20),), 24, None, ".png"),              # grayscale, resized: 36 x 24
])
def test_the_scan_plans_the_bytes_the_decoding_takes(tmp_path, mode, sizes, resize, crop, suffix):
    write_tree(tmp_path, {"b": 3, "a": 2}, sizes, mode, suffix)
    scan = imagefolder.scan_image_folder(tmp_path, "test", resize, crop)
    decoded = scan.decode()
    assert scan.planned_bytes == decoded.images.numpy().nbytes == decoded.images.numel()
    assert (len(scan), scan.image_shape) == (5, decoded.image_shape)
    assert torch.equal(scan.labels, decoded.labels) and scan.classes == decoded.classes == ["a", "b"]
    whole = load_dataset("imagefolder", tmp_path, resize=resize, crop=crop)     # decoded at once, as before
    assert isinstance(whole, ImageDataset) and torch.equal(whole.images, decoded.images)


def test_a_deferred_folder_decodes_on_first_use_only_and_once(tmp_path, monkeypatch):
    from prunekit.data import Normalization, make_loader
    from prunekit.data.dataset import DeferredImageDataset, pending_bytes
    write_tree(tmp_path, {"a": 2, "b": 3})
    decodes = []
    real = imagefolder._fitted
    monkeypatch.setattr(imagefolder, "_fitted", lambda *a: decodes.append(1) or real(*a))
    ds = load_dataset("imagefolder", tmp_path, defer=True)
    assert isinstance(ds, DeferredImageDataset) and decodes == []
    assert (len(ds), ds.image_shape, ds.classes, ds.labels.tolist()) == (5, (3, 32, 32), ["a", "b"], [0, 0, 1, 1, 1])
    assert ds.pending_bytes == 5 * 3 * 32 * 32 and decodes == []
    loader = make_loader(ds, Normalization((0.5,) * 3, (0.5,) * 3))
    other = load_dataset("imagefolder", tmp_path, defer=True)
    # one array however often it is given, directly or through its loader; a decoded data set adds nothing
    assert pending_bytes(ds, loader) == ds.pending_bytes and pending_bytes(ds, other) == 2 * ds.pending_bytes
    assert pending_bytes(load_dataset("imagefolder", tmp_path), (torch.zeros(2), torch.zeros(2))) == 0
    decodes.clear()
    images = ds.images
    assert len(decodes) == 5 and ds.pending_bytes == 0 and images.shape == (5, 3, 32, 32)
    assert ds.images is images and len(decodes) == 5                    # once
    assert torch.equal(images, load_dataset("imagefolder", tmp_path).images)
    assert torch.equal(ds.subset(2, seed=1).images, load_dataset("imagefolder", tmp_path).subset(2, seed=1).images)


def test_the_plan_counts_data_still_to_load_as_held(monkeypatch):
    monkeypatch.setattr(memory_plan, "current_usage", lambda device: 300 * 2**20)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 20), torch.nn.ReLU(), torch.nn.Linear(20, 4))
    space, example = ParamSpace(model), torch.zeros(1, 3, 4, 4)
    held = memory_plan.plan(model, space, example, n=8, max_memory="100G")
    later = memory_plan.plan(model, space, example, n=8, max_memory="100G", data_to_load=700 * 2**20)
    assert held.resident == 300 * 2**20 and later.resident == held.resident + 700 * 2**20
    assert later.total == held.total + 700 * 2**20
    limit = held.total + 350 * 2**20       # fits with the data held, not with the data still to load counted too
    assert memory_plan.plan(model, space, example, n=8, max_memory=limit).fits()
    with pytest.raises(memory_plan.PrunekitError, match="max_memory"):
        memory_plan.plan(model, space, example, n=8, max_memory=limit, data_to_load=700 * 2**20)


@pytest.fixture
def counted_decoding(monkeypatch):
    """The images decoded (each through imagefolder._fitted) and the bytes each memory plan was
    told are still to load."""
    decoded, told = [], []
    real_fitted, real_plan = imagefolder._fitted, memory_plan.plan
    monkeypatch.setattr(imagefolder, "_fitted", lambda *a: decoded.append(1) or real_fitted(*a))

    def plan(*args, **kwargs):
        told.append(kwargs.get("data_to_load", 0))
        return real_plan(*args, **kwargs)
    monkeypatch.setattr(memory_plan, "plan", plan)
    return decoded, told


def test_a_folder_too_big_for_the_plan_is_refused_before_any_image_is_decoded(tmp_path, capsys, counted_decoding):
    decoded, told = counted_decoding
    write_tree(tmp_path / "imgs", {"a": 4, "b": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["prune", "--model", "resnet20", "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                     "--method", "chita", "--sparsity", "0.5", "--fisher-samples", "8", "--max-memory", "1M",
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "prunekit: error: this request needs about" in err and "Traceback" not in err, err
    assert decoded == [], f"{len(decoded)} images decoded before the refusal"
    # a folder without train/ and test/ is both splits, one array: 8 images of 3 x 32 x 32, counted once as held
    assert told == [8 * 3 * 32 * 32]
    assert not (tmp_path / "run").exists()


def test_a_plan_that_passes_decodes_and_runs_as_before(tmp_path, capsys, counted_decoding):
    decoded, told = counted_decoding
    write_tree(tmp_path / "imgs", {"a": 4, "b": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["prune", "--model", "resnet20", "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                     "--method", "chita", "--sparsity", "0.5", "--fisher-samples", "8", "--max-memory", "64G",
                     "--refit-batches", "0", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    record = json.loads(out)
    assert told[0] == 8 * 3 * 32 * 32 and told[1:] and all(t == 0 for t in told[1:])   # decoded by then
    assert len(decoded) == 8                         # both splits one array, decoded once, after the first plan
    assert record["sparsity"] == pytest.approx(0.5, rel=1e-3)



@pytest.fixture
def scanned_splits(monkeypatch):
    """The splits of image folders scanned (each through load.scan_image_folder)."""
    from prunekit.data import load
    splits, real = [], load.scan_image_folder
    monkeypatch.setattr(load, "scan_image_folder", lambda path, split, *a, **k: splits.append(split) or
                        real(path, split, *a, **k))
    return splits


@pytest.mark.parametrize("command", ["prune", "sweep"])
def test_a_run_that_reads_no_training_images_neither_loads_nor_needs_them(tmp_path, capsys, scanned_splits,
                                                                           command):
    """magnitude without BatchNorm recalibration reads no training image: the memory plan's bytes to
    load counted the training split anyway (scanning it, and refusing a folder with only test/ for
    "no train/ folder", which ran before) -- a folder with only test/ prunes, and with train/ too,
    the training split is never scanned."""
    write_tree(tmp_path / "only" / "test", {"a": 3, "b": 3})
    write_tree(tmp_path / "both" / "test", {"a": 3, "b": 3})
    write_tree(tmp_path / "both" / "train", {"a": 3, "b": 3})
    budget = ["--sparsity", "0.5", "0.7"] if command == "sweep" else ["--sparsity", "0.5"]
    for folder in ("only", "both"):
        scanned_splits.clear()
        code = main([command, "--model", "resnet20", "--data", "imagefolder", "--data-dir", str(tmp_path / folder),
                     "--method", "magnitude", *budget, "--no-bn-recalibration", "--out", str(tmp_path / f"r_{folder}"),
                     "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert scanned_splits == ["test"], scanned_splits
    result = json.loads(out)
    kept = [run["sparsity"] for run in result["runs"]] if command == "sweep" else [result["sparsity"]]
    assert sorted(kept) == pytest.approx([0.5, 0.7] if command == "sweep" else [0.5], rel=1e-3)


@pytest.mark.parametrize("command", ["prune", "sweep"])
@pytest.mark.parametrize("flags, refusal, scanned", [
    (["--method", "chita", "--sparsity", "0.5", "--fisher-samples", "8", "--stages", "0"], "--stages must be at least 1",
     []),
    (["--method", "falcon", "--sparsity", "0.5", "--fisher-samples", "8"], "falcon needs a --flops budget", []),
    # checked against the traced model's MACs: a zoo model's example input is its own, so before the
    # test split's scan too (session 54; it came after it)
    (["--method", "chita", "--sparsity", "0.5", "--fisher-samples", "8", "--gradual", "--start-keep", "0.1"],
     "--start-keep 0.1 is the share kept before the first event", []),
])
def test_a_bad_value_is_refused_before_the_training_split_is_scanned(tmp_path, capsys, scanned_splits, command,
                                                                     flags, refusal, scanned):
    """A refusal that needs no image (a flag value, a budget the method cannot take) comes before the
    training split's scan (every image header: minutes on a huge train/ folder), which the rows check
    (--fisher-samples given) and the memory plan ran first; one that needs neither the model traced
    nor data (PruneRequest.check_values) before the test split's too, which came first of all
    (session 53). One line, nothing written."""
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2})
    write_tree(tmp_path / "imgs" / "train", {"a": 5, "b": 5})      # more than the 8 rows asked
    code = main([command, "--model", "resnet20", "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                 *flags, "--out", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]
    assert code == 2 and len(errors) == 1, errors
    assert refusal in errors[0], errors
    assert scanned_splits == scanned, scanned_splits
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, budget", [("prune", ["--sparsity", "1.5"]), ("sweep", ["--sparsity", "0.5", "1.5"])])
def test_a_bad_value_is_refused_before_a_model_files_input_shape_is_read_from_the_test_split(
        tmp_path, capsys, scanned_splits, command, budget):
    """With a model file (--model net.py:FUNCTION) the test split was scanned first (the model's
    input shape is the evaluation images'), then the budget value refused: it comes first now, as
    for a zoo model. One line, nothing written."""
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2})
    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef small():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), "
                                     "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n")
    code = main([command, "--model", f"{tmp_path}/net.py:small", "--normalize", "0.5,0.5,0.5/0.5,0.5,0.5", "--data",
                 "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--method", "magnitude", *budget,
                 "--out", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]
    assert code == 2 and len(errors) == 1 and "--sparsity '1.5' is out of range" in errors[0], errors
    assert scanned_splits == [], scanned_splits
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("budget, refusal, scanned", [
    (["--sparsity", "0.5", "1.5"], "--sparsity '1.5' is out of range", []),
    # needs the traced model (its count of weights), not the data: a zoo model's before either split (session 54)
    (["--sparsity", "0.5", "900M"], "--sparsity 900000000 weights to keep is out of range", []),
    (["--sparsity", "900M"], "--sparsity 900000000 weights to keep is out of range", []),      # one run: its plan's
])
def test_a_later_run_of_a_sweep_is_checked_before_the_first_reads_its_data(tmp_path, capsys, scanned_splits,
                                                                           budget, refusal, scanned):
    """A sweep refused its second run's bad budget only after its first run's plan had scanned the
    training split (chita reads it): every run's values are checked before any split is scanned, and
    every run's checks on the traced model before the training split is. One line, nothing written."""
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2})
    write_tree(tmp_path / "imgs" / "train", {"a": 5, "b": 5})
    code = main(["sweep", "--model", "resnet20", "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                 "--method", "chita", *budget, "--fisher-samples", "8", "--out", str(tmp_path / "sweep")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]
    assert code == 2 and len(errors) == 1 and refusal in errors[0], errors
    assert scanned_splits == scanned, scanned_splits
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("flags, refusal", [
    (["--method", "chita", "--sparsity", "900M", "--fisher-samples", "8"], "900000000 weights to keep is out of range"),
    (["--method", "taper", "--flops", "900M"], "--flops 900000000 MACs is infeasible"),    # a channel method's
])
def test_prune_refuses_a_budget_past_the_model_before_either_split_is_scanned(tmp_path, capsys, scanned_splits,
                                                                              flags, refusal):
    """A budget that needs the traced model to refuse (more weights or MACs kept than it has) was
    refused after the test split's scan (every image header: minutes on a huge folder); a zoo
    model's example input is its own, so it is refused before either split is scanned (session 54)."""
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2})
    write_tree(tmp_path / "imgs" / "train", {"a": 5, "b": 5})
    code = main(["prune", "--model", "resnet20", "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                 *flags, "--out", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]
    assert code == 2 and len(errors) == 1 and refusal in errors[0], errors
    assert scanned_splits == [], scanned_splits
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["prune", "sweep"])
def test_a_model_files_budget_past_it_is_refused_after_its_test_split_as_before(tmp_path, capsys, scanned_splits,
                                                                                 command):
    """A model file's input shape is its evaluation images' (and its forward is checked on them before
    the trace): its traced checks stay after the test split's scan, before the training split's."""
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2})
    write_tree(tmp_path / "imgs" / "train", {"a": 5, "b": 5})
    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef small():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), "
                                     "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n")
    budget = ["--sparsity", "0.5", "900M"] if command == "sweep" else ["--sparsity", "900M"]
    code = main([command, "--model", f"{tmp_path}/net.py:small", "--normalize", "0.5,0.5,0.5/0.5,0.5,0.5", "--data",
                 "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--method", "chita", "--fisher-samples", "8",
                 *budget, "--out", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]
    assert code == 2 and len(errors) == 1 and "900000000 weights to keep is out of range" in errors[0], errors
    assert scanned_splits == ["test"], scanned_splits
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, refusal", [
    (["--checkpoint", "missing.pth"], "checkpoint missing.pth not found: check the path"),
    (["--model", "net.py:build", "--normalize", "bogus"], "--normalize 'bogus' is not MEANS/STDS"),
    (["--model", "net.py:"], "is not a Python function name"),
    # session 53: these came after both splits were scanned
    (["--model", "missing.py:build", "--normalize", "none"], "model file missing.py does not exist"),
    (["--model", "resnet21"], "unknown model 'resnet21'"),
    (["--normalize", "none"], "--normalize is for a model file (net.py:function); zoo model 'resnet20'"),
    (["--checkpoint", "pickled.pth"], "checkpoint pickled.pth holds no state dict"),
    (["--checkpoint", "noise.pth"], "noise.pth is not a model checkpoint"),
    (["--batch-size", "7"], "--batch-size 7 is more than the 6 imagefolder training images: lower --batch-size"),
    (["--batch-size", "5", "--train-samples", "4"], "--batch-size 5 is more than the 4 imagefolder training images"),
    (["--batch-size", "7", "--train-samples", "9"], "--batch-size 7 is more than the 6 imagefolder training images"),
])
def test_train_refuses_a_bad_flag_before_scanning_the_image_folder(tmp_path, capsys, monkeypatch, scanned_splits,
                                                                   flags, refusal):
    """train's refusals that need no image (a --checkpoint path that is no file, a --normalize that is
    not MEANS/STDS, a model file spec without a function) come before the scan of either split."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Flatten(), "
                                     "nn.Linear(3 * 32 * 32, 2))\n")
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2})
    write_tree(tmp_path / "imgs" / "train", {"a": 3, "b": 3})
    torch.save({"sd": {}, "opt": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}, "pickled.pth")
    Path("noise.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    model = [] if "--model" in flags else ["--model", "resnet20"]
    code = main(["train", *model, "--data", "imagefolder", "--data-dir", "imgs", *flags, "--out", "run"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]
    assert code == 2 and len(errors) == 1 and refusal in errors[0], errors
    assert scanned_splits == [], scanned_splits
    assert not (tmp_path / "run").exists()


def _train_refusal(tmp_path, capsys, flags, mode="RGB"):
    """``prunekit train`` on a folder of 2 classes (train/: 3 images each, test/: 2) in ``mode``:
    its exit code and its error lines."""
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2}, mode=mode)
    write_tree(tmp_path / "imgs" / "train", {"a": 3, "b": 3}, mode=mode)
    code = main(["train", "--data", "imagefolder", "--data-dir", "imgs", "--batch-size", "2", *flags, "--epochs", "1",
                 "--out", "run"])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_train_refuses_a_checkpoint_that_does_not_fit_before_scanning_the_image_folder(tmp_path, capsys, monkeypatch,
                                                                                        scanned_splits, mode):
    """A --checkpoint that loads but does not fit the zoo model built for the folder (its weights
    of another class count; a prunekit file of another zoo model) was refused once both splits were
    scanned (every image header: minutes on a huge folder); now before either, in the same words
    (the model built on the meta device with the listing's class count, the channels from the first
    image headers; where they are all grayscale, a refusal that is the same for 1 and 3 channels)."""
    from prunekit.loading import load_model
    from prunekit.saving import save_model
    from prunekit.zoo import build
    monkeypatch.chdir(tmp_path)
    if mode == "RGB":
        torch.save(build("resnet20", num_classes=5).state_dict(), "five.pth")
        checkpoint, said = "five.pth", "does not fit model 'resnet20'"
    else:
        save_model(build("resnet32", num_classes=2, in_channels=1), "r32.safetensors",
                   {"model": "resnet32", "build_kwargs": {"num_classes": 2, "in_channels": 1},
                    "input_shape": [1, 32, 32], "normalization": {"mean": [0.5], "std": [0.5]}})
        checkpoint, said = "r32.safetensors", "holds a 'resnet32' model, not 'resnet20'"
    with pytest.raises(Exception) as expected:      # what load_model says once the data is known
        load_model("resnet20", checkpoint, num_classes=2, in_channels=1 if mode == "L" else 3)
    code, errors = _train_refusal(tmp_path, capsys, ["--model", "resnet20", "--checkpoint", checkpoint], mode)
    assert code == 2 and errors == [f"prunekit: error: {expected.value}"], (errors, expected.value)
    assert said in errors[0], errors
    assert scanned_splits == [], scanned_splits
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("checkpoint_classes", [5, 2])
def test_train_refuses_an_all_grayscale_folder_that_a_checkpoint_does_not_fit_before_scanning(
        tmp_path, capsys, monkeypatch, scanned_splits, checkpoint_classes):
    """Grayscale images at the head of the folder do not say its channels (one colour image later
    makes them 3): where 1 channel does not fit a plain checkpoint (of 5 classes: its conv1 and head;
    of the folder's 2: its conv1 alone, 3 channels fitting), the headers are read on, and an
    all-grayscale folder is refused before either split's scan (it was after both, s54), in the
    words load_model uses with 1 channel."""
    from prunekit.loading import load_model
    from prunekit.zoo import build
    monkeypatch.chdir(tmp_path)
    torch.save(build("resnet20", num_classes=checkpoint_classes).state_dict(), "plain.pth")
    with pytest.raises(Exception) as expected:
        load_model("resnet20", "plain.pth", num_classes=2, in_channels=1)
    code, errors = _train_refusal(tmp_path, capsys, ["--model", "resnet20", "--checkpoint", "plain.pth"], "L")
    assert code == 2 and errors == [f"prunekit: error: {expected.value}"], (errors, expected.value)
    assert "conv1.weight" in errors[0], errors
    assert scanned_splits == [], scanned_splits
    assert not (tmp_path / "run").exists()


def test_train_reads_the_channels_of_a_grayscale_headed_folder_with_a_colour_image_later(tmp_path, capsys,
                                                                                          monkeypatch, scanned_splits):
    """A folder whose first 8 train images are grayscale and whose 9th is in colour is RGB: a
    checkpoint of 3 channels and the folder's 2 classes fits it (trained, both splits scanned),
    and one of 5 classes is refused in the 3-channel words (its head alone), before the scans. An
    all-grayscale test split of such a folder is refused before any epoch (it was after training)."""
    from prunekit.loading import load_model
    from prunekit.zoo import build
    monkeypatch.chdir(tmp_path)
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2}, mode="L")
    write_tree(tmp_path / "imgs" / "train", {"a": 4, "b": 4}, mode="L")
    write_tree(tmp_path / "imgs" / "train", {"c": 1}, mode="RGB")        # the 9th image in walking order
    (tmp_path / "imgs" / "test" / "c").mkdir()
    write_tree(tmp_path / "imgs" / "test", {"c": 1}, mode="L")
    for classes in (3, 5):
        torch.save(build("resnet20", num_classes=classes).state_dict(), f"plain{classes}.pth")
    with pytest.raises(Exception) as expected:
        load_model("resnet20", "plain5.pth", num_classes=3, in_channels=3)
    scanned_splits.clear()
    code = main(["train", "--data", "imagefolder", "--data-dir", "imgs", "--batch-size", "3", "--model", "resnet20",
                 "--checkpoint", "plain5.pth", "--epochs", "1", "--out", "run5"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]
    assert code == 2 and errors == [f"prunekit: error: {expected.value}"], (errors, expected.value)
    assert "conv1" not in errors[0] and scanned_splits == [], (errors, scanned_splits)
    code = main(["train", "--data", "imagefolder", "--data-dir", "imgs", "--batch-size", "3", "--model", "resnet20",
                 "--checkpoint", "plain3.pth", "--epochs", "1", "--out", "run3"])
    said = capsys.readouterr().err
    assert code == 2 and "epoch 1" not in said, said       # an all-grayscale test split: refused before training
    assert said.strip().splitlines()[-1] == ("prunekit: error: the imagefolder test images are (1, 32, 32) (C,H,W) "
                                             "but model 'resnet20' takes (3, 32, 32): pick the data set the model "
                                             "was made for, or another model"), said
    write_tree(tmp_path / "imgs" / "test", {"c": 1}, mode="RGB")        # the test split in colour too
    scanned_splits.clear()
    code = main(["train", "--data", "imagefolder", "--data-dir", "imgs", "--batch-size", "3", "--model", "resnet20",
                 "--checkpoint", "plain3.pth", "--epochs", "1", "--out", "run3b"])
    assert code == 0, capsys.readouterr().err
    assert scanned_splits == ["train", "test"], scanned_splits


@pytest.mark.parametrize("source, refusal", [
    ("from torch import nn\n\n\ndef other():\n    return nn.Linear(2, 2)\n",
     "net.py defines no function 'build'; it defines other"),
    ("raise ValueError('no model here')\n", "importing net.py failed: ValueError: no model here (net.py line 1)"),
    ("def build(width):\n    pass\n", "net.py:build needs arguments (width)"),
])
def test_train_refuses_a_model_file_without_its_function_before_scanning_the_image_folder(
        tmp_path, capsys, monkeypatch, scanned_splits, source, refusal):
    """A model file that does not define the function --model names (or does not import, or whose
    function needs arguments) was refused when the model was built, after both splits' scans; it is
    imported before them now (once: the build takes that module). One line, nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(source)
    code, errors = _train_refusal(tmp_path, capsys, ["--model", "net.py:build", "--normalize", "none"])
    assert code == 2 and len(errors) == 1 and refusal in errors[0], errors
    assert scanned_splits == [], scanned_splits
    assert not (tmp_path / "run").exists()


def test_train_imports_a_model_file_once_and_builds_it_after_the_scan(tmp_path, capsys, monkeypatch, scanned_splits):
    """The import before the scan is the one the model is built from: the file runs once per call
    (a second call imports it afresh, an edit seen); its function is called once, after the scan."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(
        "from pathlib import Path\nfrom torch import nn\n\nwith open('imports.txt', 'a') as f:\n    f.write('i')\n\n\n"
        "def build():\n    with open('imports.txt', 'a') as f:\n        f.write('b')\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))\n")
    code, errors = _train_refusal(tmp_path, capsys, ["--model", "net.py:build", "--normalize", "none"])
    assert code == 0 and errors == [], errors
    assert (tmp_path / "imports.txt").read_text() == "ib" and scanned_splits == ["train", "test"]
    code = main(["train", "--model", "net.py:build", "--normalize", "none", "--data", "imagefolder", "--data-dir",
                 "imgs", "--batch-size", "2", "--epochs", "1", "--json"])
    assert code == 0 and (tmp_path / "imports.txt").read_text() == "ibib"


def test_a_sweep_traces_its_model_once_for_every_run(tmp_path, capsys, monkeypatch):
    """A sweep of 3 runs traced its model 9 times (each run's checks, each run's plan before the
    first run, each run's own plan): traced once now, every plan taking a copy of that trace; its
    runs' results are those of prune runs with the same flags (each tracing its own model)."""
    from prunekit import request
    traced = []

    class Traced(request.CostModel):
        def __init__(self, *args, **kwargs):
            traced.append(True)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(request, "CostModel", Traced)
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2})
    flags = ["--model", "resnet20", "--data", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--method",
             "magnitude", "--no-bn-recalibration", "--json"]
    code = main(["sweep", *flags, "--sparsity", "0.3", "0.5", "0.7", "--out", str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    assert code == 0 and len(traced) == 1, len(traced)
    swept = {run["sparsity"]: run for run in json.loads(out)["runs"]}
    for share in ("0.3", "0.7"):
        traced.clear()
        assert main(["prune", *flags, "--sparsity", share, "--out", str(tmp_path / f"prune{share}")]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert len(traced) == 1
        assert swept[alone["sparsity"]]["flops_kept"] == alone["flops_kept"]
        name = "magnitude_sparsity-" + share
        assert ((tmp_path / "sweep" / name / "model.safetensors").read_bytes()
                == (tmp_path / f"prune{share}" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("command", ["prune", "sweep"])
def test_a_training_split_read_only_for_batchnorm_is_refused_naming_no_bn_recalibration(tmp_path, capsys, command):
    """magnitude with BatchNorm recalibration (resnet20 has BatchNorm) on a folder with only test/:
    one line naming both fixes (the folder, --no-bn-recalibration), nothing written."""
    write_tree(tmp_path / "only" / "test", {"a": 3, "b": 3})
    code = main([command, "--model", "resnet20", "--data", "imagefolder", "--data-dir", str(tmp_path / "only"),
                 "--method", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]
    assert code == 2 and len(errors) == 1, errors
    assert "no train/ folder" in errors[0] and "--no-bn-recalibration prunes without it" in errors[0], errors
    assert not (tmp_path / "run").exists()


def test_a_plan_memory_of_the_earlier_five_argument_form_still_works_and_counts_the_data(monkeypatch):
    """A user's Method(plan_memory=f) with f(model, space, example_input, budget, options), the form
    documented before data_to_load, got TypeError "unexpected keyword argument 'data_to_load'" from
    every prunekit.prune. It is called with its five arguments; data still to load is added to the
    MemoryPlan it returns (refused when that no longer fits), or warned of when it returns none; a
    plan_memory taking data_to_load is told it."""
    import prunekit
    from prunekit.errors import PrunekitWarning
    from prunekit.methods import Method, lookup
    from prunekit.request import PruneRequest
    monkeypatch.setattr(memory_plan, "current_usage", lambda device: 300 * 2**20)
    base = lookup("magnitude")
    calls = []

    def old_form(model, space, example_input, budget, options):
        calls.append("old")
        return memory_plan.plan(model, space, example_input, n=8, max_memory=limit)

    def returns_nothing(model, space, example_input, budget, options):
        calls.append("none")

    def new_form(model, space, example_input, budget, options, data_to_load=0):
        calls.append(data_to_load)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    example = torch.zeros(1, 12)
    limit = memory_plan.plan(model, ParamSpace(model), example, n=8, max_memory="100G").total + 350 * 2**20
    mine = {f.__name__: Method(f"mag-{f.__name__}", "weights", base.options, base.run, "", plan_memory=f)
            for f in (old_form, returns_nothing, new_form)}
    X, Y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    pruned = prunekit.prune(model, (X, Y), method=mine["old_form"], sparsity=0.5)       # was TypeError
    assert calls == ["old"] and pruned.sparsity == pytest.approx(0.5, rel=0.05)
    request = lambda method, data: PruneRequest(model, example, method, {"sparsity": 0.5},   # noqa: E731
                                                data_to_load=data)
    request(mine["old_form"], 300 * 2**20).plan()                   # fits with the data counted
    with pytest.raises(prunekit.PrunekitError, match="700 MB of data still to decode"):
        request(mine["old_form"], 700 * 2**20).plan()
    with pytest.warns(PrunekitWarning, match="leaves out the 700 MB of data still to decode"):
        request(mine["returns_nothing"], 700 * 2**20).plan()
    calls.clear()
    request(mine["new_form"], 700 * 2**20).plan()
    assert calls == [700 * 2**20]


@pytest.mark.parametrize("method", ["falcon", "falcon++", "taper"])
def test_a_method_needing_flops_is_refused_before_the_model_is_traced(tmp_path, capsys, monkeypatch, method):
    """FALCON without --flops: its refusal needs no model, so it comes before the cost model's trace
    of the model (5 s of a 20 s refusal on ResNet-20-B in a walk-through; taper's came first already)."""
    from prunekit import request
    traced = []

    class Traced(request.CostModel):
        def __init__(self, *args, **kwargs):
            traced.append(True)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(request, "CostModel", Traced)
    assets = Path(__import__("prunekit").__file__).parent / "assets"
    code = main(["prune", "--model", "mlpnet", "--checkpoint", str(assets / "mlpnet.safetensors"), "--data", "mnist",
                 "--data-dir", str(assets / "mnist"), "--method", method, "--sparsity", "0.5",
                 "--out", str(tmp_path / "run")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunekit: error")]
    assert code == 2 and len(errors) == 1 and method in errors[0] and "--flops" in errors[0], errors
    assert traced == [], "traced before the refusal"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, options", [("woodfisher", {}), ("chita", {"block_size": 64})])
def test_what_torchrun_cannot_shard_is_refused_before_the_model_is_traced(monkeypatch, method, options):
    """woodfisher and block_size under torchrun (every column of X in one process): refused from
    the method and its options alone, before the cost model's trace (it came after it)."""
    from types import SimpleNamespace
    from prunekit import request
    traced = []

    class Traced(request.CostModel):
        def __init__(self, *args, **kwargs):
            traced.append(True)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(request, "CostModel", Traced)
    monkeypatch.setattr(request.distributed, "current", lambda: SimpleNamespace(distributed=True))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    asked = request.PruneRequest(model, torch.zeros(1, 16), method, {"sparsity": "0.5"}, options=options)
    with pytest.raises(request.OptionError, match="run them without torchrun"):
        asked.plan()
    assert traced == [], "traced before the refusal"


def test_train_reads_its_checkpoint_once_and_counts_the_images_it_batches(tmp_path, capsys, monkeypatch,
                                                                          scanned_splits):
    """The checkpoint train reads before the scan (refusing a file that does not load) is the one its
    model loads: read from disk once. A --batch-size of exactly the training images is taken (the
    count from the listing stops at the batch size), and the run trains as before."""
    from prunekit.zoo import checkpoints
    monkeypatch.chdir(tmp_path)
    write_tree(tmp_path / "imgs" / "test", {"a": 2, "b": 2})
    write_tree(tmp_path / "imgs" / "train", {"a": 3, "b": 3})
    torch.manual_seed(0)
    from prunekit.zoo import build
    torch.save(build("resnet20", num_classes=2).state_dict(), "start.pth")
    reads, real = [], checkpoints._read_torch
    monkeypatch.setattr(checkpoints, "_read_torch", lambda path: reads.append(path) or real(path))
    code = main(["train", "--model", "resnet20", "--checkpoint", "start.pth", "--data", "imagefolder",
                 "--data-dir", "imgs", "--epochs", "1", "--batch-size", "6", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(reads) == 1, reads
    assert json.loads(out)["train_images"] == 6 and scanned_splits == ["train", "test"]


def test_the_count_from_the_listing_is_the_scans(tmp_path):
    """imagefolder.count_images: the images scan_image_folder finds (subfolders at any depth, hidden ones
    and other files left out), without opening one; stopped at at_most; None where the scan refuses."""
    write_tree(tmp_path / "d" / "train" / "a", {"deep": 3})         # a/deep/*.png: a's images too
    write_tree(tmp_path / "d" / "train", {"a": 2, "b": 4, "c": 0})
    write_tree(tmp_path / "d" / "train" / "b", {".hidden": 2})
    (tmp_path / "d" / "train" / "b" / "notes.txt").write_text("not an image")
    write_tree(tmp_path / "d" / "test", {"a": 1})
    scan = imagefolder.scan_image_folder(tmp_path / "d", "train")
    assert len(scan) == 9
    assert imagefolder.count_images(tmp_path / "d", "train") == 9
    assert imagefolder.count_images(str(tmp_path / "d"), "train", at_most=4) == 4
    test = imagefolder.scan_image_folder(tmp_path / "d", "test")
    assert imagefolder.count_images(tmp_path / "d", "test") == len(test) == 1
    assert imagefolder.count_images(tmp_path / "d", "train", classes=["a", "b"]) is None     # c: not the model's
    assert imagefolder.count_images(tmp_path / "nothing", "train") is None
    write_tree(tmp_path / "only" / "test", {"a": 1})
    assert imagefolder.count_images(tmp_path / "only", "train") is None     # no train/: the scan says so
