"""Every kind of bad input is refused the same way (issue 10): exit code 2 on the command line or a
``PrunekitError`` in Python, a one-line message that says what is wrong, no traceback, no
warning noise, and no file written, half-written or overwritten.

One table per entry point; each row is one kind of bad input and a word its message must hold.
Command lines run in-process (``prunekit.cli.main``), argparse's own refusals included (their
``SystemExit(2)`` is caught). Every row runs against the same folder of user files (an existing
file, a folder, a binary file, checkpoints, a run folder), snapshotted before and after.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import random
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import prunekit
import prunekit.commands.prune
from prunekit import saving, zoo
from prunekit.cli import main
from prunekit.errors import PrunekitError

ASSETS = Path(prunekit.__file__).parent / "assets"
CKPT = str(ASSETS / "mlpnet.safetensors")
MNIST_DIR = str(ASSETS / "mnist")


# --- the user's folder ------------------------------------------------------------------------

MODEL_FILE = """from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def needs_args(width):
    return nn.Linear(784, width)


def not_a_model():
    return 3


def wrong_input():
    return nn.Sequential(nn.Flatten(), nn.Linear(100, 10))


def no_params():
    return nn.Sequential(nn.Flatten(), nn.Identity())


class NanOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def nan_out():
    return NanOut()


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)), x


def pair():
    return Pair()


def one_batch():
    class OneBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(x.view(len(x), -1))
    return OneBatch()


def rgb_conv():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


class _HalfLayer(nn.Module):            # a layer named half hides nn.Module.half: its forward is broken
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.half = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.half(self.conv(x)).mean((2, 3)))


def shadowed_half():
    return _HalfLayer()


def one_size():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 28 * 28, 10))


class TokenLM(nn.Module):        # a language model's layout: a Linear registered before the embedding it follows
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.wte = nn.Embedding(20, 8, padding_idx=0)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(nn.functional.relu(self.fc(self.wte(ids))))


def tokens():
    return TokenLM()


class _AssertSize(nn.Module):      # made for 32x32 inputs, and asserts it (a common idiom)
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        assert x.shape[-1] == 32, "expected 32x32 images"
        return self.fc(self.conv(x).mean((2, 3)))


def sized_by_assert():
    return _AssertSize()


class _NoForward(nn.Module):      # its forward never defined
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)


def no_forward():
    return _NoForward()

def whole_scores():        # (its class inside: the module-level names another case lists stay as they are)
    class IntOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)).long()

    return IntOut()
"""


class Planted:
    """A pickled object that makes a folder when unpickled: a checkpoint holding one is refused
    without running it (the ``untouched`` snapshot would see the folder)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __reduce__(self):
        return os.mkdir, (self.folder,)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A folder of things a user made, which no refused command may touch."""
    d = tmp_path_factory.mktemp("user")
    (d / "notes.txt").write_text("my notes\n")
    (d / "adir").mkdir()
    (d / "adir" / "keep.txt").write_text("mine\n")
    (d / "empty").write_bytes(b"")
    (d / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (d / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (d / "bad.toml").write_text("method = [unclosed\n")
    (d / "unknown-key.toml").write_text('mehtod = "chita"\n')
    (d / "unknown-hyphen-key.toml").write_text("fisher-sample = 500\n")
    (d / "wrong-type.toml").write_text('fisher-samples = "many"\n')
    (d / "noise.pth").write_bytes(random.Random(0).randbytes(512))     # fixed: a first byte 0x80 reads as a pickle
    with open(d / "plain.pkl", "wb") as f:
        pickle.dump({"fc1.weight": [[1.0]]}, f, protocol=4)
    torch.save({"state_dict": zoo.build("resnet20").state_dict()}, d / "resnet20.pth")
    numpy_state = {k: v.numpy() for k, v in zoo.build("mlpnet").state_dict().items()}
    torch.save(numpy_state, d / "numpy.pth")
    torch.save({"state_dict": numpy_state, "epoch": 3}, d / "numpy-nested.pth")
    mlp_state = zoo.build("mlpnet").state_dict()
    torch.save({k: v.to(torch.complex64) for k, v in mlp_state.items()}, d / "complex.pth")
    torch.save(mlp_state, d / "whole.pth")
    (d / "cut.pth").write_bytes((d / "whole.pth").read_bytes()[:(d / "whole.pth").stat().st_size // 2])
    with zipfile.ZipFile(d / "garbage.pth", "w") as archive:     # a zip archive whose pickle is noise
        archive.writestr("archive/data.pkl", random.Random(1).randbytes(300))
        archive.writestr("archive/version", "3\n")
    torch.save({"state_dict": Planted(str(d / "PLANTED"))}, d / "object.pth")     # would make a folder if run
    save_file({**mlp_state, "fc1.weight": torch.zeros(40, 783)}, d / "narrow-input.safetensors")
    (d / "bom.toml").write_bytes(b'\xef\xbb\xbfmehtod = "chita"\n')     # Notepad's byte-order mark
    (d / "net.py").write_text(MODEL_FILE)
    (d / "broken.py").write_text("import torch\nSCALE = 1 / 0\n")
    (d / "own").mkdir()
    saving.save_model(nn.Linear(2, 2), d / "own" / "model.safetensors",
                      {"model": f"{d}/net.py:build", "input_shape": [1, 28, 28],
                       "normalization": {"mean": [0.0], "std": [1.0]}})
    run = d / "run"                       # a run folder made with other options
    run.mkdir()
    (run / "config.toml").write_text('model = "mlpnet"\nmethod = "chita"\nsparsity = "0.5"\n')
    nan_state = zoo.build("mlpnet").state_dict()
    nan_state["fc1.weight"][0, 0] = float("nan")
    torch.save(nan_state, d / "nan-weights.pth")     # a diverged training's
    huge_state = {k: v * 1e30 for k, v in zoo.build("mlpnet").state_dict().items()}
    torch.save(huge_state, d / "huge-weights.pth")   # finite weights whose outputs overflow to inf, loss nan
    (d / "mlprun").mkdir()                # a finished run folder: its model is some command's input
    saving.save_model(zoo.build("mlpnet"), d / "mlprun" / "model.safetensors", {"model": "mlpnet"})
    (d / "mlprun" / "config.toml").write_text('model = "mlpnet"\nmethod = "magnitude"\nsparsity = "0.5"\n')
    (d / "mlprun" / "export").mkdir()     # its exports: TorchScript and ONNX models, not checkpoints
    with warnings.catch_warnings():       # torch.jit's deprecation notice: a fixture's, not prunekit's
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(nn.Linear(2, 2), torch.zeros(1, 2)),
                       d / "mlprun" / "export" / "model.torchscript.pt")
    (d / "exported.onnx").write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x062.13.0:" + bytes(64))
    (d / "mlpsweep" / "magnitude_sparsity-0.5").mkdir(parents=True)   # a sweep's run: its model is an input
    saving.save_model(zoo.build("mlpnet"), d / "mlpsweep" / "magnitude_sparsity-0.5" / "model.safetensors",
                      {"model": "mlpnet"})
    (d / "oldsweep" / "magnitude_sparsity-0.5").mkdir(parents=True)    # a sweep made with other options
    (d / "oldsweep" / "magnitude_sparsity-0.5" / "config.toml").write_text('model = "mlpnet"\n')
    (d / "usersweep" / "magnitude_sparsity-0.5").mkdir(parents=True)   # a sweep's run folder holding a file of
    (d / "usersweep" / "magnitude_sparsity-0.5" / "mine.safetensors").write_bytes(b"x")    # the user's, no run
    (d / "killedsweep" / "magnitude_sparsity-0.5").mkdir(parents=True)   # a sweep killed in its first run
    (d / "killedsweep" / ".prunekit-report.json").write_text(      # its mark: its planned runs, no report yet
        '{"sweep_runs": ["magnitude_sparsity-0.5", "magnitude_sparsity-0.7"]}')
    (d / "killedsweep" / "magnitude_sparsity-0.5" / "config.toml").write_text(
        'model = "mlpnet"\nmethod = "magnitude"\nsparsity = "0.5"\n')
    (d / "trained").mkdir()               # a finished `prunekit train` run: the user's trained model
    saving.save_model(zoo.build("mlpnet"), d / "trained" / "model.safetensors", {"model": "mlpnet"})
    (d / "trained" / "config.toml").write_text(f'model = "mlpnet"\nepochs = 1\nlr = 0.1\nout = "{d / "trained"}"\n')
    (d / "other-tool").mkdir()            # a metrics.json another tool wrote
    (d / "other-tool" / "metrics.json").write_text('{"accuracy": 0.9}\n')
    (d / "listrun").mkdir()               # a run folder whose metrics.json is JSON but not an object
    (d / "listrun" / "metrics.json").write_text("[1, 2]\n")
    return d


def snapshot(*folders: Path) -> dict:
    """Every file and folder under ``folders``: content hash, size and modification time."""
    state = {}
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for name in dirs:
                state[os.path.join(root, name)] = "dir"
            for name in files:
                path = os.path.join(root, name)
                data = Path(path).read_bytes()
                state[path] = (len(data), hashlib.sha1(data).hexdigest(), os.stat(path).st_mtime_ns)
    return state


@pytest.fixture
def untouched(home):
    """Asserts after the test that the user's folder, the assets and the working directory are unchanged."""
    cwd = Path.cwd()
    before = snapshot(home, ASSETS), sorted(os.listdir(cwd))
    yield
    assert (snapshot(home, ASSETS), sorted(os.listdir(cwd))) == before, "a refused input wrote or changed a file"


