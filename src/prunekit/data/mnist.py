"""MNIST and Fashion-MNIST: readers for the IDX file format, gzipped or raw.

IDX layout (big-endian): two zero bytes, a type code (``0x08`` = unsigned byte), the number
of dimensions ``d``, then ``d`` 32-bit sizes, then the values in row-major order.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np
import torch

from prunekit.data.dataset import ImageDataset
from prunekit.errors import PrunekitError, worded

MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

_UBYTE = 0x08
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}

# The official files' content, as (bytes, MD5) of each IDX file decompressed: MNIST and Fashion-MNIST use
# the same file names and sizes, so a folder of the other data set would load without a word. A file that
# is exactly the other data set's official one is refused (``_check_not_the_other``); a subset or any other
# file matches neither and is read as ever. The MD5 of a .gz as downloaded is checked too (``download.SOURCES``).
# MNIST's test files and all of Fashion-MNIST's were checked against copies of the official distributions.
OFFICIAL_IDX: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        # the training files only by their published .gz MD5 (download.SOURCES): no full copy here to measure
        "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": (47040016, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": (60008, "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": (7840016, "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": (10008, "15d484375f8d13e6eb1aabb0c3f46965"),
    },
}


def parse_idx(raw: bytes, ndim: int, source: str) -> np.ndarray:
    """Decode the bytes of an unsigned-byte IDX file with ``ndim`` dimensions.

    Returns a read-only ``uint8`` array of the shape stored in the header. Raises
    :class:`PrunekitError` (naming ``source``) on a wrong magic number or a size mismatch.
    """
    header_len = 4 + 4 * ndim
    magic = (_UBYTE << 8) | ndim
    if len(raw) < header_len or int.from_bytes(raw[:4], "big") != magic:
        found = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise PrunekitError(
            f"{source} is not an IDX file of unsigned bytes with {ndim} dimensions "
            f"(magic {found}, expected {magic:08x}); replace it with the official file"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header_len + int(np.prod(shape))
    if len(raw) != expected:
        raise PrunekitError(
            f"{source} has {len(raw)} bytes but its header {shape} needs {expected}; "
            "the file is truncated or corrupt: download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    """Read ``path``, decompressing it if it ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise PrunekitError(f"cannot decompress {path} ({error}); download it again") from error


def _check_not_the_other(name: str, data_dir: Path, stem: str, path: Path, raw: bytes) -> None:
    """Refuse ``path`` (``raw``: its decompressed bytes) when it is the other data set's official
    file of that name. Hashes only a file of the official size (the files are small: milliseconds)."""
    from prunekit.data.download import SOURCES
    for other, table in OFFICIAL_IDX.items():
        official = table.get(stem)
        if other == name or official is None or len(raw) != official[0]:
            continue
        same = hashlib.md5(raw, usedforsecurity=False).hexdigest() == official[1]
        published = {f.name: f.md5 for f in SOURCES[other].files}.get(path.name) if other in SOURCES else None
        if not same and published is not None:
            same = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest() == published
        if same:
            said = f"{data_dir} holds {_TITLES[other]}'s files, not {_TITLES[name]}'s ({path.name} is {_TITLES[other]}'s official file)"
            raise worded(f"{said}: load them as load_dataset({other!r}, ...), or give the folder of {_TITLES[name]}'s "
                         "files", f"{said}: --data {other}, or point --data-dir at {_TITLES[name]}'s files")


def _find(data_dir: Path, stem: str) -> Path | None:
    """``data_dir/stem.gz`` or ``data_dir/stem``, whichever exists first."""
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_like(name: str, data_dir: Path, split: str) -> ImageDataset:
    """Load the ``split`` ("train" or "test") of MNIST or Fashion-MNIST (``name``) from
    ``data_dir``, which holds the four official IDX files, each ``.gz`` or uncompressed.

    Returns images ``(N, 1, 28, 28)`` uint8 and labels ``(N,)`` int64 in 0..9.
    """
    prefix = _FILE_PREFIX[split]
    image_stem, label_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    image_path, label_path = _find(data_dir, image_stem), _find(data_dir, label_stem)
    if image_path is None or label_path is None:
        raise PrunekitError(
            f"no {name} {split} files in {data_dir}: expected {image_stem}.gz and {label_stem}.gz "
            f"(or uncompressed); download them with "
            f"`prunekit.data.download('{name}', '{data_dir}')`"
        )
    raw_images, raw_labels = _read_bytes(image_path), _read_bytes(label_path)
    _check_not_the_other(name, data_dir, label_stem, label_path, raw_labels)
    _check_not_the_other(name, data_dir, image_stem, image_path, raw_images)
    images = parse_idx(raw_images, ndim=3, source=str(image_path))
    labels = parse_idx(raw_labels, ndim=1, source=str(label_path))
    if len(images) != len(labels):
        raise PrunekitError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
            "use matching files from the same download"
        )
    if len(labels) and labels.max() > 9:
        raise PrunekitError(f"{label_path} has label {labels.max()} outside 0..9; replace it with the official file")
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    return ImageDataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(classes),
    )
