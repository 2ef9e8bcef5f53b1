"""Readers of prunekit.data on tiny generated files: IDX, CIFAR batches, .npz, image folders."""

from __future__ import annotations

import gzip
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunekit.data import DATASET_NAMES, ImageDataset, load_dataset
from prunekit.data.cifar import CIFAR10_CLASSES
from prunekit.errors import PrunekitError, PrunekitWarning

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- file writers


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, split: str, n: int, compress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = RNG.integers(0, 10, n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / stem).write_bytes(idx_bytes(array))
    return images, labels


def write_cifar_batch(path: Path, n: int, protocol: int = 2, byte_keys: bool = True) -> tuple[np.ndarray, list[int]]:
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in RNG.integers(0, 10, n)]
    keys = (b"data", b"labels") if byte_keys else ("data", "labels")
    path.write_bytes(pickle.dumps({keys[0]: data, keys[1]: labels}, protocol=protocol))
    return data, labels


def write_cifar_batches(folder: Path, n: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    return {name: write_cifar_batch(folder / name, n) for name in names}


def write_png_tree(root: Path, classes: dict[str, int], size=(6, 5), mode="RGB") -> None:
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            channels = 3 if mode == "RGB" else 1
            pixels = RNG.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
            Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(root / name / f"{k}.png")


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


# ---------------------------------------------------------------- dispatch


def test_dataset_names_are_the_public_list():
    assert DATASET_NAMES == ("mnist", "fashion-mnist", "cifar10", "imagefolder")


@pytest.mark.parametrize(
    ("name", "split", "message"),
    [("imagenet", "test", "choose one of"), ("mnist", "valid", "unknown split")],
)
def test_bad_name_or_split(tmp_path, name, split, message):
    with pytest.raises(PrunekitError, match=message):
        load_dataset(name, tmp_path, split)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_missing_directory(tmp_path, name):
    with pytest.raises(PrunekitError, match="does not exist"):
        load_dataset(name, tmp_path / "nowhere")


def test_errors_are_value_errors(tmp_path):
    with pytest.raises(ValueError):
        load_dataset("mnist", tmp_path / "nowhere")


# ---------------------------------------------------------------- MNIST / IDX


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_round_trip(tmp_path, split, compress):
    images, labels = write_mnist(tmp_path, split, 7, compress)
    ds = load_dataset("mnist", str(tmp_path), split)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (7, 1, 28, 28)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert np.array_equal(ds.images[:, 0].numpy(), images)
    assert ds.classes == [str(d) for d in range(10)] and ds.image_shape == (1, 28, 28)


def test_fashion_mnist_class_names(tmp_path):
    write_mnist(tmp_path, "test", 2)
    ds = load_dataset("fashion-mnist", tmp_path, "test")
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_mnist_missing_files_names_the_download(tmp_path):
    write_mnist(tmp_path, "test", 2)
    with pytest.raises(PrunekitError, match=r"train-images-idx3-ubyte\.gz.*prunekit\.data\.download\('mnist'"):
        load_dataset("mnist", tmp_path, "train")


def test_mnist_bad_magic(tmp_path):
    write_mnist(tmp_path, "test", 2)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 1), np.uint8))))  # 2 dimensions, not 1
    with pytest.raises(PrunekitError, match="magic"):
        load_dataset("mnist", tmp_path, "test")


def test_mnist_truncated_file(tmp_path):
    write_mnist(tmp_path, "test", 3, compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(PrunekitError, match="truncated"):
        load_dataset("mnist", tmp_path, "test")


def test_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path, "test", 3)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(PrunekitError, match="3 images but .* 4 labels"):
        load_dataset("mnist", tmp_path, "test")


def test_mnist_corrupt_gzip(tmp_path):
    write_mnist(tmp_path, "test", 3)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(PrunekitError, match="decompress"):
        load_dataset("mnist", tmp_path, "test")


def test_mnist_label_out_of_range(tmp_path):
    write_mnist(tmp_path, "test", 2)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([1, 12], np.uint8))))
    with pytest.raises(PrunekitError, match="outside 0..9"):
        load_dataset("mnist", tmp_path, "test")


# ---------------------------------------------------------------- CIFAR-10 batches


