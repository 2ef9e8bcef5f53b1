"""Batches for training and evaluation, cut from the in-memory uint8 tensor.

No per-sample Python ``Dataset``: each batch is one tensor index of ``ImageDataset.images``,
then (optionally) augmented and normalized as a whole. Shuffling and augmentation draw from a
generator seeded by ``(seed, epoch)``, so runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from prunekit.data.dataset import ImageDataset
from prunekit.data.replay import ReplayedLoader, at_pass
from prunekit.errors import PrunekitError
from prunekit.options import FLOAT32_TINY


@dataclass(frozen=True)
class Normalization:
    """Per-channel affine normalization ``(x/255 - mean) / std``.

    ``mean`` and ``std`` are in pixel units scaled to [0, 1], one value per channel: a mean
    outside [0, 1] or a std above 1 (the 0-255 convention) is refused, naming what to divide
    by 255 (the values above 1 only: a 0-255 mean with a 0-1 std keeps its std) and the result.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise PrunekitError(
                f"normalization needs one mean and one std per channel, got {len(self.mean)} means "
                f"and {len(self.std)} stds; give both the same length"
            )
        if any(s <= 0 for s in self.std):    # (NaN passes here and is refused as not finite below)
            raise PrunekitError(f"normalization stds must be above 0 (the inputs are divided by them), got "
                                f"{','.join(f'{v:g}' for v in self.std)}: give each channel's standard deviation")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise PrunekitError(f"normalization means and stds must be finite numbers, got {self.mean}/{self.std}")
        if any(s < FLOAT32_TINY for s in self.std):   # 0 or subnormal once in float32: inputs divided by it blow up
            raise PrunekitError(f"normalization stds must be at least {FLOAT32_TINY:.3g} (smaller is 0 or loses its "
                                f"precision in float32, which the inputs are divided in), got "
                                f"{','.join(map(repr, self.std))}: give each channel's standard deviation")
        # pixels are scaled to [0, 1] first: a mean above 1, or a std above 1, is the 0-255 convention
        text = lambda values: ",".join(f"{v:g}" for v in values)                           # noqa: E731
        if any(m < 0 for m in self.mean):
            raise PrunekitError(f"normalization means are the pixels' means, in [0, 1] (pixels are scaled to [0, 1]), "
                                f"got {text(self.mean)}: give the mean of each channel")
        high_mean, high_std = [v > 1 for v in self.mean], [v > 1 for v in self.std]
        if any(high_mean) or any(high_std):
            raise PrunekitError(_scale_refusal(self.mean, self.std, high_mean, high_std))


def _scale_refusal(mean: tuple[float, ...], std: tuple[float, ...], high_mean: list[bool],
                   high_std: list[bool]) -> str:
    """The one line refusing a normalization with values above 1 (``high_mean`` / ``high_std``:
    which ones), naming what to divide by 255 (those values only) and the result."""
    text = lambda values: ",".join(f"{v:g}" for v in values)                               # noqa: E731
    scaled = lambda values: ",".join(f"{round(v / 255, 4):g}" if v > 1 else f"{v:g}" for v in values)  # noqa: E731
    fixed = f"{scaled(mean)}/{scaled(std)}"
    given = f"normalization {text(mean)}/{text(std)}"
    why = "but pixels are scaled to [0, 1] before it (means in [0, 1], stds at most 1)"
    if all(high_mean) and all(high_std):
        return f"{given} looks like the 0-255 scale, {why}: divide by 255, {fixed}"
    if all(high_mean) and not any(high_std):
        return f"{given} looks like a 0-255 mean with a 0-1 std, {why}: divide the mean by 255, {fixed}"
    if all(high_std) and not any(high_mean):
        return f"{given} looks like a 0-1 mean with a 0-255 std, {why}: divide the std by 255, {fixed}"
    return f"{given} mixes the 0-255 and 0-1 scales, {why}: divide the values above 1 by 255, {fixed}"


