"""``python -m prunekit prune`` as 2 ranks (the environment torchrun gives: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): rank 0 alone writes the run folder; a killed rank ends the other with
a one-line message, not a hang; ``--resume`` with 2 ranks finishes the run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from pathlib import Path

# its tests share one spawn of the ranks: all on one xdist worker (`--dist loadgroup`), so the other
# worker goes on with other tests instead of waiting for that spawn
pytestmark = pytest.mark.xdist_group("distributed_cli")

from cli_in_ranks import cli
from distributed_spawn import free_port, run_ranks_in_folder_once

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "src" / "prunekit" / "assets"
PRUNE = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
         "--data-dir", str(ASSETS / "mnist"), "--method", "chita++", "--stages", "3", "--sparsity", "0.9",
         "--fisher-samples", "32", "--train-samples", "256", "--json"]


def _launch(args: list[str], port: int, entry: tuple[str, ...] = ("-m", "prunekit")) -> list[subprocess.Popen]:
    ranks = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src")}
        ranks.append(subprocess.Popen([sys.executable, *entry, *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return ranks


# `prunekit ARGS` whose rank 1 stops (sleeps until killed) once its first stage is saved: the others
# cannot finish the run before the test's signal, however fast the machine is or however late the
# test's polling loop runs (the 3 stages take about a second; a loaded CI machine can leave the test
# process unscheduled for longer)
_RANK_1_PAUSED_AFTER_STAGE_1 = """
import os, sys, time
from prunekit.runs import RunCheckpointer
from prunekit.cli import main
save = RunCheckpointer.save
def save_then_pause(self, state, model):
    save(self, state, model)
    if os.environ["RANK"] == "1":
        time.sleep(600)
RunCheckpointer.save = save_then_pause
sys.exit(main(sys.argv[1:]))
"""


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, out, err


def test_two_ranks_write_one_folder_and_a_killed_rank_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    ranks = _launch([*PRUNE, "--out", str(out)], free_port(), entry=("-c", _RANK_1_PAUSED_AFTER_STAGE_1))
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "stage-001.safetensors").exists():
            assert ranks[0].poll() is None and ranks[1].poll() is None, _finish(ranks[0])[2][-2000:]
            assert time.monotonic() < deadline, "stage 1 never finished"
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL)
        code, _, err = _finish(ranks[0], timeout=120)
        _finish(ranks[1])
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.communicate()
    metrics = json.loads((out / "metrics.json").read_text())
    assert code == 1, err[-2000:]            # stages 2 and 3 need rank 1: rank 0 cannot finish
    lines = [line for line in err.splitlines() if line.startswith("prunekit: error")]
    assert len(lines) == 1 and "rank 0" in lines[0] and f"--resume {out}" in lines[0], err[-2000:]
    assert "Traceback" not in err
    # interrupted, as Ctrl-C leaves a run (it stayed "running" and `compare` said "not finished")
    assert metrics["status"] == "interrupted"
    assert "rank 0: a rank stopped or could not be reached (" in lines[0], lines[0]
    logged = (out / "run.log").read_text().splitlines()[-1]       # as Ctrl-C's "interrupted (Ctrl-C)"
    assert "interrupted: a rank stopped or could not be reached (" in logged, logged
    from prunekit.cli import main           # in this process: `compare` is not what runs as ranks here
    capsys.readouterr()
    assert main(["compare", str(out)]) == 0
    compared = capsys.readouterr()
    assert compared.out.splitlines()[-1].endswith("  (interrupted)"), compared.out + compared.err
    print(lines[0], logged, sep="\n")

    resumed = _launch(["prune", "--resume", str(out), "--json"], free_port())
    results = [_finish(process) for process in resumed]
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    record = json.loads(results[0][1])
    assert abs(record["sparsity"] - 0.9) < 1e-3
    assert results[1][1] == ""                                   # rank 1 prints nothing
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "done" and [s["stage"] for s in metrics["stages"]] == [1, 2, 3]
    assert "resume: " in (out / "run.log").read_text() and ", after stage " in (out / "run.log").read_text()


def test_the_backend_follows_the_device_unless_the_environment_names_one(monkeypatch):
    import pytest
    import torch

    from prunekit.distributed.collective import chosen_backend, rank_gpu
    from prunekit.errors import PrunekitError

    monkeypatch.delenv("PRUNEKIT_DIST_BACKEND", raising=False)
    assert (chosen_backend(cuda=False), chosen_backend(cuda=True)) == ("gloo", "nccl")
    monkeypatch.setenv("PRUNEKIT_DIST_BACKEND", "Gloo")
    assert chosen_backend(cuda=True) == "gloo"
    for value, words in (("mpi", "gloo or nccl"), ("nccl", "--device cuda")):
        monkeypatch.setenv("PRUNEKIT_DIST_BACKEND", value)
        with pytest.raises(PrunekitError, match=words):
            chosen_backend(cuda=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_gpu("gloo") == 1                              # two GPUs shared by four ranks
    with pytest.raises(PrunekitError, match="--nproc_per_node 2"):
        rank_gpu("nccl")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_gpu("nccl") == 1


def test_an_unknown_backend_is_refused_in_one_line_before_joining(tmp_path):
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PRUNEKIT_DIST_BACKEND": "mpi", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "prunekit", *PRUNE, "--out", str(tmp_path / "run")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "PRUNEKIT_DIST_BACKEND='mpi'" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_every_rank_joins_with_one_backend_whatever_recipe_it_read(tmp_path, monkeypatch):
    """On a machine with CUDA, a rank that parses a recipe with ``device = "cuda"``, one that refuses
    that recipe (another copy on its machine) and one that cannot read it at all (missing on its
    machine) join with the same backend, gloo for objects and CPU tensors, NCCL for CUDA tensors, so
    their refusals meet in seconds. Before, the rank without a readable recipe joined with gloo while
    the others used NCCL: they waited for it until PRUNEKIT_DIST_TIMEOUT."""
    import pytest
    import torch
    import torch.distributed as dist

    from prunekit.cli import main
    from prunekit.distributed.collective import group_backend

    class Joined(Exception):
        pass

    backends = []

    def join(backend, **_):
        backends.append(backend)
        raise Joined

    monkeypatch.delenv("PRUNEKIT_DIST_BACKEND", raising=False)
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # two GPUs, as on the ranks' machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(dist, "init_process_group", join)
    recipe = (f'model = "mlpnet"\ncheckpoint = "{ASSETS / "mlpnet.safetensors"}"\ndata = "mnist"\n'
              f'data-dir = "{ASSETS / "mnist"}"\nmethod = "magnitude"\nsparsity = 0.5\ndevice = "cuda"\n')
    (tmp_path / "run.toml").write_text(recipe)                              # the ranks that parse it
    (tmp_path / "refused.toml").write_text(recipe + "nosuch = 1\n")         # a rank that refuses it
    for name in ("run.toml", "refused.toml", "missing.toml"):               # missing: a rank that cannot read it
        with pytest.raises(Joined):
            main(["prune", "--recipe", str(tmp_path / name)])
    assert backends == ["cpu:gloo,cuda:nccl"] * 3
    monkeypatch.setenv("PRUNEKIT_DIST_BACKEND", "gloo")                      # several ranks sharing a GPU
    assert group_backend() == "gloo"
    monkeypatch.delenv("PRUNEKIT_DIST_BACKEND")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert group_backend() == "gloo"                                         # CPU machines: as before


def test_a_rank_with_a_cuda_recipe_and_one_without_its_recipe_both_refuse_at_once(tmp_path):
    """On this CPU machine: rank 0's recipe names ``device = "cuda"`` (refused: no CUDA device here),
    rank 1's recipe is missing on its machine. Both join with gloo, each prints its own line and
    exits 2 within seconds. Before, rank 0 tried to join with NCCL (and refused on its own) while
    rank 1 joined with gloo and waited for it until PRUNEKIT_DIST_TIMEOUT (600 s here)."""
    recipe = tmp_path / "cuda.toml"
    recipe.write_text(f'model = "mlpnet"\ncheckpoint = "{ASSETS / "mlpnet.safetensors"}"\ndata = "mnist"\n'
                      f'data-dir = "{ASSETS / "mnist"}"\nmethod = "magnitude"\nsparsity = 0.5\ndevice = "cuda"\n')
    port, ranks = free_port(), []
    start = time.monotonic()
    for rank, path in enumerate((recipe, tmp_path / "missing.toml")):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PRUNEKIT_DIST_TIMEOUT": "600", "PYTHONPATH": str(ROOT / "src")}
        env.pop("PRUNEKIT_DIST_BACKEND", None)
        ranks.append(subprocess.Popen([sys.executable, "-m", "prunekit", "prune", "--recipe", str(path), "--json"],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    (code0, _, err0), (code1, _, err1) = (_finish(rank, timeout=120) for rank in ranks)
    took = time.monotonic() - start
    assert (code0, code1) == (2, 2), (err0, err1)
    assert err0.count("\n") == 1 and "sees no CUDA device" in err0, err0
    assert err1.count("\n") == 1 and "missing.toml does not exist" in err1, err1
    # well before the timeout (600 s: waiting for it is a failure however slow the machine; a bound of
    # 25 s against a 40 s timeout was wall-clock that two loaded rank start-ups could use up)
    assert took < 100, took


def test_a_rank_short_of_memory_is_refused_on_every_rank_rank_0_saying_why(shared):
    """The memory plan's verdict is agreed: one rank short of memory (no --max-memory: each rank's
    limit is its machine's) stops every rank, exit 2, and rank 0 prints that rank's refusal, once
    (rank 0 went on into the run and ended on "a rank stopped", saying nothing of memory)."""
    folder, [(code0, _, err0), (code1, _, err1)] = _case(shared, "short_of_memory")
    assert (code0, code1) == (2, 2), err0[-2000:] + err1[-2000:]
    lines = [line for line in err0.splitlines() if line.startswith("prunekit: error")]
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: rank 1: this request needs about"), err0[-2000:]
    assert "but this rank may grow to" in lines[0] and "Traceback" not in err0 + err1
    assert not [line for line in err1.splitlines() if line.startswith("prunekit: error")], err1[-2000:]
    assert not (folder / "memory").exists()
    print(lines[0])


def _without_root_powers() -> list[str]:
    """The prefix that makes a command honour file permissions (root ignores them)."""
    import shutil
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop its power over permissions")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def _writable_tree(folder: Path, writable: bool) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


@pytest.mark.parametrize("command", ["prune", "train"])
def test_two_ranks_again_on_a_finished_run_in_a_read_only_folder_give_its_result_and_write_nothing(tmp_path, command):
    """The same command again under torchrun on a finished run whose folder is chmod -R a-w was
    refused ('DIR is not writable': rank 0 took the folder's lock, which makes a file), while one
    process printed the stored result without writing. Rank 0 now looks whether the folder holds a
    finished run it may not write and tells every rank: all of them read it back, rank 0 prints it."""
    out = tmp_path / "run"
    if command == "prune":
        args = [*PRUNE, "--out", str(out)]
        args[args.index("--stages") + 1] = "1"
    else:
        args = ["train", "--model", "mlpnet", "--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--epochs", "1",
                "--eval-split", "train", "--batch-size", "500", "--json", "--out", str(out)]
    first = [_finish(rank) for rank in _launch(args, free_port())]
    assert [code for code, _, _ in first] == [0, 0], first[0][2][-2000:] + first[1][2][-2000:]
    stored = json.loads(first[0][1])
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    port, ranks = free_port(), []
    _writable_tree(out, writable=False)
    try:
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                   "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src")}
            ranks.append(subprocess.Popen([*_without_root_powers(), sys.executable, "-m", "prunekit", *args],
                                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        (code0, out0, err0), (code1, out1, err1) = [_finish(rank, timeout=120) for rank in ranks]
    finally:
        _writable_tree(out, writable=True)
    assert (code0, code1) == (0, 0), err0[-2000:] + err1[-2000:]
    assert json.loads(out0) == stored and out1 == "", out1[-2000:]
    assert "prunekit: error" not in err0 + err1 and "Traceback" not in err0 + err1
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before   # nothing written


_LAUNCHER = """
import os, subprocess, sys, time
from datetime import timedelta
import torch.distributed as dist
port, out, logs, script = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=timedelta(seconds=60), wait_for_workers=False)
pids = []
for rank in range(2):          # as torchrun starts them: the store is this launcher's, their output is its own
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    with open(f"{logs}/rank{rank}.err", "w") as err:
        pids.append(subprocess.Popen([sys.executable, script, *sys.argv[5:], "--out", out], env=env,
                                     stdout=subprocess.DEVNULL, stderr=err).pid)
