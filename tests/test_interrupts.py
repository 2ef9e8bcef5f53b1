"""``interrupts.caught``: which signal names a stop when several come at once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# SIGINT then SIGTERM sent to the process back to back by another process (``kill``, as torchrun's
# Ctrl-C reaches a rank: SIGINT, and SIGTERM within a millisecond): the first handler's
# KeyboardInterrupt is being handled when the second runs (here in the ``except``, or as ``caught``
# puts the handlers back). Prints how the stop is named (``stopped_by``), whether it counts as a
# SIGTERM (``terminated``) and whether a KeyboardInterrupt came. argv: first signal, second, pause (s).
_BOTH_SIGNALS = """
import os, subprocess, sys, time
from prunekit import interrupts
raised = 0
try:
    with interrupts.caught():
        try:
            subprocess.Popen(["sh", "-c", f"kill -{sys.argv[1]} {os.getpid()}; sleep {sys.argv[3]}; kill -{sys.argv[2]} {os.getpid()}"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.001)
        except KeyboardInterrupt:
            raised += 1
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:      # the second signal's handler runs here, or as caught ends
                time.sleep(0.001)
except KeyboardInterrupt:
    raised += 1
print(interrupts.stopped_by(), interrupts.terminated(), raised > 0)
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
@pytest.mark.parametrize("first,second,pause,said", [("INT", "TERM", "0", "('Ctrl-C', 130) False True"),
                                                     ("TERM", "INT", "0.2", "('SIGTERM', 143) True True")])
def test_the_first_of_two_signals_names_the_stop(world_size, first, second, pause, said):
    """Ctrl-C to torchrun's process group: each rank got SIGINT, then SIGTERM within a millisecond
    (torchrun closing its ranks again as a second SIGINT reached it), and the stop was named by the
    last signal: "prunekit: interrupted (SIGTERM)" and run.log "interrupted (SIGTERM)" instead of the
    README's Ctrl-C wording. The first signal names it; the second still raises (a stop either way).
    WORLD_SIZE=2: as a torchrun rank (``_sigterm_told``'s wakeup-fd thread active). SIGTERM first: 0.2 s
    before the SIGINT (two signals pending at once are run in signal-number order, SIGINT's first)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WORLD_SIZE": world_size, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _BOTH_SIGNALS, first, second, pause], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == said, (done.stdout, done.stderr[-2000:])
