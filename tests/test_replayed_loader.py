"""A user's loader read by prunekit.prune is replayed: every read of a pass gives the same batches,
whatever the caller draws in between, and the caller's RNGs are left as they were. Its randomness
includes what user transforms draw from Python's ``random`` and NumPy's global RNG."""

import random
import shutil
import warnings

import numpy as np
import pytest
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
    user's function): a held replay is put back to the epoch it was at (``epoch_mark``), also
    through a replay of a replay; a pass the replay opened before the peek is not rewound by it.
    The user's BatchLoader is read from copies (``at_pass``, s54): it stays at its epoch."""
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
    next(iter(held))                                   # the run's first pass: the loader's epoch 0
    assert (held.epoch, loader.epoch) == (1, 0)
    first_batch(lambda: held, "data")
    assert (held.epoch, loader.epoch) == (1, 0)
    twice = _batches(lambda: held, 8, shuffle=True, seed=0, what="data")
    first_batch(twice, "data")
    assert (held.epoch, loader.epoch) == (1, 0)
    twin = make_loader(ds, Normalization((0.5,) * 3, (0.25,) * 3), batch_size=8, shuffle=True, seed=1)
    twin.epoch = 1                                     # the run's second pass reads the loader's epoch 1
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(held, twin)) and loader.epoch == 0


def _image_set(count: int = 48, size: int = 8):
    from prunekit.data.dataset import ImageDataset
    gen = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=gen),
                        torch.randint(0, 3, (count,), generator=gen), ["a", "b", "c"])


def _spy_loader(ds, log: list, batch_size: int = 16):
    """A shuffling, augmenting prunekit BatchLoader that appends the epoch of each pass to ``log``."""
    from prunekit.data.loaders import BatchLoader, Normalization

    class Spy(BatchLoader):
        def __iter__(self):
            log.append(self.epoch)
            return super().__iter__()
    return Spy(ds, Normalization((0.5,) * 3, (0.25,) * 3), batch_size, True, True, 1, False)


def test_a_replay_of_lambda_loader_reads_the_loaders_epoch_moved_on_by_its_own():
    """s54: a ReplayedLoader over ``lambda: loader`` (a prunekit BatchLoader) read the user's loader
    at the loader's own pass count, whatever the replay's ``epoch`` said: a stage pipeline resumed
    at epoch k (``loader.epoch = k``), a gradual fine-tune moved on to the run's epoch and the
    hybrid's FALCON phase held at one epoch all read other epochs than the CLI's loaders do. Now
    pass k of the replay reads the user's epoch (its epoch at the call + k), from a copy."""
    from prunekit.data.loaders import make_loader, Normalization

    ds, log = _image_set(), []
    loader = _spy_loader(ds, log)
    loader.epoch = 3                                   # a user's loader already at its epoch 3
    replay = _batches(lambda: loader, 16, shuffle=True, seed=0, what="data")()
    passes = [list(replay), list(replay)]
    replay.epoch = 5                                   # as a resumed pipeline sets it
    passes.append(list(replay))
    assert log == [3, 4, 8] and loader.epoch == 3
    for epoch, seen in zip([3, 4, 8], passes):
        twin = make_loader(ds, Normalization((0.5,) * 3, (0.25,) * 3), batch_size=16, shuffle=True,
                           augment=True, seed=1)
        twin.epoch = epoch
        assert len(seen) == 3 and all(torch.equal(a, b) and torch.equal(u, v) for (a, u), (b, v) in zip(seen, twin))


