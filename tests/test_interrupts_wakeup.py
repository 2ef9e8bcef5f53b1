"""``interrupts.caught`` under a launcher of several processes takes over the signal wakeup fd (to see a
SIGTERM while the main thread waits in C++): a program's own wakeup fd (asyncio's, behind
``loop.add_signal_handler``) must still get every signal's byte."""

import asyncio
import os
import signal
import threading
import time

from prunekit import interrupts


def test_asyncio_signal_handlers_still_run_while_caught_under_several_ranks(monkeypatch):
    """A SIGUSR1 sent while the command runs under WORLD_SIZE=2: the SIGTERM thread read it from the wakeup
    socket and dropped it, and asyncio's handler never ran."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    got = []

    async def run():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, lambda: got.append("usr1"))
        try:
            with interrupts.caught():
                os.kill(os.getpid(), signal.SIGUSR1)
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline and not any(t.name == "prunekit-sigterm" for t in threading.enumerate()):
                    time.sleep(0.01)
                time.sleep(0.3)               # the thread reads the byte (and passes it on) before the block ends
            for _ in range(20):               # back in the loop: asyncio reads its wakeup fd and runs the handler
                await asyncio.sleep(0.05)
                if got:
                    break
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)

    asyncio.run(run())
    assert got == ["usr1"]


def test_a_sigterm_still_calls_the_callbacks_when_bytes_are_passed_on(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    told = threading.Event()
    interrupts.on_sigterm(told.set)
    try:
        with interrupts.caught():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                deadline = time.monotonic() + 2
                while not told.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
            except KeyboardInterrupt:
                pass
            assert told.wait(2)
    except KeyboardInterrupt:
        pass
    finally:
        interrupts._on_sigterm.remove(told.set)
    assert told.is_set()
