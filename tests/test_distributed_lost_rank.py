"""A rank lost under torchrun, as the ranks left are told: ``prunekit.prune`` in a script raises the command
line's one line as a ``PrunekitError``, not torch's raw gloo error."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_spawn import free_port

ROOT = Path(__file__).resolve().parent.parent

# rank 1 dies (os._exit: a crash, the OOM killer) as it starts its gradient rows; rank 0 prints what it was told
_SCRIPT = """
import os, sys, datetime
sys.path.insert(0, {tests!r})
import torch.distributed as dist
import prunekit
import prunekit.distributed.gradients as gradients
from prunekit.errors import PrunekitError
from test_distributed_float16 import _tinier_classifier
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
model, x, y = _tinier_classifier()
if dist.get_rank() == 1:
    gradients.collect_gradients = lambda *args, **kwargs: os._exit(9)
try:
    prunekit.prune(model, (x, y), method="chita", sparsity=0.5, fisher_samples=48, fisher_kind="empirical",
                   recalibrate_bn=False, batch_size=64, stage_eval=False, out={out!r})
except PrunekitError as err:
    print("PrunekitError:", err, flush=True)
except BaseException as err:
    print(type(err).__name__ + ":", str(err).splitlines()[0] if str(err) else "", flush=True)
os._exit(0)
"""


def test_a_rank_lost_in_prunekit_prune_raises_the_command_lines_one_line_as_a_prunekit_error(tmp_path):
    """Before, rank 0 got torch's ``RuntimeError``/``DistBackendError`` ("[.../gloo/transport/tcp/pair.cc:537]
    Read error ...: Connection reset by peer. This is typically caused by ..."): now a ``PrunekitError`` whose
    one line names the lost rank's trouble and how to carry on (the same call again, out= resumes), and
    the run folder's run.log says it was interrupted, as the command line writes it."""
    out = tmp_path / "run"
    script = tmp_path / "lost.py"
    script.write_text(_SCRIPT.format(tests=str(ROOT / "tests"), out=str(out)))
    port = free_port()
    ranks = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT / "src")}
        ranks.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        said, err = ranks[0].communicate(timeout=150)
        ranks[1].communicate(timeout=30)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    assert ranks[1].returncode == 9
    lines = said.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("PrunekitError: rank 0: a rank stopped or could not be "
                                                   "reached ("), (said, err[-2000:])
    assert lines[0].endswith(f"prunekit.prune(..., out={str(out)!r}) carries on from the last completed stage"), lines[0]
    assert "\n" not in lines[0] and "pair.cc" not in lines[0]
    stops = [line for line in (out / "run.log").read_text().splitlines() if "interrupted" in line]
    assert len(stops) == 1 and "interrupted: a rank stopped or could not be reached (" in stops[0], stops