# --- command line -----------------------------------------------------------------------------

MLP = ["--model", "mlpnet", "--checkpoint", CKPT]
MNIST = ["--data", "mnist", "--data-dir", MNIST_DIR]
PRUNE = ["prune", *MLP, *MNIST]
TRAIN = ["train", "--model", "mlpnet", *MNIST]
H = "{home}"    # replaced by the user's folder

CLI_CASES = [
    # argparse: usage errors
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["prune", "--sparsity", "0.5"], "required"),
    (["prune", "--model"], "expected one argument"),
    ([*PRUNE, "--sparsity", "0.5", "--bogus"], "unrecognized arguments"),
    ([*PRUNE, "--sparsty", "0.5"], "prunekit prune: error: unrecognized arguments: --sparsty 0.5 (did you mean --sparsity?)"),
    ([*PRUNE, "--flop", "0.5"], "unrecognized arguments: --flop 0.5 (did you mean --flops?)"),   # no abbreviations
    (["eval", "--model", "mlpnet", "--data", "svhn", "--data-dir", MNIST_DIR], "invalid choice"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--fisher-samples", "abc"], "integer or auto"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--schedule", "cubic"], "invalid choice"),
    (["prune", "--model", "mlpnet", "--checkpoint", f"{H}/run/model.safetensors", *MNIST, "--sparsity", "0.5",
      "--out", f"{H}/run", "--force"], "/run holds the model this command reads"),
    (["prune", "--model", f"{H}/mlprun", *MNIST, "--sparsity", "0.9", "--out", f"{H}/mlprun", "--force"],
     "mlprun/model.safetensors), which the run would write over"),
    (["prune", "--checkpoint", f"{H}/mlprun", *MNIST, "--sparsity", "0.9", "--out", f"{H}/mlprun"],
     "pick another --out"),
    (["train", "--checkpoint", f"{H}/mlprun/model.safetensors", *MNIST, "--epochs", "1", "--out", f"{H}/mlprun"],
     "holds the model this command reads"),
    (["sweep", "--checkpoint", f"{H}/mlpsweep/magnitude_sparsity-0.5", *MNIST, "--method", "magnitude",
      "--sparsity", "0.5", "--out", f"{H}/mlpsweep"], "holds the model this command reads"),    # its run's model
    ([*PRUNE, "--method", "falcon", "--flops", "0.5", "--gradual", "--schedule", "const"],
     "--schedule shapes the --stages of a multi-stage run, and --stages is 1"),
    ([*PRUNE, "--sparsity", "0.5", "--eval-split", "val"], "invalid choice"),
    (["eval", *MLP, *MNIST, "--batch-size", "1.5"], "invalid int"),
    (["eval", *MLP, *MNIST, "--seed", "3"], "unrecognized arguments"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--solver", "xyz"], "invalid choice"),
    (["info"], "say which model"),
    (["info", "mlpnet", "--model", "resnet20"], "two models named"),
    (["export"], "required"),
    (["bench-latency", "--model", "mlpnet"], "required: --pruned"),
    ([*TRAIN, "--epochs", "x"], "invalid int"),
    (["compare"], "required"),
    # models and checkpoints
    (["prune", "--model", "nope", *MNIST, "--sparsity", "0.5"], "unknown model"),
    (["info", "resnet21"], "did you mean 'resnet20'?"),
    ([*PRUNE, "--method", "nope", "--sparsity", "0.5"], "unknown method"),
    ([*PRUNE, "--method", "falcn", "--flops", "0.5"], "unknown method 'falcn' (did you mean 'falcon'?)"),
    # the budget given is named (was "for a sparsity budget alone" whatever the budget)
    ([*PRUNE, "--method", "falcon", "--params", "0.5"],
     "falcon needs a --flops budget (e.g. --flops=0.3); for a --params budget alone use chita"),
    ([*PRUNE, "--method", "falcon", "--sparsity", "0.5"], "for a --sparsity budget alone use chita"),
    (["eval", "--model", "mlpnet", "--checkpoint", "/no/such/file.pth", *MNIST], "not found"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/adir", *MNIST], "is a folder"),
    (["info", "mlpnet", "--checkpoint", f"{H}/plain.pkl"], "plain pickle"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/resnet20.pth", *MNIST], "trained for ('resnet20'?)"),
    (["info", "mlpnet", "--checkpoint", f"{H}/noise.pth"], "is not a model checkpoint (neither a torch.save file nor safetensors)"),
    (["info", "mlpnet", "--checkpoint", f"{H}/empty"], "is not a model checkpoint (an empty file)"),
    (["info", "mlpnet", "--checkpoint", f"{H}/notes.txt"], "is not a model checkpoint (a text file)"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/mlprun/export/model.torchscript.pt", *MNIST],
     "is a TorchScript export (as `prunekit export` writes), not a checkpoint: pass the run folder it was exported "
     "from, or its model.safetensors ("),
    (["info", "mlpnet", "--checkpoint", f"{H}/exported.onnx"], "is an ONNX export (as `prunekit export` writes), not a"),
    (["info", f"{H}/exported.onnx"], "is an ONNX export (as `prunekit export` writes), not a model `prunekit info` reads"),
    (["info", "--model", f"{H}/exported.onnx"], "is an ONNX export (as `prunekit export` writes), not a model"),
    (["eval", "--model", f"{H}/exported.onnx", *MNIST], "not a model `prunekit eval` reads: pass the run folder"),
    (["info", "mlpnet", "--checkpoint", "/dev/null"], "checkpoint /dev/null is a device, not a file: pass a torch.save"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/numpy.pth", *MNIST],
     "holds NumPy arrays ('fc1.weight' ...), not torch tensors"),
    (["info", "mlpnet", "--checkpoint", f"{H}/numpy-nested.pth"], "holds NumPy arrays ('fc1.weight' ...)"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/complex.pth", *MNIST],
     "holds 'fc1.weight' as torch.complex64, where the model has torch.float32 weights: a complex-valued checkpoint"),
    # s56: torch's own words ("[Errno 22] Invalid argument", "invalid load key, '\\xf5'") left out: they say no more
    (["info", "mlpnet", "--checkpoint", f"{H}/cut.pth"], "cut.pth is cut short (its zip archive has no end, as a "
     "copy or download that stopped leaves it): save or download it again\n"),
    (["info", "mlpnet", "--checkpoint", f"{H}/garbage.pth"], "garbage.pth is damaged (it does not read as a torch.save "
     "file): save or download it again\n"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/object.pth", *MNIST],
     "object.pth holds Python objects (posix.mkdir under 'state_dict') that prunekit will not load"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/narrow-input.safetensors", *MNIST],
     "in the model): its first layer 'fc1.weight' takes 783 inputs, the model's 784"),
    (["prune", "--recipe", f"{H}/bom.toml"], "unknown key 'mehtod' in"),
    (["eval", "--model", f"{H}/net.py:whole_scores", *MNIST, "--normalize", "none"],
     "whole_scores returns int64 outputs for one image; the model's outputs must be floating point"),
    (["prune", "--model", f"{H}/net.py:whole_scores", *MNIST, "--normalize", "none", "--sparsity", "0.5"],
     "the model's outputs must be floating point"),
    # data
    (["eval", *MLP, "--data", "mnist", "--data-dir", "/no/such/dir"], "does not exist"),
    (["eval", "--model", "resnet20", *MNIST], "(C,H,W)"),
    (["eval", *MLP, "--data", "cifar10", "--data-dir", MNIST_DIR], "cifar"),
    (["eval", *MLP, *MNIST, "--batch-size", "0"], "--batch-size must be at least 1 (samples per batch), got 0"),
    ([*PRUNE, "--sparsity", "0.5", "--train-samples", "0"], "--train-samples"),
    ([*PRUNE, "--sparsity", "0.5", "--resize", "32"], "for image folders"),
    ([*PRUNE, "--sparsity", "0.5", "--device", "gpu0"], "is not a torch device"),
    ([*PRUNE, "--sparsity", "0.5", "--seed", str(2**64), "--out", f"{H}/seeded"], "--seed must be a whole number"),
    ([*TRAIN, "--seed", str(2**64)], "--seed must be a whole number"),
    ([*TRAIN, "--train-samples", "0"], "--train-samples must be at least 1"),
    (["sweep", *MLP, *MNIST, "--sparsity", "0.5", "--seed", str(2**64), "--out", f"{H}/sweep"], "--seed must be"),
    (["eval", *MLP, *MNIST, "--device", "tpu"], "is not a torch device"),
    ([*TRAIN, "--device", "meta"], "runs on cpu, cuda or mps"),
    # budgets
    (PRUNE, "no budget"),
    ([*PRUNE, "--sparsity", "1.5"], "out of range"),
    ([*PRUNE, "--sparsity", "-0.1"], "out of range"),
    ([*PRUNE, "--sparsity", "1.0"], "[0, 1)"),
    ([*PRUNE, "--sparsity", "abc"], "not a number"),
    ([*PRUNE, "--sparsity", "90"], "ambiguous"),
    ([*PRUNE, "--sparsity", "10M"], "out of range"),
    ([*PRUNE, "--flops", "0"], "(0, 1]"),
    ([*PRUNE, "--flops", "-1"], "out of range"),
    ([*PRUNE, "--flops", "150%"], "(0, 1]"),
    ([*PRUNE, "--params", "0.00001"], "infeasible"),
    ([*PRUNE, "--params", "1.5"], "out of range"),
    # method options
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--fisher-samples", "0"], "at least 1"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--stages", "0"], "at least 1"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--max-memory", "1.5"], "got '1.5' (a number without a unit"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--max-memory", "-5G"], "--max-memory must be a size like 16G"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--max-memory", "0G"], "above zero, got '0G'"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--solver", "dfo"], "--solver"),
    ([*PRUNE, "--method", "autobot", "--sparsity", "0.5"], "--flops"),
    ([*PRUNE, "--method", "autobot"], "needs --flops"),
    ([*PRUNE, "--method", "autobot", "--flops", "0.5", "--channel-multiple", "0"], "--channel-multiple must be at least 1"),
    # a params budget with channels: autobot (its cut) and hybrid (its weights phase) take one, reachable and
    # below the model's
    ([*PRUNE, "--method", "taper", "--flops", "0.5", "--params", "0.3"], "takes no --params: for a MAC and a --params "
     "budget with a real speedup use method autobot (channels cut until both are met, e.g. --flops=0.5 --params=0.4), "
     "or method hybrid (channels to --structured-flops"),
    ([*PRUNE, "--method", "hybrid", "--flops", "0.3", "--params", "40000"], "--params 40,000 keeps every parameter"),
    ([*PRUNE, "--method", "autobot", "--flops", "0.5", "--params", "0.001"], "that one channel per group and the "
     "unprunable layers already keep"),
    ([*PRUNE, "--method", "autobot", "--flops", "0.5", "--params", "40000"], "--params 40,000 keeps every parameter"),
    ([*PRUNE, "--method", "autobot", "--flops", "0.5", "--params", "0.3", "--channel-multiple", "4"],
     "--params with --channel-multiple above 1 is not supported"),
    ([*PRUNE, "--method", "magnitude", "--sparsity", "0.5", "--gradual", "--events", "0"], "events"),
    # runaway schedules: refused above a documented cap (each would otherwise run practically forever)
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--stages", "101", "--fisher-samples", "8",
      "--train-samples", "64", "--no-stage-eval"], "--stages must be at most 100, got 101"),
    ([*PRUNE, "--method", "falcon++", "--flops", "0.5", "--stages", "101"], "--stages must be 'auto' or at most 100"),
    ([*PRUNE, "--method", "magnitude", "--sparsity", "0.5", "--gradual", "--events", "101", "--epochs-per-event", "0",
      "--final-epochs", "0", "--no-stage-eval"], "--events must be at most 100, got 101"),
    # more gradient rows (the method's default 1000) than training images: refused before --out is made,
    # and before a sweep's first run (its magnitude run would otherwise finish and leave the chita folder empty)
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--train-samples", "64", "--out", f"{H}/pc"],
     "the training data holds 64 samples, 1000 gradient rows"),
    ([*PRUNE, "--method", "hybrid", "--flops", "0.3", "--train-samples", "64"], "the training data holds 64 "
     "samples, 1000 gradient rows of one sample asked (the method's default --fisher-samples): lower "
     "--fisher-samples to 64 or fewer (or auto"),
    (["sweep", *MLP, *MNIST, "--train-samples", "64", "--method", "magnitude", "chita", "--sparsity", "0.5",
      "--out", f"{H}/sw"], "the training data holds 64 samples, 1000 gradient rows"),
    ([*PRUNE, "--method", "taper", "--flops", "0.5", "--snapshots", "0.3"], "--snapshots must be distinct shares above"),
    ([*PRUNE, "--method", "taper", "--flops", "0.5", "--snapshots", "0.7", "0.7"], "--snapshots must be distinct"),
    ([*PRUNE, "--method", "magnitude", "--sparsity", "0.5", "--gradual", "--lr", "inf"], "--lr must be a finite number"),
    ([*PRUNE, "--method", "magnitude", "--sparsity", "0.5", "--gradual", "--finetune-distill", "nan"],
     "--finetune-distill must be a finite number"),
    ([*PRUNE, "--method", "autobot", "--flops", "0.5", "--beta", "nan"], "--beta must be a finite number"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--ridge", "inf"], "--ridge must be a finite number"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--ridge", "1", "--relative-ridge", "0.5"],
     "--relative-ridge sets λ when --ridge is not given, and --ridge is 1: give one of them"),
    ([*PRUNE, "--method", "chita", "--sparsity", "0.5", "--final-pick", "last"],
     "--final-pick shapes the --stages of a multi-stage run, and --stages is 1"),
    ([*PRUNE, "--method", "autobot", "--flops", "0.5", "--finetune-lr", "5"],
     "--finetune-lr shapes the fine-tune, and --finetune-epochs is 0: give --finetune-epochs"),
    ([*PRUNE, "--method", "hybrid", "--flops", "0.3", "--finetune-temperature", "2"],
     "--finetune-temperature shapes the fine-tune, and --finetune-epochs is 0"),
    ([*PRUNE, "--method", "autobot", "--flops", "0.5", "--finetune-epochs", "1", "--finetune-distill", "0",
      "--finetune-temperature", "2"], "--finetune-distill is 0: give --finetune-distill"),
    ([*PRUNE, "--method", "taper", "--flops", "0.5", "--taper-temperature", "2"],
     "--taper-distill is 0: give --taper-distill"),
    ([*PRUNE, "--method", "magnitude", "--sparsity", "0.5", "--gradual", "--finetune-temperature", "2"],
     "--finetune-distill is 0: give --finetune-distill"),
    ([*PRUNE, "--method", "falcon", "--flops", "0.5", "--layer-search", "0", "--refit-batches", "0", "--refit-ridge", "5"],
     "--refit-ridge shapes the re-fit, and --refit-batches is 0: give --refit-batches"),
    ([*PRUNE, "--method", "magnitude", "--sparsity", "0.5", "--refit-ridge", "5"], "leave --refit-ridge out"),
    # recipes, run folders, --out
    (["prune", "--recipe", "/no/such/recipe.toml"], "does not exist"),
    (["prune", "--recipe", f"{H}/adir"], "is a folder"),
    (["prune", "--recipe", f"{H}/binary.toml"], "not a text file"),
    (["prune", "--recipe", f"{H}/bad.toml"], "not valid TOML"),
    (["prune", "--recipe", f"{H}/unknown-key.toml"], "did you mean"),
    (["prune", "--recipe", f"{H}/unknown-hyphen-key.toml"], "did you mean 'fisher-samples'?"),
    (["prune", "--recipe", f"{H}/wrong-type.toml"], "integer"),
    (["prune", "--resume", f"{H}/adir"], "not a prunekit run folder"),
    (["prune", "--resume", f"{H}/no-such-run"], "no-such-run does not exist"),
    (["prune", "--resume", f"{H}/run", "--sparsity", "0.9"], "leave out --sparsity"),
    (["sweep", "--resume", f"{H}/run"], "sweep takes no --resume"),
    (["train", "--resume", f"{H}/mlprun"], "train takes no --resume: a train run carries on when you run the same "
     "train command again with the same --out"),
    ([*TRAIN, "--epochs", "1", "--resume=" + f"{H}/mlprun"], "run the same train command again with the same --out"),
    ([*PRUNE, "--sparsity", "0.5", "--out", f"{H}/notes.txt"], "is a file"),
    ([*PRUNE, "--sparsity", "0.5", "--out", f"{H}/adir"], "holding other files"),
    ([*PRUNE, "--sparsity", "0.5", "--out", f"{H}/run"], "holds another run"),
    ([*PRUNE, "--method", "autobot", "--flops", "0.5", "--out", f"{H}/adir"], "holding other files"),
    # train
    ([*TRAIN, "--epochs", "0"], "--epochs"),
    ([*TRAIN, "--lr", "-1"], "--lr"),
    ([*TRAIN, "--lr", "0"], "--lr"),
    ([*TRAIN, "--weight-decay", "-1"], "--weight-decay"),
    ([*TRAIN, "--batch-size", "0"], "--batch-size"),
    ([*TRAIN, "--lr", "inf"], "--lr"),
    ([*TRAIN, "--weight-decay", "inf"], "--weight-decay"),
    ([*TRAIN, "--zeros", "none"], "invalid choice: 'none' (choose from 'keep', 'train')"),
    ([*TRAIN, "--batch-size", "100000", "--out", f"{H}/trained"], "lower --batch-size"),
    ([*TRAIN, "--out", f"{H}/notes.txt"], "is a file"),
    ([*TRAIN, "--out", f"{H}/adir"], "holding other files"),
    ([*PRUNE, "--sparsity", "0.5", "--out", ""], "--out is an empty path"),
    # sweep, compare, export, bench-latency
    (["sweep", *MLP, *MNIST, "--out", f"{H}/sweep"], "needs budgets"),
    (["sweep", *MLP, *MNIST, "--method", "nope", "--sparsity", "0.5", "--out", f"{H}/sweep"], "unknown method"),
    (["sweep", *MLP, *MNIST, "--sparsity", "0.5", "0.6", "--flops", "0.5", "0.4", "0.3", "--out", f"{H}/sweep"],
     "same length"),
    (["sweep", *MLP, *MNIST, "--sparsity", "0.5", "0.5", "--out", f"{H}/sweep"], "magnitude_sparsity-0.5 twice"),
    (["compare", f"{H}/listrun"], "not a prunekit metrics file"),
    (["compare", f"{H}/listrun", f"{H}/listrun/"], "is named twice"),
    (["compare", f"{H}/other-tool"], "not the metrics of a prunekit run"),
    (["sweep", *MLP, *MNIST, "--sparsity", "0.5", "--out", ""], "--out is an empty path"),
    (["compare", f"{H}/other-tool", "--out", ""], "--out is an empty path"),
    (["sweep", *MLP, *MNIST, "--sparsity", "0.3", "0.5", "--train-samples", "64", "--out", f"{H}/oldsweep"],
     "magnitude_sparsity-0.5 holds a run made with other options"),
    (["sweep", *MLP, *MNIST, "--sparsity", "0.5", "--train-samples", "64", "--out", f"{H}/usersweep"],
     "usersweep/magnitude_sparsity-0.5/mine.safetensors, not a run's: move it out of"),   # the file in its way
    (["export", f"{H}/adir", "--onnx"], "no prunekit model"),
    (["export", f"{H}/nowhere", "--onnx"], "is not a folder"),
    (["export", f"{H}/own", "--onnx"], "name its file again, --model"),
    (["export", f"{H}/mlprun", "--dense", "--normalize-in-graph"], "--normalize-in-graph is for the graphs: add --onnx"),
    # a model of the user's own: --model net.py:FUNCTION
    (["prune", "--model", f"{H}/net.py", *MNIST, "--sparsity", "0.5"], "names a file but no function"),
    (["prune", "--model", f"{H}/net.py:2x", *MNIST, "--sparsity", "0.5"], "not a Python function name"),
    (["prune", "--model", f"{H}/nope.py:build", *MNIST, "--sparsity", "0.5"], "does not exist"),
    (["prune", "--model", f"{H}/net.py:missing", *MNIST, "--sparsity", "0.5"], "it defines NanOut, Pair, TokenLM, build, nan_out, needs_args"),
    (["prune", "--model", f"{H}/net.py:needs_args", *MNIST, "--sparsity", "0.5"], "needs arguments (width)"),
    (["prune", "--model", f"{H}/net.py:not_a_model", *MNIST, "--sparsity", "0.5"], "returned a int"),
    (["prune", "--model", f"{H}/broken.py:build", *MNIST, "--sparsity", "0.5"],
     "ZeroDivisionError: division by zero (broken.py line 2)"),
    (["prune", "--model", f"{H}/net.py:build", *MNIST, "--sparsity", "0.5"], "--normalize none"),
    (["prune", "--model", f"{H}/net.py:one_batch", *MNIST, "--normalize", "none", "--sparsity", "0.5", "--onnx",
      "--out", f"{H}/newrun"], "turns the batch size into a constant (len(x)"),
    (["prune", "--model", f"{H}/net.py:build", *MNIST, "--sparsity", "0.5", "--normalize", "0.5"], "MEANS/STDS"),
    (["prune", "--model", f"{H}/net.py:build", *MNIST, "--sparsity", "0.5", "--normalize", "0.5,0.5/1,1"],
     "gives 2 channel(s) but the images have 1"),
    (["prune", "--model", f"{H}/net.py:build", *MNIST, "--sparsity", "0.5", "--normalize", "nan/1"], "finite"),
    (["prune", "--model", f"{H}/net.py:build", *MNIST, "--sparsity", "0.5", "--normalize", "33.33/78.57"],
     "looks like the 0-255 scale, but pixels are scaled to [0, 1] before it (means in [0, 1], stds at most 1): "
     "divide by 255, 0.1307/0.3081"),
    (["eval", "--model", f"{H}/net.py:build", *MNIST, "--normalize", "0.1307/78.57"],
     "looks like a 0-1 mean with a 0-255 std, but pixels are scaled to [0, 1] before it (means in [0, 1], stds at "
     "most 1): divide the std by 255, 0.1307/0.3081"),
    (["prune", "--model", f"{H}/net.py:build", *MNIST, "--sparsity", "0.5", "--normalize", "0.5/inf"], "finite"),
    (["eval", "--model", f"{H}/net.py:build", *MNIST, "--normalize", "0.1307/0"],
     "--normalize 0.1307/0: stds must be above 0"),
    (["prune", "--model", f"{H}/net.py:build", *MNIST, "--sparsity", "0.5", "--normalize", "0.1307/-0.3"],
     "--normalize 0.1307/-0.3: stds must be above 0"),
    ([*PRUNE, "--sparsity", "0.5", "--normalize", "none"], "is for a model file"),
    (["eval", "--model", f"{H}/net.py:wrong_input", *MNIST, "--normalize", "none"],
     "fails on one of the mnist test images, shape (1, 28, 28)"),
    (["eval", "--model", f"{H}/net.py:pair", *MNIST, "--normalize", "none"], "returns a tuple for one image"),
    (["prune", "--model", "mlpnet", "--checkpoint", f"{H}/nan-weights.pth", *MNIST, "--sparsity", "0.5"],
     "the model's fc1.weight holds nan or inf values: load finite weights (did its training diverge?)"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/nan-weights.pth", *MNIST],
     "the model's fc1.weight holds nan or inf values: load finite weights (did its training diverge?)"),
    ([*TRAIN, "--checkpoint", f"{H}/nan-weights.pth", "--epochs", "1", "--out", f"{H}/trained"],
     "the model's fc1.weight holds nan or inf values: load finite weights (did its training diverge?)"),
    (["prune", "--model", f"{H}/net.py:nan_out", *MNIST, "--normalize", "none", "--method", "chita", "--sparsity",
      "0.5", "--fisher-samples", "32"], "the model's loss on the evaluation data is nan: its outputs are not finite"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/huge-weights.pth", *MNIST],
     "the model's loss on the evaluation data is nan: its outputs are not finite numbers"),
    (["eval", "--model", f"{H}/net.py:nan_out", *MNIST, "--normalize", "none"],
     "the model's loss on the evaluation data is nan: its outputs are not finite numbers"),
    (["info", f"{H}/net.py:no_params", "--input-shape", "1,28,28"], "the model has no parameters"),
    (["eval", "--model", f"{H}/net.py:no_params", *MNIST, "--normalize", "none"], "the model has no parameters"),
    (["prune", "--model", f"{H}/net.py:no_params", *MNIST, "--normalize", "none", "--sparsity", "0.5"],
     "the model has no parameters"),
    (["train", "--model", f"{H}/net.py:no_params", *MNIST, "--normalize", "none", "--epochs", "1"],
     "the model has no parameters"),
    (["info", f"{H}/net.py:build"], "--input-shape"),
    (["info", f"{H}/net.py:build", "--input-shape", "1,0"], "is not a shape"),
    (["info", f"{H}/net.py:rgb_conv", "--input-shape", "32,32"],     # H,W without C: the channels are named
     "; give --input-shape 3,32,32 (channels first: its first convolution, 0, takes 3 channels)"),
    (["info", f"{H}/net.py:rgb_conv", "--input-shape", "1,32,32"], "fails on an input of --input-shape 1,32,32: "),
    # the shape fits, the model's own forward is broken: the exception and its line, not the shape given back
    (["info", f"{H}/net.py:shadowed_half", "--input-shape", "1,28,28"], "net.py:shadowed_half's forward raised "
     "TypeError on an input of --input-shape 1,28,28 (its first convolution takes those channels), at net.py line 73: "),
    # the channels fit, the height and width do not: no shape given back that is the one given
    (["info", f"{H}/net.py:one_size", "--input-shape", "1,14,14"], "forward raised RuntimeError on an input of "
     "--input-shape 1,14,14 (its first convolution takes those channels): mat1 and mat2 shapes cannot be multiplied "
     "(1x784 and 3136x10); give the height and width the model was made for (--input-shape C,H,W), or fix its "
     "forward if those are right"),
    (["eval", "--model", f"{H}/net.py:shadowed_half", *MNIST, "--normalize", "none"], "forward raised TypeError on one "
     "of the mnist test images, shape (1, 28, 28) (C,H,W), at net.py line 73: "),
    # an assert on the input's size: the line it fails at, and both causes (the data's shape, or the forward)
    (["eval", "--model", f"{H}/net.py:sized_by_assert", *MNIST, "--normalize", "none"], "forward raised AssertionError on "
     "one of the mnist test images, shape (1, 28, 28) (C,H,W), at net.py line 107: expected 32x32 images; either the "
     "data's shape is not the one the model was made for (pick data the model takes) or its forward is wrong"),
    (["info", f"{H}/net.py:sized_by_assert", "--input-shape", "1,28,28"], "forward raised AssertionError on an input of "
     "--input-shape 1,28,28 (its first convolution takes those channels), at net.py line 107: expected 32x32 images; "
     "either that is not the shape the model was made for (give that one as --input-shape, channels first) or its "
     "forward is wrong"),
    # a class without forward: said so, not "pick data the model takes" nor "the height and width"
    (["eval", "--model", f"{H}/net.py:no_forward", *MNIST, "--normalize", "none"], "net.py:no_forward: the model has "
     "no forward (Module [_NoForward] is missing the required \"forward\" function): define forward(self, x)"),
    (["info", f"{H}/net.py:no_forward", "--input-shape", "1,32,32"], "net.py:no_forward: the model has no forward"),
    # float ids reach the embedding: no --input-shape can work, and no "first layer takes 8 features"
    (["info", f"{H}/net.py:tokens", "--input-shape", "16"], "; the model takes integer token ids, which no "
     "--input-shape gives (it makes float inputs): prune it from Python on token ids"),
    (["info", "mlpnet", "--input-shape", "-1,28,28"], "--input-shape: '-1,28,28' is not a shape"),
    ([*PRUNE, "--sparsity", "0.5", "--device", "-cpu"], "'-cpu' is not a torch device"),
    # a path starting with "-" is a mistyped option (it was taken: prune made a folder "-weird")
    ([*PRUNE, "--method", "magnitude", "--sparsity", "0.5", "--out", "-weird"], "--out -weird: a path starting "
     "with '-' is most likely a mistyped option; give the path (for a file or folder of that name, write ./-weird)"),
    (["sweep", *MLP, *MNIST, "--method", "magnitude", "--sparsity", "0.5", "--out=-weird"], "write ./-weird"),
    ([*TRAIN, "--epochs", "1", "--out", "-weird"], "--out -weird: a path starting with '-'"),
    (["compare", f"{H}/run", "--out", "-weird"], "--out -weird: a path starting with '-'"),
    (["eval", "--model", "mlpnet", "--checkpoint", "-weird.pth", *MNIST], "write ./-weird.pth"),
    (["prune", "--recipe", "-weird.toml"], "--recipe -weird.toml: a path starting with '-'"),
    (["info", "resnet20", "--input-shape", "3,64,64"], "is not the input of resnet20, 3,32,32"),
    (["eval", "--model", "mlpnet", "--checkpoint", f"{H}/own/model.safetensors", *MNIST], "net.py:build' model"),
    (["eval", "--checkpoint", f"{H}/own/model.safetensors", *MNIST], "name its file again, --model path/to/net.py:build"),
    (["eval", *MNIST], "say which model"),
    (["eval", "--checkpoint", f"{H}/adir", *MNIST], "is a folder, not a file"),
    (["eval", "--checkpoint", "/no/such/file.pth", *MNIST], "not found"),
    (["eval", "--checkpoint", f"{H}/resnet20.pth", *MNIST], "resnet20.pth does not record it"),
    (["eval", "--model", f"{H}/net.py:needs_args", "--checkpoint", f"{H}/own/model.safetensors", *MNIST],
     "load it as --model"),
    (["export", f"{H}/adir"], "--onnx"),
    (["bench-latency", "--model", "mlpnet", "--pruned", f"{H}/adir", "--threads", "0"], "--threads 0: --threads must be positive"),
    (["bench-latency", "--pruned", CKPT, "--threads", "1", "-1"], "--threads -1: --threads must be positive"),
    (["bench-latency", "--pruned", CKPT, "--batch-sizes", "0"], "--batch-sizes 0: --batch-sizes must be positive"),
    (["bench-latency", "--pruned", CKPT, "--warmup", "-1"], "--warmup -1: --warmup must be 0 or more"),
    (["bench-latency", "--pruned", CKPT, "--batch-sizes", "1", "1"], "--batch-sizes gives 1 twice: give each once"),
    (["bench-latency", "--pruned", CKPT, "--threads", "2", "1", "2"], "--threads gives 2 twice: give each once"),
    (["bench-latency", "--model", "mlpnet", "--pruned", f"{H}/adir"], "no pruned model"),
    (["bench-latency", "--pruned", CKPT, "--checkpoint", CKPT], "--checkpoint must be the dense weights"),
    (["bench-latency", "--pruned", f"{H}/notes.txt"], "notes.txt is not a model checkpoint (a text file): pass a run folder"),
    (["bench-latency", "--pruned", f"{H}/plot.png"], "plot.png is not a model checkpoint (a PNG image): pass a run folder"),
    (["eval", "--checkpoint", f"{H}/plot.png", *MNIST], "plot.png is not a model checkpoint (a PNG image): pass a torch.save"),
    (["bench-latency", "--pruned", CKPT, "--input-shape", "3,32,32"], "is not the input of mlpnet, 1,28,28"),
    (["bench-latency", "--pruned", f"{H}/run"], "has not finished (no model.safetensors yet): resume it with `prunekit prune --resume"),
    (["bench-latency", "--model", "mlpnet", "--pruned", CKPT, "--batch-sizes", "1", "10000000000"],
     "the largest batch size that fits is"),
    (["compare", f"{H}/nothing-here"], "nothing-here"),
    # gradual options the schedule leaves idle
    ([*PRUNE, "--sparsity", "0.5", "--gradual", "--events", "3", "--start-keep", "0.1"],
     "--start-keep 0.1 is the share kept before the first event, and the budget keeps 0.5: every event would "
     "prune straight to the budget"),
    ([*PRUNE, "--sparsity", "0.5", "--gradual", "--events", "1", "--start-keep", "0.7", "--event-schedule", "exp"],
     "--start-keep and --event-schedule shape the schedule from dense down to the budget, and --events is 1"),
    ([*PRUNE, "--sparsity", "0.5", "--gradual", "--events", "2", "--epochs-per-event", "0", "--final-epochs", "0",
      "--lr", "5"], "--lr shapes the fine-tuning, and --final-epochs is 0 and --epochs-per-event is 0"),
    ([*PRUNE, "--sparsity", "0.5", "--force"], "--force clears the run folder --out names, and there is no --out"),
    ([*PRUNE, "--sparsity", "0.5", "--out", f"{H}/trained"], "trained holds a `prunekit train` run (its trained "
     "model.safetensors): pick another --out (--force would delete that trained model)"),
    ([*PRUNE, "--method", "autobot", "--flops", "0.5", "--reconstruct-ridge", "0.1"],
     "--reconstruct-ridge shapes the re-fit after the cut, and --reconstruct-batches is 0"),
]
CLI_CASES += [
    # session 55's walk: each was accepted, hung, or refused in words that did not name the fix
    # --out inside --data-dir: an image folder read the run's folder as a class (refused before any file is read)
    (["train", "--model", f"{H}/net.py:build", "--normalize", "none", "--data", "imagefolder", "--data-dir",
      f"{H}/adir", "--out", f"{H}/adir/train/run"], "adir/train/run is inside the image folder --data-dir"),
    # a list option given twice: the second list replaced the first without a word (an option of one
    # value keeps argparse's rule, the last one wins: test_repeated_switches_and_list_values_still_parse)
    (["sweep", *MLP, *MNIST, "--method", "magnitude", "--method", "chita", "--sparsity", "0.5", "--out", f"{H}/sw"],
     "--method given twice: give all its values after one --method"),
    (["bench-latency", "--pruned", CKPT, "--threads", "1", "--threads", "2"], "--threads given twice"),
    # a recipe that is no file (a pipe blocked forever: test_recipe_that_is_a_pipe_is_refused)
    (["prune", "--recipe", "/dev/null"], "recipe /dev/null is a device, not a file"),
    # PATH:FUNCTION whose PATH is no Python file: what is wrong with PATH, not the zoo's names
    (["info", f"{H}/adir:build", "--input-shape", "1,28,28"], "adir is a folder; write path/to/net.py:FUNCTION"),
    (["info", f"{H}/notes.txt:build", "--input-shape", "1,28,28"], "notes.txt is not a .py file"),
    (["info", "/dev/null:build", "--input-shape", "1,28,28"], "/dev/null is a device, not a .py file"),
    (["info", f"{H}/net.py:build:x", "--input-shape", "1,28,28"], "'build:x' after the colon of model"),
    # --out under a file: "Not a directory" after the model and data were loaded
    ([*PRUNE, "--sparsity", "0.5", "--out", f"{H}/notes.txt/sub"], "notes.txt is a file, not a folder: pass an "
     "--out whose parent is a folder"),
    # --data-dir "": read as the current folder
    (["eval", *MLP, "--data", "mnist", "--data-dir", ""], "--data-dir is an empty path"),
    (["train", "--model", "mlpnet", "--data", "mnist", "--data-dir", " ", "--epochs", "1"], "--data-dir is an empty path"),
    # budgets past float's range, digits other than 0-9
    ([*PRUNE, "--sparsity", "1e309"], "--sparsity '1e309' is not a finite number: as a share"),
    ([*PRUNE, "--flops", "1e309"], "--flops '1e309' is not a finite number"),
    ([*PRUNE, "--sparsity", "0.5", "--method", "chita", "--fisher-samples", "\uff18"],
     "--fisher-samples \uff18: write the number with the digits 0-9"),
    ([*PRUNE, "--sparsity", "\uff10.\uff15"], "write the number with the digits 0-9"),
    # sweep into a folder of the user's files, which prune and train refuse
    (["sweep", *MLP, *MNIST, "--method", "magnitude", "--sparsity", "0.5", "--out", f"{H}/adir"],
     "adir is a folder holding other files ("),
    # patterns shown as Python reprs ("None/['*']")
    ([*PRUNE, "--sparsity", "0.5", "--exclude", "*"], "no prunable weights matched: --exclude * leaves no layer to "
     "prune; check those patterns against the layer names (fc1, fc2, fc3)"),
    # an option of another command: "did you mean --crop?"
    ([*PRUNE, "--sparsity", "0.5", "--zeros", "keep"], "--zeros is an option of `prunekit train`, not of prune"),
]
HUGE = "99999999999999999999999"       # past sys.maxsize: itertools.islice failed mid-run
GRADUAL = [*PRUNE, "--sparsity", "0.5", "--gradual", "--events", "2", "--epochs-per-event", "1", "--out", f"{H}/g"]
TAPER = [*PRUNE, "--method", "taper", "--flops", "0.5", "--taper-epochs", "0.5", "--out", f"{H}/tp"]
AUTOBOT = [*PRUNE, "--method", "autobot", "--flops", "0.5", "--gate-batches", "2", "--out", f"{H}/ab"]
CLI_CASES += [
    # session 55's second walk: numbers that pass "finite, > 0" but not float32, and counts past C's
    # long: each crashed mid-run leaving a folder, or "succeeded" with nothing trained
    ([*TRAIN, "--lr", "1e308", "--out", f"{H}/t"], "--lr must be at most 3.4e+38 (the model computes in float32)"),
    ([*TRAIN, "--lr", "3.5e38", "--out", f"{H}/t"], "--lr must be at most 3.4e+38"),
    ([*TRAIN, "--lr", "1e-320", "--out", f"{H}/t"], "--lr must be at least 1.18e-38 (smaller is 0 in float32"),
    ([*TRAIN, "--weight-decay", "1e308", "--out", f"{H}/t"], "--weight-decay must be at most 3.4e+38"),
    (["train", "--model", f"{H}/net.py:build", *MNIST, "--normalize", "0.5/1e-320", "--out", f"{H}/t"],
     "--normalize 0.5/1e-320: stds must be at least 1.18e-38"),
    (["train", "--model", f"{H}/net.py:build", *MNIST, "--normalize", "0.5/1e-40", "--out", f"{H}/t"],
     "stds must be at least 1.18e-38"),
    ([*GRADUAL, "--lr", "1e308"], "--lr must be at most 3.4e+38"),
    ([*GRADUAL, "--finetune-distill", "0.5", "--finetune-temperature", "1e308"],
     "--finetune-temperature must be at most 1.84e+19 (its square scales the loss in float32)"),
    ([*GRADUAL, "--finetune-distill", "0.5", "--finetune-temperature", "1e-320"],
     "--finetune-temperature must be at least 1.18e-38"),
    ([*TAPER, "--gate-lr", "1e308"], "--gate-lr must be at most 3.4e+37 (Adam's first step is 10 times it"),
    ([*TAPER, "--taper-distill", "0.5", "--taper-temperature", "1e308"], "--taper-temperature must be at most 1.84e+19"),
    # s56 review: the advice named dual_lr and penalty, which have no flag, and not --lr
    ([*TAPER, "--lr", "1e3"], "so no cut can be trusted; lower one of --lr, --gate-lr, --gamma (defaults: leave them out)"),
    ([*AUTOBOT, "--finetune-lr", "1e308"], "--finetune-lr must be at most 3.4e+38"),
    ([*AUTOBOT, "--finetune-epochs", "1", "--finetune-distill", "0.5", "--finetune-temperature", "1e308"],
     "--finetune-temperature must be at most 1.84e+19"),
    ([*AUTOBOT, "--gate-lr", "3.5e37"], "--gate-lr must be at most 3.4e+37"),
    ([*AUTOBOT, "--beta", "1e308"], "--beta must be at most 3.4e+38"),
    ([*AUTOBOT, "--gamma", "1e308"], "--gamma must be at most 3.4e+38"),
    ([*AUTOBOT, "--reconstruct-batches", HUGE], f"--reconstruct-batches must be at most 9223372036854775807, got {HUGE}"),
    ([*TAPER, "--depth-flops", "0.8", "--depth-batches", HUGE], "--depth-batches must be at most 9223372036854775807"),
    ([*PRUNE, "--sparsity", "0.5", "--refit-batches", HUGE, "--out", f"{H}/m"],
     "--refit-batches must be 'auto' or at most 9223372036854775807"),
    # s56: a --batch-size past Python's counts ran as the whole split; eval refused 0 only after loading
    ([*PRUNE, "--sparsity", "0.5", "--batch-size", HUGE], f"--batch-size must be at most 9223372036854775807, got {HUGE}"),
    (["eval", *MLP, *MNIST, "--batch-size", HUGE], "--batch-size must be at most 9223372036854775807"),
    (["bench-latency", "--pruned", CKPT, "--repeats", HUGE], "--repeats must be at most 9223372036854775807"),
    (["bench-latency", "--pruned", f"{H}/mlprun", "--threads", "2147483648"],
     "--threads 2147483648 is far more than the"),
    # gates that blew up (finite options, each below float32's bound): refused, not cut at 2% "successfully"
    ([*AUTOBOT, "--gate-lr", "1e30", "--beta", "1e30", "--gamma", "1e30", "--train-samples", "64", "--no-stage-eval"],
     "AutoBot's gate training diverged (--gate-lr 1e+30, --beta 1e+30, --gamma 1e+30)"),
    # a share and a count naming one budget (mlpnet: 32,360 weights): the same pruning run twice
    (["sweep", *MLP, *MNIST, "--method", "magnitude", "--params", "0.5", "16180", "--train-samples", "64",
      "--no-stage-eval", "--out", f"{H}/sw2"], "this sweep would run the same pruning twice: magnitude_params-0.5 "
     "and magnitude_params-16180 name one budget of mlpnet"),
    # an input shape or a --resize too large to allocate: torch's allocator traceback
    (["info", f"{H}/net.py:build", "--input-shape", "1,1000000,1000000"],
     "one example of input shape 1,1000000,1000000 needs about 3725.3 GB for its input alone"),
    (["eval", "--model", f"{H}/net.py:build", "--normalize", "none", "--data", "imagefolder", "--data-dir",
      f"{H}/adir", "--resize", "100000"], "--resize must be a whole number of pixels from 1 to 16384"),
    (["train", "--model", f"{H}/net.py:build", "--normalize", "none", "--data", "imagefolder", "--data-dir",
      f"{H}/adir", "--resize", HUGE, "--out", f"{H}/t"], "--resize must be a whole number of pixels from 1 to 16384"),
]
if not torch.cuda.is_available():         # on a machine with a GPU this is no error
    CLI_CASES.append(([*PRUNE, "--sparsity", "0.5", "--device", "cuda"], "sees no CUDA device"))


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a warning would be noise on top of the one line
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,needle", CLI_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CLI_CASES])
def test_command_line_refuses_in_one_line(argv, needle, home, untouched, capsys):
    argv = [a.replace(H, str(home)) for a in argv]
    code, out, err = run_cli(argv, capsys)
    assert code == 2, f"exit code {code}: {err}"
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert "Traceback" not in err and err.startswith("prunekit")
    assert needle in err, f"{needle!r} not in {err!r}"
    assert out == ""


