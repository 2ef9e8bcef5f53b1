"""What a SIGKILL leaves in a run folder is prunekit's own and never stops the run: a folder a kill
left holding only the lock and the temporary of its config.toml is taken by the same command (and
by `prune --resume`); the temporaries of killed atomic writes are removed when a run takes the
folder again; a training run killed after its result was written loses its checkpoint on the rerun."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit import run_lock
from prunekit.cli import main
from prunekit.commands import train as train_command
from prunekit.errors import PrunekitError

pytest.importorskip("fcntl")

ASSETS = Path(prunekit.__file__).parent / "assets"
SRC = Path(prunekit.__file__).parent.parent
MNIST = ["--data", "mnist", "--data-dir", str(ASSETS / "mnist")]
PRUNE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), *MNIST,
         "--sparsity", "0.5", "--train-samples", "64", "--json"]
TRAIN = ["train", "--model", "mlpnet", *MNIST, "--epochs", "2", "--train-samples", "256", "--batch-size", "64",
         "--json"]
# `prunekit ARGS` SIGKILLed just before its config.toml's temporary (written and fsynced) is renamed
# into place: the moment the run takes its folder
_KILLED_AT_THE_CLAIM = """
import os, signal, sys
from prunekit.cli import main
replace = os.replace
def replace_or_die(src, dst, *args, **kwargs):
    if str(dst).endswith("config.toml"):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)
os.replace = replace_or_die
sys.exit(main(sys.argv[1:]))
"""


def _killed_at_the_claim(argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT_THE_CLAIM, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


def _left(folder: Path) -> list[str]:
    return sorted(p.name if p.name == run_lock.LOCK_NAME else p.name.split(".")[1] for p in folder.iterdir())


@pytest.mark.parametrize("again", ["same command", "resume"])
def test_a_prune_killed_while_taking_its_folder_is_carried_on(tmp_path, capsys, again):
    """The folder held only .config.toml.XXXX.tmp and .prunekit.lock: the same command was refused as
    "a folder holding other files, not a run folder", --resume as "not a prunekit run folder"."""
    run = tmp_path / "run"
    _killed_at_the_claim([*PRUNE, "--out", str(run)])
    assert _left(run) == [run_lock.LOCK_NAME, "config"]          # the lock and config.toml's temporary
    argv = [*PRUNE, "--out", str(run)] if again == "same command" else ["prune", "--resume", str(run), "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert not list(run.glob(".*.tmp"))                          # the temporary is gone
    assert (run / "config.toml").exists() and json.loads((run / "metrics.json").read_text())["status"] == "done"
    assert main([*PRUNE, "--out", str(run)]) == 0                # the same command: the same run, finished
    assert "holds this run, finished" in capsys.readouterr().err


def test_a_train_killed_while_taking_its_folder_is_run_again(tmp_path, capsys):
    run = tmp_path / "run"
    _killed_at_the_claim([*TRAIN, "--out", str(run)])
    assert _left(run) == [run_lock.LOCK_NAME, "config"]
    assert main([*TRAIN, "--out", str(run)]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["epochs"] == 2
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "model.json", "model.safetensors", "result.json",
                                                     "run.log"]


def test_resume_of_a_folder_of_leftovers_without_a_whole_config_says_to_run_the_command_again(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / run_lock.LOCK_NAME).write_text("")
    (run / ".config.toml.abcd1234.tmp").write_text("")           # killed before its bytes were written
    assert main(["prune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no run yet" in err and f"again with --out {run}" in err, err
    assert main([*PRUNE, "--out", str(run)]) == 0, capsys.readouterr().err      # the command again takes it
    assert not (run / ".config.toml.abcd1234.tmp").exists()


def test_a_folder_with_a_users_file_beside_leftovers_is_still_refused(tmp_path, capsys):
    run = tmp_path / "mine"
    run.mkdir()
    (run / run_lock.LOCK_NAME).write_text("")
    (run / ".config.toml.abcd1234.tmp").write_text("")
    (run / "notes.txt").write_text("mine")
    assert main([*PRUNE, "--out", str(run)]) == 2
    assert "holding other files" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".config.toml.abcd1234.tmp", run_lock.LOCK_NAME, "notes.txt"]


# (file, of a killed atomic write) planted as a SIGKILL between a temporary's write and its rename leaves it
PRUNE_TEMPORARIES = [".model.safetensors.k86o55u_.tmp", ".metrics.json.abcdefgh.tmp", ".report.md.x1y2z3w4.tmp",
                     ".result.json.zzzzzzzz.tmp", "checkpoints/.stage-002.safetensors.q1w2e3r4.tmp",
                     "plots/.layer_density.png.a_b_c_d_.tmp"]
USERS = ["notes.txt", ".mine.abcdefgh.tmp", "plots/.mine.png.abcdefgh.tmp"]


def test_a_resumed_prune_removes_the_temporaries_of_killed_writes(tmp_path, capsys, monkeypatch):
    """`.model.safetensors.XXXX.tmp` (a whole model), `.stage-NNN...`, metrics, report and plot
    temporaries stayed in the folder for good after the resume; a user's files stay."""
    from prunekit import executor
    run = tmp_path / "run"
    argv = [*PRUNE, "--method", "chita++", "--stages", "2", "--include", "fc2", "fc3", "--fisher-samples", "16",
            "--batch-size", "2000", "--out", str(run)]
    real = executor.save_pruned

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(executor, "save_pruned", interrupted)
    assert main(argv) == 130
    monkeypatch.setattr(executor, "save_pruned", real)
    (run / "plots").mkdir(exist_ok=True)
    for name in PRUNE_TEMPORARIES + USERS:
        (run / name).write_bytes(b"x" * 10)
    capsys.readouterr()
    assert main(["prune", "--resume", str(run), "--json"]) == 0, capsys.readouterr().err
    assert [name for name in PRUNE_TEMPORARIES if (run / name).exists()] == []
    assert [name for name in USERS if not (run / name).exists()] == []


