"""``torch.distributed`` behind the solvers' :class:`~prunekit.solvers.collective.Collective`.

``torchrun`` starts the processes and sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
:func:`init_from_env` joins the group (gloo for CPU tensors, NCCL for CUDA tensors) with a
timeout, so a rank that dies ends the others' collectives with an error instead of a hang.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import socket
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import interrupts
from ..errors import PrunekitError, say
from ..options import OptionError
from ..solvers.collective import Collective

DEFAULT_TIMEOUT_S = 300.0


class TorchCollective(Collective):
    """The default process group as a Collective; counts the bytes it sends. Before each collective
    it says so in the store (``passed_checks``): a rank refused on its own meanwhile stops waiting for
    this one at once (one small store write per collective, beside a collective's own round trips)."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        passed_checks()
        tensor = tensor.contiguous()
        self._count(tensor.numel() * tensor.element_size())
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        passed_checks()
        tensor = tensor.contiguous()
        self._count(tensor.numel() * tensor.element_size())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        passed_checks()
        tensor = tensor.contiguous()
        lengths = torch.zeros(self.size, dtype=torch.int64, device=tensor.device)
        lengths[self.rank] = tensor.numel()
        dist.all_reduce(lengths)
        longest = int(lengths.max())
        padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
        padded[:tensor.numel()] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self._count(padded.numel() * padded.element_size() + lengths.numel() * 8)
        dist.all_gather(parts, padded)
        return torch.cat([part[:int(length)] for part, length in zip(parts, lengths.tolist())])

    def broadcast_object(self, obj):
        passed_checks()
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        passed_checks()
        dist.barrier()

    def _count(self, nbytes: int) -> None:
        self.bytes_sent += nbytes
        self.calls += 1


def current() -> Collective:
    """The running process group as a Collective, or the one-process Collective when there is none."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollective()
    return Collective()


def ranks_on_this_machine() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def on_several_machines() -> bool:
    """Whether this torchrun run may span several machines (before joining: from the environment).
    torchrun sets GROUP_WORLD_SIZE (its nodes, one launcher each) and LOCAL_WORLD_SIZE (the ranks
    of this node): one node, or all WORLD_SIZE ranks local, is one machine. Where neither says (a
    launcher of another kind, a value that is no number), it may be several."""
    try:
        groups = os.environ.get("GROUP_WORLD_SIZE", "").strip()
        if groups:
            return int(groups) > 1
        local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
        if local:
            return int(local) < int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        pass
    return True


def launched_by_torchrun() -> bool:
    return _environment_number("WORLD_SIZE", "1", int) > 1


def _environment_number(name: str, default: str, kind=int):
    """Environment variable ``name`` as a number of ``kind`` (a launcher's or the user's setting),
    refused in one line when it is not one."""
    text = os.environ.get(name, default)
    try:
        return kind(text)
    except ValueError:
        fix = "give it in seconds, or unset it" if name.startswith("PRUNEKIT_") else "unset it, or let torchrun set it"
        raise MachineRefusal(f"{name}={text!r} in the environment is not a number: {fix}") from None


def init_from_env(device: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes in the environment (no-op when WORLD_SIZE is 1 or
    unset, or when already joined). Returns whether this process is one of several. A group joined
    here is left at interpreter exit (a barrier, then destroyed), so a script need not leave it.

    The timeout (``PRUNEKIT_DIST_TIMEOUT`` seconds, default 300) bounds every collective, so a
    dead or stuck rank ends the run with an error rather than a hang.
    """
    if not launched_by_torchrun():
        return False
    if dist.is_initialized():
        return True
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise MachineRefusal(f"WORLD_SIZE is set but {', '.join(missing)} is not: start prunekit with torchrun "
                            "(torchrun --nproc_per_node 2 -m prunekit prune ...)")
    rank, world = _environment_number("RANK", "0"), _environment_number("WORLD_SIZE", "1")
    if not 0 <= rank < world:
        raise MachineRefusal(f"RANK={rank} is not one of 0 to {world - 1} (WORLD_SIZE={world}): start prunekit with "
                             "torchrun, which numbers the ranks")
    timeout_s = timeout_s or _environment_number("PRUNEKIT_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S), float)
    if not 0 < timeout_s < float("inf"):
        raise MachineRefusal(f"PRUNEKIT_DIST_TIMEOUT={timeout_s:g} must be a positive number of seconds (default "
                             f"{DEFAULT_TIMEOUT_S:g})")
    cuda = device is not None and str(device).startswith("cuda")
    backend = chosen_backend(cuda)
    check_socket_ifname()             # every group has gloo (``group_backend``)
    if cuda:
        torch.cuda.set_device(rank_gpu(backend))
    dist.init_process_group(group_backend(), timeout=timedelta(seconds=timeout_s))
    atexit.register(_leave_at_exit, dist.GroupMember.WORLD)
    watch_launcher()
    say_process()
    interrupts.on_sigterm(say_stopped)       # said at once, even while this rank waits in a collective
    return True


LAUNCHER_POLL_S = 1.0      # how often a rank looks whether its torchrun launcher is still there
LAUNCHER_GONE = "the torchrun launcher stopped"
_launcher_lost = False
_launcher: int | None = None       # the launcher's pid (this process's parent when it joined), once watched
_lost_lock = threading.Lock()


def _first_to_see_launcher_lost() -> bool:
    """Mark the launcher lost; True for the first caller alone (the watcher or the main thread's
    ``passed_checks``), which stops the run: one KeyboardInterrupt, not a second one in its cleanup."""
    global _launcher_lost
    with _lost_lock:
        first, _launcher_lost = not _launcher_lost, True
    return first


def launcher_lost() -> bool:
    """Whether this rank's torchrun launcher died (``watch_launcher``; looked at now, so a collective
    that failed because a peer stopped for it is told apart from a lost rank before the watcher's
    next look). A launcher still exiting counts (``_launcher_exiting``): its sockets close, so the
    group's store fails, before this rank is handed to a new parent."""
    if _launcher is not None and not _launcher_lost and (os.getppid() != _launcher or _launcher_exiting()):
        _first_to_see_launcher_lost()        # the watcher then stops nothing: the caller handles it
    return _launcher_lost


_PF_EXITING = 0x4          # Linux's task flag "getting shut down" (include/linux/sched.h)


def _launcher_exiting() -> bool:
    """Whether the launcher process is dying or dead, as Linux's /proc tells (gone, a zombie, or
    flagged exiting). A ``kill -9`` of the launcher closes its sockets (the group's store, which it
    hosts) in its exit, before its children are handed to a new parent: until then ``os.getppid()``
    still names it. False where there is no /proc (macOS: the parent pid alone says it)."""
    if _launcher is None or not os.path.exists("/proc/self/stat"):
        return False
    try:
        with open(f"/proc/{_launcher}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()     # after "pid (comm)": state, ppid, ..., flags
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False
    try:
        return fields[0] in ("Z", "X", "x") or bool(int(fields[6]) & _PF_EXITING)
    except (IndexError, ValueError):
        return False


@contextlib.contextmanager
def _quiet_c10d():
    """Hold back c10d's C++ warnings while prunekit itself uses the group's store: a store whose host
    died (the torchrun launcher, killed) makes TCPStore log "[c10d] sendBytes failed" with a page of
    C++ stack (TCPStore.cpp, through c10's LOG(WARNING)) before the error reaches Python, where
    prunekit reports it in one line. c10 reads TORCH_CPP_LOG_LEVEL once, when torch loads; its level
    (FLAGS_caffe2_log_level in libc10) is raised to ERROR here for the call, then put back. Where
    that symbol is not found (another build, another system), nothing changes."""
    level = _c10_log_level()
    if level is None:
        yield
        return
    with _quiet_lock:        # the SIGTERM thread (``say_stopped``) and the main thread may be here at once:
        if _quiet[0] == 0:   # the first in saves the level, the last out puts it back (each saving its own
            _quiet[1] = level.value        # left c10d at ERROR for good when they interleaved)
            if _quiet[1] < 2:
                level.value = 2
        _quiet[0] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet[0] -= 1
            if _quiet[0] == 0 and _quiet[1] < 2:
                level.value = _quiet[1]


_quiet_lock = threading.Lock()
_quiet = [0, 0]            # [threads inside ``_quiet_c10d``, c10's log level before the first of them]


_c10_level = []            # [the ctypes int of c10's log level, or None], once looked up


def _c10_log_level():
    if not _c10_level:
        try:
            import ctypes
            lib = os.path.join(os.path.dirname(torch.__file__), "lib")
            names = [n for n in ("libc10.so", "libc10.dylib") if os.path.exists(os.path.join(lib, n))]
            _c10_level.append(ctypes.c_int.in_dll(ctypes.CDLL(os.path.join(lib, names[0])), "FLAGS_caffe2_log_level")
                              if names else None)
        except (OSError, ValueError, AttributeError):
            _c10_level.append(None)
    return _c10_level[0]


def watch_launcher(poll_s: float = LAUNCHER_POLL_S, until: threading.Event | None = None) -> None:
    """Stop this rank soon after the torchrun launcher that started it dies (its parent process: a
    ``kill -9`` of torchrun, a batch scheduler that kills the launcher alone). The ranks would go on
    as orphans otherwise, holding the run folder's lock, with the group's store (it lives in the
    launcher of node 0) gone under them. A daemon thread polls ``os.getppid()`` every ``poll_s``
    seconds; when it changes, the rank stops as a Ctrl-C stops it (``interrupts.stop``): the run is
    marked interrupted and rank 0 prints how to resume. Each process watches its own launcher, so on
    several machines a dead launcher stops its own ranks, and the others lose them (a lost rank).
    Only under torchrun's launcher (``init_from_env``; it sets TORCHELASTIC_RUN_ID: ranks a script
    or scheduler started by hand may outlive the shell that started them); once per process. With
    ``until`` (``launcher_watched``: a ``prunekit.prune`` call in a group the script joined itself),
    the watch ends, stopping nothing, once that event is set."""
    global _launcher
    if _launcher is not None or not ({"TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"} & set(os.environ)):
        return
    _launcher = launcher = os.getppid()

    def watch() -> None:
        while not _launcher_lost and os.getppid() == launcher:
            if until is None:
                time.sleep(poll_s)
            elif until.wait(poll_s):
                return
        if until is not None and until.is_set():
            return
        # a run under way stops; after it (a user's script going on past prunekit.prune), only the
        # next prunekit collective fails (``passed_checks``): the caller's own code is not interrupted
        if _first_to_see_launcher_lost() and interrupts.under_way():
            interrupts.stop(LAUNCHER_GONE, 1)

    threading.Thread(target=watch, name="prunekit-launcher-watch", daemon=True).start()


@contextlib.contextmanager
def launcher_watched(poll_s: float = LAUNCHER_POLL_S):
    """Within the block (a ``prunekit.prune`` call under torchrun), watch the launcher as
    ``init_from_env`` does for a whole process (``watch_launcher``), where nothing watches it yet: a
    script that joined the group with its own ``torch.distributed.init_process_group``. Without it the
    ranks of such a script ran on as orphans after a ``kill -9`` of torchrun, holding the run folder's
    lock until a collective failed (about 20 s), and said so as a lost rank. The watch ends with the
    block (a launcher lost after it is the script's own business: the next prunekit collective fails on
    it); a launcher lost in it stays lost (``launcher_lost``). A no-op without a group, outside torchrun,
    or where the launcher is watched already."""
    if _launcher is not None or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return
    done = threading.Event()
    watch_launcher(poll_s, until=done)
    watched = _launcher is not None
    try:
        yield
    finally:
        if watched:
            _stop_watching(done)


def _stop_watching(done: threading.Event) -> None:
    """End a watch ``launcher_watched`` started: its thread sees ``done`` at once and stops nothing;
    the next call watches afresh."""
    global _launcher
    done.set()
    _launcher = None


def _leave_at_exit(group) -> None:
    """At interpreter exit, leave the group :func:`init_from_env` made (a user's script that joined
    through it and just returns), unless it was left or replaced already: a barrier, then destroy it.
    A gloo group left to the interpreter's teardown aborts now and then ("terminate called without an
    active exception", exit -6). No barrier after an uncaught exception: the others may be inside
    another collective."""
    if dist.is_available() and dist.is_initialized() and dist.GroupMember.WORLD is group:
        shutdown(wait=not hasattr(sys, "last_value"))


def group_backend() -> str:
    """The backend string every rank joins with. It depends only on this machine (CUDA or not) and
    ``PRUNEKIT_DIST_BACKEND``, never on the ``--device`` a rank read: a rank that could not read its
    recipe joins as the others do, so the refusals exchanged right after joining (``early_refusals``,
    objects on the CPU) go through gloo in seconds instead of waiting ``PRUNEKIT_DIST_TIMEOUT`` for a
    rank that joined with another backend. With CUDA: ``cpu:gloo,cuda:nccl`` (CUDA tensors go through
    NCCL, CPU tensors, objects and barriers through gloo; NCCL connects at its first CUDA
    collective, so a CPU run never uses it); ``PRUNEKIT_DIST_BACKEND=gloo`` or no CUDA: gloo alone."""
    override = os.environ.get("PRUNEKIT_DIST_BACKEND", "").strip().lower()
    if override == "gloo" or not torch.cuda.is_available():
        return "gloo"
    return "cpu:gloo,cuda:nccl"


BACKENDS = ("gloo", "nccl")


class MachineRefusal(PrunekitError):
    """A refusal met before joining the group that every rank on this machine meets (its
    environment, its network interfaces): printed by local rank 0 alone, not once per rank."""


def check_socket_ifname() -> None:
    """Refuse a ``GLOO_SOCKET_IFNAME`` naming no network interface of this machine in one line
    naming those it has (gloo's own error reads as a lost rank, and running again cannot help)."""
    names = [n.strip() for n in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if n.strip()]
    try:
        present = [name for _, name in socket.if_nameindex()]
    except OSError:                          # no interface list on this system: let gloo judge
        return
    missing = [n for n in names if n not in present]
    if missing:
        raise MachineRefusal(f"GLOO_SOCKET_IFNAME={os.environ['GLOO_SOCKET_IFNAME']}: this machine has no network "
                            f"interface {', '.join(missing)} (it has {', '.join(present)}); name one of them, "
                            "or unset GLOO_SOCKET_IFNAME")


def chosen_backend(cuda: bool) -> str:
    """NCCL for a model on CUDA, gloo on the CPU; ``PRUNEKIT_DIST_BACKEND`` (gloo or nccl) overrides:
    gloo also carries CUDA tensors, so it can run several ranks on one GPU (NCCL cannot) or
    stand in where NCCL is broken."""
    backend = os.environ.get("PRUNEKIT_DIST_BACKEND", "").strip().lower() or ("nccl" if cuda else "gloo")
    if backend not in BACKENDS:
        raise MachineRefusal(f"PRUNEKIT_DIST_BACKEND={backend!r} is not a backend prunekit supports; "
                            f"set it to {' or '.join(BACKENDS)}, or unset it")
    if backend == "nccl" and not cuda:
        raise MachineRefusal("PRUNEKIT_DIST_BACKEND=nccl needs the model on a GPU: add --device cuda, "
                            "or unset PRUNEKIT_DIST_BACKEND for gloo on the CPU")
    return backend


def rank_gpu(backend: str) -> int:
    """The GPU index of this rank: LOCAL_RANK. NCCL needs a GPU per rank, so a machine with fewer GPUs
    than ranks is refused; gloo shares them round-robin."""
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank < gpus:
        return local_rank
    if backend == "nccl":
        raise PrunekitError(f"local rank {local_rank} has no GPU of its own (this machine has {gpus}); NCCL needs "
                            f"one per rank: start at most {gpus} per machine (torchrun --nproc_per_node {gpus}), "
                            "or set PRUNEKIT_DIST_BACKEND=gloo to share them")
    return local_rank % max(gpus, 1)


def barrier_if_alive() -> None:
    """A barrier, so that no rank leaves while another still has a collective in flight; a rank
    that has left already (a failed barrier) leaves nothing to wait for."""
    try:
        dist.barrier()
    except RuntimeError:
        pass


def shutdown(wait: bool = True) -> None:
    """Leave the process group. ``wait`` (after a run that succeeded): first a barrier
    (:func:`barrier_if_alive`). After a failure no barrier: the others may be gone or stuck."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            barrier_if_alive()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


REFUSAL_WAIT_S = 10.0      # how long another rank waits for rank 0's refusal (and rank 0 for their replies)
_passed = 0                # how many times this process has called ``passed_checks``


def _keys() -> tuple:
    """The store, and the prefix of this run's keys (a restarted run's keys are its own)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.distributed_c10d._get_default_store(), f"prunekit/{attempt}"


def passed_checks() -> None:
    """Say (in the group's store) that this rank got through the stretch where a rank may be refused
    on its own (its checkpoint, its data): every rank calls it at the same point, before the
    collective that follows (``check_same_start``, and each ``TorchCollective`` collective). A rank
    refused there stops waiting for the others at once (``print_refusal``): a rank that passed this
    point will never post the same refusal."""
    global _passed
    _passed += 1
    if _launcher is not None and os.getppid() != _launcher and _first_to_see_launcher_lost():
        interrupts.stop(LAUNCHER_GONE, 1)   # before the store (it may have lived in the launcher) and its warnings
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not _launcher_lost:
        try:
            store, prefix = _keys()
            with _quiet_c10d():
                store.set(f"{prefix}/passed/{dist.get_rank()}", str(_passed))
        except Exception as err:    # noqa: BLE001 - its host is gone: no collective can end well
            if launcher_lost():      # killed just now: its sockets closed before this rank saw a new parent
                interrupts.stop(LAUNCHER_GONE, 1)
            # under torchrun the store lives in node 0's launcher (TORCHELASTIC_USE_AGENT_STORE), else in
            # rank 0: fail now rather than pay a reconnect before every collective of a run that is over
            host = LAUNCHER_GONE if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "rank 0 stopped"
            raise dist.DistError(f"{host}: the group's store could not be reached ({_first_words(err)})") from None


STOPPED_WAIT_S = 3.0       # how long a rank whose collective failed after a SIGTERM waits for its peers' word


def say_stopped() -> None:
    """Say (in the group's store) that this rank stops because it was sent SIGTERM: under torchrun
    every rank gets one when the launcher is stopped, and the survivors get one when a rank dies on
    its own (``kill -9``, a crash). Posted before this rank leaves, so a peer whose collective then
    fails tells the two apart (``peers_stopped``). No-op without a group or a store that answers."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or _launcher_lost:
        return
    try:
        store, prefix = _keys()
        with _quiet_c10d():
            store.set(f"{prefix}/stopped/{dist.get_rank()}", "1")
    except Exception:        # noqa: BLE001 - no store that answers: nothing to say it in
        pass


def _said(store, prefix: str, whys: tuple[str, ...]):
    """rank -> whether that rank posted one of ``whys`` for itself: "stopped" (a SIGTERM,
    ``say_stopped``), "refused" (``print_refusal``), "reported" (a lost rank it reported, ``say_reported``)."""
    return lambda other: any(store.check([f"{prefix}/{why}/{other}"]) for why in whys)


def _await_words(waiting: set[int], said, wait_s: float, gone=None) -> set[int]:
    """The ranks of ``waiting`` still silent (``said`` false) after at most ``wait_s`` seconds; with
    ``gone`` (rank -> whether its process is known to have ended), the wait ends early once every
    silent rank is gone (a rank posts its word before it ends: silent and gone stays silent)."""
    deadline = time.monotonic() + wait_s
    waiting = {r for r in waiting if not said(r)}
    while waiting and time.monotonic() < deadline:
        if gone is not None and all(gone(r) for r in waiting):
            return {r for r in waiting if not said(r)}      # (said just before it ended)
        time.sleep(0.05)
        waiting = {r for r in waiting if not said(r)}
    return waiting


def peers_stopped(sigterm: bool, wait_s: float = STOPPED_WAIT_S) -> bool | None:
    """After a collective failed because a peer left: whether every other rank left for a SIGTERM
    (``say_stopped``) or a refusal of its own (``print_refusal``), not on its own (``kill -9``, a
    crash). ``sigterm``: this rank was sent one too. Where no peer said so and this rank got no
    SIGTERM, False at once (a rank died; the launcher's SIGTERM to the rest has not come yet); else
    each peer's word is waited for at most ``wait_s`` seconds (a peer inside a collective says it
    once that collective fails). None without a group or a store that answers."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or _launcher_lost:
        return None
    try:
        store, prefix = _keys()
        rank, ranks = dist.get_rank(), dist.get_world_size()
        with _quiet_c10d():
            said = _said(store, prefix, ("stopped", "refused"))
            waiting = {r for r in range(ranks) if r != rank and not said(r)}
            if waiting and not sigterm and len(waiting) == ranks - 1:
                return False
            return not _await_words(waiting, said, wait_s)
    except Exception:        # noqa: BLE001 - no store that answers
        return None


def say_reported() -> None:
    """Say (in the group's store) that this rank ends reporting a lost rank itself (its collective
    failed: ``cli``), before it leaves: a peer stopped by torchrun's SIGTERM then names the rank that
    died, not this one (``silent_peers``). No-op without a group or a store that answers."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or _launcher_lost:
        return
    try:
        store, prefix = _keys()
        with _quiet_c10d():
            store.set(f"{prefix}/reported/{dist.get_rank()}", "1")
    except Exception:        # noqa: BLE001 - no store that answers: nothing to say it in
        pass


def _this_process() -> str:
    """"MACHINE PID": MACHINE names this process's pid namespace on this boot (host name, boot id,
    the namespace's inode), so two ranks with the same MACHINE can look at each other's pid."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            if path.startswith("/proc/sys"):
                with open(path) as text:        # closed: no ResourceWarning in a script's warnings
                    parts.append(text.read().strip())
            else:
                parts.append(str(os.stat(path).st_ino))
        except OSError:
            parts.append("?")
    return f"{'|'.join(parts).replace(' ', '_')} {os.getpid()}"


def say_process() -> None:
    """Post this rank's process (``_this_process``) in the group's store once it joined: a peer on the
    same machine can then tell whether this rank's process still runs (``silent_peers``)."""
    try:
        store, prefix = _keys()
        with _quiet_c10d():
            store.set(f"{prefix}/process/{dist.get_rank()}", _this_process())
    except Exception:        # noqa: BLE001 - no store that answers: a peer will not know (it says SIGTERM)
        pass


def _process_ended(pid: int) -> bool:
    """Whether process ``pid`` (on this machine) has ended: no such process, or a zombie not yet reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def silent_peers(wait_s: float = STOPPED_WAIT_S) -> list[int] | None:
    """After this rank got a SIGTERM outside any collective (its work under way, nothing failed): the
    other ranks known to be lost, rank order. torchrun sends SIGTERM to every rank when its launcher is
    stopped, and to the ranks left when one dies; a SIGTERM may also be sent to this process alone. A
    rank counts as lost only on evidence: it said nothing (``say_stopped``, ``print_refusal``,
    ``say_reported``) within ``wait_s`` seconds AND its process, on this machine, has ended (``kill
    -9``, a crash, ``os._exit``). A silent rank whose process runs (waiting in a collective) or that
    runs on another machine is not named: the stop is then this rank's SIGTERM. None without a group
    or a store that answers (or with the launcher gone)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or _launcher_lost:
        return None
    try:
        store, prefix = _keys()
        rank, ranks = dist.get_rank(), dist.get_world_size()
        machine = _this_process().split(" ")[0]
        with _quiet_c10d():
            pids = {}
            for other in range(ranks):
                key = f"{prefix}/process/{other}"
                if other != rank and store.check([key]):
                    where, pid = store.get(key).decode().rsplit(" ", 1)
                    if where == machine:
                        pids[other] = int(pid)

            def gone(other: int) -> bool:
                return other in pids and _process_ended(pids[other])

            said = _said(store, prefix, ("stopped", "refused", "reported"))
            silent = _await_words({r for r in range(ranks) if r != rank}, said, wait_s, gone)
            return sorted(r for r in silent if gone(r))
    except Exception:        # noqa: BLE001 - no store that answers
        return None


def _first_words(err: BaseException) -> str:
    """The first line of a torch error, without its "[W... file.cpp:N]" prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text)[:120]


def print_refusal(line: str) -> None:
    """Print this rank's refusal ``line`` to stderr where it should be printed: a collective
    refusal once, not once per rank.

    Rank 0 always prints it, first (a rank that reads it and exits makes torchrun stop rank 0,
    which must have said it by then), then posts the line in the group's key-value store (no
    collective: the other ranks may be anywhere), then waits for each of them to read it (the
    store may live in rank 0's process) or to have passed further (``passed_checks``: it is in a
    collective and will never read it), at most ``REFUSAL_WAIT_S``. Another rank prints unless
    rank 0 posts this same line (or the same with other figures: each rank's memory differs): it
    waits for rank 0's line until rank 0 has passed further than this rank (it will not post one),
    at most ``REFUSAL_WAIT_S``. So a refusal every rank meets (the same arguments, the
    same files) is printed once, and one met by this rank alone (its data missing on its machine)
    is still printed, at once where rank 0 says it passed. Without a process group, or a store that
    answers, every rank prints.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        say(line)
        return
    rank, ranks = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        say(line)
    deadline = time.monotonic() + REFUSAL_WAIT_S
    try:
        with _quiet_c10d():     # a store whose host is gone: prunekit says it, not c10d's stack
            store, prefix = _keys()
            store.set(f"{prefix}/refused/{rank}", "1")      # before this rank leaves: see ``peer_refused``
            key = f"{prefix}/refusal"

            def further(other: int) -> bool:        # rank ``other`` passed a point this rank did not
                passed = f"{prefix}/passed/{other}"
                return store.check([passed]) and int(store.get(passed)) > _passed

            if rank == 0:
                store.set(key, line)
                waiting = set(range(1, ranks))
                while waiting and time.monotonic() < deadline:
                    waiting = {r for r in waiting if not (store.check([f"{prefix}/seen/{r}"]) or further(r))}
                    time.sleep(0.05 if waiting else 0)
                return
            try:
                while not store.check([key]) and not further(0) and time.monotonic() < deadline:
                    time.sleep(0.05)
                said = store.get(key).decode() if store.check([key]) else None
            finally:
                store.set(f"{prefix}/seen/{rank}", "1")
    except Exception:        # noqa: BLE001 - no store, or none that answers: say it here
        said = None
    if rank != 0 and (said is None or _figures_apart(said) != _figures_apart(line)):
        say(line)


def peer_refused() -> bool:
    """Whether another rank of this run stopped on a refusal it printed (``print_refusal``): a
    rank whose collective failed because that rank left then exits 2 without a line of its own (the
    refusal is the problem; "run the same command again" would fail the same way). Asks the group's
    store (no collective); False without a group or a store that answers."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or _launcher_lost:
        return False
    try:
        store, prefix = _keys()
        with _quiet_c10d():
            return any(store.check([f"{prefix}/refused/{r}"]) for r in range(dist.get_world_size())
                       if r != dist.get_rank())
    except Exception:        # noqa: BLE001 - no store that answers: a lost rank, as it looks
        return False


def _figures_apart(line: str) -> str:
    """A refusal without its figures: two ranks' memory refusals differ in the memory each
    process holds, not in what they say."""
    return re.sub(r"\d[\d.,]*", "#", line)


def early_refusals(line: str | None) -> list[str | None]:
    """Every rank's refusal met before the run began (None: none), in rank order. A collective
    every rank calls right after joining the group, so a refusal one machine meets alone (a
    ``--resume`` folder it lacks) stops every rank at once rather than leave the others waiting
    for it until the timeout. One process: ``[line]``."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [line]
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    return lines


def agree_refusal(refusal: PrunekitError | None) -> None:
    """Raise on every rank the refusal of the first rank (in rank order) that met one, if any did:
    for a check whose verdict can differ between ranks (the memory plan: each machine's free
    memory), where a rank refused alone let the others go on, to end on "a rank stopped". The
    refusal names its rank ("rank 1: ...") where not every rank refused. A collective: every rank
    calls it. One process: raises ``refusal``, if any."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        if refusal is not None:
            raise refusal
        return
    passed_checks()
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, refusal and (str(refusal), getattr(refusal, "params", ()),
                                                  getattr(refusal, "listed", ())))
    refused = [rank for rank, verdict in enumerate(verdicts) if verdict is not None]
    if not refused:
        return
    text, params, listed = verdicts[refused[0]]
    if len(refused) < len(verdicts):
        text = f"rank {refused[0]}: {text}"
    raise OptionError(text, params, listed)


def with_rank_peaks(record: dict, device: torch.device | str = "cpu") -> dict:
    """``record`` (a run's result, its ``peak_rss_mb`` this process's peak resident memory in MB)
    with, under torchrun, ``ranks`` (the world size) and ``peak_rss_mb_per_rank`` (every rank's
    ``peak_rss_mb``, rank order, MB to 0.1) added; ``record`` itself with one process. A collective:
    every rank calls it (``device``: where the tensor travels, the rank's GPU under NCCL, which
    exchanges CUDA tensors only). ``prune`` and ``train`` record the same fields through it."""
    collective = current()
    if not collective.distributed:
        return record
    peaks = collective.all_gather(torch.tensor([float(record["peak_rss_mb"])], dtype=torch.float64, device=device))
    return {**record, "ranks": collective.size, "peak_rss_mb_per_rank": [round(float(v), 1) for v in peaks]}


def digest(*tensors: torch.Tensor) -> int:
    """A 63-bit fingerprint of tensors' shapes, dtypes and bytes (the same on every machine)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return int.from_bytes(h.digest()[:8], "little") >> 1


def disagreeing(values: dict[str, int], device: torch.device | str = "cpu") -> dict[str, list[int]]:
    """Each named value as every rank has it (rank order), for the names where some rank's value
    differs from rank 0's; {} with one process or when all agree. A collective: every rank calls it."""
    collective = current()
    if not collective.distributed or not values:
        return {}
    names = sorted(values)
    mine = torch.tensor([values[n] for n in names], dtype=torch.int64, device=device)
    every = collective.all_gather(mine).reshape(collective.size, len(names)).cpu()
    return {n: every[:, i].tolist() for i, n in enumerate(names) if bool((every[:, i] != every[0, i]).any())}


def check_same_start(model: torch.nn.Module, python: bool = False, options: dict[str, str] | None = None,
                     samples: dict[str, int | None] | None = None, **batches) -> None:
    """Refuse (on every rank, one line) a run whose ranks would start from different weights,
    data or options: a machine with another checkpoint or data set at the same path would silently
    make another run's rows, and so would a script (``python``) that seeds each rank's model apart or
    hands each rank its own part of the data; ranks given other options (a budget, n, a seed) wait on
    each other's collectives until the timeout, or abort. ``options``: the run's settings, option name
    -> its value as text (the refusal names those that differ: as flags in the CLI, ``OptionError``
    params); ``batches``: name -> a first batch (tensors) or None; ``samples``: name -> the samples
    one pass over those data yields, where known cheaply (``data.loaders.samples_per_pass``), else
    None: data whose first batches agree but that run longer on one rank (images appended) would
    leave the others waiting on its extra batches' collectives."""
    passed_checks()            # a rank refused while loading them need not wait for this one
    values = {"model weights" if python else "model weights (--checkpoint)": digest(*model.state_dict().values())}
    if options is not None:
        values["options"] = digest(torch.frombuffer(bytearray(_options_text(options).encode()), dtype=torch.uint8))
    counts = {name: n for name, n in (samples or {}).items() if batches.get(name) is not None and n is not None}
    for name, batch in batches.items():
        if batch is not None:
            values[name] = digest(*[t for t in batch if isinstance(t, torch.Tensor)],
                                  torch.tensor([counts.get(name, -1)], dtype=torch.int64))
    device = next(iter(model.parameters()), torch.empty(0)).device
    differ = disagreeing(values, device)
    if "options" in differ:           # named first: other options also draw other data (a seed) or weights
        others = [r for r, v in enumerate(differ["options"]) if v != differ["options"][0]]
        named, params = _options_apart(options, others, device)
        raise OptionError(f"rank {', '.join(map(str, others))} was given other options than rank 0{named}: every "
                          "rank must run the same " + ("call (the same method, budget, options and seed)" if python
                                                       else "command (torchrun starts them all with it)"), params)
    if differ:
        name, ranks = next(iter(differ.items()))
        others = [r for r, v in enumerate(ranks) if v != ranks[0]]
        apart = disagreeing({"samples": counts.get(name, -1)}, device).get("samples")
        counted = ""
        if apart is not None and -1 not in apart:       # the same first batch, another length
            counted = f" ({', '.join(str(apart[r]) for r in others)} samples a pass against {apart[0]})"
        if python and name == "model weights":      # what to change for what differs: not the other's advice
            raise PrunekitError(f"rank {', '.join(map(str, others))} has other model weights than rank 0: every rank "
                                "must pass the same model weights (build the model from the same seed, or load the "
                                "same checkpoint, on every rank)")
        if python:          # another data set at the same path, or each rank's share: either may be so
            raise PrunekitError(f"rank {', '.join(map(str, others))} has other {name} than rank 0{counted}: every "
                                f"rank must pass the same {name}, whole: read from the same files on every machine, "
                                "and not split among the ranks (prunekit divides the work among them itself: no "
                                "DistributedSampler)")
        raise PrunekitError(f"rank {', '.join(map(str, others))} read other {name} than rank 0{counted}: every "
                            "machine must have the same checkpoint and data at the same paths (copy them from rank 0's "
                            "machine or put them on a shared file system)")


def _options_text(options: dict[str, str]) -> str:
    return "\n".join(f"{name} = {value}" for name, value in sorted(options.items()))


_MOST_NAMED = 6


def _options_apart(options: dict[str, str], others: list[int], device: torch.device) -> tuple[str, tuple[str, ...]]:
    """Which options ranks ``others`` were given apart from rank 0's, as " (seed 1 against 0, ...)"
    (several ranks that differ alike: once; else rank by rank), and the option names it gives. A
    collective (every rank's options, gathered: a few hundred bytes each); on NCCL the objects
    travel on ``device``, this rank's GPU, whatever the current CUDA device of the script is."""
    every = [None] * dist.get_world_size()
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        dist.all_gather_object(every, options)
    unset = "not given"

    def apart(mine: dict[str, str]) -> list[str]:
        names = sorted(set(mine) | set(every[0]))
        return [n for n in names if mine.get(n) != every[0].get(n)]

    def said(mine: dict[str, str], names: list[str]) -> str:
        text = ", ".join(f"{n} {mine.get(n, unset)} against {every[0].get(n, unset)}" for n in names[:_MOST_NAMED])
        return text + (f" and {len(names) - _MOST_NAMED} more" if len(names) > _MOST_NAMED else "")

    per_rank = {r: apart(every[r]) for r in others}
    params = tuple(sorted({n for names in per_rank.values() for n in names}))
    if not params:
        return "", ()
    texts = {r: said(every[r], names) for r, names in per_rank.items()}
    if len(set(texts.values())) == 1:
        return f" ({texts[others[0]]})", params
    return " (" + "; ".join(f"rank {r}: {text}" for r, text in texts.items()) + ")", params