def test_a_replay_of_lambda_dataloader_still_reads_what_the_dataloader_gives():
    """For a torch DataLoader behind ``lambda:`` nothing changed with ``at_pass``: epoch 0 is the
    order the loader gives from the RNG state at the call, and a replay set to epoch 1 (a resumed
    run) reads the same batches as the uninterrupted replay's second pass."""
    x, y = torch.arange(24.0).view(12, 2), torch.arange(12) % 3
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    torch.manual_seed(7)
    expected = [b for b, _ in data]
    torch.manual_seed(7)
    make = _batches(lambda: data, 4, shuffle=True, seed=0, what="data")
    whole = make()
    first, second = [b for b, _ in whole], [b for b, _ in whole]
    assert all(torch.equal(a, b) for a, b in zip(first, expected)) and len(first) == 3
    resumed = make()
    resumed.epoch = 1
    assert all(torch.equal(a, b) for a, b in zip([b for b, _ in resumed], second))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))      # epoch 1 is another order


def _net():
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


_HYBRID = dict(method="hybrid", flops=0.4, structured_flops=0.7, gate_batches=4, gate_batch_size=16,
               fisher_samples=16, finetune_epochs=2)
_GRADUAL = dict(method="chita", sparsity=0.6, fisher_samples=16, gradual=True, events=2, epochs_per_event=1,
                final_epochs=2)


@pytest.mark.parametrize("options, kill_at", [(_HYBRID, 2), (_GRADUAL, 1)], ids=["hybrid", "gradual"])
def test_lambda_loader_runs_resume_to_the_uninterrupted_model_and_read_the_clis_epochs(tmp_path, options, kill_at):
    """s54: ``prunekit.prune(model, lambda: loader)`` over a prunekit BatchLoader, killed after a
    checkpoint (the hybrid's channel cut; the gradual run's first event) and resumed with a fresh
    loader, ends with the uninterrupted run's weights, and both read the epochs the loader passed as
    it is reads (the CLI's path: a fresh copy of the loader at its epoch for every call) and end
    with its weights. Before, the hybrid resumed its fine-tune at the user's epoch 0 and its FALCON
    phase read several epochs; the gradual run's fine-tunes read the epochs the method's passes
    had left the loader at."""
    import prunekit
    from prunekit import runs
    ds = _image_set()

    def call(wrap: bool, out=None):
        log: list = []
        loader = _spy_loader(ds, log)
        result = prunekit.prune(_net(), (lambda: loader) if wrap else loader, seed=0, out=out, **options)
        return result.model.state_dict(), [e for e in log if e]        # epoch 0: peeks and the first pass

    save, saved = runs.RunCheckpointer.save, []

    def saved_then_killed(self, *args, **kwargs):
        save(self, *args, **kwargs)
        saved.append(1)
        if len(saved) == kill_at:
            raise KeyboardInterrupt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole, read = call(True)
        cli, cli_read = call(False)
        runs.RunCheckpointer.save = saved_then_killed
        try:
            with pytest.raises(KeyboardInterrupt):
                call(True, str(tmp_path / "run"))
        finally:
            runs.RunCheckpointer.save = save
        resumed, _ = call(True, str(tmp_path / "run"))
    assert read == cli_read and read, (read, cli_read)
    for state in (cli, resumed):
        assert state.keys() == whole.keys() and all(torch.equal(whole[k], state[k]) for k in whole)


def test_lambda_loader_trains_channel_gates_in_the_gate_batch_size_as_the_loader_itself_does():
    """s54: the channel methods read a prunekit loader in ``gate_batch_size`` batches (default 64;
    the executor sets it on a copy), but ``lambda: loader`` (a ReplayedLoader) kept the loader's own
    batch size (16 here): its gates, BatchNorm re-estimation and fine-tune read other batches than
    the loader passed as it is (and the CLI's) do. Now the replay reads its copies in that size."""
    import prunekit
    ds = _image_set(count=80)
    runs = []
    for wrap in (False, True):
        log: list = []
        loader = _spy_loader(ds, log)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = prunekit.prune(_net(), (lambda: loader) if wrap else loader, seed=0, method="autobot",
                                    flops=0.6, gate_batches=3, finetune_epochs=1)
        runs.append(result.model.state_dict())
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])



@pytest.mark.parametrize("method, options", [("taper", {"taper_epochs": 1, "channel_multiple": 1}),
                                             ("autobot", {"gate_batches": 3, "finetune_epochs": 0})])