open(f"{logs}/pids", "w").write(" ".join(map(str, pids)))
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ranks_whose_launcher_is_killed_stop_mark_the_run_interrupted_and_say_how_to_resume(tmp_path):
    """``kill -9`` of the torchrun launcher (it hosts the group's store and is the ranks' parent):
    the ranks stop within seconds, rank 0 marks the run interrupted and prints one line saying how to
    resume, and the folder's lock is free for that ``--resume``. Before, the ranks ran on as
    orphans, each collective paying for the store that was gone (a stage took minutes instead of
    seconds), holding the lock: ``--resume`` was refused "in use by another prunekit process"."""
    from prunekit import run_lock, runs
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src")}
    args = [a for a in PRUNE if a != "--json"]
    args[args.index("--stages") + 1] = "60"
    # rank 1 pauses after stage 1 (rank 0 waits for it in stage 2): the run cannot end before the kill
    # however late this loop sees stage 1 (60 stages took 10-20 s: a long stall of the test could miss them)
    script = tmp_path / "paused.py"
    script.write_text(_RANK_1_PAUSED_AFTER_STAGE_1)
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(free_port()), str(out), str(logs), str(script),
                                 *args], env=env, cwd=ROOT)
    pids = []
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "stage-001.safetensors").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, "stage 1 never came"
            time.sleep(0.2)
        pids = [int(p) for p in (logs / "pids").read_text().split()]
        launcher.kill()
        launcher.wait()
        killed = time.monotonic()
        while any(_alive(pid) for pid in pids) and time.monotonic() - killed < 30:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), "the ranks ran on without their launcher"
        err0, err1 = ((logs / f"rank{r}.err").read_text() for r in range(2))
        assert runs.RunFolder(out).read_metrics()["status"] == "interrupted"
        lines = [line for line in err0.splitlines() if line.startswith("prunekit:")]
        assert lines == [f"prunekit: interrupted (the torchrun launcher stopped); resume with "
                         f"`torchrun ... -m prunekit prune --resume {out}`"], err0[-3000:]
        assert not [line for line in err1.splitlines() if line.startswith("prunekit:")], err1[-3000:]
        assert "interrupted (the torchrun launcher stopped)" in (out / "run.log").read_text()
        assert run_lock.in_use(out) is False
    finally:
        launcher.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_store_write_failing_as_the_launcher_dies_says_the_launcher_stopped_without_a_cpp_stack(monkeypatch, capfd):
    """The race of a ``kill -9`` of torchrun: the launcher's sockets (the group's store, which it
    hosts) close in its exit before its ranks get a new parent, so a rank's store write could fail
    while ``os.getppid()`` still named the launcher. c10d then printed "[c10d] sendBytes failed"
    with a page of C++ stack (3 of 7 kills) and the write was reported as a store error. Now the
    write is made with c10d's warnings held back, and its failure is checked against the launcher
    (gone, or exiting, in /proc): the rank stops as the watcher would stop it. Played here by a
    store host process killed while the parent pid the rank reads stays its pid."""
    from datetime import timedelta
    import torch.distributed as dist
    from prunekit import interrupts
    from prunekit.distributed import collective
    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", "import sys, time, torch.distributed as d; from datetime import "
                             "timedelta; s = d.TCPStore('127.0.0.1', int(sys.argv[1]), 2, True, timeout=timedelta("
                             "seconds=30), wait_for_workers=False); print('up', flush=True); time.sleep(60)", str(port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline().strip() == "up"
        store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timedelta(seconds=10))
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
        monkeypatch.setattr(collective, "_launcher", host.pid)
        monkeypatch.setattr(collective, "_launcher_lost", False)
        monkeypatch.setattr(collective.os, "getppid", lambda: host.pid)      # not handed to a new parent yet
        monkeypatch.setattr(collective, "_keys", lambda: (store, "prunekit/0"))
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "get_rank", lambda: 1)
        for name, value in (("_reason", None), ("_taken", False), ("_runs", 0)):
            monkeypatch.setattr(interrupts, name, value)
        collective.passed_checks()                      # the store answers
        host.kill()
        host.wait()
        capfd.readouterr()
        with pytest.raises(KeyboardInterrupt):
            for _ in range(3):                          # a write into a reset socket may be taken once
                collective.passed_checks()
                time.sleep(0.2)
        assert interrupts.stopped_by() == (collective.LAUNCHER_GONE, 1) and collective._launcher_lost
        err = capfd.readouterr().err
        assert "sendBytes" not in err and "frame #" not in err and "c10d" not in err, err[:2000]
        level = collective._c10_log_level()
        assert level is None or level.value < 2         # c10d's warnings are held back for the write alone
    finally:
        host.kill()
        host.wait()


