"""A user's loader read by prunekit.prune is replayed: every read of a pass gives the same batches,
whatever the caller draws in between, and the caller's RNGs are left as they were. Its randomness
includes what user transforms draw from Python's ``random`` and NumPy's global RNG."""

import random
import shutil
import warnings

import numpy as np
import torch

from prunekit.api import _batches


class Noisy(torch.utils.data.Dataset):
    """Samples with noise drawn in the transform from ``random``, ``numpy.random`` and torch."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        x = torch.full((2,), float(i)) + random.random() + float(np.random.rand()) + torch.rand(1)
        return x, i % 3


def _passes(make, between: bool) -> list:
    """Two passes (epochs 0 and 1) of a fresh replayed loader, flattened; ``between``: the caller
    draws from every global RNG between batches."""
    loader, seen = make(), []
    for _ in range(2):
        for x, y in loader:
            seen.append(torch.cat([x.flatten(), y.float()]))
            if between:
                random.random(), np.random.rand(), torch.rand(1)
    return seen


def test_every_read_of_a_pass_gives_the_same_batches_whatever_the_transforms_draw():
    """Before, Python's and NumPy's global RNGs were not replayed: each read of a pass drew other
    noise (the ranks' rows of one pass differed, so did a stage's from the next)."""
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    data = torch.utils.data.DataLoader(Noisy(), batch_size=4, shuffle=True)
    make = _batches(data, 4, False, 0, "data")
    first = _passes(make, between=False)
    caller = random.getstate(), np.random.get_state(), torch.get_rng_state()
    again = _passes(make, between=True)
    assert len(first) == len(again) == 6
    for a, b in zip(first, again):
        assert torch.equal(a, b), (a, b)
    assert not torch.equal(first[0], first[3])          # epoch 1 is a new epoch: another order, other noise
    random.setstate(caller[0]), np.random.set_state(caller[1]), torch.set_rng_state(caller[2])
    expected = random.random(), float(np.random.rand()), torch.rand(1).item()
    random.setstate(caller[0]), np.random.set_state(caller[1]), torch.set_rng_state(caller[2])
    for x, y in make():          # reading leaves the caller's RNGs as they were
        pass
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected


def _first_pass(rank, world):
    random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)        # the ranks' RNGs need not agree
    make = _batches(torch.utils.data.DataLoader(Noisy(), batch_size=4, shuffle=True), 4, False, 0, "data")
    return torch.stack(_passes(make, between=rank == 1))


def test_two_ranks_read_rank_0s_stream_whatever_the_transforms_draw(tmp_path):
    """Under torchrun the states are rank 0's (broadcast when prune reads the data): both ranks read
    the same batches, noise included. Before, each rank's transforms drew its own noise."""
    from distributed_spawn import run_ranks
    zero, one = run_ranks(_first_pass, 2, tmp_path)
    assert torch.equal(zero, one), (zero, one)


class NumpyNoise(torch.utils.data.Dataset):
    """Samples drawn from NumPy's global RNG alone, as a worker's transform draws them."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([float(np.random.rand())]), i % 2


def _third_pass(persistent: bool, resumed: bool) -> torch.Tensor:
    """Pass 2 of a replayed DataLoader with two workers: read after passes 0 and 1 (an uninterrupted
    run) or first, as a resumed run's fresh process reads it (its ``epoch`` set to 2)."""
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    data = torch.utils.data.DataLoader(NumpyNoise(), batch_size=4, shuffle=True, num_workers=2,
                                       persistent_workers=persistent)
    loader = _batches(data, 4, True, 0, "data")()
    if resumed:
        loader.epoch = 2
    else:
        for _ in range(2):
            list(loader)
    return torch.cat([x for x, _ in loader])


def test_a_resumed_runs_workers_draw_what_an_uninterrupted_runs_draw():
    """NumPy's draws in DataLoader workers are replayed: torch seeds each worker's NumPy from the
    worker's seed, drawn from the replayed RNGs at each pass. With ``persistent_workers`` the workers
    lived on from pass to pass, their RNGs never seeded again: a resumed run's pass 2 (and each
    stage's pass 0 after the first) drew other numbers. Now every pass starts fresh workers."""
    for persistent in (False, True):
        uninterrupted, resumed = _third_pass(persistent, False), _third_pass(persistent, True)
        assert torch.equal(uninterrupted, resumed), (persistent, uninterrupted, resumed)


