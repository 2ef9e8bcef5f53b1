"""Ctrl-C while the command line is still starting: importing torch and prunekit takes 1-8 s before
``cli.main`` runs, and Python's own handler printed a 15-50 line traceback of whatever import it
cut short and ended the process by SIGINT. ``prunekit/__init__.py`` calls :func:`quiet_until_started`
first when prunekit is the program: a Ctrl-C until ``cli.main`` begins (:func:`started`) prints one
line and exits 130, as a Ctrl-C later does; nothing has been read or written yet. From then on the
handler acts as Python's own (``cli.main`` puts ``interrupts.caught``'s in place at once). Imports
nothing of torch.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

INTERRUPTED = "prunekit: interrupted while starting; nothing was run"

_started = False


def is_the_program() -> bool:
    """Whether this process runs prunekit's command line: ``python -m prunekit`` (torchrun's ranks
    included: ``python -u -m prunekit``) or the ``prunekit`` script, not another program importing
    prunekit (``python -m theirs``, whose package imports prunekit, is not)."""
    argv = list(getattr(sys, "orig_argv", None) or [])[1:]
    while argv:                 # the interpreter's own options, up to the module, command or script
        option = argv.pop(0)
        if option == "-m":
            return argv[:1] == ["prunekit"]
        if option.startswith("-m"):
            return option == "-mprunekit"
        if option in ("-X", "-W"):          # each takes a value (``-X importtime``)
            argv = argv[1:]
        elif option == "-c" or not option.startswith("-"):
            break
    program = (getattr(sys, "argv", None) or [""])[0]
    return os.path.basename(program) in ("prunekit", "prunekit.exe")


def _on_sigint(signum, frame):
    if _started:        # cli.main has begun (its own handler is in place while it runs): Python's
        return signal.default_int_handler(signum, frame)
    os.write(2, f"{INTERRUPTED}\n".encode())
    os._exit(128 + signal.SIGINT)       # no atexit of half-imported modules; nothing to flush or release


def quiet_until_started() -> None:
    """Take SIGINT until :func:`started` (only over Python's own handler: an embedding's stays)."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def started() -> None:
    """``cli.main`` has begun: a Ctrl-C is its to handle from here on."""
    global _started
    _started = True
