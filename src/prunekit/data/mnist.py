"""MNIST and Fashion-MNIST: readers for the IDX file format, gzipped or raw.

IDX layout (big-endian): two zero bytes, a type code (``0x08`` = unsigned byte), the number
of dimensions ``d``, then ``d`` 32-bit sizes, then the values in row-major order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from prunekit.data.dataset import ImageDataset
from prunekit.errors import PrunekitError

MNIST_CLASSES = [str(digit) for digit in range(10)]
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

_UBYTE = 0x08
_FILE_PREFIX = {"train": "train", "test": "t10k"}


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
    images = parse_idx(_read_bytes(image_path), ndim=3, source=str(image_path))
    labels = parse_idx(_read_bytes(label_path), ndim=1, source=str(label_path))
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
