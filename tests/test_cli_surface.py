"""The command line's surface: help texts, defaults shown, --version, usage, training checks and
the resume hint of an interrupted run (issue 10)."""

import argparse
import json
import re
from pathlib import Path

import pytest

import prunekit
from prunekit import executor
from prunekit.commands import eval as eval_command
from prunekit.cli import build_parser, main

ASSETS = Path(prunekit.__file__).parent / "assets"
MLP = ["--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors")]
MNIST = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist")]


def _subparsers():
    return build_parser()._subparsers._group_actions[0].choices


def _options():
    for command, parser in _subparsers().items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                yield command, action


@pytest.mark.parametrize("command,action", list(_options()), ids=lambda v: getattr(v, "dest", v))
def test_every_option_has_help_and_shows_a_nontrivial_default(command, action):
    assert action.help, f"{command} {action.option_strings[0]} has no help text"
    if action.default not in (None, False, argparse.SUPPRESS) and action.const is None:
        after = action.help.split("default", 1)[-1]
        if isinstance(action.default, (int, float)):
            numbers = [float(n) for n in re.findall(r"[-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?", after)]
            shown = action.default in numbers              # 5e-4 shows 0.0005
        else:
            words = action.default if isinstance(action.default, list) else [action.default]
            shown = all(str(w) in after for w in words)
        assert "default" in action.help and shown, \
            f"{command} {action.option_strings[0]}: help does not show its default {action.default!r}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"prunekit {prunekit.__version__}"


def test_help_words(capsys):
    subs = _subparsers()
    train_batch = next(a for a in subs["train"]._actions if a.dest == "batch_size")
    assert "training batch size" in train_batch.help and train_batch.default == 128
    sweep_method = next(a for a in subs["sweep"]._actions if a.dest == "method")
    assert sweep_method.help.startswith("one or more of")
    sparsity = next(a for a in subs["prune"]._actions if a.dest == "sparsity")
    assert "REMOVED" in sparsity.help and "KEPT" in sparsity.help     # a share removes, a count keeps
    assert "seed" not in {a.dest for a in subs["eval"]._actions}     # evaluation has no random choice
    usage = subs["prune"].format_usage()
    assert "prunekit prune --resume DIR" in usage and "prunekit prune --recipe FILE" in usage


def test_usage_lines_show_an_optional_model_as_optional():
    """--model may be left out with a prunekit checkpoint or run folder: no usage line may show it
    as required (prune's own usage line did, "prunekit prune --model MODEL --data ...")."""
    for name, sub in _subparsers().items():
        model = next((a for a in sub._actions if "--model" in a.option_strings), None)
        if model is None or model.required:
            continue
        usage = " ".join(sub.format_usage().split())
        assert usage.count("--model") == usage.count("[--model"), (name, usage)


