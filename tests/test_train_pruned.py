"""`prunekit train --checkpoint` of a pruned run fine-tunes the pruned model: its zero weights stay
zero (one line says so), a channel-pruned model keeps its channel layout (every command reads the
folder back), and the record counts the MACs kept as the prune run did. A dense checkpoint trains
every weight, as before."""

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import prunekit
from prunekit.cli import main
from prunekit.commands import train as train_command

MNIST = ["--data", "mnist", "--data-dir", str(Path(prunekit.__file__).parent / "assets" / "mnist")]

NET = """from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
"""


def run_json(capsys, argv):
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """net.py, a dense `train` run of it, and its magnitude (weights) and autobot (channels) prune runs."""
    folder = tmp_path_factory.mktemp("pruned")
    (folder / "net.py").write_text(NET)
    spec = f"{folder}/net.py:build"
    assert main(["train", "--model", spec, *MNIST, "--normalize", "0.1307/0.3081", "--epochs", "1", "--lr", "0.2",
                 "--train-samples", "512", "--out", str(folder / "dense"), "--json"]) == 0
    assert main(["prune", "--model", spec, "--checkpoint", str(folder / "dense"), *MNIST, "--method", "magnitude",
                 "--sparsity", "0.7", "--out", str(folder / "weights"), "--json"]) == 0
    assert main(["prune", "--model", spec, "--checkpoint", str(folder / "dense"), *MNIST, "--method", "autobot",
                 "--flops", "0.5", "--out", str(folder / "channels"), "--json"]) == 0
    return spec, folder


def train(spec, checkpoint, out, *extra):
    return ["train", "--model", spec, "--checkpoint", str(checkpoint), *MNIST, "--epochs", "1", "--lr", "0.05",
            "--train-samples", "256", "--out", str(out), *extra]


def test_training_a_weights_pruned_run_keeps_its_zeros(capsys, runs, tmp_path):
    spec, folder = runs
    capsys.readouterr()
    pruned = json.loads((folder / "weights" / "result.json").read_text())
    before = load_file(folder / "weights" / "model.safetensors")
    assert main(train(spec, folder / "weights", tmp_path / "ft")) == 0
    err = capsys.readouterr().err
    told = [line for line in err.splitlines() if "pruned" in line]
    assert len(told) == 1 and "held at zero" in told[0] and "stays pruned" in told[0]
    after = load_file(tmp_path / "ft" / "model.safetensors")
    for name in ("0.weight", "4.weight", "9.weight"):
        zeros = before[name] == 0
        assert zeros.any()                                   # the prune run made zeros here
        assert (after[name][zeros] == 0).all()               # ... and they are still zero
        assert (after[name] != before[name]).any()           # the kept weights did train
    record = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert record["macs"] == pruned["macs"] and record["dense_macs"] == pruned["dense_macs"]
    assert record["flops_kept"] == pytest.approx(pruned["flops_kept"], rel=1e-9)
    assert record["sparsity"] == pytest.approx(pruned["sparsity"], rel=1e-9)
    assert record["pruned"]["method"] == "magnitude"
    info = run_json(capsys, ["info", str(tmp_path / "ft"), "--model", spec, "--json"])
    assert info["macs"] == pruned["macs"]
    # a training of the fine-tuned model (its record says pruned) holds the zeros again
    again = run_json(capsys, train(spec, tmp_path / "ft", tmp_path / "ft2", "--json"))
    assert again["macs"] == pruned["macs"] and again["pruned"]["method"] == "magnitude"


def test_training_a_dense_checkpoint_trains_every_weight(capsys, runs, tmp_path):
    spec, folder = runs
    capsys.readouterr()
    assert main(train(spec, folder / "dense", tmp_path / "ft")) == 0
    assert "pruned" not in capsys.readouterr().err
    record = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert "pruned" not in record and "macs" not in record