@pytest.mark.parametrize("subfolder", ["", "cifar-10-batches-py"])
def test_cifar_batches_round_trip(tmp_path, subfolder):
    written = write_cifar_batches(tmp_path / subfolder)
    train = load_dataset("cifar10", tmp_path, "train")
    test = load_dataset("cifar10", tmp_path, "test")
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    expected = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(train.images.numpy(), expected)
    assert train.labels.tolist() == sum((written[f"data_batch_{k}"][1] for k in range(1, 6)), [])
    assert test.labels.tolist() == written["test_batch"][1]
    assert train.classes == CIFAR10_CLASSES


@pytest.mark.parametrize(("protocol", "byte_keys"), [(2, True), (4, False), (5, True)])
def test_cifar_batch_pickle_variants(tmp_path, protocol, byte_keys):
    data, labels = write_cifar_batch(tmp_path / "test_batch", 4, protocol, byte_keys)
    ds = load_dataset("cifar10", tmp_path, "test")
    assert np.array_equal(ds.images.reshape(4, -1).numpy(), data) and ds.labels.tolist() == labels


def test_cifar_meta_gives_class_names(tmp_path):
    write_cifar_batches(tmp_path)
    names = [f"c{k}".encode() for k in range(10)]
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    assert load_dataset("cifar10", tmp_path, "test").classes == [f"c{k}" for k in range(10)]


def test_cifar_pickle_cannot_run_code(tmp_path):
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _RunsCode(), b"labels": []}))
    with pytest.raises(PrunekitError, match="refusing to load posix.getcwd|refusing to load os.getcwd"):
        load_dataset("cifar10", tmp_path, "test")


def test_cifar_missing_train_batch(tmp_path):
    write_cifar_batches(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(PrunekitError, match=r"data_batch_4 .*download\('cifar10'"):
        load_dataset("cifar10", tmp_path, "train")


def test_cifar_wrong_batch_contents(tmp_path):
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(PrunekitError, match=r"shape \(N, 3072\)"):
        load_dataset("cifar10", tmp_path, "test")


def test_cifar_no_files(tmp_path):
    with pytest.raises(PrunekitError, match="no CIFAR-10 files"):
        load_dataset("cifar10", tmp_path, "test")


# ---------------------------------------------------------------- CIFAR-10 .npz


def write_npz(path: Path, n_train=4, n_test=2, **overrides) -> dict[str, np.ndarray]:
    arrays = {
        "x_train": RNG.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": RNG.integers(0, 10, (n_train, 1)),  # Keras stores labels as (N, 1)
        "x_test": RNG.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": RNG.integers(0, 10, n_test).astype(np.uint8),
    }
    arrays.update(overrides)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("point_at_file", [False, True])
def test_cifar_npz_round_trip(tmp_path, point_at_file):
    arrays = write_npz(tmp_path / "subset.npz")
    ds = load_dataset("cifar10", tmp_path / "subset.npz" if point_at_file else tmp_path, "train")
    assert ds.images.shape == (4, 3, 32, 32) and ds.images.is_contiguous()
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), arrays["x_train"])
    assert ds.labels.tolist() == arrays["y_train"].ravel().tolist()
    assert len(load_dataset("cifar10", tmp_path, "test")) == 2


def test_cifar_npz_uses_meta_next_to_it(tmp_path):
    write_npz(tmp_path / "subset.npz")
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"n{k}" for k in range(10)]}))
    assert load_dataset("cifar10", tmp_path, "test").classes[3] == "n3"


