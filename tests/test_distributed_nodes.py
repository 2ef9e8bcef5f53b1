"""prunekit on two machines, simulated on this one: two ``torchrun --nnodes 2 --nproc_per_node 1``
(node ranks 0 and 1, each started from its own working directory), so LOCAL_RANK is 0 on both
while RANK is 0 and 1. The result is one process's; only rank 0 writes the run folder; a machine
that reads another checkpoint, or that does not see the run folder rank 0 writes, is refused on
every rank in one line instead of making another run or a collective mismatch."""

import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from closeness import assert_close_to_scale
from distributed_spawn import free_port

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "src" / "prunekit" / "assets"
CHECKPOINT = str(ASSETS / "mlpnet.safetensors")
DATA = ["--model", "mlpnet", "--checkpoint", CHECKPOINT, "--data", "mnist", "--data-dir", str(ASSETS / "mnist"),
        "--train-samples", "256", "--fisher-samples", "32", "--json"]
CHITA = ["prune", *DATA, "--method", "chita++", "--stages", "2", "--sparsity", "0.9"]

# rank 1 reports every file it opens for writing, creates, renames or removes (anywhere but /dev)
_WATCHED = """
import os, sys
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args
        if (mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & WRITE:
            sys.__stderr__.write(f"WROTE {os.fsdecode(path)}\\n")
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        sys.__stderr__.write(f"WROTE {event} {os.fsdecode(args[0])}\\n")
if os.environ["RANK"] != "0":
    sys.addaudithook(hook)
from prunekit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_DIST_TIMEOUT": "40", "PYTHONPATH": str(ROOT / "src"),
            **extra}


def _finish(processes: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    """Each process's (exit code, stdout, stderr); on a timeout every one (and its children) is killed."""
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    return results


def _two_machines(args: list[str], cwds: list[Path], node1_args: list[str] | None = None,
                  **env: str) -> list[tuple]:
    """``torchrun --nnodes 2 --nproc_per_node 1 --node-rank N ... -c <watched prunekit> ARGS`` for N = 0, 1;
    ``env``: more environment variables for both."""
    script = cwds[0].parent / "watched_prunekit.py"
    script.write_text(_WATCHED)
    port, nodes = free_port(), []
    for node, cwd in enumerate(cwds):
        cwd.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                   str(script), *(node1_args if node == 1 and node1_args else args)]
        nodes.append(subprocess.Popen(command, cwd=cwd, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return _finish(nodes)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("prunekit: error")]


def _refused_once(results) -> list[str]:
    """The error lines of a refusal every rank met: both machines stop (exit not 0), the line is
    printed once (by rank 0, on machine 0), and no traceback of ours."""
    for code, _, err in results:
        assert code != 0 and "PrunekitError" not in err, err[-3000:]
    node0, node1 = (_errors(err) for _, _, err in results)
    assert len(node0) == 1 and node1 == [], (node0, node1)
    return node0


def test_two_machines_prune_as_one_process_and_only_rank_0_writes(tmp_path):
    from prunekit.cli import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*CHITA, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    (zero, zero_out, zero_err), (one, one_out, one_err) = _two_machines(
        [*CHITA, "--out", str(tmp_path / "two")], [tmp_path / "node0", tmp_path / "node1"])
    assert (zero, one) == (0, 0), zero_err[-3000:] + one_err[-3000:]
    assert one_out == ""
    wrote = [line for line in one_err.splitlines() if line.startswith("WROTE")]
    assert not [line for line in wrote if str(tmp_path) in line or not line.split()[-1].startswith(("/tmp", "/dev"))], \
        wrote                                       # rank 1 (LOCAL_RANK 0 on its machine) writes no file of ours
    single, double = (json.loads((tmp_path / run / "result.json").read_text()) for run in ("one", "two"))
    assert double["ranks"] == 2 and double["accuracy"] == pytest.approx(single["accuracy"], abs=0.02)
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    for name in a:
        assert torch.equal(a[name] != 0, b[name] != 0), name
        # chita++ re-fits the kept weights after its last stage (on by default): each layer's moments
        # are summed over the ranks, and its conjugate gradients stop at a relative residual of 1e-3
        # (prunekit.refit.TOLERANCE), where rounding in the sums can end them an iteration apart:
        # measured 3.5e-3 and 5.4e-3 of scale on fc2 and fc3; run to 1e-10, within 5e-6 on every layer
        # (tests/test_distributed_refit.py holds the ranks to that)
        assert_close_to_scale(b[name], a[name], 1e-2)


def test_a_machine_with_another_checkpoint_is_refused_on_every_rank(tmp_path):
    """Same shapes, other weights: before, both ranks ran to the end (exit 0), rank 1's gradient
    rows from other weights than rank 0's model."""
    other = tmp_path / "other.safetensors"
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in load_file(CHECKPOINT).items()}, other)
    args = [*CHITA, "--out", str(tmp_path / "run")]
    results = _two_machines(args, [tmp_path / "node0", tmp_path / "node1"],
                            node1_args=[str(other) if a == CHECKPOINT else a for a in args])
    lines = _refused_once(results)
    assert "rank 1 read other model weights (--checkpoint) than rank 0" in lines[0], lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_machine_given_other_options_is_refused_on_every_rank_naming_them(tmp_path):
    """Before, the refusal said "rank 1 was given other options than rank 0" and not which."""
    args = [*CHITA, "--out", str(tmp_path / "run")]
    other = [*args, "--seed", "1"]
    other[other.index("--fisher-samples") + 1] = "64"
    lines = _refused_once(_two_machines(args, [tmp_path / "node0", tmp_path / "node1"], node1_args=other))
    assert lines[0].startswith("prunekit: error: rank 1 was given other options than rank 0 (--fisher-samples 64 "
                               "against 32, --seed 1 against 0): every rank must run the same command"), lines


