"""Every training epoch and every evaluation starts exactly one pass over its loader (one
``iter()``): a prunekit loader's epoch moves by one per epoch (each shuffle seen in turn), a
DataLoader's workers start once. tqdm.auto's bar, handed the loader, would call ``iter()`` on it
when made (even disabled) and the loop once more: two passes per epoch."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit import train as train_module
from prunekit.cli import main
from prunekit.data.dataset import ImageDataset
from prunekit.data.loaders import BatchLoader, Normalization, make_loader
from prunekit.train import evaluate_loss_accuracy, recalibrate_batchnorm, train_epoch, train_epochs, sgd, cosine

ASSETS = Path(prunekit.__file__).parent / "assets"


class CountingLoader(torch.utils.data.DataLoader):
    """A DataLoader (taken as it is, never peeked at) counting the passes started."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


class CountingIterable:
    """A plain re-iterable of (x, y) batches (no DataLoader) counting the passes started."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def _data(n=24):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("progress", [False, True])
def test_train_epochs_and_an_evaluation_start_one_pass_of_a_dataloader_each(progress, capsys):
    loader = CountingLoader(torch.utils.data.TensorDataset(*_data()), batch_size=8)
    model = _model()
    train_epochs(model, loader, 3, lr=0.01, progress=progress)
    assert loader.passes == 3
    evaluate_loss_accuracy(model, loader, progress=progress)
    assert loader.passes == 4
    assert recalibrate_batchnorm(model, loader, max_batches=2, progress=progress)
    assert loader.passes == 5
    if progress:                            # the bars are still shown, on stderr
        assert "epoch 3/3" in capsys.readouterr().err


@pytest.mark.parametrize("progress", [False, True])
def test_train_epoch_starts_one_pass_of_a_plain_iterable_and_sees_every_batch(progress):
    x, y = _data()
    loader = CountingIterable([(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)])
    model = _model()
    optimizer = sgd(model, 0.01)
    schedule = cosine(optimizer, 3)
    train_epoch(model, loader, optimizer, schedule, progress=progress)
    assert loader.passes == 1
    assert schedule.last_epoch == 3                 # one step per batch: all three batches trained on
    evaluate_loss_accuracy(model, loader, progress=progress)      # the peek at its first batch, then one pass
    assert loader.passes == 3


def _prunekit_loader(seed=1):
    g = torch.Generator().manual_seed(0)
    ds = ImageDataset(torch.randint(0, 256, (40, 1, 2, 3), dtype=torch.uint8, generator=g),
                      torch.randint(0, 3, (40,), generator=g), ["a", "b", "c"])
    return make_loader(ds, Normalization((0.5,), (0.5,)), batch_size=8, shuffle=True, seed=seed)


@pytest.mark.parametrize("progress", [False, True])
def test_a_prunekit_loader_moves_one_epoch_per_training_epoch_and_evaluation(progress):
    loader = _prunekit_loader()
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    train_epochs(model, loader, 3, lr=0.01, progress=progress)
    assert loader.epoch == 3
    evaluate_loss_accuracy(model, loader, progress=progress)
    assert loader.epoch == 4


def test_each_training_epoch_sees_the_loaders_next_shuffle():
    """Epoch k trains on the order of the loader's epoch k: none is skipped."""
    loader, reference = _prunekit_loader(), _prunekit_loader()
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            if self.training:
                seen.append(x.clone())
            return self.fc(x.flatten(1))

    train_epochs(Recorder(), loader, 2, lr=0.01, progress=False)
    expected = [x for _ in range(2) for x, _ in reference]         # reference's epochs 0 and 1, in turn
    assert len(seen) == len(expected) == 10
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


def _passes_per_training_epoch(monkeypatch) -> list[int]:
    """Patch every train_epoch the command line calls to record how many passes of a prunekit
    loader each call started."""
    starts = [0]
    real_iter = BatchLoader.__iter__

    def counted_iter(self):
        starts[0] += 1
        return real_iter(self)
    monkeypatch.setattr(BatchLoader, "__iter__", counted_iter)
    per_epoch = []

    def counting(real):
        def wrapped(*args, **kwargs):
            before = starts[0]
            out = real(*args, **kwargs)
            per_epoch.append(starts[0] - before)
            return out
        return wrapped
    from prunekit.commands import train as train_command
    from prunekit.structured import pipeline
    for module in (train_module, train_command, pipeline):
        monkeypatch.setattr(module, "train_epoch", counting(module.train_epoch))
    return per_epoch


MNIST = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist")]
PRUNE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), *MNIST,
         "--train-samples", "256", "--json", "--no-stage-eval"]
COMMANDS = {
    "train": ["train", "--model", "mlpnet", *MNIST, "--epochs", "2", "--lr", "0.05", "--json"],
    "gradual prune": [*PRUNE, "--method", "magnitude", "--sparsity", "0.8", "--gradual", "--events", "2",
                      "--epochs-per-event", "1", "--final-epochs", "2"],
    "structured fine-tune": [*PRUNE, "--method", "autobot", "--flops", "0.5", "--gate-batches", "2",
                             "--finetune-epochs", "2"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_training_epoch_of_the_command_line_starts_one_pass(command, monkeypatch, tmp_path, capsys):
    per_epoch = _passes_per_training_epoch(monkeypatch)
    assert main([*COMMANDS[command], "--out", str(tmp_path / "run")]) == 0
    json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(per_epoch) >= 2 and per_epoch == [1] * len(per_epoch)


@pytest.mark.parametrize("command,kill_after,recorded,expected", [
    # prunekit train --epochs 2: stopped after epoch 1, whose checkpoint the old code wrote at loader epoch 2
    ("train", 1, 2, [2]),
    # channel fine-tune, 2 epochs: stopped after gates, BatchNorm and fine-tune epoch 1 (old code: loader epoch 3)
    ("structured fine-tune", 3, 3, [3]),
])
def test_a_run_folder_of_the_two_passes_code_resumes_at_its_recorded_loader_epoch(
        command, kill_after, recorded, expected, monkeypatch, tmp_path, capsys):
    """A folder written before the fix recorded a loader epoch moved by two per pass: the resume
    takes it as it is (no order already seen is read again) and moves it by one per epoch on."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from prunekit.commands import train as train_command
    from prunekit.runs import RunCheckpointer
    from prunekit.structured import pipeline
    save, saved = RunCheckpointer.save, []

    def save_then_stop(self, state, model):
        save(self, state, model)
        saved.append(self.path(state.stage))
        if len(saved) == kill_after:
            raise KeyboardInterrupt
    monkeypatch.setattr(RunCheckpointer, "save", save_then_stop)
    argv = [*COMMANDS[command], "--out", str(tmp_path / "run")]
    assert main(argv) == 130
    monkeypatch.setattr(RunCheckpointer, "save", save)
    with safe_open(str(saved[-1]), "pt") as handle:             # as the old code wrote it
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    extra = json.loads(meta["extra"])
    assert extra["loader_epoch"] == recorded - 1                # this code's: one per pass
    meta["extra"] = json.dumps({**extra, "loader_epoch": recorded})
    save_file(tensors, str(saved[-1]), metadata=meta)

    starts, per_epoch = [], _passes_per_training_epoch(monkeypatch)
    for module in (train_command, pipeline):
        counted = module.train_epoch

        def recording(model, loader, *args, counted=counted, **kwargs):
            starts.append(loader.epoch)
            return counted(model, loader, *args, **kwargs)
        monkeypatch.setattr(module, "train_epoch", recording)
    capsys.readouterr()
    assert main(argv) == 0
    assert starts == expected and per_epoch == [1] * len(expected)