def test_recipe_that_is_a_pipe_is_refused(tmp_path, capsys):
    """A FIFO as --recipe blocked prune forever on its read; without the refusal a writer opens and
    closes it after 5 s, so that the test fails (an empty recipe) rather than hangs."""
    fifo = tmp_path / "recipe.toml"
    os.mkfifo(fifo)

    def unblock():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:             # no reader: refused as it should be
            pass
    timer = threading.Timer(5, unblock)
    timer.start()
    try:
        code, out, err = run_cli(["prune", "--recipe", str(fifo)], capsys)
    finally:
        timer.cancel()
    assert code == 2 and err.count("\n") == 1 and out == ""
    assert f"recipe {fifo} is a pipe nothing was written to" in err, err


def test_out_beside_files_of_a_data_set_other_than_an_image_folder_is_theirs_to_place(tmp_path):
    """Only an image folder reads its subfolders (as classes): MNIST's folder may hold the run."""
    import argparse
    from prunekit.cli import _refuse_bad_paths
    _refuse_bad_paths(argparse.Namespace(data="mnist", data_dir=str(tmp_path), out=str(tmp_path / "runs" / "r1")))
    with pytest.raises(PrunekitError, match="inside the image folder"):
        _refuse_bad_paths(argparse.Namespace(data="imagefolder", data_dir=str(tmp_path), out=str(tmp_path / "r1")))