def test_training_a_channel_pruned_run_saves_its_layout(capsys, runs, tmp_path):
    spec, folder = runs
    capsys.readouterr()
    pruned = json.loads((folder / "channels" / "result.json").read_text())
    trained = run_json(capsys, train(spec, folder / "channels", tmp_path / "ft", "--json"))
    assert trained["macs"] == pruned["macs"] and trained["flops_kept"] == pytest.approx(pruned["flops_kept"], rel=1e-9)
    assert "channel_layout" in json.loads((tmp_path / "ft" / "model.json").read_text())
    evaluated = run_json(capsys, ["eval", "--model", spec, "--checkpoint", str(tmp_path / "ft"), *MNIST, "--json"])
    assert evaluated["accuracy"] == pytest.approx(trained["accuracy"], rel=1e-6)
    info = run_json(capsys, ["info", str(tmp_path / "ft"), "--model", spec, "--json"])
    assert info["shrunk"]["flops_kept"] == pytest.approx(pruned["flops_kept"], rel=1e-9)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_training_an_export_of_a_weights_pruned_run_keeps_its_zeros(capsys, runs, tmp_path, kind):
    """model-dense / model-sparse.safetensors (`prunekit export`) carry no record, but their zeros
    are the prune run's: held as the run folder's are."""
    spec, folder = runs
    run = tmp_path / "weights"
    shutil.copytree(folder / "weights", run)
    assert main(["export", str(run), "--model", spec, f"--{kind}", "--json"]) == 0
    capsys.readouterr()
    pruned = json.loads((run / "result.json").read_text())
    exported = run / "export" / f"model-{kind}.safetensors"
    assert main(train(spec, exported, tmp_path / "ft", "--normalize", "0.1307/0.3081")) == 0
    assert "held at zero" in capsys.readouterr().err
    record = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert record["macs"] == pruned["macs"] and record["sparsity"] == pytest.approx(pruned["sparsity"], rel=1e-9)


def test_a_killed_training_of_a_pruned_run_resumes_to_the_same_pruned_weights(capsys, runs, tmp_path, monkeypatch):
    spec, folder = runs
    argv = train(spec, folder / "weights", tmp_path / "whole", "--json")
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv) == 0
    calls, real_epoch = [], train_command.train_epoch

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    cut = [a.replace(str(tmp_path / "whole"), str(tmp_path / "cut")) for a in argv]
    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main(cut) == 130
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)
    assert main(cut) == 0
    capsys.readouterr()
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    zeros = load_file(folder / "weights" / "model.safetensors")["4.weight"] == 0
    assert zeros.any() and (b["4.weight"][zeros] == 0).all()


def test_a_refused_out_folder_stays_one_line(capsys, runs):
    """The line about the pruned checkpoint comes once training starts: a refusal before it is alone."""
    spec, folder = runs
    capsys.readouterr()
    assert main(train(spec, folder / "weights", folder / "channels")) == 2      # a prune run's folder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a `prunekit prune` run" in err


# --- --zeros: a checkpoint's exact zeros kept or trained -----------------------------------------

def plain_checkpoint(runs, path: Path, amount: float) -> dict:
    """The dense run's weights pruned by torch.nn.utils.prune (l1, ``amount`` of each conv / linear
    weight) and made permanent, saved as a plain file with no prunekit record; its state dict."""
    import sys

    import torch
    from torch.nn.utils import prune

    spec, folder = runs
    sys.path.insert(0, str(folder))
    try:
        from net import build
    finally:
        sys.path.remove(str(folder))
    net = build()
    net.load_state_dict(load_file(folder / "dense" / "model.safetensors"))
    for i in (0, 4, 9):
        prune.l1_unstructured(net[i], "weight", amount=amount)
        prune.remove(net[i], "weight")
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, path)
    return state


def plain(spec, checkpoint, out, *extra):
    return [*train(spec, checkpoint, out, "--normalize", "0.1307/0.3081"), *extra]


