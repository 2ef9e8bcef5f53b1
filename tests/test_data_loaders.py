"""Normalization, augmentation and batch loaders of prunekit.data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prunekit.data import ImageDataset, Normalization, augment_cifar, make_loader, to_float
from prunekit.errors import PrunekitError
from closeness import assert_close_to_scale

NORM3 = Normalization(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1))


def random_dataset(n: int = 50, channels: int = 3, size: int = 8) -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)
    return ImageDataset(images, torch.arange(n) % 10, [str(k) for k in range(10)])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- to_float / Normalization


def test_to_float_values():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    out = to_float(x, NORM3)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1, 1)
    mean, std = torch.tensor(NORM3.mean), torch.tensor(NORM3.std)
    assert_close_to_scale(out[0, :, 0, 0], -mean / std, rel=1e-6)
    assert_close_to_scale(out[1, :, 0, 0], (1 - mean) / std, rel=1e-6)


def test_to_float_channel_mismatch():
    with pytest.raises(PrunekitError, match="1 channels but the normalization has 3"):
        to_float(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), NORM3)


@pytest.mark.parametrize(("mean", "std"), [((0.5,), (0.5, 0.5)), ((0.5,), (0.0,)), ((), ())])
def test_normalization_validation(mean, std):
    with pytest.raises(PrunekitError):
        Normalization(mean, std)


@pytest.mark.parametrize(("mean", "std", "message"), [
    ((33.33,), (78.57,), "33.33/78.57 looks like the 0-255 scale.*divide by 255, 0.1307/0.3081"),
    # only the values above 1 are divided: a std already in [0, 1] is kept (a 0-255 mean with a 0-1 std)
    ((125.3, 123.0, 113.9), (0.25, 0.24, 0.26), r"125.3,123,113.9/0.25,0.24,0.26 looks like a 0-255 mean with a "
     r"0-1 std, .*: divide the mean by 255, 0.4914,0.4824,0.4467/0.25,0.24,0.26$"),
    ((0.5,), (63.75,), r"looks like a 0-1 mean with a 0-255 std, .*: divide the std by 255, 0.5/0.25$"),
    ((125.3, 0.48, 0.45), (0.25, 61.2, 0.26), r"mixes the 0-255 and 0-1 scales, .*: divide the values above 1 by 255, "
     r"0.4914,0.48,0.45/0.25,0.24,0.26$"),
    ((-0.5,), (0.5,), r"means are the pixels' means, in \[0, 1\].*got -0.5"),
])
def test_normalization_on_the_0_255_scale_is_refused(mean, std, message):
    with pytest.raises(PrunekitError, match=message):
        Normalization(mean, std)
    Normalization((0.0,), (1.0,))            # "none", and the edges of the range, are fine
    Normalization((1.0,), (0.01,))


# ---------------------------------------------------------------- augment_cifar


def crops_and_flips(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every image that a crop of the zero-padded ``image`` plus an optional flip can give."""
    _, height, width = image.shape
    padded = F.pad(image, (padding,) * 4)
    crops = [
        padded[:, top : top + height, left : left + width]
        for top in range(2 * padding + 1)
        for left in range(2 * padding + 1)
    ]
    return crops + [crop.flip(-1) for crop in crops]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_outputs_are_crops_or_flips(dtype):
    x = random_dataset(16, size=6).images.to(dtype)
    out = augment_cifar(x, gen(0), padding=2)
    assert out.shape == x.shape and out.dtype == dtype
    for image, augmented in zip(x, out):
        assert any(torch.equal(augmented, candidate) for candidate in crops_and_flips(image, 2))


def test_augment_uses_both_flips_and_several_offsets():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4).expand(200, 1, 4, 4)
    out = augment_cifar(x, gen(1), padding=0)
    flipped = sum(torch.equal(o, x[0].flip(-1)) for o in out)
    assert 50 < flipped < 150  # about half
    assert all(torch.equal(o, x[0]) or torch.equal(o, x[0].flip(-1)) for o in out)
    shifted = augment_cifar(x, gen(1), padding=2)
    assert len({tuple(o.flatten().tolist()) for o in shifted}) > 20


def test_augment_is_seeded():
    x = random_dataset(32).images
    assert torch.equal(augment_cifar(x, gen(3)), augment_cifar(x, gen(3)))
    assert not torch.equal(augment_cifar(x, gen(3)), augment_cifar(x, gen(4)))


# ---------------------------------------------------------------- make_loader