def test_recipe_read_through_a_pipe_with_a_writer():
    """``--recipe <(sed ... base.toml)`` and ``--recipe /dev/stdin`` name a pipe whose writer is there
    from the start: read as a file is (the refusal of a pipe is for one nobody writes to)."""
    from prunekit.recipes import load_recipe
    from prunekit.cli import build_parser_for
    read_end, write_end = os.pipe()
    try:
        writer = threading.Thread(target=lambda: (os.write(write_end, b'sparsity = "0.5"\n'), os.close(write_end)))
        writer.start()
        values = load_recipe(f"/dev/fd/{read_end}", build_parser_for("prune"))
        writer.join(timeout=30)
    finally:
        os.close(read_end)
    assert values["sparsity"] == "0.5"


def test_out_a_symlink_to_nothing_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """--out a dangling symbolic link: refused only after model and data, as "File exists"."""
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(prunekit.commands.prune, "loaded_model", None)     # loading it is already too late
    code, out, err = run_cli([*PRUNE, "--sparsity", "0.5", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and out == ""
    assert f"--out {tmp_path / 'out'} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist" in err, err
    assert not (tmp_path / "nowhere").exists()


def test_python_out_a_symlink_to_nothing_is_refused_before_any_work(tmp_path):
    """s56: ``prunekit.prune(..., out=)`` a dangling symbolic link raised FileExistsError (an OSError,
    not a PrunekitError) after the model's first pass; refused up front as the CLI's --out is."""
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError) as err:
        prunekit.prune(model, (X, Y), method="magnitude", sparsity=0.5, out=str(tmp_path / "out"))
    assert f"out={str(tmp_path / 'out')!r} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist" \
        in str(err.value), err.value
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("given,needle", [(["--batch-size", "0"], "--batch-size must be at least 1"),
                                          (["--resize", "0"], "--resize must be a whole number of pixels from 1")])
def test_eval_refuses_counts_before_loading_the_model(given, needle, capsys, monkeypatch):
    """s56: eval refused --batch-size 0 and --resize 0 only after loading the model (a model file
    imported, a checkpoint read): both need nothing from it."""
    import prunekit.commands.eval
    monkeypatch.setattr(prunekit.commands.eval, "loaded_model", None)     # loading it is already too late
    code, out, err = run_cli(["eval", *MLP, *MNIST, *given], capsys)
    assert code == 2 and err.count("\n") == 1 and out == "" and needle in err, err


def test_repeated_switches_and_list_values_still_parse():
    """Refusing a list option given twice leaves switches (repeated, the same thing), lists given once
    and options of one value (the last one wins, as argparse has it) alone."""
    from prunekit.cli import build_parser
    args = build_parser().parse_args([*PRUNE, "--sparsity", "0.5", "--no-stage-eval", "--no-stage-eval",
                                      "--exclude", "fc1", "fc2", "--sparsity", "0.7"])
    assert args.no_stage_eval is True and args.exclude == ["fc1", "fc2"] and args.sparsity == "0.7"
    args = build_parser().parse_args(["bench-latency", "--pruned", CKPT, "--threads", "1", "2"])
    assert args.threads == [1, 2]


# --- Python -----------------------------------------------------------------------------------

def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


X = torch.randn(48, 1, 4, 4, generator=torch.Generator().manual_seed(0))
Y = torch.arange(48) % 3
OK = {"data": (X, Y), "method": "magnitude", "sparsity": 0.5}


def one_pass():
    return iter([(X, Y)])


class Triples(torch.utils.data.Dataset):
    """(x, y, index) samples, as a dataset kept for per-sample bookkeeping gives; ``mask``: (x, y,
    mask) samples, a mask of x's shape (which pixels are valid)."""

    def __init__(self, mask: bool = False):
        self.mask = mask

    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return X[i], Y[i], (X[i] > 0 if self.mask else i)


class NanOut(nn.Module):
    """Finite weights, nan outputs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


class IntScores(nn.Module):
    """Class scores converted to integers (int64)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)).long()


