"""A user's script under torchrun (2 gloo ranks) that calls ``prunekit.prune`` and returns: a group
prunekit joined (``prunekit.distributed.init_from_env()``) is left by prunekit at interpreter exit,
a barrier then destroyed; a group the script joined itself is left to the script. Before, the group
``init_from_env`` made was left to the interpreter's teardown, where gloo aborts now and then
("terminate called without an active exception", exit -6: 10 of 20 runs of a plain gloo script)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_spawn import free_port

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = """
import atexit, os, sys
import torch
import torch.distributed as dist
from torch import nn
import prunekit
# registered before prunekit's own handler, so it runs after it (last in, first out)
atexit.register(lambda: print("at exit the group is", "joined" if dist.is_initialized() else "left", flush=True))
torch.set_num_threads(1)
if os.environ["JOIN"] == "script":
    dist.init_process_group("gloo")
else:
    prunekit.distributed.init_from_env()
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
data = (torch.randn(64, 8), torch.randint(0, 3, (64,)))
result = prunekit.prune(net, data, method="chita", sparsity=0.5, fisher_samples=16, batch_size=16, stage_eval=False)
print("after prune the group is", "joined" if dist.is_initialized() else "left", flush=True)
if os.environ["JOIN"] == "script":          # the script's own group: the script leaves it
    dist.barrier()
    dist.destroy_process_group()
"""


def _two_ranks(join: str) -> list[tuple[int, str, str]]:
    port, ranks = free_port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "JOIN": join,
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PRUNEKIT_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src")}
        env.pop("PRUNEKIT_DIST_BACKEND", None)
        ranks.append(subprocess.Popen([sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for process in ranks:
        try:
            out, err = process.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            raise
        results.append((process.returncode, out, err))
    return results


@pytest.mark.parametrize("join", ["prunekit", "script"])
def test_a_script_that_returns_after_prune_leaves_the_group_it_joined(join):
    for code, out, err in _two_ranks(join):
        assert code == 0, err[-2000:]
        assert "after prune the group is joined" in out, out        # prune never leaves a group
        assert "at exit the group is left" in out, out