def test_a_lost_launcher_stops_prunekit_work_but_not_the_callers_own_code_after_it(monkeypatch):
    """The launcher watcher stops a rank (a SIGINT to its main thread) while prunekit works; once
    ``prunekit.prune`` has returned, a user's script going on was interrupted by it too, with a
    bare KeyboardInterrupt. Now it only marks the launcher lost there (the next prunekit collective
    fails on it). The launcher's death is played by the parent pid the watcher reads."""
    from prunekit import interrupts
    from prunekit.distributed import collective
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for name, value in (("_launcher", None), ("_launcher_lost", False)):
        monkeypatch.setattr(collective, name, value)
    for name, value in (("_reason", None), ("_taken", False), ("_runs", 0)):
        monkeypatch.setattr(interrupts, name, value)
    parent = [os.getppid()]
    monkeypatch.setattr(collective.os, "getppid", lambda: parent[0])
    # SIGINT raises KeyboardInterrupt, as in a process an interactive shell starts: a job a script starts
    # in the background inherits SIGINT ignored, and the watcher's stop (a SIGINT) came to nothing there
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        collective.watch_launcher(poll_s=0.01)
        parent[0] = -1                               # the launcher is gone while the caller's own code runs
        interrupted = False
        try:
            deadline = time.monotonic() + 60     # at once, or when a loaded machine gets to the watcher thread
            while time.monotonic() < deadline and not collective._launcher_lost:
                time.sleep(0.01)
            time.sleep(0.2)
        except KeyboardInterrupt:
            interrupted = True
        assert collective._launcher_lost and not interrupted

        monkeypatch.setattr(collective, "_launcher", None)
        monkeypatch.setattr(collective, "_launcher_lost", False)
        parent[0] = os.getpid()                         # a new launcher, lost while prunekit works
        collective.watch_launcher(poll_s=0.01)
        with pytest.raises(KeyboardInterrupt), interrupts.running():
            # lost once prunekit works: set before ``running()`` began, a watcher thread that ran in
            # between (a loaded machine switches threads there) saw no run under way: it only marked it lost
            parent[0] = -1
            deadline = time.monotonic() + 60           # the interrupt ends the wait, however soon it comes
            while time.monotonic() < deadline:
                time.sleep(0.01)
        assert interrupts.stopped_by() == (collective.LAUNCHER_GONE, 1)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_group_the_script_joined_itself_has_its_launcher_watched_for_a_prune_call_alone(monkeypatch):
    """A script that joins with its own ``dist.init_process_group`` (not ``init_from_env``, which starts the
    watcher for the process) was not watched: after a ``kill -9`` of torchrun its ranks ran on as orphans
    for ~20 s holding the run lock, then raised LostRank in other words than the command line's. Now
    ``launcher_watched`` (entered by ``prunekit.prune``) watches it for the call: a launcher lost in it
    stops the call as the watcher stops a command (``interrupts.stop``, named "the torchrun launcher
    stopped"); after the call nothing watches (the script's own code is not interrupted), and a group
    watched already is left to its watcher. The launcher's death is played by the parent pid it reads."""
    import torch.distributed as dist
    from prunekit import interrupts
    from prunekit.distributed import collective
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for name, value in (("_launcher", None), ("_launcher_lost", False)):
        monkeypatch.setattr(collective, name, value)
    for name, value in (("_reason", None), ("_taken", False), ("_runs", 0)):
        monkeypatch.setattr(interrupts, name, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    launcher = os.getppid()
    parent = [launcher]
    monkeypatch.setattr(collective.os, "getppid", lambda: parent[0])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)     # (see the test above)
    try:
        with interrupts.running(), collective.launcher_watched(poll_s=0.01):     # a call whose launcher lives on
            assert collective._launcher == parent[0]
        assert collective._launcher is None
        parent[0] = -1                                  # lost after the call: the script's own code goes on
        time.sleep(0.3)
        assert not collective._launcher_lost

        parent[0] = launcher
        with pytest.raises(KeyboardInterrupt), interrupts.running(), collective.launcher_watched(poll_s=0.01):
            parent[0] = -1                              # lost while the call works
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                time.sleep(0.01)
        assert interrupts.stopped_by() == (collective.LAUNCHER_GONE, 1) and collective.launcher_lost()

        monkeypatch.setattr(collective, "_launcher", 12345)     # init_from_env's watch: left as it is
        with collective.launcher_watched(poll_s=0.01):
            pass
        assert collective._launcher == 12345
    finally:
        signal.signal(signal.SIGINT, previous)