PY_CASES = [
    ({"model": IntScores(), "method": "chita"}, "the model's outputs are int64, not floating point"),
    # the five of the issue
    ({"method": "chita", "fisher_samples": "10"}, "fisher_samples"),
    ({"data": (X, Y + 3)}, "class indices"),
    ({"eval_data": "test"}, "eval_data"),
    ({"seed": "x"}, "seed"),
    ({"out": f"{H}/notes.txt"}, "is a file"),
    # arguments
    ({"model": "mlpnet"}, "torch.nn.Module"),
    ({"model": nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).requires_grad_(False).apply(
        lambda m: m.weight.fill_(float("inf")) if isinstance(m, nn.Linear) else None)}, "1.weight holds nan or inf"),
    ({"model": NanOut(), "method": "chita", "fisher_samples": 16},
     "the model's gradients on the training data hold nan or inf: its outputs (or loss) on them are not finite"),
    ({"model": NanOut(), "eval_data": (X, Y)}, "the model's loss on the evaluation data is nan"),
    ({"method": "nope"}, "unknown method"),
    ({"method": 3}, "method"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 10**30}, "batch_size must be a whole number from 1 to 9223372036854775807"),   # islice's ValueError
    ({"recalibrate_bn": "no"}, "recalibrate_bn"),
    ({"progress": 1}, "progress"),
    ({"gradual": "no"}, "gradual must be True or False"),
    ({"force": "no", "out": f"{H}/run"}, "force must be True or False"),
    ({"include": "1"}, "letter by letter"),
    ({"exclude": 3}, "exclude"),
    ({"out": f"{H}/adir"}, "holding other files"),
    ({"out": f"{H}/trained"}, "trained' holds a `prunekit train` run (its trained model.safetensors): pick another "
                              "out (force=True would delete that trained model)"),
    ({"out": 5}, "out"),
    ({"out": f"{H}/notes.txt/sub"}, "notes.txt is a file, not a folder: pass an out= whose parent is a folder"),
    # budgets
    ({"sparsity": None}, "no budget"),
    ({"sparsity": 1.5}, "out of range"),
    ({"sparsity": -0.1}, "out of range"),
    ({"sparsity": None, "flops": 0}, "(0, 1]"),
    ({"sparsity": None, "flops": 1e-6}, "keeps no prunable weight"),      # every weight costs MACs
    ({"sparsity": "abc"}, "not a number"),
    # method options
    ({"method": "chita", "fisher_samples": 0}, "fisher_samples"),
    ({"method": "chita", "fisher_samples": 10.5}, "fisher_samples"),
    ({"method": "chita", "fisher_batch": 0}, "fisher_batch"),
    ({"method": "chita", "stages": "2"}, "stages"),
    ({"method": "chita", "ridge": -1.0}, "ridge"),
    ({"method": "autobot", "sparsity": None, "flops": 0.5, "gate_lr": float("inf")}, "gate_lr must be a finite number"),
    ({"method": "chita", "relative_ridge": 0}, "relative_ridge"),
    # s56: a multiplier step past float32 within a few steps: the gates all closed, a 4% cut "succeeded"
    ({"method": "taper", "sparsity": None, "flops": 0.5, "dual_lr": 3e38}, "the taper's gate training diverged "
     "(lr 0.01, gate_lr 0.1, dual_lr 3e+38, penalty 50, gamma 0.1): its multiplier"),
    # s56 review: weights that blow up (the weights' lr) made the loss inf, and lr was not named
    ({"method": "taper", "sparsity": None, "flops": 0.5, "lr": 1e3}, "its loss is not finite in float32 after"),
    ({"method": "chita", "ridge": 1.0, "relative_ridge": 0.5}, "relative_ridge sets λ when ridge is not given"),
    ({"method": "chita", "final_pick": "last"}, "final_pick shapes the stages of a multi-stage run, and stages is 1"),
    ({"method": "autobot", "sparsity": None, "flops": 0.5, "finetune_lr": 5.0},
     "finetune_lr shapes the fine-tune, and finetune_epochs is 0"),
    ({"method": "magnitude", "refit_ridge": 5.0}, "refit_ridge shapes the re-fit, and refit_batches is 0"),
    ({"method": "chita", "schedule": "cubic"}, "schedule"),
    ({"method": "chita", "revive": "yes"}, "revive"),
    ({"method": "chita", "first_order": 1}, "first_order"),
    ({"method": "chita", "solver": "nope"}, "solver"),
    ({"method": "chita", "block_size": 0}, "block_size"),
    ({"method": "chita", "fisher_sample": 10}, "takes no option fisher_sample"),
    ({"method": "chita", "flop": 0.5}, "takes no option flop (did you mean flops?)"),
    ({"method": "chita", "max_memory": "500"}, "a size like 16G, 1.5GiB or 500MB (K, M, G, T: powers of 1024; B or iB "
                                               "optional), got '500' (a number without a unit is a whole number of "
                                               "bytes, 1M at least)"),
    ({"method": "chita", "max_memory": 0.5e3}, "max_memory must be a size like 16G"),
    ({"method": "chita", "fisher_samples": 100}, "holds 48 samples, 100 gradient rows"),    # before any gradient
    # the user's loss
    ({"loss": "mse"}, "loss must be None or a function"),
    ({"loss": nn.CrossEntropyLoss(), "method": "chita", "gradual": True, "finetune_distill": 0.5},
     "finetune_distill softens"),
    ({"loss": nn.CrossEntropyLoss(), "method": "autobot", "sparsity": None, "flops": 0.5, "finetune_distill": 0.5,
      "finetune_epochs": 1},
     "finetune_distill softens"),
    ({"data": (X, torch.randn(48, 3))}, "need loss="),
    ({"loss": lambda o, y: nn.functional.cross_entropy(o, y, reduction="none")}, "a tensor of shape (2,)"),
    ({"loss": lambda o, y: 1.0}, "a tensor of one number; got float"),
    ({"loss": nn.CrossEntropyLoss(reduction="sum"), "method": "chita", "fisher_samples": 16},
     "loss must be the mean over the batch (reduction='mean')"),
    ({"loss": lambda o, y: nn.functional.cross_entropy(o, y, reduction="sum") / 48, "method": "chita",
      "fisher_samples": 16}, "a sum divided by a fixed number (a mean only on batches of that size: prunekit also calls "
                             "the loss on single samples for gradient rows"),
    ({"loss": lambda o, y: nn.functional.cross_entropy(o, y, reduction="sum") / 128},
     "or divide by the batch's own size: F.cross_entropy(outputs, targets, reduction='sum') / targets.shape[0]"),
    ({"loss": lambda o: o.sum()}, "loss(outputs, targets) failed on data's first batch: TypeError"),
    ({"importance": lambda w: w.abs()}, "importance('1', weight) failed: TypeError"),
    # data
    ({"data": "train"}, "load it first"),
    ({"data": X}, "(X, Y)"),
    ({"data": (X,)}, "(X, Y)"),
    ({"data": (X, Y[:5])}, "same N"),
    ({"data": (X, Y.float())}, "integer class indices"),
    ({"data": (X, Y - 5)}, "class indices"),
    ({"eval_data": (X, Y + 1)}, "eval_data labels"),
    ({"data": one_pass()}, "one-pass"),
    ({"data": []}, "empty"),
    ({"data": (X[:0], Y[:0])}, "data is empty"),
    ({"data": torch.utils.data.TensorDataset(X[:0], Y[:0])}, "data is empty"),
    ({"eval_data": (X[:0], Y[:0])}, "eval_data is empty"),
    ({"data": (X.clone().index_fill_(0, torch.tensor([3]), float("nan")), Y), "method": "chita", "fisher_samples": 16},
     "data's X holds nan or inf"),
    ({"eval_data": (X.clone().index_fill_(0, torch.tensor([3]), float("inf")), Y)}, "eval_data's X holds nan or inf"),
    ({"eval_data": (X[:, :, :2], Y)}, "the model failed on eval_data's first input, shape (1, 1, 2, 4)"),
    ({"data": [(X, Y, Y)]}, "(x, y) batches"),
    ({"data": Triples()}, "its first batch is a list of 3 items, not 2: prunekit reads (x, y) only"),
    ({"data": [(X, Y, X > 0)]}, "a third element (a sample index, a weight, a mask) is refused, not ignored: give "
                                "(x, y) batches"),
    ({"data": Triples(mask=True)}, "a mask the model needs is one of its inputs: wrap the model in a module whose "
                                   "forward takes one tensor, x and the mask stacked"),
    ({"data": [(X[:8], Y[:4])]}, "one target per input"),
    ({"data": [(X, Y[:, None])]}, "Y of shape (N,) with the same N; got X (48, 1, 4, 4), Y (48, 1) in its first"),
    ({"data": torch.utils.data.TensorDataset(X, Y[:, None])}, "Y of shape (N,) with the same N; got Y (48, 1)"),
    ({"eval_data": [(X, Y[:, None])]}, "eval_data needs X of shape (N, ...) and Y of shape (N,)"),
    ({"out": ""}, "empty path"),
    ({"data": None}, "example_input"),
    ({"data": None, "method": "chita"}, "pass data: method chita takes its gradients on the training data"),
    ({"data": None, "method": "autobot", "sparsity": None, "flops": 0.5}, "pass data: method autobot trains gates"),
    ({"data": None, "gradual": True}, "pass data: gradual pruning fine-tunes between events"),
    ({"example_input": torch.zeros(1, 3)}, "example input"),
    ({"example_input": X[0]}, "without its batch dimension"),     # counted per "example" of C channels
    ({"example_input": "x"}, "example_input"),
    # the meta device: shapes without data
    ({"model": tiny_net().to("meta")}, "the model's parameter 1.weight is on the meta device (no data)"),
    ({"data": (X.to("meta"), Y)}, "data's X is on the meta device (no data)"),
    ({"data": (X, Y.to("meta"))}, "data's Y is on the meta device (no data)"),
    ({"data": [(X.to("meta"), Y)]}, "data's first batch is on the meta device (no data)"),
    ({"eval_data": (X.to("meta"), Y)}, "eval_data's X is on the meta device (no data)"),
    ({"example_input": X[:1].to("meta")}, "example_input is on the meta device (no data)"),
    # options left idle
    ({"gradual": True, "events": 3, "start_keep": 0.1}, "start_keep 0.1 is the share kept before the first event"),
    ({"gradual": True, "events": 1, "epochs_per_event": 2}, "epochs_per_event shapes the schedule from dense"),
    ({"gradual": True, "final_epochs": 0, "epochs_per_event": 0, "momentum": 0.5},
     "momentum shapes the fine-tuning, and final_epochs is 0"),
    ({"force": True}, "force=True clears the run folder out= names, and out is None"),
    ({"method": "autobot", "sparsity": None, "flops": 0.5, "reconstruct_ridge": 0.1},
     "reconstruct_ridge shapes the re-fit after the cut, and reconstruct_batches is 0"),
    ({"method": "autobot", "sparsity": None, "flops": 0.5, "params": 0.1}, "ask for at least"),
    ({"method": "taper", "sparsity": None, "flops": 0.5, "params": 0.5}, "takes no params"),
    ({"method": "falcon", "sparsity": None, "params": 0.5}, "for a params budget alone use chita"),
    ({"method": "hybrid", "sparsity": None, "flops": 0.3, "params": 0.05}, "params 0.05 (8 parameters) is infeasible"),
]