# `prunekit ARGS` whose rank 0 computes (sleeps in Python, in no collective) once stage 1 is saved; rank 1,
# which has no file to write, goes on to stage 2's first collective and waits there for rank 0, or (DIE=1)
# dies on its own (os._exit: a crash, the OOM killer) a moment after it saved stage 1 (a rank 2 waits as rank 1 does)
_RANK_0_COMPUTING_AFTER_STAGE_1 = """
import os, sys, time
from prunekit.runs import RunCheckpointer
from prunekit.cli import main
save = RunCheckpointer.save
def save_then_compute(self, state, model):
    save(self, state, model)
    if os.environ["RANK"] == "0":
        open(os.environ["MARK"], "w").write(str(os.getpid()))
        time.sleep(600)
    elif os.environ.get("DIE") == "1" and os.environ["RANK"] == "1":
        time.sleep(1)
        os._exit(9)
RunCheckpointer.save = save_then_compute
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("die", [True, False], ids=["rank-1-dies", "launcher-sigterm"])
def test_a_rank_lost_while_rank_0_computes_is_named_and_a_stopped_launcher_is_not_taken_for_one(tmp_path, die):
    """rank 1 dies on its own while rank 0 computes (in no collective): torchrun sends rank 0 SIGTERM, and
    rank 0, with no failed collective to judge, said ``prunekit: interrupted (SIGTERM)`` (exit 143), run.log
    ``interrupted (SIGTERM)``. Now it names the lost rank and how to resume (exit 1). A ``kill -TERM`` of the
    launcher while rank 1 waits inside a collective (it cannot run a Python handler there) is still a
    SIGTERM stop: each rank says so in the store the moment its SIGTERM comes, from a thread of its own."""
    from test_distributed_cli import PRUNE
    out = tmp_path / "run"
    mark = tmp_path / "rank-0-computes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src"),
           "MARK": str(mark), "DIE": "1" if die else "0"}
    script = tmp_path / "computing.py"
    script.write_text(_RANK_0_COMPUTING_AFTER_STAGE_1)
    args = [a for a in PRUNE if a != "--json"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
                                 *args, "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not mark.exists():
            assert time.monotonic() < deadline and launcher.poll() is None, "stage 1 never came"
            time.sleep(0.2)
        if not die:
            time.sleep(3)                       # rank 1 waits in stage 2's first collective
            launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    lines = [line for line in err.splitlines() if line.startswith("prunekit:")]
    stops = [line for line in (out / "run.log").read_text().splitlines() if "interrupted" in line]
    if die:
        assert len(lines) == 1 and lines[0].startswith("prunekit: error: rank 0: a rank stopped or could not be "
                                                       "reached (rank 1 was lost: it stopped on its own"), err[-3000:]
        assert lines[0].endswith(f"resume with `torchrun ... -m prunekit prune --resume {out}`"), lines[0]
        assert len(stops) == 1 and "interrupted: a rank stopped or could not be reached (rank 1 was lost" in stops[0], \
            stops
    else:
        assert lines == [f"prunekit: interrupted (SIGTERM); resume with `torchrun ... -m prunekit prune --resume "
                         f"{out}`"], err[-3000:]
        assert len(stops) == 1 and stops[0].endswith("interrupted (SIGTERM)"), stops
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"


def _launch_computing(tmp_path, ranks: int, die: bool):
    """torchrun of ``_RANK_0_COMPUTING_AFTER_STAGE_1`` with ``ranks`` ranks; returns (launcher, out, mark)."""
    from test_distributed_cli import PRUNE
    out, mark, script = tmp_path / "run", tmp_path / "rank-0-computes", tmp_path / "computing.py"
    script.write_text(_RANK_0_COMPUTING_AFTER_STAGE_1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src"),
           "MARK": str(mark), "DIE": "1" if die else "0"}
    args = [a for a in PRUNE if a != "--json"]
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
                                 *args, "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    return launcher, out, mark


def _rank_0_pid(launcher, mark) -> int:
    deadline = time.monotonic() + 180
    while not (mark.exists() and mark.read_text()):
        assert time.monotonic() < deadline and launcher.poll() is None, "stage 1 never came"
        time.sleep(0.2)
    return int(mark.read_text())


def test_a_sigterm_to_rank_0_alone_is_a_sigterm_stop_not_a_lost_rank_1(tmp_path):
    """``kill -TERM`` of rank 0 alone (the process a user sees) while rank 1 waits, alive, inside a
    collective: rank 1 says nothing in the store (it got no SIGTERM), and its silence was taken as its
    death: "rank 1 was lost: it stopped on its own", exit 1. A silent rank whose process still runs is
    not lost: ``interrupted (SIGTERM)``, exit 143."""
    launcher, out, mark = _launch_computing(tmp_path, 2, die=False)
    try:
        pid = _rank_0_pid(launcher, mark)
        time.sleep(3)                               # rank 1 waits in stage 2's first collective
        os.kill(pid, signal.SIGTERM)
        _, err = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    lines = [line for line in err.splitlines() if line.startswith("prunekit:")]
    assert lines == [f"prunekit: interrupted (SIGTERM); resume with `torchrun ... -m prunekit prune --resume "
                     f"{out}`"], err[-3000:]
    stops = [line for line in (out / "run.log").read_text().splitlines() if "interrupted" in line]
    assert len(stops) == 1 and stops[0].endswith("interrupted (SIGTERM)"), stops
    assert re.search(r"rank\s*:\s*0 .*\n.*\n?\s*exitcode\s*:\s*143", err) or "exitcode  : 143" in err, err[-3000:]


def test_three_ranks_one_dies_names_that_rank_alone_not_the_one_that_reported_it(tmp_path):
    """Three ranks: rank 1 dies on its own while rank 0 computes and rank 2 waits in a collective. Rank 2's
    collective fails at once and it reports the loss itself (it ignores SIGTERM from then on, so it never
    says "stopped"); rank 0, SIGTERMed by torchrun, named it too: "rank 1, 2 was lost". Only rank 1 is."""
    launcher, out, mark = _launch_computing(tmp_path, 3, die=True)
    try:
        _rank_0_pid(launcher, mark)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    rank_0 = [line for line in err.splitlines() if line.startswith("prunekit: error: rank 0:")]
    assert len(rank_0) == 1 and "(rank 1 was lost: it stopped on its own" in rank_0[0], err[-3000:]
    stops = [line for line in (out / "run.log").read_text().splitlines() if "interrupted" in line]
    assert len(stops) == 1 and "rank 2" not in stops[0], stops


def test_lost_rank_is_exported_at_the_top_level():
    """``prunekit.LostRank`` (users catching it imported the private ``prunekit.api`` path before)."""
    import prunekit
    import prunekit.api
    assert prunekit.LostRank is prunekit.api.LostRank and "LostRank" in prunekit.__all__
    assert issubclass(prunekit.LostRank, prunekit.PrunekitError)


# rank 0 writes the report (sleeps in it) once the run is done; rank 1, done too, dies on its way out (DIE=1)
# or waits for rank 0 in the last barrier
_RANK_1_LOST_WHILE_RANK_0_REPORTS = """
import os, sys, time
import prunekit.distributed as distributed
from prunekit import report
from prunekit.cli import main
write = report.write_run_report
def slow_report(path, *args, **kwargs):
    open(os.environ["MARK"], "w").write(str(os.getpid()))
    time.sleep(600)
