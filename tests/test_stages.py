"""The stage checkpoint protocol's pieces: RNG capture, atomic checkpoints, fixed data per stage."""

import random

import numpy as np
import torch
from torch import nn

from prunekit.api import _batches
from prunekit.data import Normalization, make_loader
from prunekit.data.dataset import ImageDataset
from prunekit.pipelines.stages import StageState, capture_rng, restore_rng
from prunekit.runs import RunCheckpointer, RunFolder


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_come_back():
    """torch's state comes back; NumPy's and ``random``'s are neither captured nor set (nothing
    prunekit runs draws from them: session 54), so the caller's go on as they were."""
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()                  # leaves a cached gaussian in numpy's state
    state = capture_rng()
    assert set(state) == {"torch"}
    first = draws()
    restore_rng(state)
    again = draws()
    assert again[0] == first[0]
    assert again[1] != first[1] and again[2] != first[2]     # drawn on, not set back


def test_gpu_generator_states_travel_through_a_checkpoint(tmp_path, monkeypatch):
    """Each GPU's generator is captured once CUDA is in use, written beside the CPU's and set back
    on resume (torch.cuda stood in for here: no GPU on the test machines)."""
    gpu_states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda index: gpu_states[index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.__setitem__(index, state))
    model = nn.Linear(2, 2)
    RunCheckpointer(RunFolder(tmp_path)).save(StageState(1, model.state_dict(), [], capture_rng()), model)
    rng = RunCheckpointer(RunFolder(tmp_path)).last().rng
    assert [t.tolist() for t in rng["cuda"]] == [t.tolist() for t in gpu_states]
    restore_rng(rng)
    assert [restored[i].tolist() for i in (0, 1)] == [t.tolist() for t in gpu_states]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)     # resumed on a machine with fewer GPUs
    restored.clear()
    restore_rng(rng)
    assert restored == {}


def test_checkpoints_round_trip_and_a_broken_one_is_skipped(tmp_path):
    folder = RunFolder(tmp_path)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    saver = RunCheckpointer(folder, measure=lambda m: {"accuracy": 12.5})
    for stage in (1, 2):
        with torch.no_grad():
            model[0].weight.mul_(0.5)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        kept = {"candidate": torch.arange(5.0) * stage}       # a pipeline's own tensor
        saver.save(StageState(stage, state, [{"stage": s, "seconds": 1.0} for s in range(1, stage + 1)],
                              capture_rng(), tensors=kept), model)
    last = RunCheckpointer(folder).last()
    assert last.stage == 2 and last.history[-1] == {"stage": 2, "seconds": 1.0, "accuracy": 12.5}
    assert list(last.tensors) == ["candidate"] and last.tensors["candidate"].equal(torch.arange(5.0) * 2)
    assert all(last.model_state[k].equal(v) for k, v in model.state_dict().items())
    # A damaged newest file (not one we would write: writes are atomic) falls back to the one before.
    path = saver.path(2)
    path.write_bytes(path.read_bytes()[:100])
    assert RunCheckpointer(folder).last().stage == 1
    assert "skipping unreadable checkpoint stage-002" in (tmp_path / "run.log").read_text()
    assert not [p for p in tmp_path.rglob("*.tmp")]        # no temporary file left behind


def test_a_checkpoint_without_metadata_is_skipped_by_last_as_by_resume_point(tmp_path):
    """A stage file with no safetensors metadata (``metadata()`` None): resume_point skipped it (TypeError),
    while ``last`` raised that TypeError; both now take the checkpoint before it."""
    from safetensors.torch import save_file
    folder = RunFolder(tmp_path)
    model = nn.Linear(2, 2)
    RunCheckpointer(folder).save(StageState(1, model.state_dict(), [{"stage": 1}], capture_rng()), model)
    save_file({"model/weight": torch.zeros(2, 2)}, str(RunCheckpointer(folder).path(2)))
    assert RunCheckpointer(folder).resume_point().endswith("stage-001.safetensors")
    assert RunCheckpointer(folder).last().stage == 1
    assert "skipping unreadable checkpoint stage-002" in (tmp_path / "run.log").read_text()


def test_a_prunekit_loader_gives_every_stage_the_same_batches():
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    ds = ImageDataset(images, torch.arange(40) % 3, classes=["a", "b", "c"])
    loader = make_loader(ds, Normalization((0.5,), (0.5,)), batch_size=8, shuffle=True, seed=7)
    iter(loader)                                             # the user's loader is at epoch 1
    again = _batches(loader, 8, shuffle=True, seed=0, what="data")
    first = [y.tolist() for _, y in again()]
    assert [y.tolist() for _, y in again()] == first         # stage 2 sees stage 1's batches
    assert loader.epoch == 1                                 # and the user's loader is untouched
    assert first == [y.tolist() for _, y in list(loader)]    # epoch 1's order, as the user left it


def test_a_users_shuffling_dataloader_gives_every_stage_the_same_batches():
    """A torch DataLoader reshuffles at every pass (from torch's RNG or its own generator); read
    through ``_batches`` every call is the pass the loader would have given next, and neither
    RNG is moved (each call drew a new order from them)."""
    labels = torch.arange(40)
    for generator in (None, torch.Generator().manual_seed(3)):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(40, 2), labels),
                                             batch_size=8, shuffle=True, generator=generator)
        torch.manual_seed(5)
        again = _batches(loader, 8, shuffle=True, seed=0, what="data")
        first = [y.tolist() for _, y in again()]
        torch.rand(3)                                        # what a stage draws does not change the next
        assert [y.tolist() for _, y in again()] == first
        batches = again()                                    # one loader: every pass is a new epoch
        assert [y.tolist() for _, y in batches] == first and [y.tolist() for _, y in batches] != first
        torch.rand(3)
        expected_rng = torch.get_rng_state()
        torch.manual_seed(5)
        assert first == [y.tolist() for _, y in loader]      # the order the loader would have given
        torch.manual_seed(5)
        torch.rand(3)
        torch.rand(3)
        assert torch.equal(torch.get_rng_state(), expected_rng)    # only the test's own draws moved it
