"""CIFAR-10 from the official python batches or from a Keras-style ``.npz``.

The official batches are pickles. They are read with an unpickler that can only rebuild
numpy arrays (plus plain dicts, lists, strings and numbers), so a tampered file cannot run
code. The ``.npz`` is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import codecs
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.data.dataset import ImageDataset
from prunekit.errors import PrunekitError

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
_SPLIT_BATCHES = {"train": TRAIN_BATCHES, "test": (TEST_BATCH,)}
_FIX_MISSING = "download them with `prunekit.data.download('cifar10', '{dir}')`"

# The only globals a pickled numpy array needs. The functions are taken from numpy itself
# (what ndarray.__reduce_ex__ returns) so they match the installed numpy; both module
# spellings are accepted because numpy 2 renamed numpy.core to numpy._core.
_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce_ex__(2)[0]
_FROMBUFFER = np.zeros(1, np.uint8).__reduce_ex__(5)[0]
_SCALAR = np.uint8(0).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, "latin1")
    ("_codecs", "encode"): codecs.encode,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _RECONSTRUCT
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _SCALAR
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _FROMBUFFER


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except those needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(path: Path) -> Any:
    """Load a CIFAR pickle (Python 2 strings come back as ``bytes``)."""
    try:
        with open(path, "rb") as handle:
            return _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # any failure to decode untrusted bytes is a bad file
        raise PrunekitError(f"cannot read {path} as a CIFAR-10 batch ({error}); download it again") from error


def _field(batch: Any, key: str, path: Path) -> Any:
    """``batch[key]`` for a dict whose keys may be ``str`` or ``bytes``."""
    if isinstance(batch, dict):
        for candidate in (key, key.encode()):
            if candidate in batch:
                return batch[candidate]
    raise PrunekitError(f"{path} has no '{key}' entry, so it is not a CIFAR-10 python batch; download it again")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64."""
    batch = _unpickle(path)
    data, labels = _field(batch, "data", path), np.asarray(_field(batch, "labels", path))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise PrunekitError(f"{path}: 'data' must be a uint8 array of shape (N, 3072); download the file again")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise PrunekitError(f"{path}: 'labels' must hold {len(data)} integers; download the file again")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_class_names(meta_path: Path) -> list[str]:
    """Class names from an official ``batches.meta`` (its ``label_names`` entry)."""
    names = _field(_unpickle(meta_path), "label_names", meta_path)
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def _class_names(*folders: Path) -> list[str]:
    """Names from the first ``batches.meta`` found in ``folders``, else the standard names."""
    for folder in folders:
        if (folder / META_FILE).is_file():
            return read_class_names(folder / META_FILE)
    return list(CIFAR10_CLASSES)


def _find_batch_folder(data_dir: Path) -> Path | None:
    """``data_dir`` or ``data_dir/cifar-10-batches-py``, whichever holds batch files."""
    for folder in (data_dir, data_dir / BATCH_FOLDER):
        if any((folder / name).is_file() for name in (*TRAIN_BATCHES, TEST_BATCH)):
            return folder
    return None


def _find_npz(data_dir: Path) -> Path | None:
    """``data_dir`` itself if it is an ``.npz`` file, else the single ``.npz`` inside it."""
    if data_dir.is_file():
        return data_dir if data_dir.suffix == ".npz" else None
    found = sorted(data_dir.glob("*.npz"))
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise PrunekitError(f"{data_dir} holds several .npz files ({names}); pass the path of the one to use")
    return found[0] if found else None


def _load_batches(folder: Path, split: str, data_dir: Path) -> ImageDataset:
    names = _SPLIT_BATCHES[split]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise PrunekitError(
            f"CIFAR-10 {split} split needs {', '.join(missing)} in {folder}; " + _FIX_MISSING.format(dir=data_dir)
        )
    parts = [_read_batch(folder / name) for name in names]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), _class_names(folder))


def _read_npz_arrays(path: Path, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The arrays ``x_key`` and ``y_key`` of the ``.npz`` at ``path`` (no pickled objects)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            if x_key in keys and y_key in keys:
                return archive[x_key], archive[y_key]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise PrunekitError(f"cannot read {path} as an .npz of plain arrays ({error}); recreate it") from error
    raise PrunekitError(f"{path} has keys {keys} but needs '{x_key}' and '{y_key}'; save the arrays under those names")


def _load_npz(path: Path, split: str) -> ImageDataset:
    x_key, y_key = f"x_{split}", f"y_{split}"
    x, y = _read_npz_arrays(path, x_key, y_key)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise PrunekitError(
            f"{path}: '{x_key}' must be uint8 images of shape (N, H, W, 3), got {x.dtype} {x.shape}; "
            "save them channels-last as uint8"
        )
    y = y.reshape(-1)
    if len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise PrunekitError(f"{path}: '{y_key}' must hold {len(x)} integer labels, got {y.dtype} {y.shape}")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return ImageDataset(images, torch.from_numpy(y.astype(np.int64)), _class_names(path.parent),
                        named_labels=(path.parent / META_FILE).is_file(), source=str(path))


def load_cifar10(data_dir: Path, split: str) -> ImageDataset:
    """Load the ``split`` ("train" or "test") of CIFAR-10.

    ``data_dir`` may hold the official python batches (directly or in
    ``cifar-10-batches-py/``), or a single Keras-style ``.npz`` (keys ``x_train``,
    ``y_train``, ``x_test``, ``y_test``; images NHWC uint8), or be that ``.npz`` file.
    Class names come from a ``batches.meta`` next to the data if there is one.

    Returns images ``(N, 3, 32, 32)`` uint8 (NCHW) and labels ``(N,)`` int64.
    """
    folder = None if data_dir.is_file() else _find_batch_folder(data_dir)
    if folder is not None:
        return _load_batches(folder, split, data_dir)
    npz = _find_npz(data_dir)
    if npz is not None:
        return _load_npz(npz, split)
    raise PrunekitError(
        f"no CIFAR-10 files in {data_dir}: expected the python batches ({BATCH_FOLDER}/data_batch_1..5, "
        f"test_batch) or a Keras-style .npz; " + _FIX_MISSING.format(dir=data_dir)
    )