def test_eval_refuses_seed(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", *MLP, *MNIST, "--seed", "3"])
    assert exit_.value.code == 2 and "--seed" in capsys.readouterr().err


def test_train_measures_the_eval_split(tmp_path, capsys):
    assert main(["train", "--model", "mlpnet", *MNIST, "--epochs", "1", "--eval-split", "train", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["split"] == "train" and record["epochs"] == 1 and 0 <= record["accuracy"] <= 100


@pytest.mark.parametrize("flag,value,words", [("--epochs", "0", "--epochs must be at least 1"),
                                              ("--lr", "-1", "--lr must be a positive"),
                                              ("--lr", "0", "--lr must be a positive"),
                                              ("--weight-decay", "-0.1", "--weight-decay must be 0 or more"),
                                              ("--batch-size", "0", "--batch-size must be at least 1")])
def test_train_refuses_settings_that_do_nothing_or_crash(tmp_path, capsys, flag, value, words):
    out = tmp_path / "trained"
    assert main(["train", "--model", "mlpnet", *MNIST, flag, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and not out.exists()


def test_interrupted_run_says_how_to_resume_and_the_hint_works(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["prune", *MLP, *MNIST, "--method", "magnitude", "--train-samples", "256", "--eval-split", "train",
            "--sparsity", "0.8", "--out", str(out), "--json"]
    prune = executor.prune_weights

    def interrupt(*args, **kwargs):          # a Ctrl-C once the run folder holds its config
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "prune_weights", interrupt)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"prunekit: interrupted; resume with `prunekit prune --resume {out}`"
    assert (out / "run.log").read_text().splitlines()[-1].endswith("interrupted (Ctrl-C)")
    monkeypatch.setattr(executor, "prune_weights", prune)
    assert main(["prune", "--resume", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.8, abs=1e-4)


def test_a_ctrl_c_that_a_cleanup_swallowed_stops_a_sweep_before_its_next_run(tmp_path, capsys, monkeypatch):
    """A SIGINT whose KeyboardInterrupt is raised, and swallowed, inside code the interpreter runs
    for itself (a weakref callback: "Exception ignored in ...") is remembered: the sweep stops
    before its next run instead of going on."""
    import os
    import signal
    from prunekit.commands import sweep
    prune_into, before = sweep.prune_into, signal.getsignal(signal.SIGINT)

    def swallowing(*args, **kwargs):
        prune_into(*args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:        # what "Exception ignored in: <WeakSet ...>" amounts to
            pass

    monkeypatch.setattr(sweep, "prune_into", swallowing)
    out = tmp_path / "sweep"
    assert main(["sweep", *MLP, *MNIST, "--method", "magnitude", "--sparsity", "0.5", "0.8", "--train-samples", "256",
                 "--eval-split", "train", "--out", str(out), "--json"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1         # the second run never started
    # put back as it was (Python's default_int_handler; SIG_IGN in a job a script started in the background)
    assert signal.getsignal(signal.SIGINT) is before


def test_the_same_command_on_a_finished_run_says_nothing_was_run(tmp_path, capsys):
    argv = ["prune", *MLP, *MNIST, "--method", "magnitude", "--train-samples", "256", "--eval-split", "train",
            "--sparsity", "0.8", "--out", str(tmp_path / "run"), "--json"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "nothing was run" not in first.err
    assert main(argv) == 0
    again = capsys.readouterr()
    assert json.loads(again.out) == json.loads(first.out)
    assert f"prunekit: note: {tmp_path / 'run'} holds this run, finished: its result again, nothing was run" in again.err
    # a run folder stands for its model.safetensors wherever a checkpoint is read
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), *MNIST, "--eval-split", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(json.loads(first.out)["accuracy"])
    assert main(["info", "--checkpoint", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == json.loads(first.out)["macs"]
    # ... and where a model is named: `info runs/x`, `eval --model runs/x`
    assert main(["info", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == json.loads(first.out)["macs"]
    assert main(["eval", "--model", str(tmp_path / "run"), *MNIST, "--eval-split", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(json.loads(first.out)["accuracy"])
    assert main(["info", str(tmp_path)]) == 2
    assert "folder without a model.safetensors" in capsys.readouterr().err
    # the finished run's command with --onnx added: export writes the file, nothing is pruned again
    assert main([*argv, "--onnx"]) == 2
    assert f"`prunekit export {tmp_path / 'run'} --onnx`" in capsys.readouterr().err
    # another budget: the refusal names what differs
    assert main([*[a if a != "0.8" else "0.7" for a in argv]]) == 2
    assert "holds another run (other sparsity)" in capsys.readouterr().err


def test_info_table_counts_the_nonzero_params_of_each_layer(tmp_path, capsys):
    """The per-layer params of a pruned model are its nonzero ones and sum to the total line."""
    out = tmp_path / "run"
    assert main(["prune", *MLP, *MNIST, "--method", "magnitude", "--train-samples", "256", "--eval-split", "train",
                 "--sparsity", "0.8", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert sum(r["params_kept"] for r in counted["layers"]) == counted["params"] < counted["dense_params"]
    assert main(["info", str(out)]) == 0
    table = capsys.readouterr().out
    fc1 = next(r for r in counted["layers"] if r["shape"])
    assert f"{fc1['params_kept']:,}" in next(line for line in table.splitlines() if line.startswith(fc1["name"] + " "))


def test_interrupt_without_a_run_folder_says_nothing_was_saved(capsys, monkeypatch):
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_command, "cmd_eval", interrupt)
    assert main(["eval", *MLP, *MNIST]) == 130
    assert "nothing was saved" in capsys.readouterr().err


def test_a_torchrun_summary_says_how_many_ranks_ran_and_each_ones_peak():
    from prunekit.commands.prune import prune_lines
    record = {"model": "m", "method": "falcon", "mode": "one-shot", "dense_accuracy": 90.0, "accuracy": 80.0,
              "sparsity": None, "flops_kept": 0.5, "macs": 50, "dense_macs": 100, "params_kept": 0.5, "params": 10,
              "seconds": 1.0, "peak_rss_mb": 410.2}
    assert prune_lines(record)[-1] == "  time       1.00 s pruning, peak RSS 410 MB"
    ranked = {**record, "ranks": 2, "peak_rss_mb_per_rank": [410.2, 398.7]}
    assert prune_lines(ranked)[-1] == "  time       1.00 s pruning, 2 ranks, peak RSS 410 / 399 MB"


def test_a_zoo_model_pruned_from_python_is_read_as_that_zoo_model(tmp_path, capsys):
    """Its sidecar names the class only (MLPNet); --model mlpnet names it again (was refused as a
    model saved from Python, asking for a model file)."""
    import torch

    import prunekit
    from prunekit import zoo
    torch.manual_seed(0)
    out = tmp_path / "py"
    result = prunekit.prune(zoo.build("mlpnet"), (torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))),
                            method="magnitude", sparsity=0.7, out=str(out))
    assert main(["info", "mlpnet", "--checkpoint", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs"] == result.record["macs"]
    assert main(["info", "--checkpoint", str(out)]) == 2                 # unnamed: which code builds it?
    assert "saved from Python" in capsys.readouterr().err
    assert main(["info", "resnet20", "--checkpoint", str(out)]) == 2     # another zoo model
    assert "holds a MLPNet model saved from Python" in capsys.readouterr().err


def test_export_of_a_run_that_has_not_finished_says_to_carry_it_on(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('method = "falcon"\n')       # what a killed run leaves, before its model
    assert main(["export", str(run), "--onnx"]) == 2
    assert f"has not finished: carry it on first (`prunekit prune --resume {run}`" in capsys.readouterr().err


def test_more_gradient_rows_than_training_images_is_said_before_the_memory_check(capsys):
    """The memory refusal came first and suggested an n above the 256 images (then refused again)."""
    assert main(["prune", *MLP, *MNIST, "--method", "falcon", "--flops", "0.5", "--train-samples", "256",
                 "--fisher-samples", "10000000", "--eval-split", "train"]) == 2
    err = capsys.readouterr().err
    assert "the training data holds 256 samples" in err and "--fisher-samples" in err and err.count("\n") == 1


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    """`kill` / `timeout` (SIGTERM) ended a run silently with 143, its log and metrics still "running";
    now it is said like Ctrl-C, with the resume command, and the same command finishes the run."""
    import os
    import signal
    from prunekit import executor
    real_run, before = executor._run, signal.getsignal(signal.SIGTERM)

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(executor, "_run", terminated)
    out = tmp_path / "run"
    argv = ["prune", *MLP, *MNIST, "--method", "magnitude", "--sparsity", "0.8", "--train-samples", "256",
            "--eval-split", "train", "--out", str(out), "--json"]
    assert main(argv) == 143
    assert "prunekit: interrupted (SIGTERM); " in capsys.readouterr().err
    assert "interrupted (SIGTERM)" in (out / "run.log").read_text()
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is before          # put back as it was
    monkeypatch.setattr(executor, "_run", real_run)
    assert main(argv) == 0
    assert json.loads((out / "metrics.json").read_text())["status"] == "done"


def test_a_sweep_killed_between_its_report_files_is_finished_by_the_same_command(tmp_path, capsys):
    """report.md was written before runs.json: a kill between them (or a damaged runs.json) left a
    report.md that read as a user's file, and the sweep could never be finished."""
    out = tmp_path / "my sweep"
    argv = ["sweep", *MLP, *MNIST, "--method", "magnitude", "--sparsity", "0.5", "0.8", "--train-samples", "256",
            "--eval-split", "train", "--out", str(out), "--json"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    (out / "runs.json").write_text("[{")                 # damaged, as a kill mid-write of a non-atomic copy leaves it
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == first["runs"]
    (out / "runs.json").unlink()
    assert main(argv) == 0
    assert json.loads((out / "runs.json").read_text())
    capsys.readouterr()
    assert main(["compare", str(out), "--out", str(tmp_path / "compared"), "--json"]) == 0
    assert "](../my%20sweep/magnitude_" in (tmp_path / "compared" / "report.md").read_text()   # a link with a space

def test_a_quoted_tilde_in_a_path_option_is_the_home_folder(tmp_path, capsys, monkeypatch):
    """--out '~/pkrun' made a folder named '~' in the working directory; --checkpoint '~/...' was not found."""
    import shutil
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    shutil.copy(MLP[3], home / "m.safetensors")
    shutil.copy(str(MLP[3]).replace(".safetensors", ".json"), home / "m.json")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(["prune", "--model", "mlpnet", "--checkpoint", "~/m.safetensors", *MNIST, "--method", "magnitude",
                 "--sparsity", "0.5", "--train-samples", "256", "--out", "~/pkrun", "--json"]) == 0
    assert (home / "pkrun" / "model.safetensors").exists() and not (work / "~").exists()
