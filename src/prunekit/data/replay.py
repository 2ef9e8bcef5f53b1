"""A user's own loader read as a replayable stream: every pass depends on the pass's number alone.

A shuffling ``torch.utils.data.DataLoader`` draws a new order at every ``iter()`` (from its
generator, or from torch's global RNG), and its transforms may draw from the global RNGs too
(torch's, Python's ``random``, NumPy's). Under
torchrun each rank reads its gradient rows piece by piece, one pass per piece, so without a replay
every piece, and every rank, would read another order than one process reads.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

_END = object()

# how this version's replay reads a prunekit loader that a user's function gives (``at_pass``: a copy
# at the loader's epoch moved on by the replay's, in ``ReplayedLoader.batch_size`` batches): a run
# folder's data-rng.json records it with each stream's states (key ``prunekit_loader``); one started
# by an older prunekit, which read that loader itself, pass after pass, in its own batches, has none
READS_AT_PASS = "at_pass"


class ReplayedLoader:
    """The batches of ``make()`` with the randomness they draw replayed.

    ``generators``: the loader's own ``torch.Generator`` objects (see :func:`loader_generators`).
    ``states``: the RNG states to start from, as :func:`rng_states` gives them (under torchrun
    rank 0's, so every rank reads rank 0's stream).

    Every ``iter()`` starts a new epoch, as a prunekit ``BatchLoader`` does (``epoch`` counts
    them, from 0; set it to replay an epoch again): epoch 0 from ``states`` (the order the loader
    would have given next), epoch k from states seeded by (a seed drawn from ``states``, k). While
    a batch is drawn those states are swapped in, and the caller's swapped back after, so the
    caller's RNGs are left as they were and what the caller draws between batches does not
    change the stream. ``make_takes_epoch``: ``make(epoch)`` builds the loader of that epoch
    (prunekit's own loader over a user's Dataset or tensors, whose order is drawn from ``seed``
    and the epoch alone, not from the caller's RNGs). A ``make()`` giving a prunekit loader (``lambda:
    loader`` over a ``BatchLoader``) is read at its own epoch moved on by this one (``at_pass``),
    so setting ``epoch`` (a resumed pipeline, a gradual fine-tune, the hybrid's held epoch) moves
    what it reads, and the user's loader stays where it is.
    """

    def __init__(self, make: Callable[..., Iterable], generators: list[torch.Generator],
                 states: list[torch.Tensor], make_takes_epoch: bool = False):
        self.make, self.generators, self.states = make, generators, states
        self.make_takes_epoch = make_takes_epoch
        self.epoch = 0
        self.batch_size: int | None = None     # a prunekit loader that make() gives is read in these (gates')
        draw = torch.Generator()
        draw.set_state(states[0])
        self._seed = int(torch.randint(0, 2**62, (1,), generator=draw))

    def __len__(self) -> int:
        """Batches per pass, as the loader says (TypeError when it has no length)."""
        made = self.make()
        return len(made if self.make_takes_epoch else at_pass(made, 0, self.batch_size))

    def __iter__(self) -> Iterator:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if epoch == 0:
            return self._replay(list(self.states), epoch)
        seeds = [self._seed + epoch * len(self.states) + i for i in range(len(self.states))]
        return self._replay([torch.Generator().manual_seed(seeds[0]).get_state(), random.Random(seeds[1]).getstate(),
                             np.random.RandomState(seeds[2] % 2**32).get_state(),
                             *(torch.Generator().manual_seed(s).get_state() for s in seeds[3:])], epoch)

    def _replay(self, own: list[torch.Tensor], epoch: int) -> Iterator:
        stream = None
        while True:
            theirs = rng_states(self.generators)
            set_rng_states(self.generators, own)
            try:
                if stream is None:      # a DataLoader draws its workers' seed at iter(), its order at the first next()
                    made = self.make(epoch) if self.make_takes_epoch else self.make()
                    stream = iter(made if self.make_takes_epoch else at_pass(made, epoch, self.batch_size))
                batch = next(stream, _END)
                own = rng_states(self.generators)
            finally:
                set_rng_states(self.generators, theirs)
            if batch is _END:
                return
            yield batch


_ours: tuple[type, ...] = ()


def _prunekit_loaders() -> tuple[type, ...]:
    """(``BatchLoader``, ``ReplayedLoader``): the loaders that number their passes themselves.
    ``loaders`` imports this module, so ``BatchLoader`` is imported on the first call (once)."""
    global _ours
    if not _ours:
        from .loaders import BatchLoader
        _ours = (BatchLoader, ReplayedLoader)
    return _ours


def at_pass(loader, epoch: int, batch_size: int | None = None):
    """What pass ``epoch`` of a replay reads from ``loader``, the iterable a user's function gave.

    A loader that numbers its passes itself (a prunekit ``BatchLoader`` or ``ReplayedLoader``:
    its order and augmentation come from its seed and ``epoch``, not from the RNG states a replay
    swaps in) is read at its own epoch moved on by ``epoch``, from a copy: the replay's epoch
    (which a resumed stage pipeline sets, a gradual fine-tune moves on, the hybrid holds) decides
    what it reads, as it does for prunekit's copies of a loader passed as it is (``api._batches``)
    and the CLI's fresh loaders, and the user's loader is left at its epoch. Anything else (a
    DataLoader, a list) is read as it is: the swapped-in RNG states make its passes.
    ``batch_size``: a ``BatchLoader``'s copy is read in batches of this many (the channel methods'
    ``gate_batch_size``, as the executor sets it on a prunekit loader passed as it is); None: its own."""
    if not isinstance(loader, _prunekit_loaders()):
        return loader
    held = copy.copy(loader)
    held.epoch = loader.epoch + epoch
    if batch_size is not None:
        held.batch_size = batch_size
    return held


def epoch_mark(loader) -> Callable[[], None]:
    """A function that puts ``loader``'s pass count back to what it is now, so that a peek at a
    first batch leaves no trace on the stream: the ``epoch`` of a prunekit ``BatchLoader`` or
    ``ReplayedLoader`` (each ``iter()`` moves it on by one) or of ``train``'s per-pass wrapper over a
    user's function (a class with ``wraps_passes``; like a ``ReplayedLoader`` it reads copies of a
    prunekit loader the function gives, ``at_pass``, and leaves that loader where it is). Anything
    else has no count: nothing to put back (its RNG draws are the caller's to restore)."""
    counts = isinstance(loader, _prunekit_loaders()) or getattr(type(loader), "wraps_passes", False)
    epoch = loader.epoch if counts else None

    def put_back() -> None:
        if epoch is not None:
            loader.epoch = epoch
    return put_back


def loader_generators(data) -> list[torch.Generator]:
    """The distinct generators a DataLoader draws from (its own, its sampler's, its batch
    sampler's sampler's); none for anything else."""
    if not isinstance(data, torch.utils.data.DataLoader):
        return []
    sampler = getattr(data.batch_sampler, "sampler", None)
    found = [data.generator, getattr(data.sampler, "generator", None), getattr(sampler, "generator", None)]
    distinct = []
    for generator in found:
        if isinstance(generator, torch.Generator) and all(generator is not g for g in distinct):
            distinct.append(generator)
    return distinct


def rng_states(generators: list[torch.Generator]) -> list:
    """[torch's global CPU RNG state, Python's ``random`` state, NumPy's global state, *each
    generator's state] (torch's: uint8 tensors)."""
    return [torch.get_rng_state(), random.getstate(), np.random.get_state(), *(g.get_state() for g in generators)]


def set_rng_states(generators: list[torch.Generator], states: list) -> None:
    """Set the global RNGs and each generator to ``states`` (as :func:`rng_states` gives)."""
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])
    for generator, state in zip(generators, states[3:]):
        generator.set_state(state)