def zero_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "exact zero" in line]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_plain_checkpoint_pruned_by_another_tool_keeps_its_zeros_saying_so(capsys, runs, tmp_path, suffix):
    """A file torch.nn.utils.prune pruned (70% of each layer, made permanent; no prunekit record)
    trained dense without a word: its sparsity was lost. Now its zeros are held by default, one
    line naming --zeros train says so, and --zeros train trains them."""
    spec, _ = runs
    before = plain_checkpoint(runs, tmp_path / f"pruned{suffix}", 0.7)
    capsys.readouterr()
    kept = run_json(capsys, plain(spec, tmp_path / f"pruned{suffix}", tmp_path / "kept", "--json"))
    after = load_file(tmp_path / "kept" / "model.safetensors")
    for name in ("0.weight", "4.weight", "9.weight"):
        zeros = before[name] == 0
        assert zeros.float().mean() >= 0.69 and (after[name][zeros] == 0).all()
        assert (after[name] != before[name]).any()
    assert kept["zeros"] == "keep" and kept["pruned"]["plain"] is True
    assert kept["sparsity"] == pytest.approx(0.7, abs=0.01)
    main(plain(spec, tmp_path / f"pruned{suffix}", tmp_path / "kept2"))
    told = zero_lines(capsys.readouterr().err)
    assert len(told) == 1 and "held at zero" in told[0] and "--zeros train" in told[0], told
    assert "layer(s) '0', '4', '9'" in told[0], told        # quoted: Sequential children's names, not counts
    assert main(plain(spec, tmp_path / f"pruned{suffix}", tmp_path / "trained", "--zeros", "train", "--json")) == 0
    captured = capsys.readouterr()
    assert not zero_lines(captured.err)                 # asked for: nothing to say
    trained = json.loads(captured.out)
    assert trained["zeros"] == "train" and "pruned" not in trained and "sparsity" not in trained
    assert trained["trained_zeros"] == sum(int((before[f"{i}.weight"] == 0).sum()) for i in (0, 4, 9))
    after = load_file(tmp_path / "trained" / "model.safetensors")
    revived = after["4.weight"][before["4.weight"] == 0]
    assert (revived != 0).float().mean() > 0.9          # the zeros trained


def test_a_plain_checkpoint_with_fewer_zeros_trains_them_saying_so(capsys, runs, tmp_path):
    """20% of each layer zero: under half, so trained by default, with one line naming --zeros keep
    (a note: not under --json, where what plain training does goes without a word); --zeros keep
    holds them."""
    spec, _ = runs
    before = plain_checkpoint(runs, tmp_path / "light.pth", 0.2)
    zeros = int(sum((before[f"{i}.weight"] == 0).sum() for i in (0, 4, 9)))
    capsys.readouterr()
    assert main(plain(spec, tmp_path / "light.pth", tmp_path / "said")) == 0
    told = zero_lines(capsys.readouterr().err)
    assert len(told) == 1 and "trained like every weight" in told[0] and "--zeros keep" in told[0], told
    assert main(plain(spec, tmp_path / "light.pth", tmp_path / "trained", "--json")) == 0
    captured = capsys.readouterr()
    assert not zero_lines(captured.err), captured.err
    after = load_file(tmp_path / "trained" / "model.safetensors")
    assert (after["4.weight"][before["4.weight"] == 0] != 0).float().mean() > 0.9
    trained = json.loads(captured.out)
    assert trained["zeros"] == "train" and trained["trained_zeros"] == zeros
    kept = run_json(capsys, plain(spec, tmp_path / "light.pth", tmp_path / "kept", "--zeros", "keep", "--json"))
    assert kept["zeros"] == "keep" and kept["nonzeros"] == sum(int((v != 0).sum()) for k, v in before.items()
                                                               if k in ("0.weight", "4.weight", "9.weight"))
    after = load_file(tmp_path / "kept" / "model.safetensors")
    assert (after["4.weight"][before["4.weight"] == 0] == 0).all()


def test_zeros_train_trains_a_pruned_run_dense_and_keeps_a_channel_layout(capsys, runs, tmp_path):
    spec, folder = runs
    before = load_file(folder / "weights" / "model.safetensors")
    capsys.readouterr()
    assert main(train(spec, folder / "weights", tmp_path / "dense", "--zeros", "train")) == 0
    told = [line for line in capsys.readouterr().err.splitlines() if "pruned model" in line]
    assert len(told) == 1 and "are trained (--zeros train)" in told[0] and "is dense" in told[0], told
    record = json.loads((tmp_path / "dense" / "result.json").read_text())
    assert record["zeros"] == "train" and "pruned" not in record
    zeros = before["4.weight"] == 0
    assert record["trained_zeros"] >= int(zeros.sum()) > 0
    after = load_file(tmp_path / "dense" / "model.safetensors")
    assert (after["4.weight"][zeros] != 0).float().mean() > 0.9
    # channels removed: a smaller dense model, its layout saved as before
    pruned = json.loads((folder / "channels" / "result.json").read_text())
    small = run_json(capsys, train(spec, folder / "channels", tmp_path / "small", "--zeros", "train", "--json"))
    assert small["zeros"] == "train" and small["pruned"]["shrunk"] is True
    assert small["macs"] <= pruned["macs"]
    assert "channel_layout" in json.loads((tmp_path / "small" / "model.json").read_text())


