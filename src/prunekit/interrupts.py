"""Ctrl-C (and SIGTERM) that is never lost.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread is; raised inside a
callback that the interpreter runs for itself (a weakref's or ``__del__``'s: a DataLoader's
``WeakSet`` cleanup, session 44), it is printed as "Exception ignored" and the run goes on. While
:func:`caught` is active, a SIGINT is also remembered, and :func:`check` raises it again at the
next safe point (between a sweep's runs, after a stage's checkpoint), so the run stops there.
Under a launcher of several processes (WORLD_SIZE above 1: torchrun) :func:`caught` also starts a
thread that sees a SIGTERM the moment it comes, even while the main thread waits in a collective
(``_sigterm_told``), and calls the ``on_sigterm`` callbacks; the program's own signal wakeup fd
(asyncio's) still gets every signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

_pending = False
_received = signal.SIGINT          # the signal that stopped the run: the first one while ``caught`` was active
_signalled = False                 # a signal came while ``caught`` was active (``_received`` is its)
_reason: tuple[str, int] | None = None   # a stop prunekit asked for itself (``stop``): its name, exit code
_taken = False                     # that stop is being handled already: its SIGINT raises nothing more
_runs = 0                          # prunekit work under way on the main thread (``caught``, ``running``)
_on_sigterm: list = []             # called from a thread of their own the moment a SIGTERM comes (``on_sigterm``)
_sigint_here = False               # a SIGINT of its own (not ``stop``'s) reached this process while ``caught`` was active


def on_sigterm(callback) -> None:
    """Call ``callback()`` (no arguments, quick, never raising) from a thread of its own the moment a
    SIGTERM reaches this process while :func:`caught` is active under a launcher of several processes
    (WORLD_SIZE above 1; with one process nothing calls it), whatever the main thread is doing:
    Python runs a signal handler only when the main thread is back in the interpreter, so a rank
    waiting inside a collective (C++) said nothing of its SIGTERM until that collective ended. Under
    torchrun ``distributed.say_stopped`` is registered (once), so a peer that gets its own SIGTERM
    meanwhile tells a stopped launcher (every rank got one) from a rank lost on its own."""
    if callback not in _on_sigterm:
        _on_sigterm.append(callback)


@contextlib.contextmanager
def _sigterm_told():
    """While active (main thread), a thread reads the signals Python's C-level handler writes to a
    wakeup socket (``signal.set_wakeup_fd``: written at once, even while the main thread waits in C++)
    and calls the ``on_sigterm`` callbacks (those registered by then) at a SIGTERM. Every byte read is
    passed on to the wakeup fd the program had set before (asyncio's, for ``add_signal_handler``), so
    its signals still reach it. Only under a
    launcher of several processes (WORLD_SIZE above 1: torchrun), where the CLI joins the group, and
    registers ``say_stopped``, inside this block."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        reader.close()
        writer.close()
        yield
        return

    def read() -> None:
        while True:
            try:
                got = reader.recv(64)
            except OSError:
                return
            if not got:
                return
            if previous >= 0:                   # the program's own wakeup fd (asyncio's): every byte, as it would have had it
                with contextlib.suppress(OSError):
                    os.write(previous, got)
            if signal.SIGINT in got and _reason is None:     # (``stop`` names its reason before its SIGINT)
                _note_sigint()
            if signal.SIGTERM in got:
                for callback in list(_on_sigterm):
                    try:
                        callback()
                    except Exception:      # noqa: BLE001 - a store gone: nothing to tell
                        pass

    thread = threading.Thread(target=read, name="prunekit-sigterm", daemon=True)
    thread.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        with contextlib.suppress(OSError):
            writer.shutdown(socket.SHUT_RDWR)
        writer.close()
        thread.join(timeout=1.0)
        reader.close()


def _on_signal(signum, frame):
    """SIGINT or SIGTERM while ``caught`` is active: remembered and raised as KeyboardInterrupt. The
    first signal names the stop (``stopped_by``): a Ctrl-C under torchrun reaches each rank as SIGINT
    and, a millisecond later, SIGTERM (the launcher closing its ranks again as a second SIGINT reaches
    it), and Python runs the second handler while the first KeyboardInterrupt is handled; it
    still raises, but the stop stays a Ctrl-C, as README says (it was logged "interrupted (SIGTERM)")."""
    global _pending, _received, _taken, _signalled
    if _reason is not None:           # ``stop``'s SIGINT: one KeyboardInterrupt, never one inside its handling
        if _taken:
            return
        _taken = True
    if not _signalled:
        _received, _signalled = signum, True
    if signum == signal.SIGINT and _reason is None:
        _note_sigint()
    _pending = True
    raise KeyboardInterrupt


def _forget_signals() -> None:
    """Forget any signal taken before: no stop pending, none received (``terminated`` False), no
    ``stop`` reason, no SIGINT of its own; as ``caught`` and ``sigterm_in_call`` begin their block."""
    global _pending, _received, _reason, _taken, _signalled, _sigint_here
    _pending, _received, _reason, _taken, _signalled = False, signal.SIGINT, None, False, False
    _sigint_here = False


def _note_sigint() -> None:
    global _sigint_here
    _sigint_here = True


def sigint_here() -> bool:
    """Whether this process was itself sent SIGINT while :func:`caught` was active (a Ctrl-C, which
    under torchrun reaches every rank on the machine: the launcher's process group, and the launcher
    passing its own on), not :func:`stop`'s. Known the moment it comes, also while the main thread
    waits in a collective (``_sigterm_told``'s thread reads it from the wakeup fd) and before its
    KeyboardInterrupt is raised: a collective that fails then failed because a peer obeyed the same
    Ctrl-C, not because a rank was lost."""
    return _sigint_here and _reason is None


@contextlib.contextmanager
def caught():
    """Within the block (on the main thread), SIGINT and SIGTERM (``kill``, ``timeout``, a batch
    scheduler's stop, a ``kill -TERM`` of the torchrun launcher, which sends SIGTERM to every rank)
    raise KeyboardInterrupt and are remembered, so both stop a run the same way: its log says so and
    the resume command is printed (under torchrun by rank 0). A rank inside a collective takes it
    when the collective returns: at once where a peer has left (its connection closes), else at
    the group's timeout or torchrun's SIGKILL 30 s after its SIGTERM; a rank ending on its own
    (a refusal, a lost rank) ignores SIGTERM from then on (``cli._ending_on_our_own``)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _forget_signals()
    previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with running(), _sigterm_told():
            yield
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is _on_signal:      # (not one the block put in place: cli.main's end)
                signal.signal(signum, handler)
        _pending = False


@contextlib.contextmanager
def sigterm_in_call():
    """Within the block (a ``prunekit.prune`` call in a script under torchrun, main thread), a SIGTERM
    raises KeyboardInterrupt and is remembered (``terminated``), as under :func:`caught`, so the call
    can tell a rank lost on its own (torchrun's SIGTERM to the ranks left) from a stop, and write its
    run folder's stop; the caller re-sends the SIGTERM (``resend_sigterm``) where it was a stop. Only
    where the program has no SIGTERM handler of its own (the default: the process dies at once): a
    handler of the program's is left alone. The default is put back when the block ends. Yields
    whether it took SIGTERM."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield False
        return
    _forget_signals()
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        with _sigterm_told():
            yield True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def resend_sigterm() -> None:
    """End this process by SIGTERM's default action (exit status -15, 143 in a shell), as it would
    have ended without :func:`sigterm_in_call`. SIGTERM must be back at its default (the block ended)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
    while True:                       # delivered to some thread; the process ends within moments
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
        time.sleep(0.05)


@contextlib.contextmanager
def running():
    """Within the block prunekit's own work is under way (a command, a ``prunekit.prune`` call): a
    ``stop`` from another thread may interrupt it; outside, the caller's own code runs and is not
    interrupted by prunekit."""
    global _runs
    _runs += 1
    try:
        yield
    finally:
        _runs -= 1


def under_way() -> bool:
    """Whether prunekit's own work is under way (``running``)."""
    return _runs > 0


def stop(reason: str, code: int = 1) -> None:
    """Stop the run as a Ctrl-C does (on the main thread: a KeyboardInterrupt raised here; from
    another: a SIGINT to the main thread, its KeyboardInterrupt at the next bytecode), named ``reason`` and ending
    with exit code ``code`` (``stopped_by``). Used when the torchrun launcher dies
    (``distributed.collective``)."""
    global _reason, _pending, _received, _taken
    _reason = (reason, code)
    if threading.current_thread() is threading.main_thread():      # here and now
        _pending, _received, _taken = True, signal.SIGINT, True
        raise KeyboardInterrupt
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


def taken() -> None:
    """The stop ``stop`` asked for is being handled (the main thread met its cause first, as an
    error): a SIGINT ``stop`` sent meanwhile raises nothing in the middle of that handling."""
    global _taken
    _taken = True


def stopped_by() -> tuple[str, int]:
    """(how the last stop is named, the exit code for it): Ctrl-C 130, SIGTERM 143 (128 + signal);
    a stop asked for by ``stop``: its reason and code."""
    if _reason is not None:
        return _reason
    return ("Ctrl-C", 130) if _received == signal.SIGINT else (signal.Signals(_received).name, 128 + _received)


def terminated() -> bool:
    """Whether the last stop came by SIGTERM (while ``caught`` was active): under torchrun, the
    launcher stopping every rank; a collective that failed after it failed because a peer obeyed."""
    return _reason is None and _received == signal.SIGTERM


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT came while :func:`caught` was active (a no-op
    otherwise: it is raised once, then forgotten)."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt
