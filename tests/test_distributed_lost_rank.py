"""A rank lost under torchrun, as the ranks left are told: ``prunekit.prune`` in a script raises the command
line's one line as a ``PrunekitError``, not torch's raw gloo error."""

import os
import subprocess
import sys
from pathlib import Path

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