def test_prune_watches_the_launcher_while_it_works_and_says_a_lost_launchers_failed_collective_in_its_words(monkeypatch):
    """``prunekit.prune`` enters ``launcher_watched`` inside its ``running`` span (a stop there is the
    call's), and a collective that fails because the launcher (and the group's store with it) is gone is
    said as the command line says it: "interrupted (the torchrun launcher stopped)", not "a rank stopped
    or could not be reached (the torchrun launcher stopped: ...)"."""
    import contextlib
    import torch
    from torch import nn
    import prunekit
    from prunekit import api, interrupts
    from prunekit.distributed import collective
    entered = []

    @contextlib.contextmanager
    def watched(poll_s=1.0):
        entered.append(interrupts.under_way())
        yield
        entered.append("left")

    monkeypatch.setattr(collective, "launcher_watched", watched)
    torch.manual_seed(0)
    prunekit.prune(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), method="magnitude", sparsity=0.5,
                   example_input=torch.randn(1, 8))
    assert entered == [True, "left"]

    monkeypatch.setattr(api, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(api, "current", lambda: type("Group", (), {"distributed": True})())
    monkeypatch.setattr(collective, "_launcher_lost", True)
    failed = torch.distributed.DistError("the torchrun launcher stopped: the group's store could not be reached "
                                         "(Broken pipe)")       # as ``passed_checks`` raises it
    lost = api.lost_rank_refusal(failed, "/runs/a")
    assert lost.stop_line == "interrupted (the torchrun launcher stopped)"
    assert str(lost).startswith("rank ") and ": interrupted (the torchrun launcher stopped); run the same script " \
        "again under torchrun: prunekit.prune(..., out='/runs/a') carries on" in str(lost), str(lost)


def test_a_sigterm_to_torchrun_stops_both_ranks_with_one_prunekit_line_and_the_run_resumes(tmp_path):
    """``kill -TERM`` of the torchrun launcher (a batch scheduler's stop, a user's ``kill``): torchrun
    sends SIGTERM to every rank. The ranks died at once with no prunekit line (only the launcher's
    SignalException stack), the run left "running". Now rank 0 marks it interrupted and prints one
    line saying how to resume, as a SIGTERM of one prunekit process does; the resume finishes it."""
    from prunekit import run_lock, runs
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src")}

    def torchrun(args: list[str], entry: tuple[str, ...] = ("-m", "prunekit")) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *entry,
                                 *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    args = [a for a in PRUNE if a != "--json"]
    args[args.index("--stages") + 1] = "4"
    # rank 1 pauses after stage 1 (rank 0 waits for it in stage 2): the 4 stages took about a second,
    # and could all end before a late poll of this loop sent the signal
    script = tmp_path / "paused.py"
    script.write_text(_RANK_1_PAUSED_AFTER_STAGE_1)
    launcher = torchrun([*args, "--out", str(out)], entry=(str(script),))
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "stage-001.safetensors").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, "stage 1 never came"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    lines = [line for line in err.splitlines() if line.startswith("prunekit")]
    assert lines == [f"prunekit: interrupted (SIGTERM); resume with `torchrun ... -m prunekit prune --resume {out}`"], \
        err[-3000:]
    assert runs.RunFolder(out).read_metrics()["status"] == "interrupted"
    assert (out / "run.log").read_text().splitlines()[-1].endswith("interrupted (SIGTERM)")
    assert run_lock.in_use(out) is False
    resumed = torchrun(["prune", "--resume", str(out), "--json"])
    code, output, err = _finish(resumed)
    assert code == 0, err[-3000:]
    assert json.loads(output)["sparsity"] == pytest.approx(0.9, abs=1e-3)
    metrics = runs.RunFolder(out).read_metrics()
    assert metrics["status"] == "done" and [s["stage"] for s in metrics["stages"]] == [1, 2, 3, 4]