def test_a_run_resumed_from_other_global_rngs_reads_the_batches_an_uninterrupted_run_reads(tmp_path, monkeypatch):
    """A user's DataLoader(shuffle=True) draws its order from torch's global RNG; prune replayed it
    from the states at the call, so a run killed after stage 1 and resumed by a call whose global
    RNG was elsewhere read other batches in the stages left and ended with other weights (with the
    same global RNG it matched). The run folder keeps the states it started with (data-rng.json)."""
    import prunekit
    from prunekit.runs import RunCheckpointer

    class Stop(Exception):
        pass

    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(0))
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0).long()
    dataset = torch.utils.data.TensorDataset(x, y)

    def call(out, global_seed):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        torch.manual_seed(global_seed)              # the user's global RNG at the call
        loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True)
        prunekit.prune(net, loader, method="chita", sparsity=0.8, stages=3, fisher_samples=32, seed=0, out=out)
        return net.state_dict()

    whole = call(str(tmp_path / "whole"), 1)
    save = RunCheckpointer.save

    def save_then_stop(self, state, model):
        save(self, state, model)
        raise Stop
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    try:
        call(str(tmp_path / "killed"), 1)
    except Stop:
        pass
    monkeypatch.setattr(RunCheckpointer, "save", save)
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["stage-001.safetensors"]
    assert (tmp_path / "killed" / "data-rng.json").is_file()
    shutil.copytree(tmp_path / "killed", tmp_path / "old")
    (tmp_path / "old" / "data-rng.json").unlink()           # as an older prunekit left it: its resume says so
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        call(str(tmp_path / "old"), 2)
    assert any("keeps no RNG states of its data" in str(w.message) for w in said), [str(w.message) for w in said]
    resumed = call(str(tmp_path / "killed"), 2)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    # the control: a whole run from the other global RNG state does end elsewhere (the test can fail)
    other = call(str(tmp_path / "other"), 2)
    assert not all(torch.equal(whole[k], other[k]) for k in whole)


def test_a_peek_through_the_replay_leaves_the_wrapped_prunekit_loader_at_its_epoch():
    """``first_batch`` on ``lambda: loader`` as prunekit.prune wraps it (a ReplayedLoader over the
    user's function): the user's BatchLoader and a held replay are put back to the epoch they were
    at (``epoch_mark``), also through a replay of a replay; a pass the inner replay opened before
    the peek is not rewound by it."""
    from prunekit.api_checks import first_batch
    from prunekit.data.dataset import ImageDataset
    from prunekit.data.loaders import Normalization, make_loader

    gen = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (24, 3, 4, 4), dtype=torch.uint8, generator=gen),
                      torch.randint(0, 10, (24,), generator=gen), [str(k) for k in range(10)])
    loader = make_loader(ds, Normalization((0.5,) * 3, (0.25,) * 3), batch_size=8, shuffle=True, seed=1)
    wrapped = _batches(lambda: loader, 8, shuffle=True, seed=0, what="data")
    for _ in range(3):
        first_batch(wrapped, "data")
    assert loader.epoch == 0
    held = wrapped()
    next(iter(held))                                   # the run's first pass: epoch 0 of both
    assert (held.epoch, loader.epoch) == (1, 1)
    first_batch(lambda: held, "data")
    assert (held.epoch, loader.epoch) == (1, 1)
    twice = _batches(lambda: held, 8, shuffle=True, seed=0, what="data")
    first_batch(twice, "data")
    assert (held.epoch, loader.epoch) == (1, 1)
    twin = make_loader(ds, Normalization((0.5,) * 3, (0.25,) * 3), batch_size=8, shuffle=True, seed=1)
    twin.epoch = 1                                     # the run's second pass reads the loader's epoch 1
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(held, twin)) and loader.epoch == 2
