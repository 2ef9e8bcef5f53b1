"""Run folders whose config.toml was edited by hand, the same budget spelled another way, the advice
for an unfinished Python run folder, and notes under logging.disable."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit.cli import main
from prunekit.errors import PrunekitError

ASSETS = Path(prunekit.__file__).parent / "assets"
SRC = Path(prunekit.__file__).parent.parent
MNIST = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist")]
PRUNE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), *MNIST,
         "--train-samples", "256", "--method", "magnitude", "--json"]


def _edit(folder: Path, old: str, new: str) -> None:
    config = (folder / "config.toml").read_text()
    assert old in config
    (folder / "config.toml").write_text(config.replace(old, new))


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_prune_over_an_edited_finished_run_is_refused_not_given_back(tmp_path, capsys):
    """A finished 0.5 run whose config.toml was edited to 0.6, then `prune --sparsity 0.6` into it,
    gave back the 0.5 run's result as "this run, finished" (exit 0)."""
    out = tmp_path / "run"
    assert main([*PRUNE, "--sparsity", "0.5", "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["sparsity"] == pytest.approx(0.5, abs=1e-3)
    model = (out / "model.safetensors").read_bytes()
    _edit(out, 'sparsity = "0.5"', 'sparsity = "0.6"')
    assert main([*PRUNE, "--sparsity", "0.6", "--out", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "config.toml was changed (sparsity) since metrics.json was saved" in err and "add --force" in err, err
    assert (out / "model.safetensors").read_bytes() == model          # nothing written over
    # the fix it names: --force runs the asked budget anew
    assert main([*PRUNE, "--sparsity", "0.6", "--out", str(out), "--force"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["sparsity"] == pytest.approx(0.6, abs=1e-3)
    # a comment added by hand is no edit: the same command gives the run back
    (out / "config.toml").write_text("# mine\n" + (out / "config.toml").read_text())
    assert main([*PRUNE, "--sparsity", "0.6", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == again["sparsity"]


@pytest.mark.parametrize("spelled", ["0.50", "50%"])
def test_cli_prune_takes_the_same_budget_spelled_another_way(tmp_path, capsys, spelled):
    """`--sparsity 0.50` (or 50%) over a folder made with 0.5 was refused as "holds another run
    (other sparsity)": config.toml records the budget as typed."""
    out = tmp_path / "run"
    assert main([*PRUNE, "--sparsity", "0.5", "--out", str(out)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*PRUNE, "--sparsity", spelled, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "holds this run, finished" in captured.err
    assert json.loads(captured.out)["sparsity"] == first["sparsity"]
    assert main([*PRUNE, "--sparsity", "0.6", "--out", str(out)]) == 2     # another value is another run
    assert "other sparsity" in _one_line(capsys.readouterr().err)


def test_budgets_compare_by_value():
    from prunekit.run_configs import _differing
    from prunekit.runs import same_values
    assert same_values('sparsity = "0.5"\n', 'sparsity = "50%"\n')
    assert same_values('params = "50k"\n', 'params = "50000"\n')
    assert same_values('flops = "0.3"\n', 'flops = "30%"\n')
    assert not same_values('sparsity = "0.5"\n', 'sparsity = "0.6"\n')
    assert not same_values('sparsity = "0.5"\n', 'params = "0.5"\n')
    assert _differing('sparsity = "0.5"\nseed = 0\n', 'sparsity = "50%"\nseed = 1\n') == ["seed"]
    assert not same_values('sparsity = "lots"\n', 'sparsity = "LOTS"\n')   # no budget: compared as written


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def test_python_call_over_an_edited_finished_run_is_refused(tmp_path):
    """prunekit.prune(sparsity=0.7) over a finished 0.8 run whose config.toml was edited to 0.7 gave
    back the 0.8 result as this call's."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    run = tmp_path / "py"
    first = prunekit.prune(_tiny(), (x, y), method="magnitude-uniform", sparsity=0.8, out=str(run))
    assert first.sparsity == pytest.approx(0.8, abs=0.02)
    _edit(run, "sparsity = 0.8\n", "sparsity = 0.7\n")
    with pytest.raises(PrunekitError, match=r"config\.toml was changed \(sparsity\) since metrics\.json was saved.*"
                                            r"pass force=True") as refused:
        prunekit.prune(_tiny(), (x, y), method="magnitude-uniform", sparsity=0.7, out=str(run))
    assert "\n" not in str(refused.value)
    again = prunekit.prune(_tiny(), (x, y), method="magnitude-uniform", sparsity=0.7, out=str(run), force=True)
    assert again.sparsity == pytest.approx(0.7, abs=0.02)


def test_a_finished_training_run_with_edited_epochs_is_refused(tmp_path):
    """`prunekit train --epochs 5` over a 3-epoch run whose config.toml was edited to 5 gave back
    the 3-epoch result. Checked where the claim is (the training run's record is result.json)."""
    from prunekit.runs import EditedConfig, RunFolder, check_claim
    folder = RunFolder(tmp_path / "t")
    folder.path.mkdir()
    config = 'model = "mlpnet"\nbatch-size = 32\nseed = 0\nepochs = 5\nlr = 0.05\n'
    folder.config.write_text(config)
    folder.model_path.write_bytes(b"x")
    (folder.path / "result.json").write_text(json.dumps({"epochs": 3, "lr": 0.05, "batch_size": 32, "seed": 0}))
    with pytest.raises(EditedConfig, match=r"changed \(epochs\) since result\.json was saved.*add --force"):
        check_claim(folder, config)
    (folder.path / "result.json").write_text(json.dumps({"epochs": 5, "lr": 0.05, "batch_size": 32, "seed": 0}))
    check_claim(folder, config)     # the run it records: given back


def test_cli_train_over_an_edited_finished_run_is_refused(tmp_path, capsys):
    out = tmp_path / "t"
    train = ["train", "--model", "mlpnet", *MNIST, "--lr", "0.05", "--json", "--out", str(out)]
    assert main([*train, "--epochs", "1"]) == 0
    capsys.readouterr()
    _edit(out, "epochs = 1\n", "epochs = 2\n")
    assert main([*train, "--epochs", "2"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "config.toml was changed (epochs) since result.json was saved" in err and "--force" in err, err


def test_sweep_over_an_edited_finished_run_says_so_in_a_sweeps_words(tmp_path, monkeypatch):
    from argparse import Namespace
    from prunekit.commands import sweep
    folder = tmp_path / "row"
    folder.mkdir()
    (folder / "config.toml").write_text('method = "magnitude"\nsparsity = "0.6"\n')
    (folder / "metrics.json").write_text(json.dumps({"status": "done", "config": 'method = "magnitude"\n'
                                                                                  'sparsity = "0.5"\n'}))
    args = Namespace(out=str(folder))
    monkeypatch.setattr(sweep, "run_config", lambda run_args: 'method = "magnitude"\nsparsity = "0.6"\n')
    with pytest.raises(PrunekitError, match=r"changed \(sparsity\) since metrics\.json.*the finished run there.*"
                                            r"move that folder away"):
        sweep.check_run_folder(args)
    (folder / "metrics.json").write_text(json.dumps({"status": "running", "config": 'method = "magnitude"\n'
                                                                                     'sparsity = "0.5"\n'}))
    (folder / "checkpoints").mkdir()             # it saved work (one stopped before any starts anew)
    (folder / "checkpoints" / "stage-001.safetensors").write_bytes(b"saved work")
    with pytest.raises(PrunekitError, match=r"changed \(sparsity\) since metrics\.json.*the unfinished run there.*"
                                            r"back to carry it on, or move that folder away") as refused:
        sweep.check_run_folder(args)        # (s53: was carried on, then refused at its first checkpoint)
    assert "force" not in str(refused.value)


def test_info_and_eval_of_an_unfinished_python_run_name_the_python_call(tmp_path, capsys):
    """They said "resume it with `prunekit prune --resume DIR`", which refuses Python run folders."""
    from prunekit.commands.common import refuse_unfinished
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    run = tmp_path / "py"
    prunekit.prune(_tiny(), (x, y), method="magnitude", sparsity=0.5, out=str(run))
    (run / "model.safetensors").unlink()            # as a run killed before its model was written
    with pytest.raises(PrunekitError) as refused:
        refuse_unfinished(run)
    said = str(refused.value)
    assert f"call prunekit.prune again with the same arguments and out={str(run)!r}" in said, said
    assert "--resume" not in said
    assert main(["eval", "--checkpoint", str(run), *MNIST]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "call prunekit.prune again" in err and "--resume" not in err, err


def test_a_note_is_silent_under_logging_disable():
    code = ("import logging, prunekit.errors as e\n"
            "e.note('one')\n"
            "logging.disable(logging.CRITICAL)\n"
            "e.note('two')\n"
            "logging.disable(logging.NOTSET)\n"
            "e.note('three')\n")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    assert err == "prunekit: note: one\nprunekit: note: three\n", err


def test_a_call_asking_for_the_run_as_it_ran_is_told_the_config_was_edited(tmp_path, capsys):
    """The call the run was made with, over its edited config.toml, read "holds another run (other sparsity)"."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    run = tmp_path / "py"
    prunekit.prune(_tiny(), (x, y), method="magnitude-uniform", sparsity=0.8, out=str(run))
    _edit(run, "sparsity = 0.8\n", "sparsity = 0.7\n")
    with pytest.raises(PrunekitError, match=r"changed \(sparsity\) since metrics\.json was saved; this call asks for "
                                            r"the run it holds: put config\.toml's values back"):
        prunekit.prune(_tiny(), (x, y), method="magnitude-uniform", sparsity=0.8, out=str(run))
    with pytest.raises(PrunekitError, match=r"holds another run \(other sparsity\)"):     # a third value: another run
        prunekit.prune(_tiny(), (x, y), method="magnitude-uniform", sparsity=0.5, out=str(run))
    _edit(run, "sparsity = 0.7\n", "sparsity = 0.8\n")      # put back: its result again
    assert prunekit.prune(_tiny(), (x, y), method="magnitude-uniform", sparsity=0.8, out=str(run)).sparsity \
        == pytest.approx(0.8, abs=0.02)
    from prunekit.runs import EditedConfig, RunFolder, check_claim        # a training run: by its result.json
    folder = RunFolder(tmp_path / "t")
    folder.path.mkdir()
    folder.config.write_text('model = "mlpnet"\nbatch-size = 32\nseed = 0\nepochs = 5\nlr = 0.05\n')
    folder.model_path.write_bytes(b"x")
    (folder.path / "result.json").write_text(json.dumps({"epochs": 3, "lr": 0.05, "batch_size": 32, "seed": 0}))
    with pytest.raises(EditedConfig, match=r"this call asks for the run it holds"):
        check_claim(folder, 'model = "mlpnet"\nbatch-size = 32\nseed = 0\nepochs = 3\nlr = 0.05\n')
    with pytest.raises(PrunekitError, match=r"holds another run \(other epochs, lr\)"):
        check_claim(folder, 'model = "mlpnet"\nbatch-size = 32\nseed = 0\nepochs = 3\nlr = 0.1\n')


def _killed_after_first_stage(run: Path, monkeypatch, sparsity: float = 0.8):
    """A 3-stage CHITA run into ``run`` stopped (KeyboardInterrupt) once stage 1 is saved."""
    from prunekit import runs
    save = runs.RunCheckpointer.save

    def saved_then_killed(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.RunCheckpointer, "save", saved_then_killed)
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(_tiny(), (x, y), method="chita", sparsity=sparsity, stages=3, fisher_samples=32, out=str(run))
    monkeypatch.undo()
    assert (run / "checkpoints" / "stage-001.safetensors").exists() and not (run / "model.safetensors").exists()
    return x, y


def test_an_unfinished_run_with_an_edited_config_is_run_anew_by_force_and_refused_up_front_without(
        tmp_path, monkeypatch):
    """s53: an unfinished run whose config.toml was edited (0.8 -> 0.7), asked for with the edited
    values and force=True, was carried on (force clears only another run or a finished one), then
    refused at its stage-1 checkpoint ('put its values back ... or start a new run in another
    folder'). force=True now runs it anew with these values, as documented; without force the call
    is refused before anything is written, in one line naming force."""
    run = tmp_path / "py"
    x, y = _killed_after_first_stage(run, monkeypatch)
    _edit(run, "sparsity = 0.8\n", "sparsity = 0.7\n")
    log = (run / "run.log").read_text()
    with pytest.raises(PrunekitError, match=r"config\.toml was changed \(sparsity\) since the unfinished run there "
                                            r"began .*put them back to carry it on, or pass force=True") as refused:
        prunekit.prune(_tiny(), (x, y), method="chita", sparsity=0.7, stages=3, fisher_samples=32, out=str(run))
    assert "\n" not in str(refused.value) and (run / "run.log").read_text() == log      # nothing written
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # nor a warning of RNG states left by the cleared run
        again = prunekit.prune(_tiny(), (x, y), method="chita", sparsity=0.7, stages=3, fisher_samples=32,
                               out=str(run), force=True)
    assert again.sparsity == pytest.approx(0.7, abs=0.02)
    fresh = prunekit.prune(_tiny(), (x, y), method="chita", sparsity=0.7, stages=3, fisher_samples=32,
                           out=str(tmp_path / "fresh"))
    def steps(record):          # run anew: not carried on from 0.8's stage 1 (timings aside)
        return [(h["stage"], h["max_nonzeros"], h["nonzeros"]) for h in record["stages"]]
    assert steps(again.record) == steps(fresh.record) and len(steps(fresh.record)) == 3
    assert [h["objective"] for h in again.record["stages"]] == pytest.approx(
        [h["objective"] for h in fresh.record["stages"]], rel=1e-6)
    assert ", after stage " not in (run / "run.log").read_text()


def test_the_cli_says_so_up_front_too(tmp_path, capsys, monkeypatch):
    """The same over the command line: an edited unfinished run that saved a checkpoint is refused in one
    line naming --force; one stopped before any (nothing computed) starts with the edited values given on
    the command line. ``--resume DIR`` (no values given: config.toml's are read, and the model file it
    names imported) stays refused before anything is imported, as ever."""
    import shutil
    from prunekit import executor
    out = tmp_path / "run"
    argv = [*PRUNE, "--sparsity", "0.5", "--out", str(out)]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(executor, "save_pruned", killed)
    assert main(argv) == 130
    monkeypatch.undo()
    capsys.readouterr()
    _edit(out, 'sparsity = "0.5"\n', 'sparsity = "0.6"\n')
    for name in ("idle", "idle-resumed"):
        shutil.copytree(out, tmp_path / name)
    (out / "checkpoints").mkdir(exist_ok=True)          # a checkpoint saved (not read before the refusal)
    (out / "checkpoints" / "stage-001.safetensors").write_bytes(b"saved work")
    assert main([*PRUNE, "--sparsity", "0.6", "--out", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "was changed (sparsity) since the unfinished run there began" in err and "add --force" in err
    assert main([*PRUNE, "--sparsity", "0.6", "--out", str(out), "--force"]) == 0
    assert main([*PRUNE, "--sparsity", "0.6", "--out", str(tmp_path / "idle")]) == 0
    record = json.loads((tmp_path / "idle" / "metrics.json").read_text())
    assert record["status"] == "done" and 'sparsity = "0.6"' in record["config"]
    capsys.readouterr()
    assert main(["prune", "--resume", str(tmp_path / "idle-resumed"), "--json"]) == 2
    assert "was changed (sparsity)" in _one_line(capsys.readouterr().err)


def test_a_run_stopped_before_its_first_checkpoint_starts_with_the_edited_values(tmp_path, monkeypatch):
    """s53 review: a run killed before its first checkpoint has computed nothing, so its edited config.toml
    (0.8 -> 0.7) asked for with the edited values is simply started with them (as before the edited-run
    refusal), not refused until force: the same stages as a fresh run, config.toml kept as edited,
    metrics.json recording these values (a later stop and carry-on is not refused), and run.log saying so."""
    from prunekit import runs
    run = tmp_path / "py"

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.RunCheckpointer, "save", killed)
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(_tiny(), (x, y), method="chita", sparsity=0.8, stages=3, fisher_samples=32, out=str(run))
    monkeypatch.undo()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    _edit(run, "sparsity = 0.8\n", "sparsity = 0.7\n")
    edited = (run / "config.toml").read_text()
    again = prunekit.prune(_tiny(), (x, y), method="chita", sparsity=0.7, stages=3, fisher_samples=32, out=str(run))
    fresh = prunekit.prune(_tiny(), (x, y), method="chita", sparsity=0.7, stages=3, fisher_samples=32,
                           out=str(tmp_path / "fresh"))

    def steps(record):
        return [(h["stage"], h["max_nonzeros"], h["nonzeros"]) for h in record["stages"]]
    assert steps(again.record) == steps(fresh.record) and len(steps(fresh.record)) == 3
    assert (run / "config.toml").read_text() == edited
    assert json.loads((run / "metrics.json").read_text())["config"] == edited
    assert "stopped before its first checkpoint (nothing computed to lose): started with these values" in \
        (run / "run.log").read_text()


def test_the_call_that_began_an_edited_unfinished_run_is_told_so_and_both_fixes_work(tmp_path, monkeypatch):
    """Walk s53 (old artefacts): an unfinished run whose config.toml was edited (0.8 -> 0.7), called
    again as it began (0.8, what metrics.json keeps), read "holds another run (other sparsity): ...
    carry that run on (the same call as its config.toml records)". Now one line says config.toml was
    edited since the run began and names both fixes, each of which works: its values back (this same
    call carries it on) or force=True (run anew with this call's values)."""
    import shutil
    run = tmp_path / "py"
    x, y = _killed_after_first_stage(run, monkeypatch)
    _edit(run, "sparsity = 0.8\n", "sparsity = 0.7\n")
    shutil.copytree(run, tmp_path / "back")
    log = (run / "run.log").read_text()
    with pytest.raises(PrunekitError) as refused:
        prunekit.prune(_tiny(), (x, y), method="chita", sparsity=0.8, stages=3, fisher_samples=32, out=str(run))
    said = str(refused.value)
    assert "\n" not in said and "holds another run" not in said, said
    assert (f"{run / 'config.toml'} was edited since the unfinished run there began (sparsity; metrics.json keeps "
            "the values this call asks for): put them back in config.toml and this same call carries the run on, or "
            "pass force=True to run it anew") == said
    assert (run / "run.log").read_text() == log and "sparsity = 0.7\n" in (run / "config.toml").read_text()
    again = prunekit.prune(_tiny(), (x, y), method="chita", sparsity=0.8, stages=3, fisher_samples=32, out=str(run),
                           force=True)
    assert again.sparsity == pytest.approx(0.8, abs=0.02) and "sparsity = 0.8\n" in (run / "config.toml").read_text()
    assert ", after stage " not in (run / "run.log").read_text()
    back = tmp_path / "back"
    _edit(back, "sparsity = 0.7\n", "sparsity = 0.8\n")         # the other fix: its values back
    carried = prunekit.prune(_tiny(), (x, y), method="chita", sparsity=0.8, stages=3, fisher_samples=32,
                             out=str(back))
    assert carried.sparsity == pytest.approx(0.8, abs=0.02) and ", after stage " in (back / "run.log").read_text()


def test_the_command_that_began_an_edited_unfinished_run_and_resume_name_fixes_that_work(tmp_path, capsys,
                                                                                        monkeypatch):
    """The same over the command line: the original command read "holds another run ... carry that
    run on (--resume) or ... (--force)"; --resume was then refused ("... start a new run in another
    folder") and --resume --force said only "leave out --force". Now the original command names the
    edit and --force (which runs it anew); --resume and --resume --force name a command that runs it
    anew with config.toml's values, and that command works."""
    import shlex
    from prunekit import executor
    out = tmp_path / "run"
    argv = [*PRUNE, "--sparsity", "0.5", "--out", str(out)]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(executor, "save_pruned", killed)
    assert main(argv) == 130
    monkeypatch.undo()
    _edit(out, 'sparsity = "0.5"\n', 'sparsity = "0.6"\n')
    (out / "checkpoints").mkdir(exist_ok=True)          # a checkpoint saved: work to lose (none: nothing to refuse)
    (out / "checkpoints" / "stage-001.safetensors").write_bytes(b"saved work")
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert "holds another run" not in err and "--resume" not in err, err
    assert (f"{out / 'config.toml'} was edited since the unfinished run there began (sparsity; metrics.json keeps the "
            "values this command asks for): put them back in config.toml and this same command carries the run on, "
            "or add --force to run it anew") in err
    commands = []
    for resume in (["prune", "--resume", str(out)], ["prune", "--resume", str(out), "--force"]):
        assert main(resume) == 2
        err = _one_line(capsys.readouterr().err)
        assert "start a new run in another folder" not in err, err
        found = __import__("re").search(r"`(prunekit prune [^`]*--force)`", err)
        assert found, err
        commands.append(found.group(1))
    assert commands[0] == commands[1]
    assert main(shlex.split(commands[0])[1:] + ["--json"]) == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["request"]["sparsity"] == "0.6"
    assert 'sparsity = "0.6"\n' in (out / "config.toml").read_text()
    assert main([*argv, "--force"]) == 0             # and the original command with --force
    assert json.loads((out / "metrics.json").read_text())["request"]["sparsity"] == "0.5"


def test_a_config_saved_again_with_a_byte_order_mark_is_no_edit(tmp_path, capsys, monkeypatch):
    """s56: a run folder whose config.toml an editor (Notepad) saved again with a UTF-8 byte-order
    mark, its values unchanged: `--resume` refused it as "config.toml was changed (its text)", finished
    or not (a recipe with a BOM has been read since s55). Both are carried on as the run was."""
    from prunekit import executor

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    argv = [*PRUNE, "--sparsity", "0.5", "--no-stage-eval"]
    monkeypatch.setattr(executor, "save_pruned", killed)
    assert main([*argv, "--out", str(tmp_path / "killed")]) == 130
    monkeypatch.undo()
    assert main([*argv, "--out", str(tmp_path / "done")]) == 0
    capsys.readouterr()
    for name in ("killed", "done"):
        config = tmp_path / name / "config.toml"
        config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
        assert main(["prune", "--resume", str(tmp_path / name), "--json"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_a_run_carried_on_after_a_bom_edit_before_its_first_checkpoint_stays_resumable(tmp_path, capsys, monkeypatch):
    """s56 review: a run stopped before its first checkpoint, its config.toml edited in an editor that
    writes a byte-order mark (sparsity 0.5 -> 0.6), run again with the new value: metrics.json kept the
    text with its mark while every comparison reads config.toml without it, so each later rerun and
    `--resume` was refused as "config.toml was changed (its text)" although nothing had changed."""
    from prunekit import executor

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    out = tmp_path / "run"
    argv = [*PRUNE, "--no-stage-eval", "--out", str(out)]
    monkeypatch.setattr(executor, "_run", killed)
    assert main([*argv, "--sparsity", "0.5"]) == 130
    monkeypatch.undo()
    config = out / "config.toml"
    text = config.read_text()
    assert 'sparsity = "0.5"' in text
    config.write_bytes(b"\xef\xbb\xbf" + text.replace('sparsity = "0.5"', 'sparsity = "0.6"').encode())
    assert main([*argv, "--sparsity", "0.6"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*argv, "--sparsity", "0.6", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert main(["prune", "--resume", str(out)]) == 0, capsys.readouterr().err