def dies_on_its_way_out():
    time.sleep(1)
    os._exit(9)
if os.environ["RANK"] == "0":
    report.write_run_report = slow_report
elif os.environ["DIE"] == "1":
    distributed.barrier_if_alive = dies_on_its_way_out
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("die", [True, False], ids=["rank-1-dies", "launcher-sigterm"])
def test_a_rank_lost_after_the_run_finished_says_so_not_resume(tmp_path, die):
    """rank 1 dies once the run is done, while rank 0 writes the report: rank 0 (SIGTERMed by torchrun) said
    "resume with `torchrun ... --resume DIR`" for a finished run. Now: the run had finished, where its result
    is, no resume needed (report.md not written: the resume writes it); metrics.json stays "done".
    A ``kill -TERM`` of the launcher meanwhile (rank 1, done, waits for rank 0 in the last barrier) is a
    SIGTERM stop, not a lost rank 1: that barrier ran after ``caught`` had put SIGTERM back at its default,
    so rank 1 died of it saying nothing and rank 0 named it lost ("rank 1 was lost: it stopped on its own")."""
    from test_distributed_cli import PRUNE
    out, mark, script = tmp_path / "run", tmp_path / "rank-0-reports", tmp_path / "reporting.py"
    script.write_text(_RANK_1_LOST_WHILE_RANK_0_REPORTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src"),
           "MARK": str(mark), "DIE": "1" if die else "0"}
    args = [a for a in PRUNE if a != "--json"] + ["--no-stage-eval"]
    args[args.index("--stages") + 1] = "1"              # one stage: the run is done in seconds
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
                                 *args, "--out", str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _rank_0_pid(launcher, mark)
        if not die:
            time.sleep(3)                       # rank 1 waits for rank 0 in the last barrier
            launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    lines = [line for line in err.splitlines() if line.startswith("prunekit:")]
    finished = (f"the run had finished: its result is in {out} (no resume needed; report.md was not "
                f"written: `torchrun ... -m prunekit prune --resume {out}` writes it)")
    last = (out / "run.log").read_text().splitlines()[-1]
    if die:
        assert len(lines) == 1 and lines[0].startswith("prunekit: error: rank 0: a rank stopped or could not be "
                                                       "reached (rank 1 was lost"), err[-3000:]
        assert lines[0].endswith(finished), lines[0]
    else:
        assert lines == [f"prunekit: interrupted (SIGTERM); {finished}"], err[-3000:]
        assert last.endswith("interrupted (SIGTERM), after the run finished (its result stands)"), last
    assert json.loads((out / "metrics.json").read_text())["status"] == "done"
    assert last.endswith("after the run finished (its result stands)"), last


# a script with no SIGTERM handler: rank 0 computes (sleeps, in no collective) once stage 1 is saved; rank 1
# dies on its own a moment later (os._exit: a crash, the OOM killer); rank 0 prints what it was told
_SCRIPT_RANK_0_COMPUTING = """
import os, sys, time, datetime
sys.path.insert(0, {tests!r})
import torch.distributed as dist
import prunekit
from prunekit.runs import RunCheckpointer
from test_distributed_float16 import _tinier_classifier
save = RunCheckpointer.save
def save_then_compute(self, state, model):
    save(self, state, model)
    if dist.get_rank() == 0:
        open({mark!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    else:
        time.sleep(1)
        os._exit(9)
RunCheckpointer.save = save_then_compute
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
model, x, y = _tinier_classifier()
try:
    prunekit.prune(model, (x, y), method="chita++", sparsity=0.5, stages=2, fisher_samples=48,
                   fisher_kind="empirical", recalibrate_bn=False, batch_size=64, stage_eval=False, out={out!r})
except prunekit.LostRank as err:
    print("LostRank:", err, flush=True)
    os._exit(3)
os._exit(0)
"""