def test_a_sigterm_to_torchrun_training_writes_the_stop_to_its_run_log(tmp_path):
    """``train --out`` under torchrun, the launcher sent SIGTERM: rank 0's one line, and the
    training folder's run.log ends ``interrupted (SIGTERM)`` as a prune run's does (before, its last
    line was an epoch's checkpoint: nothing said the run had been stopped)."""
    from prunekit import run_lock
    out = tmp_path / "train"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src")}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "prunekit",
                                 "train", "--model", "mlpnet", "--data", "mnist", "--data-dir", str(ASSETS / "mnist"),
                                 "--epochs", "100000", "--lr", "0.05", "--out", str(out)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        # Each epoch's checkpoint replaces the one before and an epoch of the test images takes well under
        # a second: wait for any checkpoint (stage-001 may already be gone), with epochs that never all end.
        deadline = time.monotonic() + 180
        while not any((out / "checkpoints").glob("stage-*.safetensors")):
            assert time.monotonic() < deadline and launcher.poll() is None, "epoch 1 never came"
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    lines = [line for line in err.splitlines() if line.startswith("prunekit")]
    assert len(lines) == 1 and lines[0].startswith("prunekit: interrupted (SIGTERM)"), err[-3000:]
    assert (out / "run.log").read_text().splitlines()[-1].endswith("interrupted (SIGTERM)")
    assert run_lock.in_use(out) is False


