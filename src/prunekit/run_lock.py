"""One prunekit process at a time in a run folder: an advisory lock on ``DIR/.prunekit.lock``.

``held(DIR)`` takes ``fcntl.flock`` on that file without waiting, writes this process's pid and
host name into it, and holds it until the block ends, then removes the file. A second process
refuses the folder in one line (``PrunekitError``) naming the holder's pid. A killed holder's lock
is released by the operating system, so its leftover file never stops a resume. Without ``fcntl``
(Windows) no lock is taken. Under torchrun the commands and ``prunekit.prune(out=)`` take
``held_by_rank_0``: rank 0 holds it for all.

``in_use(DIR)`` tells a reader (``compare``, a run's report) whether a live process holds the lock,
so that a metrics.json left "running" by a kill is told from a run still at work. It only probes:
a shared lock tried without waiting and let go at once, on the file opened read-only (it never
makes one); ``held`` waits out such a probe rather than refusing the folder. On a shared file
system whose locks are not seen from every machine (NFS mounted ``nolock`` or ``local_lock``), a
lock file another machine wrote that nobody holds here is "cannot tell" (None), never "free".
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .errors import PrunekitError, refusal_of

try:
    import fcntl
except ImportError:          # Windows: no flock; runs are not guarded there
    fcntl = None

LOCK_NAME = ".prunekit.lock"


@contextmanager
def held(folder: str | Path, flag: str = "--out") -> Iterator[None]:
    """Hold ``folder``'s lock for the block (creating ``folder`` if needed); ``flag``: the option
    that named the folder, for the refusal (``--out`` on the command line, ``--resume`` for
    ``prune --resume DIR``, ``out=`` in Python)."""
    if fcntl is None:
        yield
        return
    folder = Path(folder)
    path = folder / LOCK_NAME
    made = _missing(folder)        # the folders this process makes: removed again if left empty
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, folder, flag)
    except OSError as err:
        _remove_empty(made)
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise PrunekitError(_unwritable(folder, flag, err.errno == errno.EROFS)) from None
    except BaseException:
        _remove_empty(made)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)      # while still held: a waiting process re-checks the file
        _remove_empty(made)               # a run refused before writing anything leaves no folder behind
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _missing(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for one in (folder, *folder.parents):
        if one.exists() or one.is_symlink():
            break
        missing.append(one)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; stop at the first that is not."""
    for one in folders:
        try:
            one.rmdir()
        except OSError:           # not empty (the run wrote in it), or already gone: kept
            return


@contextmanager
def held_by_rank_0(folder: str | Path, flag: str = "--out") -> Iterator[None]:
    """``held`` under torchrun: rank 0, the rank that writes, holds the lock; a refusal (an
    ``OSError`` too: a folder rank 0 cannot make) is told to every rank (a collective: every rank
    must enter), so all of them stop with its one line rather than the others waiting for rank 0
    until the timeout. One process: ``held``."""
    from .distributed import current        # prunekit.distributed imports the solvers: imported when used
    collective = current()
    if not collective.distributed:
        with held(folder, flag):
            yield
        return
    with ExitStack() as lock:
        refusal = None
        if collective.rank == 0:
            try:
                lock.enter_context(held(folder, flag))
            except PrunekitError as err:
                refusal = str(err)
            except OSError as err:          # DIR cannot be made or written: every rank says so
                refusal = str(refusal_of(err))
        refusal = collective.broadcast_object(refusal)
        if refusal is not None:
            raise PrunekitError(refusal)
        yield


def _unwritable(folder: Path, flag: str, read_only_system: bool) -> str:
    """The refusal of a run folder this process may not write (or make: its parent's then)."""
    there = next(p for p in (folder, *folder.parents) if p.exists())
    what = f"{folder} is not writable" if there == folder else f"cannot make {folder}: {there} is not writable"
    other = "copy the run folder somewhere writable and --resume it there" if flag == "--resume" \
        else f"choose another {flag}"
    if read_only_system:
        return f"{what} (a read-only file system): {other}"
    return f"{what} (permission denied): make it writable (chmod u+w {there}) or {other}"


def _acquire(path: Path, folder: Path, flag: str) -> int:
    """An open descriptor of ``path`` holding its flock; refuses when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_past_probes(fd)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise PrunekitError(f"{folder} is in use by another prunekit process"
                                + (f" (pid {pid})" if pid else "") + f": {_wait(flag)}") from None
        except BaseException:
            os.close(fd)
            raise
        try:                                # the holder before may have removed the file meanwhile
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _wait(flag: str) -> str:
    """The way out of a folder held by another process, for the option that named it: another folder,
    or for ``--resume`` (that run's folder: most likely the same run, carried on by the other) waiting."""
    if flag == "--resume":
        return "wait for it to finish, then --resume again gives back its result (or carries on where it stopped)"
    return f"wait for it to finish or choose another {flag}"


def _lock_past_probes(fd: int, wait: float = 2.0) -> None:
    """``flock(fd, LOCK_EX)`` without waiting for a holder (``BlockingIOError`` when there is one);
    a reader's ``in_use`` probe (a shared lock held for an instant) is waited out for up to
    ``wait`` seconds instead of being taken for a holder."""
    until = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)    # refused too: a holder (BlockingIOError)
            fcntl.flock(fd, fcntl.LOCK_UN)                    # granted: only readers probing
            if time.monotonic() > until:
                raise
            time.sleep(0.005)


def in_use(folder: str | Path) -> bool | None:
    """Whether a live process holds ``folder``'s lock now: True, False, or None when this cannot be
    told (no ``fcntl``, an unreadable lock file, a file system that refuses locks, or a lock file
    written on another machine that nobody holds as seen from here: a file system whose locks
    do not reach every machine would show a live run there as free). Never blocks, takes the lock
    only as a shared probe let go at once, and makes no file."""
    if fcntl is None:
        return None
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:     # a holder keeps its file until it lets go (a killed one leaves it)
        return False
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:           # e.g. ENOLCK: NFS without its lock service
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        host = _holder_host(fd)
        return False if host is None or host == socket.gethostname() else None
    finally:
        os.close(fd)


def _holder_words(fd: int) -> list[str]:
    """The words written in the lock file: [pid, host] (a file of an older prunekit: [pid])."""
    try:
        return os.pread(fd, 512, 0).decode().split()
    except (OSError, UnicodeDecodeError):
        return []


def holder_pid(folder: str | Path) -> int | None:
    """The pid written in ``folder``'s lock file (its holder's, or a killed holder's), None when
    there is no such file or no pid in it."""
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _holder(fd)
    finally:
        os.close(fd)


def _holder(fd: int) -> int | None:
    """The pid written in the lock file, None when there is none (yet)."""
    words = _holder_words(fd)
    return int(words[0]) if words and words[0].isdigit() else None


def _holder_host(fd: int) -> str | None:
    """The host name written in the lock file, None when there is none (yet, or an older file)."""
    words = _holder_words(fd)
    return words[1] if len(words) > 1 else None