def _killed_in_second_epoch(monkeypatch):
    calls, real_epoch = [], train_command.train_epoch

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_command, "train_epoch", killed)
    return lambda: monkeypatch.setattr(train_command, "train_epoch", real_epoch)


def test_another_zeros_flag_on_an_unfinished_run_is_refused(capsys, runs, tmp_path, monkeypatch):
    spec, _ = runs
    before = plain_checkpoint(runs, tmp_path / "pruned.pth", 0.7)
    argv = plain(spec, tmp_path / "pruned.pth", tmp_path / "ft")
    argv[argv.index("--epochs") + 1] = "2"
    restore = _killed_in_second_epoch(monkeypatch)
    assert main(argv) == 130
    restore()
    capsys.readouterr()
    assert main([*argv, "--zeros", "train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unfinished training run (other zeros)" in err, err
    assert main(argv) == 0                              # the run's own command carries it on, zeros held
    assert "resuming" in capsys.readouterr().err
    after = load_file(tmp_path / "ft" / "model.safetensors")
    assert (after["4.weight"][before["4.weight"] == 0] == 0).all()
    assert json.loads((tmp_path / "ft" / "result.json").read_text())["zeros"] == "keep"


def test_an_older_unfinished_run_over_a_plain_sparse_file_carries_on_training_its_zeros(capsys, runs, tmp_path,
                                                                                      monkeypatch):
    """An epoch checkpoint of an older prunekit (no ``zeros`` recorded) over a plain file trained
    its zeros: carried on so, and said, not switched to holding them half way."""
    spec, _ = runs
    plain_checkpoint(runs, tmp_path / "pruned.pth", 0.7)
    argv = plain(spec, tmp_path / "pruned.pth", tmp_path / "ft")
    argv[argv.index("--epochs") + 1] = "2"
    real_save = train_command.save_epoch
    monkeypatch.setattr(train_command, "save_epoch", lambda *a: real_save(*a[:8], None))     # no zeros recorded
    restore = _killed_in_second_epoch(monkeypatch)
    assert main(argv) == 130
    restore()
    monkeypatch.setattr(train_command, "save_epoch", real_save)
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "started by an older prunekit" in err and "carried on training them" in err, err
    record = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert record["zeros"] == "train"


def test_train_epochs_holds_zeros_only_when_asked():
    """The Python API cannot tell pruned weights loaded from a file from weights just initialised
    with zeros (eye_): by default every weight trains, a warning naming zeros="keep" where a layer
    is a notable share zeros; zeros="keep" holds them, zeros="train" trains them without a word."""
    import warnings

    import torch
    from torch import nn
    from torch.nn.utils import prune

    from prunekit.errors import PrunekitError, PrunekitWarning
    from prunekit.train import train_epochs

    def pruned_net(amount):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        for layer in (net[0], net[2]):
            prune.l1_unstructured(layer, "weight", amount=amount)
            prune.remove(layer, "weight")
        return net

    data = (torch.randn(64, 8), torch.randint(0, 3, (64,)))
    net = pruned_net(0.7)
    zeros = net[0].weight == 0
    with pytest.warns(PrunekitWarning, match='trained like every weight.*zeros="keep"'):
        train_epochs(net, data, epochs=1, lr=0.05, progress=False, batch_size=16)
    assert (net[0].weight[zeros] != 0).float().mean() > 0.9
    net = pruned_net(0.7)
    train_epochs(net, data, epochs=1, lr=0.05, progress=False, batch_size=16, zeros="keep")
    assert (net[0].weight[zeros] == 0).all() and (net[0].weight[~zeros] != 0).all()
    net = pruned_net(0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_epochs(net, data, epochs=1, lr=0.05, progress=False, batch_size=16, zeros="train")
    assert (net[0].weight[zeros] != 0).float().mean() > 0.9
    # an identity-initialised layer (15/16 zeros): its initialisation, trained
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    nn.init.eye_(net[2].weight)
    off = ~torch.eye(16, dtype=torch.bool)
    with pytest.warns(PrunekitWarning, match='layer\\(s\\) .2. .*zeros="keep"'):
        train_epochs(net, data, epochs=1, lr=0.05, progress=False, batch_size=16)
    assert (net[2].weight[off] != 0).float().mean() > 0.9
    with pytest.raises(PrunekitError, match="zeros must be"):
        train_epochs(net, data, epochs=1, progress=False, zeros="sparse")


def test_a_padding_row_or_a_lone_zero_row_is_not_worth_a_line():
    """An Embedding's padding_idx row (zero by design, never trained) is not counted; a lone zero
    row of a layer is under NOTABLE_LAYER_SHARE: training either says nothing."""
    import warnings

    import torch
    from torch import nn

    from prunekit.masks import exact_zeros
    from prunekit.params import ParamSpace
    from prunekit.train import train_epochs

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(12, 8, padding_idx=0)
            self.fc = nn.Linear(8, 12)

        def forward(self, x):
            return self.fc(self.emb(x).mean(1))

    torch.manual_seed(0)
    net = Tokens()
    with torch.no_grad():
        net.fc.weight[3] = 0                    # one row of 12: 8% of the layer
    found = exact_zeros(ParamSpace(net))
    assert found.zeros == 8 and found.numel == 11 * 8 + 12 * 8      # the padding row left out
    assert not found.notable and not found.looks_pruned
    with torch.no_grad():
        net.fc.weight[3:5] = 0                  # two rows of 12: 17%, notable
    assert exact_zeros(ParamSpace(net)).notable_layers == ("fc",)
    with torch.no_grad():
        net.fc.weight[4] = 1.0
    data = (torch.randint(0, 12, (64, 5)), torch.randint(0, 12, (64,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_epochs(net, data, epochs=1, lr=0.05, progress=False, batch_size=16)
    assert (net.emb.weight[0] == 0).all()


def test_an_unfinished_run_whose_checkpoint_lost_its_zeros_is_refused(capsys, runs, tmp_path, monkeypatch):
    """Its epochs so far held the file's zeros; the file (same path) now holds too few to keep by
    default: carrying on would train them half way through, so it is refused in one line."""
    spec, _ = runs
    plain_checkpoint(runs, tmp_path / "pruned.pth", 0.7)
    argv = plain(spec, tmp_path / "pruned.pth", tmp_path / "ft")
    argv[argv.index("--epochs") + 1] = "2"
    restore = _killed_in_second_epoch(monkeypatch)
    assert main(argv) == 130
    restore()
    plain_checkpoint(runs, tmp_path / "pruned.pth", 0.2)         # replaced in place
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "held the checkpoint's zero weights at zero" in err \
        and "checkpoint file changed" in err and "--force" in err, err
    assert not (tmp_path / "ft" / "result.json").exists()


EYE_NET = """from torch import nn


def build():
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    nn.init.eye_(net[3].weight)         # identity-initialised: 31/32 of the layer exact zeros
    return net
"""


def test_a_freshly_built_model_trains_its_initial_zeros(capsys, tmp_path):
    """No --checkpoint: the zeros of what build() returned are its initialisation (eye_), trained
    by default (they were held at zero through the whole training, the layer stuck at identity);
    one line (not under --json) names --zeros keep for a build() that loads pruned weights itself;
    --zeros keep holds them."""
    import torch

    (tmp_path / "eye.py").write_text(EYE_NET)
    spec = f"{tmp_path}/eye.py:build"
    argv = ["train", "--model", spec, *MNIST, "--normalize", "0.1307/0.3081", "--epochs", "1", "--lr", "0.05",
            "--train-samples", "256"]
    off = ~torch.eye(32, dtype=torch.bool)
    capsys.readouterr()
    record = run_json(capsys, [*argv, "--out", str(tmp_path / "quiet"), "--json"])
    assert record["zeros"] == "train" and record["trained_zeros"] == 32 * 31 and "pruned" not in record
    assert (load_file(tmp_path / "quiet" / "model.safetensors")["3.weight"][off] != 0).float().mean() > 0.9
    assert main([*argv, "--out", str(tmp_path / "said")]) == 0
    told = [line for line in capsys.readouterr().err.splitlines() if "exact zeros" in line]
    assert len(told) == 1 and "no --checkpoint" in told[0] and "--zeros keep" in told[0], told
    kept = run_json(capsys, [*argv, "--out", str(tmp_path / "kept"), "--zeros", "keep", "--json"])
    assert kept["zeros"] == "keep"
    assert (load_file(tmp_path / "kept" / "model.safetensors")["3.weight"][off] == 0).all()


def test_a_few_zeros_of_a_checkpoint_train_without_a_word(capsys, runs, tmp_path):
    """A few zeros in one conv filter (36 of its layer's 1,152: 3%, over 1% of the prunable weights,
    which used to be worth a line): no pruning to speak of, so they train as every weight does and
    nothing is said, --json or not."""
    import torch

    spec, folder = runs
    state = load_file(folder / "dense" / "model.safetensors")
    state["4.weight"][5, :4] = 0
    torch.save(state, tmp_path / "row.pth")
    capsys.readouterr()
    record = run_json(capsys, plain(spec, tmp_path / "row.pth", tmp_path / "quiet", "--json"))
    assert record["zeros"] == "train" and "pruned" not in record
    assert main(plain(spec, tmp_path / "row.pth", tmp_path / "said")) == 0
    err = capsys.readouterr().err
    assert not zero_lines(err) and "--zeros" not in err, err
    assert (load_file(tmp_path / "said" / "model.safetensors")["4.weight"][5, :4] != 0).float().mean() > 0.9


def test_force_over_a_run_whose_checkpoint_lost_its_zeros_starts_it_anew(capsys, runs, tmp_path, monkeypatch):
    """The refusal names --force to train anew: --force removes the epochs so far (which held the
    zeros the file had) and trains the file as it is now from epoch 1, saying so in run.log."""
    spec, _ = runs
    plain_checkpoint(runs, tmp_path / "pruned.pth", 0.7)
    argv = plain(spec, tmp_path / "pruned.pth", tmp_path / "ft")
    argv[argv.index("--epochs") + 1] = "2"
    restore = _killed_in_second_epoch(monkeypatch)
    assert main(argv) == 130
    restore()
    now = plain_checkpoint(runs, tmp_path / "pruned.pth", 0.2)
    capsys.readouterr()
    assert main(argv) == 2 and "--force to train anew" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "resuming" not in err
    record = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert record["zeros"] == "train" and [h["epoch"] for h in record["history"]] == [1, 2]
    assert "starts it anew" in (tmp_path / "ft" / "run.log").read_text()
    after = load_file(tmp_path / "ft" / "model.safetensors")
    assert (after["4.weight"][now["4.weight"] == 0] != 0).float().mean() > 0.9     # trained, as the file is now


def test_an_explicit_zeros_flag_naming_the_default_carries_the_same_run_on(capsys, runs, tmp_path, monkeypatch):
    """A run started with --zeros left out (resolved to keep here), killed: the same command with
    --zeros keep does the same, so it carries the run on (it was refused as other zeros); and a run
    started with --zeros keep carries on without it."""
    spec, _ = runs
    before = plain_checkpoint(runs, tmp_path / "pruned.pth", 0.7)
    for first, second, out in (([], ["--zeros", "keep"], "a"), (["--zeros", "keep"], [], "b")):
        argv = plain(spec, tmp_path / "pruned.pth", tmp_path / out)
        argv[argv.index("--epochs") + 1] = "2"
        restore = _killed_in_second_epoch(monkeypatch)
        assert main([*argv, *first]) == 130
        restore()
        capsys.readouterr()
        assert main([*argv, *second]) == 0, capsys.readouterr().err
        assert "resuming" in capsys.readouterr().err
        record = json.loads((tmp_path / out / "result.json").read_text())
        assert record["zeros"] == "keep"
        after = load_file(tmp_path / out / "model.safetensors")
        assert (after["4.weight"][before["4.weight"] == 0] == 0).all()


def test_force_over_an_older_run_that_trained_a_plain_files_zeros_starts_it_anew_holding_them(capsys, runs, tmp_path,
                                                                                              monkeypatch):
    """The older prunekit's run carries on training the zeros, its line naming --force to train anew
    holding them: --force does that (it carried on training them)."""
    spec, _ = runs
    before = plain_checkpoint(runs, tmp_path / "pruned.pth", 0.7)
    argv = plain(spec, tmp_path / "pruned.pth", tmp_path / "ft")
    argv[argv.index("--epochs") + 1] = "2"
    real_save = train_command.save_epoch
    monkeypatch.setattr(train_command, "save_epoch", lambda *a: real_save(*a[:8], None))     # no zeros recorded
    restore = _killed_in_second_epoch(monkeypatch)
    assert main(argv) == 130
    restore()
    monkeypatch.setattr(train_command, "save_epoch", real_save)
    capsys.readouterr()
    assert main([*argv, "--force"]) == 0, capsys.readouterr().err
    assert "resuming" not in capsys.readouterr().err
    record = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert record["zeros"] == "keep" and [h["epoch"] for h in record["history"]] == [1, 2]
    after = load_file(tmp_path / "ft" / "model.safetensors")
    assert (after["4.weight"][before["4.weight"] == 0] == 0).all()


def _as_an_older_finished_run(out: Path) -> None:
    """Rewrite the finished `--zeros train` run in ``out`` as the older prunekit wrote it: that
    version trained a plain file's zeros with no --zeros option, so its config.toml names none and
    its result.json records neither the zeros choice nor the count trained."""
    config = (out / "config.toml").read_text()
    assert 'zeros = "train"' in config
    (out / "config.toml").write_text("".join(line for line in config.splitlines(keepends=True)
                                             if not line.startswith("zeros = ")))
    record = json.loads((out / "result.json").read_text())
    assert record.pop("zeros") == "train" and record.pop("trained_zeros") > 0
    (out / "result.json").write_text(json.dumps(record))


def test_an_older_finished_run_that_trained_a_plain_files_zeros_says_so_when_given_back(capsys, runs, tmp_path):
    """A run an older prunekit finished over a plain file with 70% zeros trained them (a dense
    result). The same command today would hold them: it gave that dense result back with the plain
    "finished" note, silent on the zeros, and `--zeros train` (what that run did) was refused as
    "other zeros". Now the same command says, in one line, that the zeros were trained (--force
    trains anew holding them), its summary counts them, and `--zeros train` gives the result back."""
    spec, _ = runs
    plain_checkpoint(runs, tmp_path / "pruned.pth", 0.7)
    out = tmp_path / "ft"
    argv = plain(spec, tmp_path / "pruned.pth", out)
    assert main([*argv, "--zeros", "train"]) == 0, capsys.readouterr().err
    _as_an_older_finished_run(out)
    model = (out / "model.safetensors").read_bytes()
    zeros = sum(int((w == 0).sum()) for k, w in load_file(out / "model.safetensors").items() if k.endswith("weight"))
    assert zeros < 10                   # trained: dense
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if "older prunekit" in line]
    assert len(said) == 1, captured.err
    assert said[0].startswith("prunekit: note: ") and "trained the" in said[0] and "exact zero weights" in said[0]
    assert "--force trains anew, holding them at zero" in said[0], said[0]
    assert "holds this training run, finished" not in captured.err
    assert "zero weights trained" in captured.out, captured.out
    assert (out / "model.safetensors").read_bytes() == model        # given back, nothing trained
    assert main([*argv, "--zeros", "train"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "holds this training run, finished" in captured.err and "older prunekit" not in captured.err
    assert "zero weights trained" in captured.out, captured.out
    assert (out / "model.safetensors").read_bytes() == model
    assert json.loads((out / "result.json").read_text()).get("trained_zeros") is None      # nothing rewritten


def test_the_zeros_line_of_an_older_unfinished_run_is_a_prunekit_note(capsys, runs, tmp_path, monkeypatch):
    """The line saying an older prunekit's unfinished run carries on training a plain file's zeros
    had no "prunekit: note:" prefix, unlike prunekit's other notes and warnings."""
    spec, _ = runs
    plain_checkpoint(runs, tmp_path / "pruned.pth", 0.7)
    argv = plain(spec, tmp_path / "pruned.pth", tmp_path / "ft")
    argv[argv.index("--epochs") + 1] = "2"
    real_save = train_command.save_epoch
    monkeypatch.setattr(train_command, "save_epoch", lambda *a: real_save(*a[:8], None))     # no zeros recorded
    restore = _killed_in_second_epoch(monkeypatch)
    assert main(argv) == 130
    restore()
    monkeypatch.setattr(train_command, "save_epoch", real_save)
    capsys.readouterr()
    assert main(argv) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "started by an older prunekit" in line]
    assert len(said) == 1 and said[0].startswith("prunekit: note: the training run in "), said
