"""The command line's check of OMP_NUM_THREADS, made before torch is imported.

libgomp reads OMP_NUM_THREADS once, as torch loads it, and answers a value it cannot use (0, -3,
"abc", an empty string) with a blank line and "libgomp: Invalid value for environment variable
OMP_NUM_THREADS" on stderr, then runs on with its own default. After that import nothing can take
the lines back, so ``prunekit/__init__.py`` runs this first when prunekit is the program
(``python -m prunekit``, the ``prunekit`` script). Imports nothing of torch.
"""

from __future__ import annotations

import os
import re
import sys

# what libgomp accepts: a number of threads >= 1, or a comma-separated list (one per nesting level)
_VALID = re.compile(r"\s*\d+\s*(,\s*\d+\s*)*")


def omp_threads_problem(value: str | None) -> str | None:
    """Why ``value`` of OMP_NUM_THREADS is refused, or None (unset or usable)."""
    if value is None:
        return None
    if _VALID.fullmatch(value) and all(int(part) >= 1 for part in value.split(",")):
        return None
    return (f"OMP_NUM_THREADS must be a whole number of threads >= 1, got {value!r}: "
            "unset it or set e.g. 1")


def run_as_program() -> bool:
    """prunekit is the program being run, not a library imported by another one."""
    argv = getattr(sys, "argv", None) or [""]
    return argv[0] == "-m" or os.path.basename(argv[0]) in ("prunekit", "prunekit.exe")


def refuse_bad_omp_threads() -> None:
    problem = omp_threads_problem(os.environ.get("OMP_NUM_THREADS"))
    if problem:
        print(f"prunekit: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