@pytest.mark.parametrize("change,needle", PY_CASES, ids=[",".join(c) for c, _ in PY_CASES])
def test_python_refuses_with_one_line(change, needle, home, untouched):
    kwargs = {**OK, **{k: (v.replace(H, str(home)) if isinstance(v, str) else v) for k, v in change.items()}}
    model = kwargs.pop("model", None) or tiny_net()
    before = ({k: v.clone() for k, v in model.state_dict().items()}
              if isinstance(model, nn.Module) and not any(v.is_meta for v in model.state_dict().values()) else None)
    data = kwargs.pop("data")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PrunekitError) as err:
            prunekit.prune(model, data, **kwargs)
    message = str(err.value)
    assert "\n" not in message and needle in message, message
    if before is not None:                    # refused before touching the model
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_at_least_sixty_kinds():
    assert len(CLI_CASES) + len(PY_CASES) >= 60


def test_all_labels_of_a_prunekit_loader_are_checked(untouched):
    """A prunekit loader's labels are checked in full, not only its first batch."""
    from prunekit.data import Normalization, load_dataset, make_loader

    train = load_dataset("mnist", MNIST_DIR, "train")
    order = torch.argsort(train.labels)                # batch 1 holds only small labels
    train.images, train.labels = train.images[order], train.labels[order]
    loader = make_loader(train, Normalization((0.1307,), (0.3081,)), batch_size=64)
    five_classes = nn.Sequential(nn.Flatten(), nn.Linear(784, 5))
    with pytest.raises(PrunekitError, match=r"labels go from 0 to 9.*5 outputs"):
        prunekit.prune(five_classes, loader, method="magnitude", sparsity=0.5)