def test_a_train_run_again_removes_temporaries_and_a_finished_runs_checkpoint(tmp_path, capsys, monkeypatch):
    """A train killed after result.json, before its checkpoint went, kept checkpoints/ for good
    (the README says the checkpoint is removed once the model is written)."""
    run = tmp_path / "run"
    monkeypatch.setattr(train_command.shutil, "rmtree", lambda *args, **kwargs: None)   # killed before it
    assert main([*TRAIN, "--out", str(run)]) == 0
    monkeypatch.undo()
    assert (run / "checkpoints" / "stage-002.safetensors").exists()
    for name in (".model.safetensors.abcdefgh.tmp", "checkpoints/.stage-003.safetensors.abcdefgh.tmp"):
        (run / name).write_bytes(b"x")
    (run / "notes.txt").write_text("mine")
    first = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(train_command, "train_epoch", None)      # nothing is trained again
    assert main([*TRAIN, "--out", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == first["accuracy"]
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "model.json", "model.safetensors", "notes.txt",
                                                     "result.json", "run.log"]


# `prunekit ARGS` SIGKILLed just before the sweep report's runs.json (written and fsynced) is renamed
# into place: every run finished, the report half written
_KILLED_AT_THE_REPORT = _KILLED_AT_THE_CLAIM.replace('endswith("config.toml")', 'endswith("runs.json")')
SWEEP = ["sweep", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), *MNIST, "--method",
         "magnitude", "--sparsity", "0.5", "--train-samples", "64", "--json"]
SWEEP_TEMPORARIES = [".report.md.x1y2z3w4.tmp", ".report.new.md.abcdefgh.tmp", ".runs.json.zzzzzzzz.tmp",
                     "..prunekit-report.json.q1w2e3r4.tmp", "plots/.accuracy_vs_macs.png.a_b_c_d_.tmp",
                     "plots/.accuracy_vs_sparsity.png.k86o55u_.tmp"]


