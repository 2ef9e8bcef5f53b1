"""``load_dataset``: one entry point that picks the reader for a data set name."""

from __future__ import annotations

import os
from pathlib import Path

from prunekit.data.cifar import load_cifar10
from prunekit.data.dataset import DeferredImageDataset, ImageDataset, SubsetScan
from prunekit.data.imagefolder import scan_image_folder, scans_again
from prunekit.data.mnist import load_mnist_like
from prunekit.errors import PrunekitError, PrunekitWarning, worded
from ..errors import warn as warn_ours

DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10", "imagefolder")
SPLITS = ("train", "test")


# the largest --resize / --crop side: a 16384 x 16384 colour image is 805 MB of pixels, 3.2 GB as float32
MAX_IMAGE_SIDE = 16384


def check_image_sizes(resize, crop) -> None:
    """Refuse a ``resize`` / ``crop`` (pixels; None: not given) that is no whole number from 1 to
    ``MAX_IMAGE_SIDE``: 0 has no image, and far larger sides cannot be held (one image of side
    100000 is 40 GB as float32; past 2**63 PIL cannot even be asked)."""
    for flag, value in (("resize", resize), ("crop", crop)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGE_SIDE:
            raise worded(f"{flag} must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE}, got {value!r}",
                         f"--{flag} must be a whole number of pixels from 1 to {MAX_IMAGE_SIDE} (one image of "
                         f"{MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} is 3.2 GB as float32), got {value!r}")


def load_dataset(name: str, data_dir: str | Path, split: str = "test", *, resize: int | None = None,
                 crop: int | None = None, limit: int | None = None, seed: int | None = None,
                 classes: list[str] | tuple[str, ...] | None = None,
                 defer: bool = False,
                 same_as: DeferredImageDataset | None = None) -> ImageDataset | DeferredImageDataset:
    """Read the ``split`` ("train" or "test") of data set ``name`` from ``data_dir``.

    - "mnist", "fashion-mnist": the four IDX files (``.gz`` or raw) in ``data_dir``.
    - "cifar10": the python batches (in ``data_dir`` or ``data_dir/cifar-10-batches-py``),
      else a Keras-style ``.npz`` in ``data_dir``; ``data_dir`` may also be the ``.npz``.
    - "imagefolder": ``data_dir/<split>/<class>/*`` if that folder exists, else
      ``data_dir/<class>/*``; ``resize`` (shorter side) and ``crop`` (centre square), in
      pixels, bring images of any size to one (image folders only). ``classes``: the class
      names a model was trained on, in the order of its outputs (its sidecar's ``class_names``):
      labels index them, not the folder's own sorted names, so a folder lacking some classes keeps
      the model's labels; a class folder not among them is refused. ``None``: the folder's names
      (those of train/, when there is one). Ignored for the other data sets, whose labels are fixed.

    ``limit``: at most that many images, ``ImageDataset.subset(limit, seed)`` of the split when it
    holds more (an image folder decodes only those); a ``limit`` above the split's number of images
    takes them all and says so (one ``PrunekitWarning`` naming the count used).

    ``defer``: an image folder is scanned only (file list, labels, every file's header: its
    refusals all come now) and returned as a :class:`DeferredImageDataset` whose pixels are decoded
    on first use, its ``pending_bytes`` the uint8 array's size until then (what a memory plan made
    before decoding counts). Other data sets are read at once either way.

    ``same_as``: an image folder's split loaded before with ``defer=True`` (say the test split; a
    decoded ``ImageDataset`` is refused, as nothing tells which images it holds; the other data
    sets, read at once, ignore it). When this call
    would read the very same images (an image folder without train/ and test/ folders is both
    splits; or the same split twice) with the same ``resize`` / ``crop``, labelled by the same class
    names, that data set is returned again (decoded, without ``defer``): the folder is scanned once
    and its pixels decoded and held once (10,000 JPEGs at 224 x 224: 1.4 GB and some 20 s saved).
    A ``limit`` below its count takes ``subset(limit, seed)`` of it (the images a scan with that
    limit would keep), copied from its decoded images rather than decoded again. Nothing changes the images in place
    (the loaders' augmentation makes new tensors), so training on it leaves evaluation unchanged.

    Returns an :class:`ImageDataset` (with ``defer`` and an image folder, a
    :class:`DeferredImageDataset`): uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``. Every problem raises
    :class:`PrunekitError` with a message that names the fix.
    """
    if not isinstance(data_dir, (str, os.PathLike)):
        raise PrunekitError(f"load_dataset(name, data_dir, split): data_dir must be the folder holding the data "
                            f"set's files, got {type(data_dir).__name__}")
    if name not in DATASET_NAMES:
        raise PrunekitError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if name != "imagefolder" and (resize is not None or crop is not None):
        raise PrunekitError(f"resizing and cropping are for image folders: {name} images all have one size already; "
                            "leave out resize and crop")
    check_image_sizes(resize, crop)
    if classes is not None and (isinstance(classes, str) or not all(isinstance(c, str) for c in classes)):
        raise PrunekitError("classes must be a list of class names (strings) in the order of the model's outputs, "
                            f"got {classes!r}")
    if split not in SPLITS:
        raise PrunekitError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "imagefolder" and same_as is not None and not isinstance(same_as, DeferredImageDataset):
        raise PrunekitError(f"same_as must be a split as load_dataset(..., defer=True) returns it (a DeferredImageDataset, "
                            f"whose scan tells whether it holds the same images), got {type(same_as).__name__}: load "
                            "that split with defer=True, or leave same_as out")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise PrunekitError(f"data path {path} does not exist; pass the folder that holds the {name} files")
    if name == "imagefolder" and path.is_dir():
        if isinstance(same_as, DeferredImageDataset) and scans_again(same_as.scan, path, split, resize, crop, classes):
            if limit is None or limit >= len(same_as):
                ds = same_as if defer else same_as.dataset
            else:       # its rows, copied from its images (decoded for it anyway), not decoded again
                ds = DeferredImageDataset(SubsetScan(same_as, limit, seed))
                return ds if defer else ds.dataset
        else:
            scan = scan_image_folder(path, split, resize, crop, limit, seed, classes)
            ds = DeferredImageDataset(scan) if defer else scan.decode()
    elif name == "cifar10":
        ds = load_cifar10(path, split)
    elif not path.is_dir():
        raise PrunekitError(f"{path} is a file; pass the folder that holds the {name} files")
    else:
        ds = load_mnist_like(name, path, split)
    if limit is not None and limit > len(ds):
        warn_ours(PrunekitWarning(f"the {name} {split} split holds {len(ds)} images, fewer than the {limit} "
                                      f"asked for: using all {len(ds)}"))
    return ds if limit is None or limit >= len(ds) else ds.subset(limit, seed)