def test_a_channel_method_is_handed_the_users_data_function_without_a_call_of_its_own(method, options,
                                                                                      monkeypatch):
    """s54: the executor called the user's data function once more, outside the replay's RNG swap
    (whatever it draws from torch's global RNG shifting the run's seeded stream), only to see
    whether it gives a prunekit loader to read in the gates' batches: a loader made and never read,
    one call more than at 4ce381c (taper 26, was 25). Now the replayed makes themselves tell
    (``at_pass``): between the executor's dispatch and the method's start the function is not
    called (the repro's full count for taper is 25 again)."""
    import prunekit
    from prunekit import executor
    torch.manual_seed(0)
    x = torch.randn(96, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 2))
    calls = []

    def data():
        calls.append(1)
        return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]

    at = {}
    real_run, real_channels = executor._run, executor.prune_channels

    def run(*args, **kwargs):
        at["dispatch"] = len(calls)
        return real_run(*args, **kwargs)

    def channels(*args, **kwargs):
        at["method"] = len(calls)
        return real_channels(*args, **kwargs)

    monkeypatch.setattr(executor, "_run", run)
    monkeypatch.setattr(executor, "prune_channels", channels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prunekit.prune(net, data, method=method, flops=0.6, seed=3, **options)
    assert at["method"] == at["dispatch"] > 0, at


def _measures(folder) -> dict:
    """A run folder's measurements on the evaluation data (dense, each event, final), no timings."""
    import json
    metrics = json.loads((folder / "metrics.json").read_text())
    pick = lambda record: (record.get("accuracy"), record.get("loss"))     # noqa: E731
    return {"dense": pick(metrics["dense"]), "events": [pick(h) for h in metrics["stages"]],
            "final": pick(metrics["final"])}


@pytest.mark.parametrize("wrap, kill_at", [(True, 1), (False, 0)],
                         ids=["lambda, killed after event 1", "as it is, killed before the first checkpoint"])
def test_a_resumed_runs_measures_read_the_eval_epochs_an_uninterrupted_run_reads(tmp_path, monkeypatch, wrap,
                                                                                 kill_at):
    """s55: every measurement (dense, each event, final) reads one pass of eval_data, and an
    augmenting prunekit loader crops and flips otherwise at each epoch. A resumed run measured its
    events left from the loader's epoch 0 again, where an uninterrupted run reads epoch 2 on: its
    record's accuracies and losses were another run's. Now the same, for ``lambda: loader`` killed
    after a checkpoint and for the loader passed as it is, killed after the dense measurement
    alone (no checkpoint: the pass the dense model took is still counted)."""
    import prunekit
    from prunekit import runs
    ds = _image_set()
    probe = _spy_loader(ds, [])
    assert not torch.equal(next(iter(probe))[0], next(iter(probe))[0])       # epochs 0 and 1 differ
    options = dict(method="magnitude", sparsity=0.6, gradual=True, events=2, epochs_per_event=1, final_epochs=1)

    def call(out):
        train, evaluation = _spy_loader(ds, []), _spy_loader(ds, [])
        prunekit.prune(_net(), lambda: train, eval_data=(lambda: evaluation) if wrap else evaluation, seed=0,
                       out=str(out), **options)

    save, saved = runs.RunCheckpointer.save, []

    def killed(self, *args, **kwargs):
        if len(saved) == kill_at:
            raise KeyboardInterrupt
        save(self, *args, **kwargs)
        saved.append(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(tmp_path / "whole")
        monkeypatch.setattr(runs.RunCheckpointer, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            call(tmp_path / "resumed")
        monkeypatch.setattr(runs.RunCheckpointer, "save", save)
        call(tmp_path / "resumed")
    whole, resumed = _measures(tmp_path / "whole"), _measures(tmp_path / "resumed")
    assert len(whole["events"]) == 2 and whole["final"][1] is not None
    assert resumed == whole