def test_a_sweep_run_again_removes_the_temporaries_of_its_killed_report(tmp_path, capsys):
    """A sweep killed while it wrote its report left `.runs.json.XXXX.tmp` (and, killed elsewhere,
    the report's and plots' temporaries) in the sweep folder for good; the same sweep again removes
    them; a user's files there stay."""
    out = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT_THE_REPORT, *SWEEP, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = [p.name for p in out.iterdir() if p.name.startswith(".runs.json.") and p.name.endswith(".tmp")]
    assert len(left) == 1 and not (out / "runs.json").exists()       # what the kill left
    (out / "plots").mkdir(exist_ok=True)
    for name in SWEEP_TEMPORARIES + USERS:
        (out / name).write_bytes(b"x" * 10)
    capsys.readouterr()
    assert main([*SWEEP, "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "runs.json").read_text())[0]["sparsity"] == 0.5
    assert [p.name for p in out.rglob("*.tmp") if p.relative_to(out).as_posix() not in USERS] == []
    assert [name for name in USERS if (out / name).read_bytes() != b"x" * 10] == []


# `prunekit ARGS` SIGKILLed as its sweep begins its second run (the first finished, the second's
# folder not made yet)
_KILLED_AT_THE_SECOND_RUN = """
import os, signal, sys
from prunekit.cli import main
from prunekit.commands import sweep
into, begun = sweep.prune_into, []
def second_or_die(*args, **kwargs):
    begun.append(1)
    if len(begun) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return into(*args, **kwargs)
sweep.prune_into = second_or_die
sys.exit(main(sys.argv[1:]))
"""


def test_save_model_refuses_a_killed_sweeps_folder_and_the_sweep_names_what_is_in_its_way(tmp_path, capsys):
    """``prunekit.save_model`` wrote into a killed sweep's folder (the folder of a run it had not
    begun: the sweep had no report yet, so nothing marked the folder as a sweep's), and the sweep,
    run again, was refused with "is a folder holding other files", naming neither the file nor how
    to finish. Now the sweep marks its folder before its first run, naming the run folders it
    plans, save_model refuses anywhere inside those (made or not) naming the folder, and a file put
    there anyway is named by the sweep's refusal. Beside them, in the sweep's folder, is not theirs."""
    out = tmp_path / "sweep"
    argv = [*SWEEP[:SWEEP.index("--sparsity") + 2], "0.7", *SWEEP[SWEEP.index("--sparsity") + 2:], "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT_THE_SECOND_RUN, *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    second = out / "magnitude_sparsity-0.7"
    assert (out / "magnitude_sparsity-0.5" / "metrics.json").exists() and not second.exists()   # what the kill left
    model = torch.nn.Linear(3, 2)
    inside = (second / "mine.safetensors", second / "deeper" / "mine.safetensors",
              out / "magnitude_sparsity-0.5" / "m.safetensors")
    for path in inside:
        run = out / path.relative_to(out).parts[0]
        with pytest.raises(PrunekitError) as err:
            prunekit.save_model(model, path, {})
        assert f"lies inside {run}, a run folder of the prunekit sweep in {out}" in str(err.value), str(err.value)
        assert "\n" not in str(err.value) and not path.exists() and not path.with_suffix(".json").exists()
    assert not second.exists()
    prunekit.save_model(model, out / "mine.safetensors", {})      # beside the runs: in no sweep's way
    (out / "mine.safetensors").unlink()
    (out / "mine.json").unlink()
    # a file put there all the same (by hand, or by a version before): the sweep names it and the fix
    second.mkdir()
    (second / "mine.safetensors").write_bytes(b"x")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"holds {second / 'mine.safetensors'}, not a run's: move it out of {second}" in err
    assert "run this sweep again to finish it" in err, err
    (second / "mine.safetensors").unlink()
    assert main(argv) == 0, capsys.readouterr().err
    rows = json.loads((out / "runs.json").read_text())
    assert sorted(r["sparsity"] for r in rows) == [0.5, 0.7]


def test_a_sweep_names_the_files_a_run_would_overwrite_in_its_run_folder(tmp_path, capsys):
    """A sweep's run folder holding a model.safetensors but no run's config.toml: the refusal said
    "holds files a run would overwrite" without naming them."""
    out = tmp_path / "sweep"
    run = out / "magnitude_sparsity-0.5"
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"x")
    assert main([*SWEEP, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"({run / 'model.safetensors'}), and no run's config.toml: move them out" in err


def test_save_model_refuses_a_folder_marked_by_a_sweep_before_its_first_run(tmp_path):
    """A sweep killed before its first run wrote anything leaves only its mark (a report state
    naming the run folders it plans): that folder is a sweep's too, and is called one (it was
    called a "comparison"), in both of save_model's refusals."""
    from prunekit import report
    from prunekit.folders import kind
    out = tmp_path / "sweep"
    out.mkdir()
    report.mark_report_folder(out)
    assert kind(out) == "sweep"
    with pytest.raises(PrunekitError, match="would write runs.json, a file of the prunekit sweep in"):
        prunekit.save_model(torch.nn.Linear(3, 2), out / "runs.safetensors", {})     # its sidecar: runs.json
    report.mark_report_folder(out, ["magnitude_sparsity-0.5"])        # as a sweep marks it: its runs named
    with pytest.raises(PrunekitError, match="a run folder of the prunekit sweep in"):
        prunekit.save_model(torch.nn.Linear(3, 2), out / "magnitude_sparsity-0.5" / "m.safetensors", {})
    assert [p.name for p in out.iterdir()] == [report.REPORT_STATE]
    prunekit.save_model(torch.nn.Linear(3, 2), tmp_path / "m.safetensors", {})     # beside it: fine


def _pruned(folder: Path, sparsity: str) -> None:
    assert main(["prune", *PRUNE[1:PRUNE.index("--sparsity")], "--sparsity", sparsity, "--train-samples", "64",
                 "--out", str(folder), "--json"]) == 0


def test_compare_into_the_runs_own_folder_makes_no_sweep_of_it(tmp_path, capsys):
    """`compare exp/mag0.5 exp/mag0.7 --out exp` made `exp` a "sweep" (a report beside run folders),
    and save_model refused anywhere inside it (exp/finetuned/model.safetensors too) as "inside the
    folder of a prunekit sweep". A comparison writes only its report files, and makes no run folder
    later: only those are refused, in a comparison's words."""
    from prunekit.folders import kind
    exp = tmp_path / "exp"
    _pruned(exp / "mag0.5", "0.5")
    _pruned(exp / "mag0.7", "0.7")
    assert main(["compare", str(exp / "mag0.5"), str(exp / "mag0.7"), "--out", str(exp), "--json"]) == 0
    assert kind(exp) == "comparison"
    model = torch.nn.Linear(3, 2)
    for path in (exp / "finetuned" / "model-ft.safetensors", exp / "mine.safetensors",
                 exp / "mag0.5" / "tuned" / "m.safetensors"):
        prunekit.save_model(model, path, {})
        assert path.exists()
    with pytest.raises(PrunekitError, match=f"would write runs.json, a file of the prunekit comparison in {exp}"):
        prunekit.save_model(model, exp / "runs.safetensors", {})     # its sidecar: runs.json


def test_a_sweep_into_a_users_folder_leaves_the_rest_of_it_theirs(tmp_path, capsys):
    """A sweep's folder the user keeps things of their own in (``sweep --out`` into a folder holding
    them is refused, as prune's and train's are: they were put there after): save_model is refused
    inside the sweep's run folders (where it writes, made or not yet), not in the user's other
    folders of it at any depth, for good. A sweep folder of an older version (its report state names
    no run folders) is known by its report's title and its runs by its runs.json rows."""
    from prunekit import report
    from prunekit.folders import kind
    work = tmp_path / "work"
    (work / "project" / "models").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    argv = [*SWEEP[:SWEEP.index("--sparsity") + 2], "0.7", *SWEEP[SWEEP.index("--sparsity") + 2:], "--out", str(work)]
    assert main(argv) == 2 and "is a folder holding other files" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "project"]      # nothing written there
    (work / "notes.txt").rename(tmp_path / "notes.txt")
    (work / "project").rename(tmp_path / "project")
    assert main(argv) == 0, capsys.readouterr().err
    (tmp_path / "notes.txt").rename(work / "notes.txt")               # the user's things, put there since
    (tmp_path / "project").rename(work / "project")
    assert kind(work) == "sweep"
    model = torch.nn.Linear(3, 2)
    for path in (work / "project" / "models" / "m.safetensors", work / "other" / "deep" / "m.safetensors",
                 work / "m.safetensors"):
        prunekit.save_model(model, path, {})
        assert path.exists()
    with pytest.raises(PrunekitError, match="a run folder of the prunekit sweep"):
        prunekit.save_model(model, work / "magnitude_sparsity-0.7" / "x" / "m.safetensors", {})
    state = json.loads((work / report.REPORT_STATE).read_text())
    assert state.pop(report.SWEEP_RUNS) == ["magnitude_sparsity-0.5", "magnitude_sparsity-0.7"]
    (work / report.REPORT_STATE).write_text(json.dumps(state))       # as an older version left it
    assert kind(work) == "sweep"
    with pytest.raises(PrunekitError, match="a run folder of the prunekit sweep"):
        prunekit.save_model(model, work / "magnitude_sparsity-0.5" / "m2.safetensors", {})
    prunekit.save_model(model, work / "project" / "m2.safetensors", {})
    assert main(argv) == 0, capsys.readouterr().err                  # the same sweep again: its result
    assert json.loads((work / report.REPORT_STATE).read_text())[report.SWEEP_RUNS] == [
        "magnitude_sparsity-0.5", "magnitude_sparsity-0.7"]


def _older_sweep_killed_between_runs(out: Path, capsys) -> None:
    """What a sweep of an older version, killed after its first run, left in ``out``: that version
    marked its folder only with its report (written at its end), so only the kill's leftover lock
    file and the finished run's folder ("magnitude_sparsity-0.5") are there."""
    from prunekit import report
    assert main([*SWEEP, "--out", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    for name in ("report.md", "runs.json", report.REPORT_STATE):
        (out / name).unlink()
    for path in sorted((out / "plots").iterdir()):
        path.unlink()
    (out / "plots").rmdir()
    (out / run_lock.LOCK_NAME).write_text("4242 elsewhere\n")          # the killed sweep's, held by no one
    assert sorted(p.name for p in out.iterdir()) == [run_lock.LOCK_NAME, "magnitude_sparsity-0.5"]


def test_save_model_refuses_the_run_folders_of_an_older_sweep_killed_between_runs(tmp_path, capsys):
    """An older version's sweep killed between its runs left no mark: save_model wrote into its
    run folders (the finished one's, and that of a run not begun), and the sweep run again stopped
    on the user's file. Such a folder (its lock, and run folders named as a sweep names them holding
    a run's config.toml) is now known as a sweep's. A folder without the lock (runs the user named
    so, by hand) is not."""
    from prunekit.folders import kind
    out = tmp_path / "sweep"
    _older_sweep_killed_between_runs(out, capsys)
    assert kind(out) == "sweep"
    model = torch.nn.Linear(3, 2)
    for run in ("magnitude_sparsity-0.5", "magnitude_sparsity-0.8"):
        with pytest.raises(PrunekitError) as err:
            prunekit.save_model(model, out / run / "mine.safetensors", {})
        assert f"lies inside {out / run}, a run folder of the prunekit sweep in {out}" in str(err.value), str(err.value)
        assert not (out / run / "mine.safetensors").exists()
    prunekit.save_model(model, out / "mine.safetensors", {})      # beside the runs: in no sweep's way
    (out / run_lock.LOCK_NAME).unlink()
    for name in ("mine.safetensors", "mine.json"):
        (out / name).unlink()
    assert kind(out) is None                                        # the user's folder of runs
    prunekit.save_model(model, out / "magnitude_sparsity-0.8" / "mine.safetensors", {})


def test_a_sweep_refusing_over_a_users_file_marks_an_older_sweeps_folder(tmp_path, capsys):
    """An older version's sweep killed between runs, a file of the user's put in the folder of its
    run not begun: the sweep run again refuses (naming the file) and now marks its folder as it
    marks its own, naming the run folders it plans, so that what is saved there is refused."""
    from prunekit import report
    out = tmp_path / "sweep"
    _older_sweep_killed_between_runs(out, capsys)
    (out / "magnitude_sparsity-0.8").mkdir()
    (out / "magnitude_sparsity-0.8" / "mine.txt").write_text("the user's")
    argv = [*SWEEP[:SWEEP.index("--sparsity") + 2], "0.8", *SWEEP[SWEEP.index("--sparsity") + 2:], "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "mine.txt" in err and len(err.strip().splitlines()) == 1, err
    state = json.loads((out / report.REPORT_STATE).read_text())
    assert state[report.SWEEP_RUNS] == ["magnitude_sparsity-0.5", "magnitude_sparsity-0.8"], state
    assert (out / "magnitude_sparsity-0.8" / "mine.txt").read_text() == "the user's"
    assert not (out / "magnitude_sparsity-0.8" / "metrics.json").exists()