def test_loader_shapes_and_order_without_shuffle():
    ds = random_dataset(50)
    loader = make_loader(ds, NORM3, batch_size=16)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (16, 3, 8, 8) and y.dtype == torch.int64
    assert_close_to_scale(torch.cat([x for x, _ in batches]), to_float(ds.images, NORM3), rel=1e-6)
    assert torch.equal(torch.cat([y for _, y in batches]), ds.labels)


def test_loader_drop_last():
    loader = make_loader(random_dataset(50), NORM3, batch_size=16, drop_last=True)
    assert len(loader) == 3 and [len(y) for _, y in loader] == [16, 16, 16]
    assert len(make_loader(random_dataset(48), NORM3, batch_size=16)) == 3


def test_samples_per_pass_counts_what_one_pass_yields():
    from prunekit.data.loaders import samples_per_pass

    def counted(batches) -> int:
        return sum(len(y) for _, y in batches)

    tensors = torch.utils.data.TensorDataset(torch.zeros(50, 2), torch.zeros(50, dtype=torch.long))
    for loader in (make_loader(random_dataset(50), NORM3, batch_size=16),
                   make_loader(random_dataset(50), NORM3, batch_size=16, drop_last=True, shuffle=True),
                   torch.utils.data.DataLoader(tensors, batch_size=16, shuffle=True),
                   torch.utils.data.DataLoader(tensors, batch_size=16, drop_last=True)):
        assert samples_per_pass(loader) == counted(loader)
    assert samples_per_pass(iter([])) is None                                      # unknown: not read
    assert samples_per_pass(torch.utils.data.DataLoader(tensors, batch_sampler=[[0, 1], [2]])) is None


def labels_of_epoch(loader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


def test_shuffle_is_a_permutation_and_reproducible():
    ds = ImageDataset(torch.zeros(40, 3, 2, 2, dtype=torch.uint8), torch.arange(40), [str(k) for k in range(40)])
    first, second = (make_loader(ds, NORM3, batch_size=7, shuffle=True, seed=11) for _ in range(2))
    epoch0 = labels_of_epoch(first)
    assert sorted(epoch0) == list(range(40)) and epoch0 != list(range(40))
    assert labels_of_epoch(second) == epoch0  # same seed, same batches
    epoch1 = labels_of_epoch(first)
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(40))  # each epoch reshuffles
    assert labels_of_epoch(second) == epoch1
    other = labels_of_epoch(make_loader(ds, NORM3, batch_size=7, shuffle=True, seed=12))
    assert other != epoch0
    first.epoch = 0  # resuming at an epoch replays it
    assert labels_of_epoch(first) == epoch0


def test_each_iter_call_is_one_epoch():
    ds = ImageDataset(torch.zeros(20, 3, 2, 2, dtype=torch.uint8), torch.arange(20), [str(k) for k in range(20)])
    loader = make_loader(ds, NORM3, batch_size=5, shuffle=True)
    a, b = iter(loader), iter(loader)
    assert loader.epoch == 2
    assert torch.cat([y for _, y in a]).tolist() != torch.cat([y for _, y in b]).tolist()


def test_augmenting_loader_is_deterministic():
    ds = random_dataset(30)

    def epoch(seed):
        return torch.cat([x for x, _ in make_loader(ds, NORM3, batch_size=8, augment=True, seed=seed)])

    assert torch.equal(epoch(5), epoch(5))
    assert not torch.equal(epoch(5), epoch(6))
    plain = torch.cat([x for x, _ in make_loader(ds, NORM3, batch_size=8)])
    assert epoch(5).shape == plain.shape and not torch.equal(epoch(5), plain)


def test_augmented_padding_is_black_pixels():
    ds = ImageDataset(torch.full((64, 3, 4, 4), 200, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64), ["a"])
    x = torch.cat([x for x, _ in make_loader(ds, NORM3, batch_size=64, augment=True)])
    black = to_float(torch.zeros(1, 3, 1, 1, dtype=torch.uint8), NORM3).view(3)
    values = {tuple(pixel.tolist()) for pixel in x.permute(0, 2, 3, 1).reshape(-1, 3)}
    assert tuple(black.tolist()) in values


@pytest.mark.parametrize(("kwargs", "message"), [({"batch_size": 0}, "batch size"), ({"seed": -1}, "seed")])
def test_loader_argument_errors(kwargs, message):
    with pytest.raises(PrunekitError, match=message):
        make_loader(random_dataset(4), NORM3, **kwargs)