def test_a_run_folder_the_machines_do_not_share_is_refused_on_every_rank(tmp_path):
    """The same command again after a kill, ``--out run`` relative: node 0's folder holds stage 1,
    node 1 (another working directory, as on a machine without the shared file system) sees none.
    Before, rank 0 resumed after stage 1 and rank 1 started over: a collective mismatch (gloo
    aborted rank 0, SIGABRT) or, where the sizes happened to match, another run."""
    from prunekit.cli import main
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    args = [*CHITA, "--out", "run"]
    cwd = os.getcwd()
    os.chdir(node0)
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    run = node0 / "run"                                  # as if killed after stage 1
    (run / "checkpoints" / "stage-002.safetensors").unlink()
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "status": "running", "stages": metrics["stages"][:1]}))
    for name in ("model.safetensors", "model.json", "result.json"):
        (run / name).unlink()
    lines = _refused_once(_two_machines(args, [node0, node1]))
    assert "the ranks see different run folders at run (rank 0 finds 1 checkpoint(s), rank 1 finds nothing)" \
        in lines[0] and "file system they all share" in lines[0], lines
    assert json.loads((run / "metrics.json").read_text())["status"] == "running"
    assert not (node1 / "run").exists()


def test_a_gloo_socket_ifname_naming_no_interface_is_refused_in_one_line(tmp_path, monkeypatch):
    """Before, gloo's "Unable to find address for: nosuch0" read as a lost rank (exit 1, "run the
    same command again")."""
    import socket

    present = [name for _, name in socket.if_nameindex()]
    env = _env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PRUNEKIT_DIST_TIMEOUT="10",
               GLOO_SOCKET_IFNAME=f"{present[0]},nosuch0")
    done = subprocess.run([sys.executable, "-m", "prunekit", *CHITA, "--out", str(tmp_path / "run")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "no network interface nosuch0" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()
    from prunekit.distributed.collective import check_socket_ifname
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", ",".join(present[:2]))
    check_socket_ifname()                                  # interfaces this machine has: accepted


def test_a_resume_folder_missing_on_one_machine_is_refused_by_it_and_the_other_stops_at_once(tmp_path):
    """`prune --resume runs/x`, the folder on machine 0 alone: machine 1 names the shared file system
    in one line, machine 0 stops (exit not 0) without a line of its own. Before, machine 1 refused
    before joining the group, so machine 0 waited for it the whole PRUNEKIT_DIST_TIMEOUT (600 s here)."""
    import socket
    import time

    from prunekit.cli import main
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    cwd = os.getcwd()
    os.chdir(node0)
    try:
        assert main([*CHITA, "--out", "runs/x"]) == 0
    finally:
        os.chdir(cwd)
    start = time.monotonic()
    # a timeout no machine's start-up comes near (a bound of 25 s against 40 s was wall-clock that a
    # loaded machine's two torchrun start-ups could use up): waiting for it is the failure
    (zero, _, zero_err), (one, _, one_err) = _two_machines(["prune", "--resume", "runs/x", "--json"], [node0, node1],
                                                           PRUNEKIT_DIST_TIMEOUT="600")
    assert time.monotonic() - start < 100, (zero_err[-2000:], one_err[-2000:])
    assert zero != 0 and one != 0 and _errors(zero_err) == [], zero_err[-3000:]
    assert _errors(one_err) == [f"prunekit: error: --resume runs/x does not exist on machine {socket.gethostname()} "
                                "(check the path; on several machines the run folder must be on a file system they "
                                "all share, at the same path)"], one_err[-3000:]


def test_a_training_folder_the_machines_do_not_share_is_refused_on_every_rank(tmp_path):
    """`train --out run` again after it ended, node 1 in another directory: before, rank 0 gave the
    finished run's result while rank 1 trained again from scratch (its DDP collectives unanswered)."""
    from prunekit.cli import main
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    args = ["train", "--model", "mlpnet", "--data", "mnist", "--data-dir", str(ASSETS / "mnist"), "--epochs", "1",
            "--batch-size", "64", "--json", "--out", "run"]
    cwd = os.getcwd()
    os.chdir(node0)
    try:
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    lines = _refused_once(_two_machines(args, [node0, node1]))
    assert "the ranks see different run folders at run (rank 0 finds a finished run, rank 1 finds nothing)" \
        in lines[0], lines
    assert not (node1 / "run").exists()


@pytest.mark.parametrize("launch", [["--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port"],
                                    ["--rdzv-backend", "c10d", "--rdzv-id", "x", "--rdzv-endpoint"]],
                         ids=["static", "c10d"])
def test_the_readme_option_for_the_rendezvous_wait_is_the_one_torchrun_honours(launch):
    """The README names, for each launch, the ``--rdzv-conf`` key that bounds how long torchrun
    waits for a machine that never starts (it named ``timeout``, which c10d ignores: 600 s)."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    static, c10d = re.search(r"with `--master-addr` \(the static rendezvous\) `--rdzv-conf (\w+)=60`.*?"
                             r"with `--rdzv-backend c10d` `--rdzv-conf (\w+)=60`", readme).groups()
    key = static if "--master-port" in launch else c10d
    port = str(free_port())
    endpoint = port if "--master-port" in launch else f"127.0.0.1:{port}"
    lone = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                             *launch, endpoint, "--rdzv-conf", f"{key}=2", "--no-python", "true"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    [(code, _, err)] = _finish([lone], timeout=120)     # a 2 s wait, after a start-up a loaded machine makes long
    assert code != 0 and ("Timed out after" in err or "RendezvousTimeoutError" in err), err[-500:]