def test_cifar_npz_errors(tmp_path):
    write_npz(tmp_path / "a.npz", x_test=np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(PrunekitError, match=r"\(N, H, W, 3\)"):
        load_dataset("cifar10", tmp_path / "a.npz", "test")
    np.savez(tmp_path / "b.npz", images=np.zeros(3))
    with pytest.raises(PrunekitError, match="several .npz"):
        load_dataset("cifar10", tmp_path, "test")
    with pytest.raises(PrunekitError, match="needs 'x_test' and 'y_test'"):
        load_dataset("cifar10", tmp_path / "b.npz", "test")
    (tmp_path / "c.npz").write_bytes(b"not a zip")
    with pytest.raises(PrunekitError, match="cannot read"):
        load_dataset("cifar10", tmp_path / "c.npz", "test")


def test_cifar_npz_refuses_pickled_objects(tmp_path):
    np.savez(tmp_path / "obj.npz", x_test=np.array([object()], dtype=object), y_test=np.zeros(1))
    with pytest.raises(PrunekitError, match="plain arrays"):
        load_dataset("cifar10", tmp_path / "obj.npz", "test")


# ---------------------------------------------------------------- image folders


def test_image_folder_rgb_round_trip(tmp_path):
    write_png_tree(tmp_path, {"zebra": 2, "ant": 3})
    ds = load_dataset("imagefolder", tmp_path)
    assert ds.classes == ["ant", "zebra"] and ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.images.shape == (5, 3, 5, 6) and ds.images.dtype == torch.uint8
    pixels = np.asarray(Image.open(tmp_path / "zebra" / "1.png"))
    assert np.array_equal(ds.images[4].permute(1, 2, 0).numpy(), pixels)


def test_image_folder_decodes_into_one_array_not_three(tmp_path):
    """The decoded images were a list, stacked, then transposed into a contiguous copy: three copies of
    the data set at once (ImageNet-size images: 4.9 GB peak for 1.5 GB of CIFAR-10 test at 224, and as
    many seconds in the copies as in the decoding). Now each image goes straight into its slot."""
    import tracemalloc
    write_png_tree(tmp_path / "warm", {"a": 1})
    load_dataset("imagefolder", tmp_path / "warm")        # imports and caches out of the measurement
    write_png_tree(tmp_path / "big", {"a": 40, "b": 40}, size=(48, 40))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ds = load_dataset("imagefolder", tmp_path / "big", resize=80)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert ds.images.shape == (80, 3, 80, 96) and ds.images.is_contiguous()
    pixels = np.asarray(Image.open(tmp_path / "big" / "b" / "0.png").resize((96, 80), Image.Resampling.BILINEAR))
    assert np.array_equal(ds.images[40].permute(1, 2, 0).numpy(), pixels)
    assert peak < 1.5 * ds.images.numel(), f"peak {peak / ds.images.numel():.2f}x the data set"


def test_image_folder_grayscale_and_mixed(tmp_path):
    write_png_tree(tmp_path / "gray", {"a": 1, "b": 1}, mode="L")
    assert load_dataset("imagefolder", tmp_path / "gray").image_shape == (1, 5, 6)
    write_png_tree(tmp_path / "gray", {"c": 1}, mode="RGB")
    assert load_dataset("imagefolder", tmp_path / "gray").image_shape == (3, 5, 6)


def test_image_folder_picks_split_folder(tmp_path):
    write_png_tree(tmp_path / "train", {"a": 3, "b": 1})
    write_png_tree(tmp_path / "test", {"a": 1, "b": 1})
    assert len(load_dataset("imagefolder", tmp_path, "train")) == 4
    assert len(load_dataset("imagefolder", tmp_path, "test")) == 2


def test_image_folder_test_split_of_fewer_classes_keeps_the_training_labels(tmp_path):
    write_png_tree(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    write_png_tree(tmp_path / "test", {"a": 1, "c": 2})          # no b: c is still label 2, not 1
    test = load_dataset("imagefolder", tmp_path, "test")
    assert test.classes == ["a", "b", "c"]
    assert test.labels.tolist() == [0, 2, 2]


def test_image_folder_test_class_the_training_split_lacks_is_refused(tmp_path):
    write_png_tree(tmp_path / "train", {"a": 1, "c": 1})
    write_png_tree(tmp_path / "test", {"a": 1, "b": 1, "c": 1})
    assert load_dataset("imagefolder", tmp_path, "train").labels.tolist() == [0, 1]
    with pytest.raises(PrunekitError, match=r"class folders that .*train lacks \(b\).*same class folders"):
        load_dataset("imagefolder", tmp_path, "test")


def test_a_folder_without_splits_is_both_and_says_so_when_trained_on(tmp_path):
    write_png_tree(tmp_path, {"a": 2, "b": 1})
    with pytest.warns(PrunekitWarning, match="no train/ and test/ folders.*not held out"):
        train = load_dataset("imagefolder", tmp_path, "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # the test split alone (eval) is no cause to warn
        test = load_dataset("imagefolder", tmp_path, "test")
    assert torch.equal(train.images, test.images)


def test_image_folder_missing_split_is_an_error(tmp_path):
    write_png_tree(tmp_path / "test", {"a": 1})
    with pytest.raises(PrunekitError, match="no train/ folder"):
        load_dataset("imagefolder", tmp_path, "train")


def test_image_folder_sizes_must_match(tmp_path):
    write_png_tree(tmp_path, {"a": 1})
    write_png_tree(tmp_path, {"b": 1}, size=(4, 4))
    from prunekit.options import cli_message
    with pytest.raises(PrunekitError, match=r"bring them to one size \(resize=N, crop=N\)") as refused:
        load_dataset("imagefolder", tmp_path)                 # Python's words; the command line's flags
    assert cli_message(refused.value).endswith("bring them to one size (--resize N --crop N)")
    with pytest.raises(PrunekitError, match=r"crop them to one size \(crop=N\)"):   # 6x5 -> 5x4 after resize 4
        load_dataset("imagefolder", tmp_path, resize=4)


def test_image_folder_resize_and_crop_bring_sizes_to_one(tmp_path):
    mixed = tmp_path / "mixed"
    write_png_tree(mixed, {"a": 2}, size=(40, 20))           # landscape
    write_png_tree(mixed, {"b": 1}, size=(16, 30))           # portrait
    ds = load_dataset("imagefolder", mixed, resize=12, crop=10)
    assert ds.images.shape == (3, 3, 10, 10) and ds.labels.tolist() == [0, 0, 1]
    # the reference: Pillow's bilinear resize of the shorter side to 12, then the centre 10x10
    with Image.open(mixed / "b" / "0.png") as image:
        resized = image.resize((12, round(30 * 12 / 16)), Image.Resampling.BILINEAR)   # 12 wide, 22 high
        expected = np.asarray(resized.crop((1, 6, 11, 16)))
    assert np.array_equal(ds.images[2].permute(1, 2, 0).numpy(), expected)
    # resize alone keeps the aspect ratio: the shorter side has the pixels asked for
    write_png_tree(tmp_path / "wide", {"a": 2}, size=(40, 20))
    assert load_dataset("imagefolder", tmp_path / "wide", resize=10).image_shape == (3, 10, 20)
    # crop alone: the centre of the original
    with Image.open(tmp_path / "wide" / "a" / "0.png") as image:
        centre = np.asarray(image.crop((15, 5, 25, 15)))
    cropped = load_dataset("imagefolder", tmp_path / "wide", crop=10).images[0]
    assert np.array_equal(cropped.permute(1, 2, 0).numpy(), centre)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"crop": 25}, "smaller than the crop of 25"),
    ({"resize": 8, "crop": 9}, "after resizing to 8"),
    ({"resize": 0}, "whole number of pixels from 1 to 16384, got 0"),
    ({"crop": 2.5}, "whole number of pixels from 1 to 16384, got 2.5"),
])
def test_image_folder_resize_and_crop_refusals(tmp_path, kwargs, message):
    write_png_tree(tmp_path, {"a": 1}, size=(40, 20))
    with pytest.raises(PrunekitError, match=message):
        load_dataset("imagefolder", tmp_path, **kwargs)


