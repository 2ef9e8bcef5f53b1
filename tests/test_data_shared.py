"""Counts of the real data sets in ../shared/data; skipped where that folder is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunekit.data import load_dataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="no shared data on this machine")
@pytest.mark.parametrize(
    ("name", "folder", "split", "count", "shape"),
    [
        ("mnist", "mnist", "test", 10_000, (1, 28, 28)),
        ("mnist", "mnist", "train", 24_680, (1, 28, 28)),
        ("cifar10", "cifar10", "train", 5_085, (3, 32, 32)),
        ("cifar10", "cifar10", "test", 1_017, (3, 32, 32)),
    ],
)
def test_shared_data_counts(name, folder, split, count, shape):
    ds = load_dataset(name, SHARED / folder, split)
    assert len(ds) == count and ds.image_shape == shape
    assert sorted(set(ds.labels.tolist())) == list(range(10))