def test_train_with_a_batch_size_below_the_ranks_is_refused_in_one_line_on_every_rank(shared):
    """`train --batch-size 1` as 2 ranks: every batch is whole and split over the ranks, so rank 1
    would have no sample of any batch (before the fix it raised ZeroDivisionError on its first batch
    and rank 0 waited for the timeout; guarded, it would only idle). Refused before any data is read."""
    folder, done = _case(shared, "batch_size_below_ranks")
    assert [code for code, _, _ in done] == [2, 2], done[0][2][-2000:] + done[1][2][-2000:]
    err0 = done[0][2]
    assert err0.count("\n") == 1 and "--batch-size 1 is below the 2 ranks" in err0 and "--batch-size 2" in err0, err0
    assert "Traceback" not in done[1][2], done[1][2][-2000:]
    assert not (folder / "small_batches").exists()


def test_a_warning_every_rank_meets_is_printed_once_by_rank_0(shared):
    """`eval` as 2 ranks of a 5-output model file on an image folder without train/ and test/,
    --eval-split train: the folder's "no train/ and test/ folders" and "3 class folders but 5
    outputs" warnings came once per rank (a walk-through's torchrun train printed the first twice)."""
    _, done = _case(shared, "warning_once")
    assert [code for code, _, _ in done] == [0, 0], done[0][2][-2000:] + done[1][2][-2000:]
    warned = [[line for line in err.splitlines() if line.startswith("prunekit: warning:")] for _, _, err in done]
    assert len(warned[0]) == 2, done[0][2][-2000:]
    assert any("no train/ and test/ folders" in line for line in warned[0]), warned[0]
    assert any("3 class folders but the model has 5 outputs" in line for line in warned[0]), warned[0]
    assert warned[1] == [], done[1][2][-2000:]