def test_resize_is_for_image_folders_only(tmp_path):
    with pytest.raises(PrunekitError, match="for image folders"):
        load_dataset("mnist", tmp_path, "test", resize=32)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: (root / "a").mkdir(), r"class folders of .* hold no .jpg/.jpeg/.png images; add images"),
        (lambda root: (root / "x.png").write_bytes(b""), "no class folders"),
        (lambda root: ((root / "a").mkdir(), (root / "a" / "0.png").write_bytes(b"junk")), "cannot decode"),
    ],
)
def test_image_folder_errors(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(PrunekitError, match=message):
        load_dataset("imagefolder", tmp_path)


def test_image_folder_reads_the_images_in_subfolders_of_a_class_folder(tmp_path):
    """Images in a subfolder of a class folder (DIR/test/red/more/*.png) were skipped without a
    word (eval counted 55 of 60 images); torchvision's ImageFolder reads them, and so does prunekit:
    a folder's own files first, then its subfolders' in sorted order; a hidden one is left out."""
    write_png_tree(tmp_path / "test", {"a": 2, "b": 1, "a/more": 2, "a/more/deeper": 1, "b/.hidden": 3})
    ds = load_dataset("imagefolder", tmp_path, "test")
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 0, 0, 0, 1]
    order = ["a/0.png", "a/1.png", "a/more/0.png", "a/more/1.png", "a/more/deeper/0.png", "b/0.png"]
    for k, name in enumerate(order):
        pixels = torch.from_numpy(np.array(Image.open(tmp_path / "test" / name))).permute(2, 0, 1)
        assert torch.equal(ds.images[k], pixels), name


