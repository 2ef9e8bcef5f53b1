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


def check_enough_samples(batches: Iterable, n: int, default: bool = False) -> None:
    """Refuse, before any gradient, n per-sample rows from one pass over ``batches`` that holds
    fewer samples (where its size is known: ``data.loaders.samples_per_pass``)."""
    check_sample_count(samples_per_pass(batches), n, default)


def check_sample_count(available: int | None, n: int, default: bool = False) -> None:
    """Refuse n per-sample rows from one pass of ``available`` samples (None: not known), naming
    the n that fits. ``default``: n is the method's default fisher_samples, not the user's."""
    if available is not None and available < n:
        asked = f"{n} gradient rows of one sample asked" + (" (the method's default fisher_samples)" if default else "")
        raise OptionError(f"the training data holds {available} samples, {asked}: lower fisher_samples to "
                          f"{available} or fewer (or auto: the most that fit), or give more training samples "
                          "(or rows of several samples, fisher_batch > 1, read pass after pass)",
                          ("fisher_samples", "fisher_batch"))


def check_filled(filled: int, n: int, batch: int) -> None:
    if filled < n:
        raise OptionError(f"the training data gave only {filled} gradient rows of {batch} sample(s), "
                          f"{n} asked: lower fisher_samples or fisher_batch, or give more training samples",
                          ("fisher_samples", "fisher_batch"))


def regroup(batches: Iterable, size: int):
    """Re-cut a stream of (x, y) batches into groups of exactly ``size`` samples (the last may be
    short). Each group is a list of (x, y) pieces, x (k, ...) and y (k, ...) with the pieces' k
    summing to the group's size: samples are concatenated across batches while their shapes past
    the first dimension agree, and a batch of another shape (e.g. sequences of another length)
    starts a new piece. Batches of one shape give one piece per group, the tensors re-cut as ever."""
    group: list[tuple[torch.Tensor, torch.Tensor]] = []     # finished pieces of the group being cut
    xs, ys, have = [], [], 0                                # the current run of one shape; samples in all
    for x, y in batches:
        if xs and (x.shape[1:] != xs[0].shape[1:] or y.shape[1:] != ys[0].shape[1:]):
            group += _run(xs, ys)
            xs, ys = [], []
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
        while have >= size:
            need = size - sum(piece.shape[0] for piece, _ in group)
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield group + [(x_all[:need], y_all[:need])]
            group, xs, ys, have = [], [x_all[need:]], [y_all[need:]], have - size
    if have:
        yield group + _run(xs, ys)


def _run(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(x, y)] of a run of same-shaped batches concatenated, or [] when it holds no sample."""
    return [(torch.cat(xs), torch.cat(ys))] if sum(x.shape[0] for x in xs) else []


def row_groups(batches: Iterable, batch: int, chunk: int):
    """The samples of each step of a collector, as ``regroup``'s lists of same-shaped (x, y)
    pieces: per-sample rows (``batch`` 1) one piece of at most ``chunk`` samples at a time,
    mini-batch rows ``batch`` samples at a time (the last group may be short)."""
    if batch > 1:
        yield from regroup(batches, batch)
        return
    for group in regroup(batches, chunk):
        for piece in group:
            yield [piece]


def group_size(group: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """The samples in a group of (x (k, ...), y (k, ...)) pieces."""
    return sum(x.shape[0] for x, _ in group)


def one_shape(batches: Iterable):
    """The (x, y) batches of ``batches``, refused in one line at the first whose shapes past the
    first dimension differ from the first batch's: a row that normalises over its mini-batch
    (``fisher_bn='batch'``) needs its samples in one forward."""
    first = None
    for x, y in batches:
        shapes = (tuple(x.shape[1:]), tuple(y.shape[1:]))
        if first is None:
            first = shapes
        elif shapes != first:
            raise OptionError(f"fisher_bn='batch' forwards each mini-batch row's samples together, and the training "
                              f"batches differ in shape (x {list(first[0])}, y {list(first[1])} per sample, then x "
                              f"{list(shapes[0])}, y {list(shapes[1])}): pad "
                              "them to one shape (sequences to one length) or use fisher_bn='frozen'",
                              ("fisher_bn",))
        yield x, y