@pytest.mark.parametrize("call", [lambda: prunekit.load_pruned("mlpnet", CKPT),
                                  lambda: prunekit.load_pruned(CKPT, zoo.build("mlpnet")),
                                  lambda: prunekit.save_model("mlpnet", "x.safetensors", {"model": "mlpnet"})],
                         ids=["load_pruned name", "load_pruned swapped", "save_model name"])
def test_load_pruned_and_save_model_refuse_a_model_that_is_not_a_module(call, untouched):
    with pytest.raises(PrunekitError, match="must be a (fresh )?torch.nn.Module"):
        call()


@pytest.mark.parametrize("inside", ["magnitude_sparsity-0.7/m.safetensors", "magnitude_sparsity-0.5/sub/m.safetensors"])
def test_save_model_refuses_a_path_inside_a_sweeps_folder(inside, home, untouched):
    """A killed sweep's folder (its mark naming its planned runs, one begun): its later runs'
    folders are not made yet, and a model saved there stopped the sweep when run again. Refused at
    any depth inside its run folders, naming the folder; beside them is the user's
    (``test_killed_leftovers``)."""
    run = home / "killedsweep" / inside.split("/")[0]
    with pytest.raises(PrunekitError) as err:
        prunekit.save_model(nn.Linear(2, 2), home / "killedsweep" / inside, {})
    message = str(err.value)
    assert "\n" not in message and f"lies inside {run}, a run folder of the prunekit sweep in {home / 'killedsweep'}" \
        in message, message