def test_image_folder_one_level_too_high_is_refused_naming_the_subfolders(tmp_path):
    """A folder whose class folders hold images only in subfolders (DIR/data/<class>/, or splits
    named val/) would read as one class per subfolder tree: refused, naming them."""
    write_png_tree(tmp_path / "val", {"cat": 1, "dog": 1})
    with pytest.raises(PrunekitError, match=r"class folders of .* hold no .jpg/.jpeg/.png images of their own, "
                                            r"only subfolders \(val/cat/, val/dog/\): pass the folder that holds "
                                            r"the <class>/ folders"):
        load_dataset("imagefolder", tmp_path, "test")


def test_an_empty_class_folder_is_a_class_with_no_images(tmp_path):
    """A model without class names meeting a folder of fewer classes is told to add an (empty)
    folder for each missing class; such a folder was then refused ("has no images"). It is a class
    with no images: its name keeps its place, so the labels after it do not shift."""
    write_png_tree(tmp_path / "test", {"b": 1, "d": 2})
    (tmp_path / "test" / "a").mkdir()
    (tmp_path / "test" / "c").mkdir()
    ds = load_dataset("imagefolder", tmp_path, "test")
    assert ds.classes == ["a", "b", "c", "d"] and ds.labels.tolist() == [1, 3, 3]


# ---------------------------------------------------------------- ImageDataset


def make_dataset(n=10) -> ImageDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"])


def test_subset_first_n_and_seeded():
    ds = make_dataset()
    assert ds.subset(4).images[:, 0, 0, 0].tolist() == [0, 1, 2, 3]
    assert len(ds.subset()) == 10
    small, large = ds.subset(3, seed=5), ds.subset(6, seed=5)
    assert torch.equal(small.images, large.images[:3]) and torch.equal(small.labels, large.labels[:3])
    assert not torch.equal(ds.subset(6, seed=5).images, ds.subset(6, seed=6).images)
    assert sorted(ds.subset(seed=1).labels.tolist()) == sorted(ds.labels.tolist())


def test_subset_too_large():
    with pytest.raises(PrunekitError, match="cannot take 11"):
        make_dataset().subset(11)


