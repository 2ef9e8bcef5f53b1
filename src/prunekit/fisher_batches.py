"""Feeding gradient rows: batches re-cut to the row size, the progress bar, and the checks that
the data holds (or gave) the rows asked for. Shared by both collectors (``fisher_hooks``,
``fisher_vmap``)."""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from .data.loaders import samples_per_pass
from .options import OptionError


def gradient_bar(n: int, progress: bool) -> tqdm:
    """The "gradients" progress bar over ``n`` rows (pass it as ``progress`` to count several calls)."""
    return tqdm(total=n, desc="gradients", leave=False, disable=not progress, dynamic_ncols=True)


def check_enough_samples(batches: Iterable, n: int) -> None:
    """Refuse, before any gradient, n per-sample rows from one pass over ``batches`` that holds
    fewer samples (where its size is known: ``data.loaders.samples_per_pass``)."""
    check_sample_count(samples_per_pass(batches), n)


def check_sample_count(available: int | None, n: int) -> None:
    """Refuse n per-sample rows from one pass of ``available`` samples (None: not known)."""
    if available is not None and available < n:
        raise OptionError(f"the training data holds {available} samples, {n} gradient rows of one sample asked: "
                          "lower fisher_samples or give more training images (mini-batch rows, fisher_batch > 1, "
                          "read the data pass after pass)", ("fisher_samples", "fisher_batch"))


def check_filled(filled: int, n: int, batch: int) -> None:
    if filled < n:
        raise OptionError(f"the training data gave only {filled} gradient rows of {batch} sample(s), "
                          f"{n} asked: lower fisher_samples or fisher_batch, or give more training images",
                          ("fisher_samples", "fisher_batch"))


def regroup(batches: Iterable, size: int):
    """Re-cut a stream of (x, y) batches into batches of exactly ``size`` (the last may be short)."""
    xs, ys, have = [], [], 0
    for x, y in batches:
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
        while have >= size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, have = [x_all[size:]], [y_all[size:]], have - size
    if have:
        yield torch.cat(xs), torch.cat(ys)