# --- where the output goes --------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_output_is_said_in_one_line(monkeypatch, capsys, untouched):
    """stdout on a full disk was "No space left on device:  (check the path and its permissions)":
    an empty path, and advice for no path at fault."""
    full = open("/dev/full", "w", buffering=1)       # line-buffered: the first line meets the full disk
    monkeypatch.setattr(sys, "stdout", full)
    code = main(["info", "mlpnet"])
    monkeypatch.undo()
    with contextlib.suppress(OSError):          # what the buffer kept meets the full disk again
        full.close()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "writing the output: the disk (or the quota) it goes to is full" in err and "permissions" not in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_refusal_whose_stderr_is_full_still_exits_2(monkeypatch):
    """Printing the refusal to a full stderr raised from the handler: a traceback, exit 1."""
    full = open("/dev/full", "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", full)
    code = main(["info", "resnet21"])
    monkeypatch.undo()
    with contextlib.suppress(OSError):
        full.close()
    assert code == 2


def test_a_path_whose_name_is_not_utf8_prints_on_a_strict_stdout(monkeypatch):
    """A path with bytes that are not UTF-8 (read with surrogates) raised UnicodeEncodeError from
    print on a stdout of strict UTF-8 (PYTHONIOENCODING=utf-8), after the run was saved."""
    from prunekit.errors import printable_paths
    raw = io.BytesIO()
    strict = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", strict)
    name = os.fsdecode(b"/tmp/bad\xff\xfename")
    with printable_paths():
        print(f"saved to {name}, \u2713")
    assert raw.getvalue() == "saved to /tmp/bad\\xff\\xfename, \u2713\n".encode()
    assert strict.errors == "strict"            # put back as it was
    with pytest.raises(UnicodeEncodeError):     # what printable_paths is for
        print(name)


def test_a_run_into_a_folder_whose_name_is_not_utf8_prints_its_summary(tmp_path, monkeypatch):
    """The run was saved, then printing its summary ("saved to DIR") raised UnicodeEncodeError:
    a traceback and exit 1 where stdout is strict UTF-8."""
    raw = io.BytesIO()
    strict = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)   # kept: collected, it closes raw
    monkeypatch.setattr(sys, "stdout", strict)
    out = tmp_path / os.fsdecode(b"bad\xffname")
    code = main([*PRUNE, "--sparsity", "0.5", "--train-samples", "64", "--no-stage-eval", "--out", str(out)])
    monkeypatch.undo()
    assert code == 0 and (out / "model.safetensors").is_file()
    assert b"bad\\xffname" in raw.getvalue()
