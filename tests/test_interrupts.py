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


def test_one_store_client_shared_by_the_sigterm_thread_and_the_main_thread_keeps_each_answer_its_own():
    """The SIGTERM thread (``say_stopped``) and the main thread (``silent_peers``, ``print_refusal``) use
    the group's one store client at once. torch's TCPStore client serializes each request under a mutex
    (``activeOpLock_``, set/get/check/wait in TCPStore.cpp) and the bindings release the GIL: here two
    threads hammer one client (a PrefixStore over a TCPStore, as the group's store is) for ~1 s, and every
    answer must be the one asked for (a reply read by the wrong thread would show as a wrong value or an
    error)."""
    import threading
    import time
    from datetime import timedelta

    import torch.distributed as dist
    from distributed_spawn import free_port
    server = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=timedelta(seconds=10))
    store = dist.PrefixStore("prunekit/0", server)
    errors, counts = [], [0, 0]
    deadline = time.monotonic() + 1.0

    def hammer(who: int) -> None:
        i = 0
        try:
            while time.monotonic() < deadline:
                key, value = f"{who}/{i % 50}", f"{who}-{i}-" + "x" * (i % 300)
                store.set(key, value)
                assert store.check([key])
                got = store.get(key).decode()
                assert got == value, (who, got[:40], value[:40])
                i += 1
        except BaseException as err:        # noqa: BLE001 - reported by the test
            errors.append(err)
        counts[who] = i

    other = threading.Thread(target=hammer, args=(1,))
    other.start()
    hammer(0)
    other.join(10)
    assert not errors, errors
    assert min(counts) > 50, counts            # both really ran at once, many times each


def test_the_c10d_log_level_is_put_back_when_two_threads_quiet_it_at_once(monkeypatch):
    """``_quiet_c10d`` raises c10's log level while prunekit uses the store, from the main thread and the
    SIGTERM thread alike. Each saved the level it found: thread B, finding the level thread A had just
    raised, put back ERROR after A put back the user's level, and c10d's warnings stayed hidden for the
    rest of the process. The interleaving is forced here by a level whose reads wait on the other thread."""
    import threading

    from prunekit.distributed import collective
    b_checked, a_raised, b_read_again, a_done = (threading.Event() for _ in range(4))

    class Level:
        def __init__(self):
            self._value, self.reads = 0, {"A": 0, "B": 0}

        @property
        def value(self):
            me = threading.current_thread().name
            self.reads[me] += 1
            if me == "A":
                b_checked.wait(0.5)
            elif self.reads[me] == 1:
                b_checked.set()
            else:
                a_raised.wait(0.5)
                value = self._value
                b_read_again.set()
                return value
            return self._value

        @value.setter
        def value(self, level):
            self._value = level
            if threading.current_thread().name == "A" and level == 2:
                a_raised.set()

    level = Level()
    monkeypatch.setattr(collective, "_c10_log_level", lambda: level)
    inside = []

    def a():
        with collective._quiet_c10d():
            b_read_again.wait(0.5)
            inside.append(("A", level._value))
        a_done.set()

    def b():
        with collective._quiet_c10d():
            a_done.wait(2)
            inside.append(("B", level._value))

    threads = [threading.Thread(target=b, name="B"), threading.Thread(target=a, name="A")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sorted(inside) == [("A", 2), ("B", 2)], inside       # quiet inside, for each
    assert level._value == 0                                    # and the user's level back after both
