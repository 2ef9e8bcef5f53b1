"""``prunekit.cli.main`` called in ranks a test spawned once (``distributed_spawn``), case after case,
each call giving what a launched rank gives its test: exit code, stdout, stderr. A launch of the
ranks (each process importing torch and prunekit) cost more than most cases; what is the process's
own (a refusal before joining the group, a rank that leaves it, a signal) still needs a launch."""

from __future__ import annotations

import os
import sys

_WATCH: dict = {"path": None, "wrote": []}


def _audit(event: str, args: tuple) -> None:
    """The audit hook of ``watch_writes``: each write under the watched folder, into ``_WATCH["wrote"]``."""
    watched = _WATCH["path"]
    if watched is None:
        return

    def under(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(watched)
        except (TypeError, ValueError):
            return False
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = args
        if under(path) and ((mode is not None and any(c in mode for c in "wax+")) or (flags or 0) & write):
            _WATCH["wrote"].append(f"WROTE {path}\n")
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        if under(args[0]):
            _WATCH["wrote"].append(f"WROTE {event} {args[0]}\n")


def cli(argv: list, watched=None, env: dict | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``prunekit.cli.main(argv)`` in this rank, as a launched
    rank's test reads them: everything written to file descriptors 1 and 2 (C++'s too), and
    (after ``watch_writes``) a "WROTE ..." line on stderr for each write under ``watched``. ``env``:
    environment variables for this call alone. Both ranks make the same calls in the same order."""
    import tempfile
    from prunekit.cli import main
    from prunekit.distributed import collective
    # keys of the group's store of its own, as a fresh process's (a torchrun restart's are named by
    # its count): an earlier case's refusal or "passed" count in the store is no word of this one's
    _WATCH["calls"] = _WATCH.get("calls", 0) + 1
    env = {**(env or {}), "TORCHELASTIC_RESTART_COUNT": f"case-{_WATCH['calls']}"}
    collective._passed = 0
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    stdout, stderr = sys.stdout, sys.stderr
    caught = [tempfile.TemporaryFile("w+") for _ in range(2)]
    saved = [os.dup(1), os.dup(2)]
    stdout.flush()
    stderr.flush()
    for fd, file in zip((1, 2), caught):
        os.dup2(file.fileno(), fd)
    _WATCH.update(path=None if watched is None else os.path.realpath(watched), wrote=[])
    try:
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as stop:           # argparse's refusals
            code = stop.code
    finally:
        _WATCH["path"] = None
        for stream in (sys.stdout, sys.stderr, stdout, stderr):     # rank 1's main made sys.stdout /dev/null
            stream.flush()
        sys.stdout, sys.stderr = stdout, stderr
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    said = []
    for file in caught:
        file.seek(0)
        said.append(file.read())
        file.close()
    return code, said[0], said[1] + "".join(_WATCH["wrote"])


def watch_writes() -> None:
    """Report each write under the folder a ``cli`` call watches, as ``test_distributed_rank_writes``'s
    launched ranks do (its ``_WATCHED``): opening a file for writing, creating, renaming or removing."""
    sys.addaudithook(_audit)