def states_to_json(states: list) -> dict:
    """``states`` (as :func:`rng_states` gives them) as JSON-able data (a run folder keeps them)."""
    kind, keys, pos, has_gauss, gauss = states[2]
    version, internal, gauss_next = states[1]
    return {"torch": [int(v) for v in states[0].tolist()],
            "random": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
            "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "generators": [[int(v) for v in g.tolist()] for g in states[3:]]}


def states_from_json(saved: dict) -> list:
    """Undo :func:`states_to_json` (``KeyError``, ``TypeError`` or ``ValueError`` on anything else:
    a value that is not an int in its range included, none truncated or wrapped)."""
    def ints(values, top: int) -> list:
        if not isinstance(values, list) or not all(type(v) is int and 0 <= v < top for v in values):
            raise ValueError(f"expected a list of ints in [0, {top})")
        return values
    as_tensor = lambda values: torch.tensor(ints(values, 256), dtype=torch.uint8)      # noqa: E731
    try:                    # each is a state its generator takes (checked on scratch generators)
        r, n = saved["random"], saved["numpy"]
        states = [as_tensor(saved["torch"]), (r["version"], tuple(ints(r["internal"], 2 ** 32)), r["gauss_next"]),
                  (n["kind"], np.array(ints(n["keys"], 2 ** 32), dtype=np.uint32), n["pos"], n["has_gauss"],
                   n["gauss"]),
                  *(as_tensor(g) for g in saved["generators"])]
        for state in (states[0], *states[3:]):
            torch.Generator().set_state(state)
        random.Random().setstate(states[1])
        np.random.RandomState().set_state(states[2])
    except (RuntimeError, OverflowError) as err:
        raise ValueError(str(err)) from None
    return states