def to_float(images_uint8: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Map uint8 images ``(N, C, H, W)`` in 0..255 to float32 ``(x/255 - mean) / std``."""
    channels = images_uint8.shape[1]
    if channels != len(norm.mean):
        raise PrunekitError(
            f"images have {channels} channels but the normalization has {len(norm.mean)}; "
            "use a normalization with one mean/std per image channel"
        )
    shape = (1, channels, 1, 1)
    mean = torch.tensor(norm.mean, dtype=torch.float32, device=images_uint8.device).view(shape)
    std = torch.tensor(norm.std, dtype=torch.float32, device=images_uint8.device).view(shape)
    return (images_uint8.to(torch.float32) / 255.0 - mean) / std


def augment_cifar(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding, then a random horizontal flip, per image.

    ``x`` is ``(B, C, H, W)`` of any dtype; the result has the same shape and dtype. Each
    image is padded by ``padding`` zeros on every side, cropped back to ``H x W`` at an
    offset drawn uniformly from ``[0, 2*padding]`` in each axis, and mirrored left-right
    with probability 1/2. Offsets and flips are drawn from ``generator`` (a CPU generator).
    Zeros are zeros in the units of ``x``: :class:`BatchLoader` augments the uint8 pixels,
    so its padding is black, as in torchvision's ``RandomCrop(32, padding=4)``.
    """
    batch, _, height, width = x.shape
    span = 2 * padding + 1
    top = torch.randint(0, span, (batch,), generator=generator).to(x.device)
    left = torch.randint(0, span, (batch,), generator=generator).to(x.device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(x.device)

    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = top[:, None] + torch.arange(height, device=x.device)  # (B, H)
    col_offsets = torch.arange(width, device=x.device)
    col_offsets = torch.where(flip[:, None], width - 1 - col_offsets, col_offsets)
    cols = left[:, None] + col_offsets  # (B, W), already mirrored for flipped images
    image_index = torch.arange(batch, device=x.device)[:, None, None, None]
    channel_index = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[image_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator whose state depends on both ``seed`` and ``epoch`` (no collisions
    between e.g. seed 0 epoch 1 and seed 1 epoch 0)."""
    mixed = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(mixed))


class BatchLoader:
    """Iterable of ``(x, y)`` batches: ``x`` float32 ``(B, C, H, W)`` normalized,
    ``y`` int64 ``(B,)``; tensors on the CPU.

    Every ``iter()`` starts a new epoch (``epoch`` counts them, from 0; set it to resume).
    With ``shuffle`` the order is a permutation drawn from ``(seed, epoch)``; with ``augment``
    each batch goes through :func:`augment_cifar` with the same generator. Equal seeds give
    equal batches.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        norm: Normalization,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        seed: int,
        drop_last: bool,
    ) -> None:
        if batch_size < 1:
            raise PrunekitError(f"batch size must be at least 1, got {batch_size}")
        if seed < 0:
            raise PrunekitError(f"seed must be a non-negative integer, got {seed}")
        self.dataset = dataset
        self.norm = norm
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        """Number of batches per epoch."""
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1  # now, not at the first next(), so each iter() call is one epoch
        return self._batches(generator)

    def _batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.dataset), generator=generator) if self.shuffle else None
        for batch in range(len(self)):
            start = batch * self.batch_size
            index = slice(start, start + self.batch_size) if order is None else order[start : start + self.batch_size]
            images = self.dataset.images[index]
            if self.augment:
                images = augment_cifar(images, generator)
            yield to_float(images, self.norm), self.dataset.labels[index]


def make_loader(
    ds: ImageDataset,
    norm: Normalization,
    batch_size: int = 128,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> BatchLoader:
    """Batches of ``ds`` normalized with ``norm``; see :class:`BatchLoader`.

    ``augment`` applies :func:`augment_cifar` (crop with 4 px of black padding + flip) to the
    uint8 pixels before normalization; use it for training only.
    """
    return BatchLoader(ds, norm, batch_size, shuffle, augment, seed, drop_last)


def leaves_one_over(count: int, batch_size: int) -> bool:
    """Whether ``count`` samples in batches of ``batch_size`` end with a batch of one: a BatchNorm
    layer that takes its statistics from the batch cannot (so training loaders drop it)."""
    return count > batch_size and count % batch_size == 1


def map_style(data) -> torch.utils.data.Dataset | None:
    """``data`` as a map-style Dataset of ``(x, y)`` samples where it is one or ``(X, Y)`` tensors
    (a TensorDataset of them); None for any other form (a loader, a function, an IterableDataset)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return torch.utils.data.TensorDataset(*data)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__") \
            and not isinstance(data, torch.utils.data.IterableDataset):
        return data
    return None


def dataset_loader(dataset: torch.utils.data.Dataset, batch_size: int, shuffle: bool,
                   generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader of ``dataset`` (map-style) in batches of ``batch_size``; with ``shuffle``, in a
    new order at each pass (drawn from ``generator``, or from torch's global RNG without one) and
    without a last batch of one sample (``leaves_one_over``: BatchNorm cannot train on it)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       drop_last=shuffle and leaves_one_over(len(dataset), batch_size))


def samples_per_pass(batches) -> int | None:
    """How many samples one pass over ``batches`` yields, where that is known without reading
    it: a :class:`BatchLoader`, or a ``torch.utils.data.DataLoader`` with a batch size and a
    sampler of known length; None for anything else (a generator, a custom batch sampler)."""
    if isinstance(batches, ReplayedLoader):
        batches = batches.make() if batches.make_takes_epoch else at_pass(batches.make(), 0, batches.batch_size)
    if isinstance(batches, BatchLoader):
        size, count = batches.batch_size, len(batches.dataset)
        drop_last = batches.drop_last
    elif isinstance(batches, torch.utils.data.DataLoader) and batches.batch_size is not None:
        try:
            size, count = batches.batch_size, len(batches.sampler)
        except TypeError:                     # a sampler without a length
            return None
        drop_last = batches.drop_last
    else:
        return None
    return count // size * size if drop_last else count
