"""The in-memory image data set that every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError


@dataclass
class ImageDataset:
    """A labelled image classification set held in memory.

    Attributes:
        images: ``uint8`` tensor of shape ``(N, C, H, W)``, raw pixel values 0..255
            (MNIST: ``C=1``, 28x28; CIFAR-10: ``C=3``, 32x32).
        labels: ``int64`` tensor of shape ``(N,)``, values in ``[0, len(classes))``.
        classes: class names; ``classes[k]`` names label ``k``.
        named_labels: whether ``classes`` came with the data (folder names, a ``batches.meta``);
            False where the labels are bare integers and ``classes`` the data set's standard names
            (a Keras-style ``.npz``), so their order against a model's class names cannot be checked.
        source: the file the images were read from where it is one file (an ``.npz``), else None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    named_labels: bool = True
    source: str | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise PrunekitError(
                f"images must be a uint8 tensor of shape (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}; convert them with .to(torch.uint8) and reshape"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise PrunekitError(
                f"labels must be an int64 tensor of shape ({self.images.shape[0]},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}; pass one label per image"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise PrunekitError(
                f"labels must lie in [0, {len(self.classes)}) for {len(self.classes)} classes, got "
                f"{int(self.labels.min())}..{int(self.labels.max())}; fix the labels or the class list"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def subset(self, n: int | None = None, seed: int | None = None) -> ImageDataset:
        """Return ``n`` images: the first ``n`` if ``seed`` is None, else the first ``n`` of a
        permutation drawn from ``seed`` (so a smaller subset is a prefix of a larger one).

        ``n=None`` means all images (then a seed only reorders them). Raises
        :class:`PrunekitError` if ``n`` is negative or larger than the data set.
        """
        index = subset_indices(len(self), n, seed)
        if seed is None:                 # a prefix: views, no copy
            return ImageDataset(self.images[:len(index)], self.labels[:len(index)], list(self.classes),
                                self.named_labels, self.source)
        return ImageDataset(self.images[index], self.labels[index], list(self.classes), self.named_labels, self.source)


def contents_fingerprint(ds, kind: str, where) -> dict | None:
    """What a run folder records of a split read whole into memory (MNIST, Fashion-MNIST, CIFAR-10's
    batches or ``.npz``: an ``ImageDataset``), to tell before a killed run carries on whether its data
    changed since (``data.imagefolder.fingerprint_change``): ``{"data": kind, "folder": where,
    "images": N, "sha256": hex}``, the SHA-256 of the images and labels the run reads (after
    ``--train-samples``; ``folder``, the ``--data-dir`` or the ``.npz``, names it and is not compared).
    Its decoded pixels, not its files: an edit in place that keeps a file's size and time is seen, and
    a gzipped copy of the same images is the same data. Some 0.4 s a GB, once per data set (kept on it:
    a sweep's runs share it). None for anything else (an image folder's split: ``folder_fingerprint``)."""
    if not isinstance(ds, ImageDataset):
        return None
    known = ds.__dict__.get("_contents_fingerprint")
    if known is None:
        from prunekit.run_digests import tensors_sha256
        known = ds.__dict__["_contents_fingerprint"] = {
            "data": kind, "folder": str(ds.source or where), "images": len(ds),
            "sha256": tensors_sha256([("images", ds.images), ("labels", ds.labels)])}
    return dict(known)


def subset_indices(total: int, n: int | None, seed: int | None) -> torch.Tensor:
    """The indices ``ImageDataset.subset(n, seed)`` keeps of ``total`` images: ``0..n-1`` without
    a seed, else the first ``n`` of a permutation drawn from ``seed``."""
    if n is None:
        n = total
    if not 0 <= n <= total:
        raise PrunekitError(f"cannot take {n} images from a data set of {total}; use 0 <= n <= {total}")
    if seed is None:
        return torch.arange(n)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]


class DeferredImageDataset:
    """An :class:`ImageDataset` known from a scan (count, image shape, labels, classes) whose
    pixels are decoded on first use of ``images`` (or ``subset``, ``dataset``), once.

    The commands read image folders so: the memory plan is made between the scan and the decoding,
    and counts ``pending_bytes`` as memory the process will hold, so a request too large for it is
    refused in seconds rather than after every image is decoded. ``scan``: an object with
    ``__len__``, ``image_shape``, ``labels``, ``classes``, ``planned_bytes`` and
    ``decode() -> ImageDataset`` (``imagefolder.ImageFolderScan``).
    """

    def __init__(self, scan) -> None:
        self._scan = scan
        self._decoded: ImageDataset | None = None
        self.labels: torch.Tensor = scan.labels          # int64 (N,)
        self.classes: list[str] = list(scan.classes)

    @property
    def dataset(self) -> ImageDataset:
        """The decoded :class:`ImageDataset` (decoding it on first use)."""
        if self._decoded is None:
            self._decoded = self._scan.decode()
            self.labels = self._decoded.labels
        return self._decoded

    @property
    def images(self) -> torch.Tensor:
        """uint8 ``(N, C, H, W)``, decoded on first use."""
        return self.dataset.images

    @property
    def scan(self):
        """The scan the images are decoded from (``imagefolder.ImageFolderScan``)."""
        return self._scan

    @property
    def decoded(self) -> bool:
        return self._decoded is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes decoding will still add (the uint8 images' ``nbytes``); 0 once decoded."""
        return 0 if self._decoded is not None else int(self._scan.planned_bytes)

    def __len__(self) -> int:
        return len(self._scan)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image (from the scan: no decoding)."""
        return tuple(int(v) for v in self._scan.image_shape)

    def subset(self, n: int | None = None, seed: int | None = None) -> ImageDataset:
        """:meth:`ImageDataset.subset` of the decoded images."""
        return self.dataset.subset(n, seed)


class SubsetScan:
    """The scan of ``parent.subset(n, seed)`` (``parent`` a :class:`DeferredImageDataset`): the
    rows of its images ``subset`` keeps, copied out of them once they are decoded, so a subset of a
    split that is decoded anyway is not decoded again. It is what a scan of the same folder with
    ``limit=n, seed=seed`` finds (the same images, labels and order).
    ``planned_bytes``: the copy's (a prefix, ``seed`` None, is a view: 0); the parent's own bytes
    are the parent's to count."""

    def __init__(self, parent: DeferredImageDataset, n: int, seed: int | None) -> None:
        self.parent, self.n, self.seed = parent, n, seed
        self.index = subset_indices(len(parent), n, seed)
        self.labels = parent.labels[self.index]        # int64 (n,)
        self.classes = list(parent.classes)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.parent.image_shape

    @property
    def planned_bytes(self) -> int:
        channels, height, width = self.image_shape
        return 0 if self.seed is None else len(self) * channels * height * width

    def decode(self) -> ImageDataset:
        return self.parent.subset(self.n, self.seed)


def pending_bytes(*data) -> int:
    """Bytes the data sets given (or loaders of them, ``.dataset``) will add to memory when their
    pixels are decoded: each distinct :class:`DeferredImageDataset` not yet decoded, once (the same
    one given twice is one array); 0 for anything else (held already)."""
    deferred = {}
    for one in data:
        one = one if isinstance(one, DeferredImageDataset) else getattr(one, "dataset", one)
        if isinstance(one, DeferredImageDataset):
            deferred[id(one)] = one
    return sum(one.pending_bytes for one in deferred.values())


def refuse_raw_pixels(data, what: str) -> None:
    """Refuse an :class:`ImageDataset` or :class:`DeferredImageDataset` (``load_dataset``'s, with
    ``defer=True`` too) passed where batches are read: its uint8 pixels are not yet scaled and
    normalized. One line naming the fix; anything else passes."""
    if isinstance(data, (ImageDataset, DeferredImageDataset)):
        article = "an" if isinstance(data, ImageDataset) else "a"
        raise PrunekitError(f"{what} is {article} {type(data).__name__} of raw uint8 pixels: pass make_loader({what}, "
                            "normalization) (prunekit.data), which scales and normalizes them as the model was "
                            "trained")
