"""Ctrl-C that is never lost.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread is; raised inside a
callback that the interpreter runs for itself (a weakref's or ``__del__``'s: a DataLoader's
``WeakSet`` cleanup, session 44), it is printed as "Exception ignored" and the run goes on. While
:func:`caught` is active, a SIGINT is also remembered, and :func:`check` raises it again at the
next safe point (between a sweep's runs, after a stage's checkpoint), so the run stops there.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_pending = False


def _on_sigint(signum, frame):
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def caught():
    """Within the block (on the main thread), SIGINT raises KeyboardInterrupt and is remembered."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending = False
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending = False


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT came while :func:`caught` was active (a no-op
    otherwise: it is raised once, then forgotten)."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt
