"""One process at a time in a run folder: a second prunekit process is refused in one line while
the first holds the folder; a killed holder's lock goes with it, so the folder is usable again."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from prunekit import run_lock
from prunekit.cli import main
from prunekit.errors import PrunekitError

pytest.importorskip("fcntl")

ASSETS = Path(prunekit.__file__).parent / "assets"
SRC = Path(prunekit.__file__).parent.parent
PRUNE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
         "--data-dir", str(ASSETS / "mnist"), "--sparsity", "0.5", "--train-samples", "64", "--json"]
HOLD = ("import sys, time\nfrom prunekit.run_lock import held\n"
        "with held(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


class Holder:
    """A child process holding the lock of ``folder`` until ``kill()``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                                      env={**os.environ, "PYTHONPATH": str(SRC)})
        assert self.child.stdout.readline() == b"held\n"
        self.pid = self.child.pid

    def kill(self) -> None:
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGKILL)
        self.child.wait()
        self.child.stdout.close()


@pytest.fixture
def holders():
    made = []
    yield lambda folder: made.append(Holder(folder)) or made[-1]
    for holder in made:
        holder.kill()


def _run(argv, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(argv)
    return code, capsys.readouterr()


def test_second_process_is_refused_then_the_folder_is_usable_after_a_kill(holders, tmp_path, capsys):
    folder = tmp_path / "run"
    holder = holders(folder)
    code, out = _run([*PRUNE, "--out", str(folder)], capsys)
    assert code == 2 and out.out == ""
    assert out.err == (f"prunekit: error: {folder} is in use by another prunekit process (pid {holder.pid}): "
                       "wait for it to finish or choose another --out\n")
    assert sorted(os.listdir(folder)) == [run_lock.LOCK_NAME]       # nothing of a run was written
    holder.kill()                                                   # the OS releases a killed holder's lock
    assert (folder / run_lock.LOCK_NAME).exists()                   # its stale file is left behind ...
    code, out = _run([*PRUNE, "--out", str(folder)], capsys)
    assert code == 0, out.err                                       # ... and does not stop the run
    assert (folder / "model.safetensors").exists() and not (folder / run_lock.LOCK_NAME).exists()


def test_resume_and_sweep_are_refused_too(holders, tmp_path, capsys):
    folder = tmp_path / "run"
    assert _run([*PRUNE, "--out", str(folder)], capsys)[0] == 0
    holder = holders(folder)
    code, out = _run(["prune", "--resume", str(folder)], capsys)
    assert code == 2 and out.err.count("\n") == 1, out.err
    assert f"in use by another prunekit process (pid {holder.pid})" in out.err
    # the user named the folder with --resume (two resumes at once): told to wait, not to pick an --out
    assert "wait for it to finish, then --resume again" in out.err and "--out" not in out.err, out.err
    sweep_folder = tmp_path / "sweep"
    holder = holders(sweep_folder)
    code, out = _run(["sweep", *PRUNE[1:], "--out", str(sweep_folder)], capsys)
    assert code == 2 and out.err.count("\n") == 1, out.err
    assert f"{sweep_folder} is in use by another prunekit process (pid {holder.pid})" in out.err
    assert sorted(os.listdir(sweep_folder)) == [run_lock.LOCK_NAME]


def test_compare_out_is_refused_while_another_process_writes_there(holders, tmp_path, capsys):
    """`compare --out X` took no lock: two compares into X, or a compare into the folder a sweep
    is writing, could interleave their report files. It is refused in one line, as the others are,
    and works once the holder is gone."""
    run, report = tmp_path / "run", tmp_path / "report"
    assert _run([*PRUNE, "--out", str(run)], capsys)[0] == 0
    holder = holders(report)
    code, out = _run(["compare", str(run), "--out", str(report)], capsys)
    assert code == 2 and out.out == "" and out.err.count("\n") == 1, out.err
    assert f"{report} is in use by another prunekit process (pid {holder.pid})" in out.err
    assert sorted(os.listdir(report)) == [run_lock.LOCK_NAME]       # nothing of the report was written
    holder.kill()
    code, out = _run(["compare", str(run), "--out", str(report), "--json"], capsys)
    assert code == 0, out.err
    assert (report / "runs.json").exists() and not (report / run_lock.LOCK_NAME).exists()


def test_python_prune_is_refused(holders, tmp_path):
    holder = holders(tmp_path / "run")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(8, 1, 4, 4), torch.arange(8) % 3
    with pytest.raises(PrunekitError, match=rf"in use by another prunekit process \(pid {holder.pid}\): .* out="):
        prunekit.prune(net, (x, y), method="magnitude", sparsity=0.5, out=str(tmp_path / "run"))


def test_lock_is_released_and_removed_after_the_block(tmp_path):
    with run_lock.held(tmp_path / "a"):
        assert (tmp_path / "a" / run_lock.LOCK_NAME).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        with pytest.raises(PrunekitError, match=rf"pid {os.getpid()}"):      # a second open file description
            with run_lock.held(tmp_path / "a"):
                pass
    assert os.listdir(tmp_path) == []            # the lock file went, and the folder it made, left empty
    with run_lock.held(tmp_path / "a"):
        pass


def test_a_refused_block_leaves_no_folder_it_made(tmp_path):
    """The folders ``held`` made (parents too) go again when the block leaves them empty; a folder that
    was there before, or that the block wrote in, stays."""
    with pytest.raises(PrunekitError):
        with run_lock.held(tmp_path / "new" / "run"):
            raise PrunekitError("refused")
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()
    with run_lock.held(tmp_path / "mine" / "run"):
        pass
    assert os.listdir(tmp_path / "mine") == []           # run went, the user's folder stays
    with run_lock.held(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine").is_dir()
    with run_lock.held(tmp_path / "kept"):
        (tmp_path / "kept" / "config.toml").write_text("x")
    assert os.listdir(tmp_path / "kept") == ["config.toml"]


def test_prune_refused_inside_the_run_leaves_no_out_folder(tmp_path, monkeypatch, capsys):
    """A refusal that only the run finds (after the folder was claimed) leaves no --out folder behind."""
    from prunekit.commands import prune as prune_command

    def refuse(*args, **kwargs):
        raise PrunekitError("refused by the run")
    monkeypatch.setattr(prune_command, "execute", refuse)
    assert main([*PRUNE, "--out", str(tmp_path / "a" / "out")]) == 2
    assert "refused by the run" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_without_fcntl_no_lock_is_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "fcntl", None)
    with run_lock.held(tmp_path / "a"), run_lock.held(tmp_path / "a"):
        pass
    assert not (tmp_path / "a").exists()


def test_train_and_export_are_refused_too(holders, tmp_path, capsys):
    """`prunekit train --out` and `prunekit export` of a folder another process holds are refused
    in one line naming the holder, and write nothing there (they took no lock)."""
    folder = tmp_path / "trained"
    holder = holders(folder)
    train = ["train", "--model", "mlpnet", "--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--epochs", "1",
             "--eval-split", "train", "--batch-size", "500", "--json"]
    code, out = _run([*train, "--out", str(folder)], capsys)
    assert code == 2 and out.out == ""
    assert out.err == (f"prunekit: error: {folder} is in use by another prunekit process (pid {holder.pid}): "
                       "wait for it to finish or choose another --out\n")
    assert sorted(os.listdir(folder)) == [run_lock.LOCK_NAME]
    run = tmp_path / "run"
    assert _run([*PRUNE, "--out", str(run)], capsys)[0] == 0
    holder = holders(run)
    code, out = _run(["export", str(run), "--dense", "--json"], capsys)
    assert code == 2 and out.out == "" and out.err.count("\n") == 1, out.err
    assert f"{run} is in use by another prunekit process (pid {holder.pid})" in out.err
    assert not (run / "export").exists()


def _without_root_powers() -> list[str]:
    """The prefix that makes a command honour file permissions (root ignores them)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop its power over permissions")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]


@pytest.mark.parametrize("out,needle", [("ro", "ro is not writable (permission denied): make it writable "
                                               "(chmod u+w {ro}) or choose another --out"),
                                        ("ro/new", "cannot make {ro}/new: {ro} is not writable")])
def test_a_read_only_out_folder_is_named_not_its_lock_file(tmp_path, out, needle):
    """chmod -w on --out (or on the folder it is to be made in) was refused as 'Permission denied:
    DIR/.prunekit.lock (check the path and its permissions)'."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        done = subprocess.run([*_without_root_powers(), sys.executable, "-m", "prunekit", *PRUNE, "--out",
                               str(tmp_path / out)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    finally:
        ro.chmod(0o755)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert needle.format(ro=ro) in done.stderr and run_lock.LOCK_NAME not in done.stderr
    assert list(ro.iterdir()) == []


def _chmod_tree(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


def test_resume_of_a_finished_run_in_a_read_only_folder_gives_its_result_and_writes_nothing(tmp_path, capsys):
    """`prune --resume DIR` of a finished run whose folder is chmod -R a-w was refused ('DIR is not
    writable'): taking the lock makes DIR/.prunekit.lock. A finished run needs neither the lock nor
    any write: its stored result, exit 0."""
    run = tmp_path / "run"
    code, out = _run([*PRUNE, "--out", str(run)], capsys)
    assert code == 0, out.err
    stored = json.loads(out.out)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")}
    _chmod_tree(run, writable=False)
    try:
        done = subprocess.run([*_without_root_powers(), sys.executable, "-m", "prunekit", "prune", "--resume",
                               str(run), "--json"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    finally:
        _chmod_tree(run, writable=True)
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    assert (again["accuracy"], again["nonzeros"]) == (stored["accuracy"], stored["nonzeros"])
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.rglob("*")} == before   # nothing written


def test_train_again_of_a_finished_run_in_a_read_only_folder_gives_its_result_and_writes_nothing(tmp_path, capsys):
    """`prunekit train --out DIR` again (train has no --resume: the same command carries a run on) of a
    finished run whose folder is chmod -R a-w was refused ('DIR is not writable'), as `prune --resume`
    was: taking the lock makes DIR/.prunekit.lock. Its stored result, exit 0, nothing written; another
    training's options there are still refused in one line, as in a writable folder."""
    folder = tmp_path / "trained"
    train = ["train", "--model", "mlpnet", "--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--epochs", "1",
             "--eval-split", "train", "--batch-size", "500", "--json", "--out", str(folder)]
    code, out = _run(train, capsys)
    assert code == 0, out.err
    stored = json.loads(out.out)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}
    _chmod_tree(folder, writable=False)
    try:
        again, other = (subprocess.run([*_without_root_powers(), sys.executable, "-m", "prunekit", *argv],
                                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
                        for argv in (train, [*train[:-2], "--lr", "0.05", *train[-2:]]))
    finally:
        _chmod_tree(folder, writable=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == stored
    assert other.returncode == 2 and other.stdout == "" and other.stderr.count("\n") == 1, other.stderr
    assert f"--out {folder} holds another training run, finished (other lr)" in other.stderr
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")} == before   # nothing written


# `prunekit ARGS` that SIGKILLs itself once its first stage's checkpoint is saved (in the middle of a
# 3-stage run: nothing can write its status)
_KILLED_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
from prunekit.runs import RunCheckpointer
from prunekit.cli import main
save = RunCheckpointer.save
def save_then_die(self, state, model):
    save(self, state, model)
    os.kill(os.getpid(), signal.SIGKILL)
RunCheckpointer.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""
# fc2 and fc3 only, 16 gradient rows: the solves take milliseconds
STAGED = [*PRUNE, "--method", "chita++", "--stages", "3", "--include", "fc2", "fc3", "--fisher-samples", "16",
          "--batch-size", "2000"]


def _compared(folder: Path, capsys) -> tuple[str, str]:
    """(the status `compare --json` gives the run at ``folder``, the end of its line in the table)."""
    code, out = _run(["compare", str(folder), "--json"], capsys)
    assert code == 0, out.err
    status = json.loads(out.out)["runs"][0]["status"]
    code, out = _run(["compare", str(folder)], capsys)
    assert code == 0, out.err
    return status, out.out.splitlines()[-1]


def test_a_sigkilled_run_is_shown_interrupted_and_one_a_live_process_holds_running(holders, tmp_path, capsys):
    """A SIGKILL leaves metrics.json "running" (nothing can write it) and `compare` said "(not
    finished)" whether the run was still at work or long dead. Now a run no process holds is shown as
    a Ctrl-C'd or SIGTERM'd one is, "interrupted", and resumes; one whose lock a live process holds
    stays "running". The reader writes nothing in the folder."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_FIRST_CHECKPOINT, *STAGED, "--out", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    metrics = (run / "metrics.json").read_text()
    assert json.loads(metrics)["status"] == "running"                # what the kill left
    files = sorted(os.listdir(run))
    assert run_lock.LOCK_NAME in files                               # the killed holder's stale lock file
    status, line = _compared(run, capsys)
    assert status == "interrupted" and line.endswith("  (interrupted)"), line
    assert run_lock.in_use(run) is False

    holder = holders(run)                                            # a live process in the folder
    status, line = _compared(run, capsys)
    assert status == "running" and line.endswith("  (not finished)"), line
    assert run_lock.in_use(run) is True
    holder.kill()
    assert _compared(run, capsys)[0] == "interrupted"
    assert (run / "metrics.json").read_text() == metrics and sorted(os.listdir(run)) == files   # only read

    code, out = _run(["prune", "--resume", str(run), "--json"], capsys)
    assert code == 0, out.err
    assert json.loads((run / "metrics.json").read_text())["status"] == "done"
    assert _compared(run, capsys)[0] == "done"


def test_the_probe_makes_no_lock_file_and_never_stops_a_run_taking_the_lock(tmp_path):
    """``in_use`` opens an existing lock file read-only and holds a shared lock for an instant: in
    a folder without one it makes none, and a run taking the lock meanwhile waits the probe out
    (taken for a holder, the probe would have the run refused: 'in use by another prunekit process')."""
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / run_lock.LOCK_NAME
    lock.write_text(f"{os.getpid() + 1} {socket.gethostname()}\n")    # a killed run's
    probe = os.open(lock, os.O_RDONLY)
    run_lock.fcntl.flock(probe, run_lock.fcntl.LOCK_SH | run_lock.fcntl.LOCK_NB)     # a reader mid-probe
    releaser = threading.Timer(0.3, os.close, (probe,))
    started = time.monotonic()        # before the timer starts: a stall between the two cannot shorten the wait
    releaser.start()
    try:
        with run_lock.held(tmp_path / "run"):
            assert time.monotonic() - started >= 0.2
            assert run_lock.in_use(tmp_path / "run") is True
    finally:
        releaser.join()
    assert run_lock.in_use(tmp_path / "run") is False and os.listdir(tmp_path / "run") == []
    assert run_lock.in_use(tmp_path / "missing") is False and not (tmp_path / "missing").exists()


def test_a_lock_file_of_another_machine_nobody_holds_here_cannot_tell(tmp_path):
    """On a shared file system whose locks do not reach every machine (NFS mounted nolock), a run
    working on another machine holds nothing seen from here: its folder keeps the status it
    wrote, never shown interrupted on the strength of that."""
    from prunekit.runs import RunFolder, shown_status
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"status": "running", "method": "chita"}))
    (run / run_lock.LOCK_NAME).write_text("4242 another-machine.example\n")
    assert run_lock.in_use(run) is None
    assert shown_status(RunFolder(run)) == "running"
    (run / run_lock.LOCK_NAME).write_text("4242\n")                   # an older prunekit's, no host: this one's
    assert shown_status(RunFolder(run)) == "interrupted"


def test_a_stop_before_the_lock_leaves_the_run_another_process_holds_alone(holders, tmp_path):
    """Ctrl-C (or a lost rank) ends a prune after its lock was let go, or before it was taken: the
    'interrupted' line and status are written only where no other process works in the folder."""
    import argparse

    from prunekit.cli import _log_stop
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.log").write_text("start\n")
    (run / "metrics.json").write_text(json.dumps({"status": "running"}))
    args = argparse.Namespace(command="prune", out=str(run))
    holder = holders(run)
    _log_stop(args, "interrupted (Ctrl-C)")
    assert (run / "run.log").read_text() == "start\n"
    assert json.loads((run / "metrics.json").read_text())["status"] == "running"
    holder.kill()
    _log_stop(args, "interrupted (Ctrl-C)")
    assert (run / "run.log").read_text().endswith(" interrupted (Ctrl-C)\n")
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"


def test_using_a_run_still_at_work_says_to_wait_not_to_resume(holders, tmp_path, capsys):
    """`export` and `bench-latency --pruned` of an unfinished run advised `prunekit prune --resume`,
    which the folder's lock refuses while a live process holds it; they say to wait for it now, and
    still advise the resume once nobody holds the folder."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('method = "magnitude"\nsparsity = 0.5\n')
    (run / "metrics.json").write_text('{"status": "running"}')
    holder = holders(run)
    for argv in (["export", str(run), "--dense"], ["bench-latency", "--pruned", str(run)]):
        code, out = _run(argv, capsys)
        assert code == 2 and out.err.count("\n") == 1, out.err
        assert f"holds a run that is still at work (prunekit process {holder.pid} holds it): wait for it" in out.err
    holder.kill()
    for argv in (["export", str(run), "--dense"], ["bench-latency", "--pruned", str(run)]):
        code, out = _run(argv, capsys)
        assert code == 2 and f"prunekit prune --resume {run}" in out.err, out.err


def test_a_stopped_runs_status_is_written_before_its_lock_is_let_go(tmp_path, capsys, monkeypatch):
    """Ctrl-C in a run wrote "interrupted" (and its run.log line) only after the run's lock was let
    go: in between, a process taking the lock saw "running", and one that had started a run there by
    then could have its status written over. Both are written while the lock is held, once."""
    from contextlib import contextmanager

    from prunekit import executor
    run = tmp_path / "run"
    real, seen = run_lock.held, []

    @contextmanager
    def held_and_seen(folder, flag="--out"):
        with real(folder, flag):
            try:
                yield
            finally:        # the moment before the lock is let go
                if (Path(folder) / "metrics.json").exists():
                    seen.append(json.loads((Path(folder) / "metrics.json").read_text())["status"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_lock, "held", held_and_seen)
    monkeypatch.setattr(executor, "save_pruned", interrupted)
    assert main([*PRUNE, "--out", str(run)]) == 130
    assert seen[:1] == ["interrupted"], seen
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert (run / "run.log").read_text().count("interrupted (Ctrl-C)") == 1


def test_a_python_run_stopped_by_ctrl_c_is_marked_interrupted_before_its_lock_is_let_go(tmp_path, monkeypatch):
    """Only the command line marked a stopped run: prunekit.prune(out=) stopped by Ctrl-C (or a lost
    torchrun launcher) left metrics.json 'running' and run.log silent."""
    import prunekit
    import torch
    from torch import nn
    from prunekit import executor
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    run = tmp_path / "run"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(executor, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), (x, y), method="magnitude",
                       sparsity=0.5, out=str(run))
    assert json.loads((run / "metrics.json").read_text())["status"] == "interrupted"
    assert "interrupted (Ctrl-C)" in (run / "run.log").read_text()
    assert not run_lock.in_use(str(run))


def test_a_resume_refused_over_an_unwritable_folder_names_no_other_resume(tmp_path):
    """``prune --resume DIR`` names the run's folder, not a place to write: an unwritable one is not
    told to "choose another --resume"."""
    for read_only_system in (True, False):
        said = run_lock._unwritable(tmp_path, "--resume", read_only_system)
        assert "copy the run folder somewhere writable and --resume it there" in said, said
        assert "another --resume" not in said
    assert run_lock._unwritable(tmp_path, "--out", True).endswith("choose another --out")