def test_a_script_without_a_sigterm_handler_is_told_of_a_rank_lost_while_rank_0_computes(tmp_path):
    """torchrun SIGTERMs the ranks left once rank 1 died; a script with no SIGTERM handler of its own was
    killed by it (exit -15, torchrun's page, no prunekit line, run.log silent, the run left "running"). Now
    ``prunekit.prune`` takes SIGTERM for the call alone: it raises ``LostRank`` naming rank 1, and run.log
    says so."""
    out, mark, script = tmp_path / "run", tmp_path / "rank-0-computes", tmp_path / "script.py"
    script.write_text(_SCRIPT_RANK_0_COMPUTING.format(tests=str(ROOT / "tests"), out=str(out), mark=str(mark)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        said, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    lines = [line for line in said.splitlines() if line.startswith("LostRank:")]
    assert len(lines) == 1 and lines[0].startswith("LostRank: rank 0: a rank stopped or could not be reached "
                                                   "(rank 1 was lost: it stopped on its own"), (said, err[-3000:])
    assert lines[0].endswith(f"prunekit.prune(..., out={str(out)!r}) carries on from the last completed stage")
    assert re.search(r"rank\s*:\s*0 .*\n.*\n?\s*exitcode\s*:\s*3\b", err), err[-3000:]
    stops = [line for line in (out / "run.log").read_text().splitlines() if "interrupted" in line]
    assert len(stops) == 1 and "interrupted: a rank stopped or could not be reached (rank 1 was lost" in stops[0], stops
    assert json.loads((out / "metrics.json").read_text())["status"] == "interrupted"


# a script with no SIGTERM handler: rank 0 writes the report (sleeps in it) once the run is done; each rank
# prints what its call ended with
_SCRIPT_RANK_0_REPORTING = """
import os, sys, time, datetime
sys.path.insert(0, {tests!r})
import torch.distributed as dist
import prunekit
from prunekit import api
from test_distributed_float16 import _tinier_classifier
def slow_report(folder):
    open({mark!r}, "w").write(str(os.getpid()))
    time.sleep(600)
api._write_report = slow_report
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
model, x, y = _tinier_classifier()
try:
    prunekit.prune(model, (x, y), method="chita", sparsity=0.5, fisher_samples=48, fisher_kind="empirical",
                   recalibrate_bn=False, batch_size=64, stage_eval=False, out={out!r})
except BaseException as err:
    print(f"rank {{dist.get_rank()}}:", type(err).__name__, flush=True)
    raise
print(f"rank {{dist.get_rank()}}: returned", flush=True)
time.sleep(600)         # the script's own work after the call
"""


def test_a_launcher_sigterm_while_rank_0_reports_stops_a_script_it_does_not_lose_rank_1(tmp_path):
    """``kill -TERM`` of the launcher while rank 0's ``prunekit.prune`` still wrote the report: rank 1's call
    had returned (SIGTERM back at its default), so rank 1 died of it saying nothing and rank 0 raised
    ``LostRank`` ("rank 1 was lost: it stopped on its own"). Now no rank leaves the call before the others:
    each ends by SIGTERM as a stop, run.log says it came after the run finished, no ``LostRank``."""
    out, mark, script = tmp_path / "run", tmp_path / "rank-0-reports", tmp_path / "script.py"
    script.write_text(_SCRIPT_RANK_0_REPORTING.format(tests=str(ROOT / "tests"), out=str(out), mark=str(mark)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        _rank_0_pid(launcher, mark)
        time.sleep(3)                           # rank 1's work is done
        launcher.send_signal(signal.SIGTERM)
        said, err = launcher.communicate(timeout=90)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    # a stop ends each rank by SIGTERM inside its call (``resend_sigterm``): neither returns nor raises to the script
    assert said.strip() == "", (said, err[-3000:])
    assert (out / "run.log").read_text().splitlines()[-1].endswith(
        "interrupted (SIGTERM), after the run finished (its result stands)")
    assert json.loads((out / "metrics.json").read_text())["status"] == "done"
