"""Data sets for prunekit: readers, batch loaders and downloads.

- :func:`load_dataset` reads MNIST, Fashion-MNIST, CIFAR-10 or an image folder into an
  :class:`ImageDataset` (uint8 images ``(N, C, H, W)``, int64 labels ``(N,)``).
- :func:`make_loader` cuts normalized float32 batches from it, optionally shuffled and
  augmented, reproducibly from a seed.
- :func:`download` fetches the official files, verified by MD5.
"""

from prunekit.data.dataset import ImageDataset
from prunekit.data.download import download
from prunekit.data.load import DATASET_NAMES, SPLITS, load_dataset
from prunekit.data.loaders import BatchLoader, Normalization, augment_cifar, make_loader, to_float

__all__ = [
    "DATASET_NAMES",
    "SPLITS",
    "BatchLoader",
    "ImageDataset",
    "Normalization",
    "augment_cifar",
    "download",
    "load_dataset",
    "make_loader",
    "to_float",
]