# The cases above that run after the ranks joined their group share one spawn of the two ranks, each
# a call of ``prunekit.cli.main`` in both (``cli_in_ranks.cli``: exit code, stdout, stderr as a
# launched rank's); the others are about a process (a kill, a signal, torchrun, a refusal before
# joining) and launch their own.
def _prepare(folder: Path) -> None:
    """An image folder of 3 classes without train/ and test/, and a model file of 5 outputs."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for name in "abc":
        (folder / "imgs" / name).mkdir(parents=True)
        for k in range(2):
            Image.fromarray((rng.random((4, 4, 3)) * 255).astype("uint8")).save(folder / "imgs" / name / f"{k}.png")
    (folder / "net.py").write_text("import torch.nn as nn\n\ndef build():\n"
                                   "    return nn.Sequential(nn.Flatten(), nn.Linear(48, 5))\n")


def _short_of_memory(rank: int, folder: Path) -> tuple:
    """``PRUNE`` where rank 1's machine has little memory left (600 MiB available to the memory plan,
    ``process_memory.available_memory``; ``refit``, imported with prunekit, keeps its own name for it)."""
    from prunekit import process_memory
    real = process_memory.available_memory
    if rank == 1:
        process_memory.available_memory = lambda device: 600 * 2**20
    try:
        return cli([*PRUNE, "--out", folder / "memory"])
    finally:
        process_memory.available_memory = real


def _every_case(rank: int, world: int, folder: str) -> dict:
    """Every shared case, one after the other in one spawn of the ranks: {case: this rank's result}.
    The warnings' case comes first: no earlier call in the process has shown them."""
    import torch.distributed as dist
    folder = Path(folder)
    cases = {
        "warning_once": lambda: cli(["eval", "--model", f"{folder / 'net.py'}:build", "--normalize", "none", "--data",
                                     "imagefolder", "--data-dir", folder / "imgs", "--eval-split", "train",
                                     "--batch-size", "2"]),
        "short_of_memory": lambda: _short_of_memory(rank, folder),
        "batch_size_below_ranks": lambda: cli(["train", "--model", "mlpnet", "--data", "mnist", "--data-dir",
                                               ASSETS / "mnist", "--epochs", "1", "--eval-split", "train",
                                               "--batch-size", "1", "--train-samples", "4", "--out",
                                               folder / "small_batches"]),
    }
    said = {}
    for name, case in cases.items():
        said[name] = case()
        dist.barrier()
    return said


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """(the cases' folder, each rank's {case: result}) of ``_every_case``, run once for the module
    (and both xdist workers)."""
    return run_ranks_in_folder_once("distributed_cli", _prepare, _every_case, 2, tmp_path_factory, timeout=600)


def _case(shared, name: str) -> tuple[Path, list]:
    """(the cases' folder, [rank 0's result of case ``name``, rank 1's])."""
    folder, ranks = shared
    return folder, [said[name] for said in ranks]


def test_an_edited_finished_run_under_torchrun_is_refused_in_one_line_and_exit_code_2(tmp_path):
    """``torchrun ... -m prunekit prune ... --out R`` over a finished run whose config.toml was
    edited by hand: rank 0's one-line refusal and exit code 2 on both ranks. Before, rank 1 crashed
    in ``broadcast_object`` unpickling rank 0's ``EditedConfig`` (``TypeError: EditedConfig.__init__()
    missing 2 required positional arguments``), a traceback and exit code 1."""
    out = tmp_path / "run"
    args = ["prune", "--model", "mlpnet", "--checkpoint", str(ASSETS / "mlpnet.safetensors"), "--data", "mnist",
            "--data-dir", str(ASSETS / "mnist"), "--method", "magnitude", "--sparsity", "0.5", "--train-samples",
            "256", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src")}
    from prunekit.cli import main           # the finished run, made in this process (one process, not ranks)
    assert main(args) == 0
    config = (out / "config.toml").read_text()
    assert "train-samples = 256\n" in config
    (out / "config.toml").write_text(config.replace("train-samples = 256\n", "train-samples = 512\n"))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "prunekit",
                                 *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        _, err = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    lines = [line for line in err.splitlines() if line.startswith("prunekit:")]      # not torchrun's "prunekit FAILED"
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: "), err[-3000:]
    assert "config.toml was changed (train-samples)" in lines[0], lines[0]
    assert "Error" not in err.replace("ChildFailedError", ""), err[-3000:]     # no rank's traceback
    assert err.count("exitcode  : 2") == 2, err[-3000:]            # torchrun's report: both ranks exit 2


def _ranks_of(launcher: int) -> dict[int, int]:
    """The rank processes torchrun ``launcher`` started: {RANK: pid}."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"RANK=")), None)
        if parent == launcher and rank is not None:
            ranks[rank] = int(entry.name)
    return ranks


@pytest.mark.parametrize("sigterm_first", [True, False], ids=["sigterm-before-the-collective-fails", "kill-alone"])
def test_a_rank_killed_under_torchrun_is_reported_as_a_lost_rank_not_a_sigterm(tmp_path, sigterm_first):
    """``kill -9`` of rank 1 under torchrun: rank 0's collective fails, and torchrun sends it SIGTERM
    (it stops the ranks left once one dies), which raced rank 0's own message: about half the runs
    said ``prunekit: interrupted (SIGTERM); resume with ...`` (exit 143) and run.log had two lines
    (the lost rank, then the SIGTERM). The SIGTERM is sent here before the kill (rank 0 waits in a
    collective: it takes the signal as that collective fails), the order that lost every time, and
    without it (torchrun's own, at whatever time). Now rank 0 asks the store whether its peer left
    for a SIGTERM (a stopped launcher) or not: one line naming the lost rank, one in run.log."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src")}
    script = tmp_path / "paused.py"
    script.write_text(_RANK_1_PAUSED_AFTER_STAGE_1)
    args = [a for a in PRUNE if a != "--json"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
                                 *args, "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "stage-001.safetensors").exists():
            assert time.monotonic() < deadline and launcher.poll() is None, "stage 1 never came"
            time.sleep(0.2)
        time.sleep(3)                          # rank 0 is in stage 2's first collective, waiting for rank 1
        ranks = _ranks_of(launcher.pid)
        assert sorted(ranks) == [0, 1], ranks
        if sigterm_first:
            os.kill(ranks[0], signal.SIGTERM)
            time.sleep(0.5)
        os.kill(ranks[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    lines = [line for line in err.splitlines() if line.startswith("prunekit:")]
    assert len(lines) == 1 and lines[0].startswith("prunekit: error: rank 0: a rank stopped or could not be "
                                                   "reached ("), err[-3000:]
    assert lines[0].endswith(f"--resume {out}`"), lines[0]
    stops = [line for line in (out / "run.log").read_text().splitlines() if "interrupted" in line]
    assert len(stops) == 1 and "interrupted: a rank stopped or could not be reached (" in stops[0], stops
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"
