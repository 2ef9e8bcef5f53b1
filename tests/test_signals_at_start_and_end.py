"""A Ctrl-C before the command line's work begins (torch and prunekit still importing) is one line
and exit 130; a Ctrl-C or SIGTERM after it has ended (its result printed, the process ending) is
ignored: never a traceback, nor a death by the signal.

A walk sent SIGINT 1-8 s into `python -m prunekit prune ...`: a 15-50 line traceback of the import it
cut short, killed by SIGINT (rc -2). And SIGINT just after `prune --out` printed "saved to": a
traceback from ``interrupts._on_signal`` raised as ``cli.main`` left its ``with`` block (rc -2), or
"Exception ignored in: ... KeyboardInterrupt" from a finalizer; a sweep SIGTERMed after printing its
report's path died by it (rc -15, no line). Each child here is the command line
as the ``prunekit`` script runs it (``sys.argv[0]`` is the script: ``startup.is_the_program``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

# the SIGINT sent the moment prunekit's package imports its first heavy module (torch comes with it)
DURING_IMPORT = """
import os, signal, sys
sys.argv = ["/usr/bin/prunekit", "info", "mlpnet"]

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "prunekit.methods":
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
from prunekit.cli import main
sys.exit(main())
"""

# the signal sent as cli.main leaves its block (``leaving``) or once it has returned (``after``)
AT_THE_END = """
import contextlib, os, signal, sys, time
sys.argv = ["/usr/bin/prunekit", "info", "mlpnet"]
from prunekit import cli

@contextlib.contextmanager
def leaving():
    yield
    os.kill(os.getpid(), signal.{sig})
    time.sleep(0.2)

if "{when}" == "leaving":
    cli.printable_paths = leaving
code = cli.main()
if "{when}" == "after":
    os.kill(os.getpid(), signal.{sig})
    time.sleep(0.2)
sys.exit(code)
"""


def _child(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_a_ctrl_c_while_prunekit_imports_is_one_line_and_exit_130():
    done = _child(DURING_IMPORT)
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])
    assert done.stderr.strip() == "prunekit: interrupted while starting; nothing was run", done.stderr[-2000:]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["leaving", "after"])
def test_a_ctrl_c_or_sigterm_once_the_command_has_ended_is_ignored(when, sig):
    """SIGTERM too: a sweep SIGTERMed once it had printed its report's path died by it (-15, no word)."""
    done = _child(AT_THE_END.replace("{when}", when).replace("{sig}", sig))
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr[-2000:]
    assert "mlpnet" in done.stdout


def test_prunekit_imported_by_another_program_leaves_its_ctrl_c_alone():
    """Another program (``python -m theirs``, a script) importing prunekit keeps Python's handler."""
    done = _child("import signal, prunekit; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]


@pytest.mark.parametrize("command, ours", [("-m prunekit prune", True), ("-u -m prunekit", True),
                                           ("-X importtime -m prunekit", True), ("-mprunekit", True),
                                           ("-m pytest -m prunekit", False), ("-c pass -m prunekit", False),
                                           ("theirs.py -m prunekit", False), ("-m theirs", False)])
def test_the_program_is_told_by_the_interpreter_s_own_options(monkeypatch, command, ours):
    """Only the module the interpreter runs counts (``python -m pytest -m prunekit`` is pytest)."""
    from prunekit import startup
    monkeypatch.setattr(sys, "orig_argv", ["python", *command.split()])
    monkeypatch.setattr(sys, "argv", ["-c" if "-c" in command else "x"])
    assert startup.is_the_program() is ours