def test_dataset_validates_its_tensors():
    with pytest.raises(PrunekitError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(PrunekitError, match="one label per image"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"])
    with pytest.raises(PrunekitError, match=r"\[0, 1\)"):
        ImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.ones(2, dtype=torch.int64), ["a"])


def test_image_folder_limit_reads_only_the_subset(tmp_path, monkeypatch):
    """``limit`` gives the images ImageDataset.subset would keep, without decoding the others."""
    from prunekit.data import imagefolder
    write_png_tree(tmp_path, {"a": 5, "b": 7})
    whole = load_dataset("imagefolder", tmp_path)
    opened = []
    real_open = imagefolder._open
    monkeypatch.setattr(imagefolder, "_open", lambda path: opened.append(path) or real_open(path))
    for seed in (None, 3):
        opened.clear()
        part = load_dataset("imagefolder", tmp_path, limit=4, seed=seed)
        expected = whole.subset(4, seed)
        assert torch.equal(part.images, expected.images) and torch.equal(part.labels, expected.labels)
        assert len(set(opened)) == 4                  # the 8 other files were never opened
    with pytest.warns(PrunekitWarning, match="holds 12 images, fewer than the 100 asked for: using all 12"):
        assert len(load_dataset("imagefolder", tmp_path, limit=100)) == 12     # at most: all 12, in order


# ---------------------------------------------------------------- MNIST and Fashion-MNIST told apart


def _fingerprint(raw: bytes) -> tuple[int, str]:
    import hashlib
    return len(raw), hashlib.md5(raw).hexdigest()


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_the_other_data_sets_official_files_are_refused(tmp_path, monkeypatch, split, compress):
    """MNIST and Fashion-MNIST share file names and sizes: a folder holding the other one's official files
    is refused in one line naming the fix (the official fingerprints are stood in for by tiny files' own)."""
    from prunekit.data import mnist
    images, labels = write_mnist(tmp_path / "fm", split, 5, compress)
    prefix = "train" if split == "train" else "t10k"
    table = {name: dict(files) for name, files in mnist.OFFICIAL_IDX.items()}
    table["fashion-mnist"][f"{prefix}-labels-idx1-ubyte"] = _fingerprint(idx_bytes(labels))
    monkeypatch.setattr(mnist, "OFFICIAL_IDX", table)
    from prunekit.options import cli_message
    with pytest.raises(PrunekitError, match=r"fm holds Fashion-MNIST's files, not MNIST's .*: load them as "
                                            r"load_dataset\('fashion-mnist', \.\.\.\), or give the folder of "
                                            r"MNIST's files$") as refused:     # Python's words, not flags
        load_dataset("mnist", tmp_path / "fm", split)
    assert cli_message(refused.value).endswith(": --data fashion-mnist, or point --data-dir at MNIST's files")
    assert len(load_dataset("fashion-mnist", tmp_path / "fm", split)) == 5     # its own: read as ever
    write_mnist(tmp_path / "neither", split, 5, compress)                      # a subset, or other files
    assert len(load_dataset("mnist", tmp_path / "neither", split)) == 5
    assert len(load_dataset("fashion-mnist", tmp_path / "neither", split)) == 5


def test_the_other_data_sets_published_gz_is_refused(tmp_path, monkeypatch):
    """A .gz that is byte for byte the other data set's download (its published MD5) is refused too, when
    its content has the official size."""
    import importlib
    from prunekit.data import mnist
    download = importlib.import_module("prunekit.data.download")      # prunekit.data.download is the function
    images, labels = write_mnist(tmp_path, "test", 5)
    table = {name: dict(files) for name, files in mnist.OFFICIAL_IDX.items()}
    table["mnist"]["t10k-images-idx3-ubyte"] = (len(idx_bytes(images)), "0" * 32)      # the size alone matches
    monkeypatch.setattr(mnist, "OFFICIAL_IDX", table)
    mnist_files = tuple(download.RemoteFile(f.name, download._md5(tmp_path / f.name)
                                            if f.name == "t10k-images-idx3-ubyte.gz" else f.md5)
                        for f in download.SOURCES["mnist"].files)
    monkeypatch.setitem(download.SOURCES, "mnist", download.Source(download.SOURCES["mnist"].mirrors, mnist_files))
    with pytest.raises(PrunekitError, match=r"holds MNIST's files, not Fashion-MNIST's \(t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", tmp_path, "test")
    assert len(load_dataset("mnist", tmp_path, "test")) == 5


def test_eval_refuses_the_other_data_set_in_one_line(tmp_path, monkeypatch, capsys):
    import prunekit
    from prunekit.cli import main
    from prunekit.data import mnist
    images, labels = write_mnist(tmp_path, "test", 4)
    table = {name: dict(files) for name, files in mnist.OFFICIAL_IDX.items()}
    table["mnist"]["t10k-images-idx3-ubyte"] = _fingerprint(idx_bytes(images))
    monkeypatch.setattr(mnist, "OFFICIAL_IDX", table)
    ckpt = str(Path(prunekit.__file__).parent / "assets" / "mlpnet.safetensors")
    code = main(["eval", "--model", "mlpnet", "--checkpoint", ckpt, "--data", "fashion-mnist", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds MNIST's files, not Fashion-MNIST's" in err, err
    assert err.endswith(": --data mnist, or point --data-dir at Fashion-MNIST's files\n"), err     # the flags, not Python
