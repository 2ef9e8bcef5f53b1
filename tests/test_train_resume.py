"""`prunekit train --out DIR` checkpoints every epoch: killed and run again, it ends with the
same weights as a run that was never interrupted."""

import json
import tomllib
from pathlib import Path

import pytest
from safetensors.torch import load_file

import prunekit
from prunekit.cli import main
from prunekit.commands import train as train_command

MNIST = ["--data", "mnist", "--data-dir", str(Path(prunekit.__file__).parent / "assets" / "mnist")]
TRAIN = ["train", "--model", "mlpnet", *MNIST, "--epochs", "3", "--lr", "0.05", "--json"]


def test_killed_training_resumes_to_the_same_weights(capsys, tmp_path, monkeypatch):
    assert main([*TRAIN, "--augment", "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads(capsys.readouterr().out)

    calls = []
    real_epoch = train_command.train_epoch

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main([*TRAIN, "--augment", "--out", str(tmp_path / "cut")]) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["stage-001.safetensors"]
    # run.log says why it ended there, as a prune run's does (before, its last line was "epoch 1 saved ...")
    assert (tmp_path / "cut" / "run.log").read_text().splitlines()[-1].endswith("interrupted (Ctrl-C)")
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)

    assert main([*TRAIN, "--augment", "--out", str(tmp_path / "cut")]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["accuracy"] == whole["accuracy"]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not (tmp_path / "cut" / "checkpoints").exists()      # the run ended: its model is the result


def test_a_training_folder_refuses_other_options(capsys, tmp_path):
    assert main([*TRAIN, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main([*TRAIN, "--epochs", "2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "holds another training run" in err and err.count("\n") == 1


@pytest.mark.parametrize("where", ["same", "other"])
def test_a_finished_training_run_again_is_the_same_result(capsys, tmp_path, monkeypatch, where):
    assert main([*TRAIN, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0
    first = json.loads(capsys.readouterr().out)
    out = str(tmp_path / "run")
    if where == "other":                  # the config holds absolute paths: the same folder, named relatively
        monkeypatch.chdir(tmp_path)
        out = "run"
    monkeypatch.setattr(train_command, "train_epoch", None)      # nothing left to train
    assert main([*TRAIN, "--epochs", "1", "--out", out]) == 0
    captured = capsys.readouterr()
    again = json.loads(captured.out)
    assert again["accuracy"] == first["accuracy"] and again["history"] == first["history"]
    assert captured.err.count("\n") == 1 and "holds this training run, finished: its result again, nothing was " \
        "trained (--force trains it anew)" in captured.err, captured.err


def test_a_resumed_training_of_a_model_file_says_when_the_file_changed(capsys, tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text("from torch import nn\n\n\ndef build():\n"
                                     "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n")
    argv = ["train", "--model", f"{tmp_path}/net.py:build", "--normalize", "none", *MNIST, "--epochs", "2",
            "--json", "--out", str(tmp_path / "run")]
    real_epoch = train_command.train_epoch
    calls = []

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main(argv) == 130
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)
    with (tmp_path / "net.py").open("a") as f:
        f.write("# edited\n")
    capsys.readouterr()
    assert main(argv) == 0
    assert "prunekit: warning: the model file changed since this training started" in capsys.readouterr().err


def test_train_onto_a_prune_run_folder_says_it_is_one(capsys, tmp_path):
    run = tmp_path / "pruned"
    assert main(["prune", "--model", "mlpnet", "--checkpoint", str(Path(prunekit.__file__).parent / "assets" /
                 "mlpnet.safetensors"), *MNIST, "--sparsity", "0.5", "--json", "--out", str(run)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main([*TRAIN, "--epochs", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "`prunekit prune` run" in err and "training run" not in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_train_on_a_seeded_subset_of_the_training_images(capsys, tmp_path):
    """--train-samples N trains on N training images drawn with --seed (as prune's does), and the
    record says how many; a run folder records it, so the same command again is the same run."""
    out = str(tmp_path / "run")
    assert main([*TRAIN, "--epochs", "1", "--train-samples", "300", "--out", out]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["train_images"] == 300
    assert main([*TRAIN, "--epochs", "1", "--train-samples", "300", "--out", out]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert main([*TRAIN, "--epochs", "1", "--train-samples", "200", "--out", out]) == 2
    assert "holds another training run" in capsys.readouterr().err
    assert main([*TRAIN, "--epochs", "1", "--train-samples", "300", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["history"][0]["loss"] != first["history"][0]["loss"]


def test_a_diverging_training_stops_in_one_line_and_saves_nothing_diverged(capsys, tmp_path):
    out = str(tmp_path / "run")
    argv = ["train", "--model", "mlpnet", *MNIST, "--train-samples", "256", "--epochs", "1", "--out", out]
    assert main([*argv, "--lr", "1e20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged in epoch 1/1 (its loss became nan): lower --lr (it is 1e+20)" in err
    assert not Path(out).exists() or not any(Path(out).iterdir())     # released: no model, no config
    assert main([*argv, "--lr", "0.05"]) == 0                           # the lower --lr takes the same folder
    assert prunekit.train.nonfinite_weight(prunekit.load_pruned(prunekit.zoo.build("mlpnet"), out)) is None


def test_a_training_diverging_after_an_epoch_keeps_that_epoch_resumable(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_epoch = train_command.train_epoch
    calls = []

    def diverging_in_second_epoch(model, *args, **kwargs):
        calls.append(1)
        loss = real_epoch(model, *args, **kwargs)
        if len(calls) == 2:
            next(model.parameters()).data.fill_(float("inf"))
        return loss

    monkeypatch.setattr(train_command, "train_epoch", diverging_in_second_epoch)
    assert main([*TRAIN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training diverged in epoch 2/3 (its fc1.weight became nan or inf)" in err
    # the advice works: --force starts over there with the lower --lr (another --out would too); run.log says why
    assert err.endswith(f"{out} keeps the run up to epoch 1 with this --lr: to train with a lower one, add --force to "
                        "start over there, or give it another --out\n")
    assert (out / "run.log").read_text().splitlines()[-1].endswith(
        "stopped: training diverged in epoch 2/3 (its fc1.weight became nan or inf): lower --lr (it is 0.05); "
        "nothing diverged was saved")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["stage-001.safetensors"]
    assert not (out / "model.safetensors").exists()
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)
    assert main([*TRAIN, "--out", str(out)]) == 0                     # the same command carries on from epoch 1
    assert len(json.loads(capsys.readouterr().out)["history"]) == 3
    calls.clear()
    monkeypatch.setattr(train_command, "train_epoch", diverging_in_second_epoch)
    assert main([*TRAIN, "--out", str(tmp_path / "again")]) == 2
    capsys.readouterr()
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)
    assert main([*TRAIN, "--lr", "0.01", "--force", "--out", str(tmp_path / "again")]) == 0
    assert len(json.loads(capsys.readouterr().out)["history"]) == 3
    assert tomllib.loads((tmp_path / "again" / "config.toml").read_text())["lr"] == 0.01


def test_train_onto_another_run_names_the_options_and_whether_it_finished(capsys, tmp_path, monkeypatch):
    """A finished folder with other options was answered "give that run's own options to carry it
    on" (nothing is left to carry on), naming no option that differs."""
    assert main([*TRAIN, "--epochs", "1", "--out", str(tmp_path / "done")]) == 0
    capsys.readouterr()
    assert main([*TRAIN, "--epochs", "2", "--out", str(tmp_path / "done")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another training run, finished (other epochs)" in err, err
    assert "carry it on" not in err and "--force" in err
    real_epoch, calls = train_command.train_epoch, []

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main([*TRAIN, "--out", str(tmp_path / "cut")]) == 130
    capsys.readouterr()
    assert main([*TRAIN, "--lr", "0.01", "--augment", "--out", str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "an unfinished training run (other lr, augment)" in err, err
    assert "give that run's own options to carry it on" in err


def test_train_force_replaces_a_training_run_only(capsys, tmp_path, monkeypatch):
    """`train` had no --force while prune has one: it clears the training run's own files (another
    run's, or this one's once finished: trained anew), never a user's file or a prune run."""
    run = tmp_path / "run"
    assert main([*TRAIN, "--epochs", "1", "--out", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*TRAIN, "--epochs", "2", "--out", str(run), "--force"]) == 0
    assert len(json.loads(capsys.readouterr().out)["history"]) == 2
    assert "force" not in tomllib.loads((run / "config.toml").read_text()) and (run / "notes.txt").read_text() == "mine"
    calls = []
    real_epoch = train_command.train_epoch
    monkeypatch.setattr(train_command, "train_epoch", lambda *a, **k: calls.append(1) or real_epoch(*a, **k))
    assert main([*TRAIN, "--epochs", "2", "--out", str(run), "--force"]) == 0      # finished: trained anew
    assert len(calls) == 2 and not (run / "checkpoints").exists()
    capsys.readouterr()
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", "mlpnet", "--checkpoint", str(Path(prunekit.__file__).parent / "assets" /
                 "mlpnet.safetensors"), *MNIST, "--sparsity", "0.5", "--json", "--out", str(pruned)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in pruned.rglob("*") if p.is_file()}
    assert main([*TRAIN, "--epochs", "1", "--out", str(pruned), "--force"]) == 2
    assert "`prunekit prune` run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in pruned.rglob("*") if p.is_file()} == before
    assert main([*TRAIN, "--epochs", "1", "--force"]) == 2
    assert "add --out DIR" in capsys.readouterr().err


def _tiny_data(n=64):
    g = prunekit.train.torch.Generator().manual_seed(0)
    torch = prunekit.train.torch
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, n, 16)]


def test_train_epochs_stops_at_the_first_diverging_epoch_naming_the_learning_rate():
    torch = prunekit.train.torch
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    seen = []
    with pytest.raises(prunekit.PrunekitError, match=r"training diverged in epoch 1/3 \(its loss became nan\): "
                                                     r"lower lr \(it is 1e\+20\)") as caught:
        prunekit.train.train_epochs(model, _tiny_data(), 3, lr=1e20, progress=False,
                                    on_epoch_end=lambda epoch, loss: seen.append(epoch))
    assert isinstance(caught.value, ValueError) and seen == []     # the diverged epoch is not reported as done
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    prunekit.train.train_epochs(model, _tiny_data(), 2, lr=0.01, progress=False,
                                on_epoch_end=lambda epoch, loss: seen.append(epoch))
    assert seen == [0, 1]                                           # a sane rate trains as before


def test_a_diverging_gradual_fine_tune_stops_in_one_line_and_saves_nothing_diverged(capsys, tmp_path):
    ckpt = str(Path(prunekit.__file__).parent / "assets" / "mlpnet.safetensors")
    out = tmp_path / "run"
    argv = ["prune", "--model", "mlpnet", "--checkpoint", ckpt, *MNIST, "--method", "magnitude", "--sparsity", "0.5",
            "--gradual", "--events", "2", "--epochs-per-event", "1", "--final-epochs", "1", "--out", str(out)]
    assert main([*argv, "--lr", "1e20"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("training diverged in epoch 1/1 of the fine-tune after prune event 1/2 "
                                     "(its loss became nan): lower --lr (it is 1e+20)") in err
    assert not (out / "model.safetensors").exists()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_a_diverging_channel_fine_tune_stops_in_one_line_naming_finetune_lr(capsys, tmp_path):
    ckpt = str(Path(prunekit.__file__).parent / "assets" / "mlpnet.safetensors")
    out = tmp_path / "run"
    argv = ["prune", "--model", "mlpnet", "--checkpoint", ckpt, *MNIST, "--method", "autobot", "--flops", "0.5",
            "--gate-batches", "2", "--finetune-epochs", "1", "--finetune-lr", "1e20", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # phases 1 and 2 were saved: the folder keeps that run, whose config.toml names this --finetune-lr, so
    # the advice says how to run with the lower one (the same --out refused it as "another run"), run.log
    # says why the run stopped, and metrics.json says "stopped" (it said "running")
    assert err.count("prunekit: error:") == 1 and err.endswith(
        "prunekit: error: training diverged in fine-tune epoch 1/1 of the 0.5 FLOPs model (its loss became nan): "
        f"lower --finetune-lr (it is 1e+20); nothing diverged was saved; {out} keeps the run up to its last "
        "checkpoint, made with this --finetune-lr: to run with a lower one, add --force (it starts over there) or "
        "give it another --out\n")
    assert not (out / "model.safetensors").exists()
    assert (out / "run.log").read_text().splitlines()[-1].endswith(
        "stopped: training diverged in fine-tune epoch 1/1 of the 0.5 FLOPs model (its loss became nan) with "
        "finetune_lr 1e+20; nothing diverged was saved")
    assert json.loads((out / "metrics.json").read_text())["status"] == "stopped"
    assert main([*argv[:-4], "--finetune-lr", "0.01", "--force", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["status"] == "done" and (out / "model.safetensors").exists()


def test_a_diverging_resumed_run_says_what_works_under_resume_and_it_does(capsys, tmp_path):
    """A `prune --resume DIR` that diverged was told to "add --force", which --resume refuses (it
    takes every option from the folder's config.toml): it is told to run the original command again
    with a lower rate and --force, or the --recipe of that config.toml with them, which works."""
    import shlex
    ckpt = str(Path(prunekit.__file__).parent / "assets" / "mlpnet.safetensors")
    out = tmp_path / "run"
    argv = ["prune", "--model", "mlpnet", "--checkpoint", ckpt, *MNIST, "--method", "autobot", "--flops", "0.5",
            "--gate-batches", "2", "--finetune-epochs", "1", "--finetune-lr", "1e20", "--out", str(out)]
    assert main(argv) == 2
    capsys.readouterr()
    assert main(["prune", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("prunekit: error:") == 1 and "add --force" not in err, err
    assert err.endswith(
        f"{out} keeps the run up to its last checkpoint, made with this --finetune-lr: to run with a lower one, run "
        "the original command again with a lower --finetune-lr and --force (it starts over there; --resume takes "
        f"neither), e.g. `prunekit prune --recipe {shlex.quote(str(out / 'config.toml'))} --finetune-lr LOWER "
        "--force`, or give it another --out\n"), err
    command = shlex.split(err.split("`")[1].replace("LOWER", "0.01"))
    assert command[:2] == ["prunekit", "prune"]
    assert main(command[1:]) == 0
    assert json.loads((out / "metrics.json").read_text())["status"] == "done" and (out / "model.safetensors").exists()
    assert "finetune-lr = 0.01" in (out / "config.toml").read_text()


@pytest.mark.parametrize("method, options, needle", [
    ("magnitude", {"sparsity": 0.5, "gradual": True, "events": 2, "epochs_per_event": 1, "final_epochs": 1,
                   "lr": 1e20}, "of the fine-tune after prune event 2/2 (its loss became nan): lower lr (it is 1e+20)"),
    ("autobot", {"flops": 0.5, "gate_batches": 2, "finetune_epochs": 3, "finetune_lr": 1e30},
     "of the 0.5 FLOPs model (its loss became nan): lower finetune_lr (it is 1e+30)")])
def test_a_diverging_fine_tune_in_python_raises_a_prunekit_error_naming_the_option(method, options, needle, tmp_path):
    torch = prunekit.train.torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(48, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(prunekit.PrunekitError) as caught:
        prunekit.prune(model, (x, torch.arange(48) % 3), method=method, out=str(tmp_path / "run"), **options)
    assert "\n" not in str(caught.value) and needle in str(caught.value), str(caught.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # a checkpoint was saved before the divergence (prune event 1; phases 1 and 2): the folder keeps that run
    assert str(caught.value).endswith(f"{tmp_path / 'run'} keeps the run up to its last checkpoint, made with this "
                                      f"{'finetune_lr' if method == 'autobot' else 'lr'}: to run with a lower one, "
                                      "pass force=True (it starts over there) or another out=")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "stopped"
    assert (tmp_path / "run" / "run.log").read_text().splitlines()[-1].split(" ", 2)[2].startswith(
        "stopped: training diverged")


def test_a_moved_training_folder_is_carried_on_by_the_same_command(capsys, tmp_path, monkeypatch):
    """A training folder renamed after a kill: the same command with the new --out carries it on
    (it said "holds an unfinished training run (other out)"); its config.toml is left as it was and
    another option is still refused, naming that option only."""
    real_epoch = train_command.train_epoch
    calls = []

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    argv = [*TRAIN[:TRAIN.index("--epochs")], "--epochs", "2", "--lr", "0.05", "--json"]
    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main([*argv, "--out", str(tmp_path / "made")]) == 130
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)
    (tmp_path / "made").rename(tmp_path / "moved")
    config = (tmp_path / "moved" / "config.toml").read_text()
    capsys.readouterr()
    assert main([*argv, "--lr", "0.1", "--out", str(tmp_path / "moved")]) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished training run (other lr)" in err and err.count("\n") == 1, err
    assert main([*argv, "--out", str(tmp_path / "moved")]) == 0, capsys.readouterr().err
    assert len(json.loads(capsys.readouterr().out)["history"]) == 2
    assert (tmp_path / "moved" / "config.toml").read_text() == config
    assert "has moved to" in (tmp_path / "moved" / "run.log").read_text()
    assert not (tmp_path / "made").exists()


def test_compare_out_is_refused_in_a_training_run_folder(capsys, tmp_path):
    """A comparison report written into a `train --out` folder would sit among its files (and a
    later `train --force` there would delete it): refused like a prune run's folder."""
    out = tmp_path / "trained"
    assert main(["train", "--model", "mlpnet", *MNIST, "--train-samples", "256", "--epochs", "1", "--lr", "0.05",
                 "--out", str(out)]) == 0
    run = tmp_path / "run"
    assert main(["prune", "--model", "mlpnet", *MNIST, "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(run)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["compare", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the folder of a prunekit training run" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def _weights(path, seed):
    """A plain checkpoint of mlpnet's weights as built with ``seed``."""
    from prunekit import zoo
    torch = prunekit.train.torch
    torch.manual_seed(seed)
    torch.save(zoo.build("mlpnet").state_dict(), path)


def test_a_finished_training_run_whose_checkpoint_changed_is_another_run(capsys, tmp_path, monkeypatch):
    """--checkpoint replaced by other weights at the same path: the same command gave the old run's
    result back ("holds this training run, finished"). The file's SHA-256 is recorded (model.json,
    as prune records it): another run, refused in one line naming the fix; the same bytes written
    again are the same run; a folder of an older prunekit (no digest recorded) is given back."""
    checkpoint, out = tmp_path / "ck.pth", tmp_path / "run"
    argv = [*TRAIN, "--epochs", "1", "--checkpoint", str(checkpoint), "--out", str(out)]
    _weights(checkpoint, 1)
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    model = (out / "model.safetensors").read_bytes()
    assert json.loads((out / "model.json").read_text())["checkpoint_sha256"] == \
        prunekit.runs.file_sha256(checkpoint)
    calls = []
    monkeypatch.setattr(train_command, "train_epoch", lambda *a, **k: calls.append(1) or None)
    _weights(checkpoint, 2)                                   # other weights, same path
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds another training run, finished: it started from other weights than " \
        f"--checkpoint {checkpoint}" in err and "--force to replace it" in err, err
    assert (out / "model.safetensors").read_bytes() == model and not calls
    _weights(checkpoint, 1)                                   # the same bytes again: this run, given back
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["history"] == first["history"] and "holds this training run" in captured.err
    # an older prunekit's folder (its model.json records no digest): given back, as before
    meta = json.loads((out / "model.json").read_text())
    del meta["checkpoint_sha256"]
    (out / "model.json").write_text(json.dumps(meta))
    _weights(checkpoint, 2)
    assert main(argv) == 0
    assert "holds this training run, finished" in capsys.readouterr().err and not calls


def test_a_resumed_training_whose_checkpoint_changed_is_refused_and_force_starts_it_anew(capsys, tmp_path,
                                                                                           monkeypatch):
    checkpoint, out = tmp_path / "ck.pth", tmp_path / "run"
    argv = [*TRAIN, "--epochs", "2", "--checkpoint", str(checkpoint), "--out", str(out)]
    _weights(checkpoint, 1)
    real_epoch, calls = train_command.train_epoch, []

    def killed_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)
    monkeypatch.setattr(train_command, "train_epoch", killed_in_second_epoch)
    assert main(argv) == 130
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)
    _weights(checkpoint, 2)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--checkpoint file the run in" in err and "has changed since" in err, err
    assert (out / "checkpoints" / "stage-001.safetensors").exists() and not (out / "model.safetensors").exists()
    assert main([*argv, "--force"]) == 0
    assert len(json.loads(capsys.readouterr().out)["history"]) == 2
    assert "its --checkpoint file changed since this run started" in (out / "run.log").read_text()


def test_the_checkpoint_read_ahead_is_not_kept_after_the_command(capsys, tmp_path):
    """train reads --checkpoint before the data (zoo.checkpoints.read_ahead) and kept its whole state
    dict in a module-level cache after a refusal or a finished run given back (nothing built to take
    it): a leak in a long process. Kept for the command's call only."""
    from prunekit.zoo import checkpoints
    checkpoint, out = tmp_path / "ck.pth", tmp_path / "run"
    argv = [*TRAIN, "--epochs", "1", "--checkpoint", str(checkpoint), "--out", str(out)]
    _weights(checkpoint, 1)
    assert main(argv) == 0 and checkpoints._READ_AHEAD == {}
    capsys.readouterr()
    _weights(checkpoint, 2)
    assert main(argv) == 2                                     # refused after the read, before any model is built
    assert "holds another training run, finished" in capsys.readouterr().err
    assert checkpoints._READ_AHEAD == {}
    _weights(checkpoint, 1)
    assert main(argv) == 0                                     # given back: no model built to take it
    assert "holds this training run, finished" in capsys.readouterr().err
    assert checkpoints._READ_AHEAD == {}


def test_train_run_log_says_start_stop_resume_and_done_as_prune_s_does(capsys, tmp_path, monkeypatch):
    """Session 54: a SIGTERM in the first epoch left run.log unwritten (the folder held only
    config.toml: its stop recorded nowhere), and a training's run.log had only "epoch N saved" lines.
    Now it has prune's: start, the stop, resume, done, and "already complete" for the same command again."""
    import os
    import signal
    out = tmp_path / "run"
    argv = [*TRAIN, "--epochs", "2", "--out", str(out)]
    real_epoch = train_command.train_epoch

    def terminated_in_first_epoch(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_command, "train_epoch", terminated_in_first_epoch)
    assert main(argv) == 143
    assert "prunekit: interrupted (SIGTERM)" in capsys.readouterr().err
    lines = [line.split(" ", 2)[2] for line in (out / "run.log").read_text().splitlines()]
    assert lines == ["start: train mlpnet on mnist, 2 epochs, lr 0.05, seed 0", "interrupted (SIGTERM)"], lines
    assert not (out / "checkpoints").exists()

    # stopped in its second epoch: the epoch checkpointed before it is where the same command resumes
    calls = []

    def interrupted_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_command, "train_epoch", interrupted_in_second_epoch)
    assert main(argv) == 130
    monkeypatch.setattr(train_command, "train_epoch", real_epoch)
    assert main(argv) == 0
    accuracy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    assert main(argv) == 0
    lines = [line.split(" ", 2)[2] for line in (out / "run.log").read_text().splitlines()]
    assert lines[2:] == ["start: train mlpnet on mnist, 2 epochs, lr 0.05, seed 0",
                         "epoch 1 saved to stage-001.safetensors", "interrupted (Ctrl-C)",
                         "resume: train mlpnet on mnist, 2 epochs, lr 0.05, seed 0",     # one line (s54: two)
                         "epoch 2 saved to stage-002.safetensors",
                         f"done: test accuracy {accuracy:.2f}% after 2 epochs",
                         "already complete; nothing to do"], lines


def test_a_model_file_drawing_at_import_trains_the_same_for_one_seed(capsys, tmp_path, monkeypatch):
    """A model file that draws at import time (a fixed random projection) gets its draws from --seed,
    as the build's own: the import comes under ``torch.manual_seed(seed)`` and the model's initial
    weights are the draws that follow it, whatever the RNG held before the command (each process,
    rank and resume draws the same). The figure expected is a seeded reference build's."""
    import torch
    from torch import nn

    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\nPROJ = torch.randn(784, 16)\n\n\n"
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.register_buffer('proj', PROJ.clone())\n        self.fc = nn.Linear(16, 10)\n\n"
        "    def forward(self, x):\n        return self.fc(x.flatten(1) @ self.proj)\n\n\n"
        "def build():\n    return Net()\n")
    argv = ["train", "--model", f"{tmp_path}/net.py:build", "--normalize", "none", *MNIST, "--epochs", "1",
            "--train-samples", "256", "--seed", "3", "--json"]
    real_epoch = train_command.train_epoch
    initial = []

    def first_weights(model, *args, **kwargs):
        initial.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_epoch(model, *args, **kwargs)

    monkeypatch.setattr(train_command, "train_epoch", first_weights)
    results = []
    for before in (100, 200):           # whatever the process drew before the command
        torch.manual_seed(before)
        torch.rand(5)
        assert main(argv) == 0
        results.append(json.loads(capsys.readouterr().out))
    with torch.random.fork_rng(devices=[]):    # the reference: import then build, under the seed
        torch.manual_seed(3)
        proj = torch.randn(784, 16)
        fc = nn.Linear(16, 10)
    for weights in initial:
        assert torch.equal(weights["proj"], proj)
        assert torch.equal(weights["fc.weight"], fc.weight) and torch.equal(weights["fc.bias"], fc.bias)
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert [h["loss"] for h in results[0]["history"]] == [h["loss"] for h in results[1]["history"]]


def test_a_model_file_drawing_from_cuda_at_import_builds_from_the_cuda_state_after_its_import(capsys, tmp_path,
                                                                                            monkeypatch):
    """As the CPU generator's, each GPU generator's state just after the seeded import of a model
    file is the one its build carries on from, whatever was drawn between (the data's reading):
    ``capture_rng`` / ``restore_rng``. No GPU here: torch.cuda is a fake one-GPU generator (a byte
    of state; ``manual_seed`` sets it to the seed), and the code path is the one a GPU takes. The
    import draws (+1), the data's reading draws (+50 each split), the build records what it finds."""
    import torch
    fake = {"state": torch.zeros(1, dtype=torch.uint8)}
    for name, value in {"is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 1,
                        "get_rng_state": lambda device=0: fake["state"].clone(),
                        "set_rng_state": lambda state, device=0: fake.update(state=state.clone()),
                        "manual_seed_all": lambda seed: fake.update(state=torch.tensor([seed % 256],
                                                                                      dtype=torch.uint8)),
                        }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    real_load = train_command.load_dataset

    def drawing_load(*args, **kwargs):          # a draw from the GPU's generator between import and build
        fake["state"] = fake["state"] + 50
        return real_load(*args, **kwargs)
    monkeypatch.setattr(train_command, "load_dataset", drawing_load)
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "torch.cuda.set_rng_state(torch.cuda.get_rng_state(0) + 1, 0)      # a draw at import\n\n\n"
        "def build():\n    SEEN.append(int(torch.cuda.get_rng_state(0)[0]))\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n\n\nSEEN = []\n")
    seen = []
    argv = ["train", "--model", f"{tmp_path}/net.py:build", "--normalize", "none", *MNIST, "--epochs", "1",
            "--train-samples", "64", "--batch-size", "32", "--seed", "7", "--json"]
    from prunekit import user_models
    real_factory = user_models._factory

    def factory_seen(path, function, name):
        made = real_factory(path, function, name)
        seen.append(made.__globals__["SEEN"])
        return made
    monkeypatch.setattr(user_models, "_factory", factory_seen)
    assert main(argv) == 0, capsys.readouterr().err
    assert seen and seen[-1] == [7 + 1], (seen, fake)      # the seed, the import's draw; not the data's +100
