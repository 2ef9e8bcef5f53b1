"""The run folder itself: its paths and files, its run's status, and what a killed run left there.

Layout of ``DIR`` (every file but the log is written atomically)::

    config.toml                 the resolved options (a recipe: ``prunekit prune --recipe`` reads it)
    run.log                     what happened, one timestamped line per event (append-only)
    metrics.json                status, dense model, per stage (budget asked, sparsity and MACs
                                reached, loss, accuracy, seconds), final result, per-layer density
    data-rng.json               a Python run's: the RNG states its data is replayed from (resume reads them)
    code-written.json           a Python run's: what it wrote into the code it was given (``api._note_written``)
    code-slots.json             a Python run's: a digest per place of that code, for a refusal to name (``api._note_slots``)
    checkpoints/stage-NNN.safetensors   model state + RNG states + stage history after stage NNN
    model.safetensors, model.json       the final model and its sidecar
    report.md, plots/*.png              written by ``report.write_run_report``
    .prunekit.lock              while a process works in the folder (``run_lock``; left by a kill)

metrics.json's ``status``: "running" from the run's start, "done" at its end, "interrupted" when
Ctrl-C or SIGTERM stopped it or a torchrun rank was lost, "stopped" when its fine-tune diverged after a
checkpoint (``stopped_by_divergence``). A SIGKILL (or a crash) leaves "running":
``shown_status`` tells such a folder from a run still at work by its lock.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from .errors import PrunekitError
from .record import finite as _finite
from .run_lock import LOCK_NAME, in_use
from .saving import atomic_write_json


METRICS = "metrics.json"


class RunFolder:
    """Paths and small I/O helpers of one run folder."""

    writable = True     # False for the ranks of a distributed run other than 0: they only read
    claimed_afresh = False   # this process's ``claim`` wrote its config.toml (no run of this request was there)
    echo = None         # the command line's console (a function of one line): told where a run resumes

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def follower(self) -> "RunFolder":
        """The same folder, read-only: what ranks other than 0 of a torchrun run see (they resume
        from it, rank 0 alone writes)."""
        return _FollowerRunFolder(self.path)

    config = property(lambda self: self.path / "config.toml")
    metrics_path = property(lambda self: self.path / METRICS)
    checkpoints = property(lambda self: self.path / "checkpoints")
    model_path = property(lambda self: self.path / "model.safetensors")
    report_path = property(lambda self: self.path / "report.md")

    def exists(self) -> bool:
        return self.metrics_path.exists() or self.config.exists()

    def config_text(self) -> str:
        """config.toml's text (``read_config``)."""
        return read_config(self.config)

    def log(self, message: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path / "run.log", "a") as log:
            log.write(f"{stamp} {message}\n")

    def read_metrics(self) -> dict:
        if not self.metrics_path.exists():
            return {}
        try:
            metrics = json.loads(self.metrics_path.read_text())
        except json.JSONDecodeError as err:
            raise PrunekitError(f"{self.metrics_path} is not valid JSON ({err}); restore or delete it") from None
        if not isinstance(metrics, dict):
            raise PrunekitError(f"{self.metrics_path} is not a prunekit metrics file (not a JSON object); "
                                "restore or delete it")
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.metrics_path, _finite(metrics))


def shown_status(folder: RunFolder, metrics: dict | None = None) -> str | None:
    """The status of ``folder``'s run as readers show it (``compare``, a run's report):
    metrics.json's, except that a run it says is "running" which no live process holds
    (``run_lock.in_use``: SIGKILLed, a torchrun rank 0 lost, a crash) is "interrupted", as a
    run stopped by Ctrl-C or SIGTERM is: ``--resume`` carries it on. Where the lock cannot tell
    (no ``fcntl``; a lock file another machine wrote), "running" stays. ``metrics``: the folder's,
    if already read. Reads only: the folder is not written."""
    status = (folder.read_metrics() if metrics is None else metrics).get("status")
    if status == "running" and in_use(folder.path) is False:
        return "interrupted"
    return status


class _FollowerRunFolder(RunFolder):
    writable = False

    def log(self, message: str) -> None:
        pass

    def write_metrics(self, metrics: dict) -> None:
        pass


def finished_run(folder: RunFolder) -> bool:
    """Whether ``folder`` holds a finished run: a prune run's metrics.json says "done"; a training
    run writes none, and is finished once its model and result.json are written. Raises
    ``PrunekitError`` when metrics.json cannot be read."""
    if not folder.metrics_path.exists():
        return (folder.path / "result.json").exists() and folder.model_path.exists()
    return folder.read_metrics().get("status") == "done"


def finished_read_only(path: str | Path) -> bool:
    """Whether run folder ``path`` holds a finished run (``finished_run``: prune's or train's) that
    this process may not write (permissions, a read-only file system): the run's result can be
    handed back from it as it is, without its lock (which would make a file there) or any other
    write (the caller still checks that it is the run asked for)."""
    path = Path(path)
    try:
        done = path.is_dir() and finished_run(RunFolder(path))
    except PrunekitError:
        return False
    return done and not os.access(path, os.W_OK)


def finished_read_only_on_rank_0(path: str | Path) -> bool:
    """``finished_read_only`` as rank 0, the rank that writes, finds ``path``, told to every rank of a
    torchrun run (a collective: every rank calls it), so that all of them read the finished run
    back or none does: a rank going on alone to take the folder's lock would wait for the others.
    One process: ``finished_read_only``."""
    from . import distributed
    collective = distributed.current()
    if not collective.distributed:
        return finished_read_only(path)
    return bool(collective.broadcast_object(finished_read_only(path) if collective.rank == 0 else None))


def finished_note(out, again: str) -> str:
    """The end of the one line for a run stopped after it had finished (metrics.json "done": a rank lost,
    or a SIGTERM, while rank 0 wrote the report or the ranks left): nothing to resume. ``again``: the
    call that gives the finished run back (and writes a report.md the stop left unwritten)."""
    missing = "" if (Path(out) / "report.md").exists() else f"; report.md was not written: {again} writes it"
    return f"the run had finished: its result is in {out} (no resume needed{missing})"


def mark_stopped(folder: RunFolder, line: str, status: str = "interrupted") -> None:
    """Write why the run in ``folder`` ends here (``line``) to its run.log and mark a running run
    ``status``: "interrupted" (``--resume`` carries it on), "stopped" (its training diverged:
    ``stopped_by_divergence``). Called by the process holding the folder's lock,
    before it lets go: a process taking the lock next never sees a status this one writes later (or
    has its own run's status written over). A folder whose run has not begun (no run.log) is left
    alone; a damaged metrics.json keeps what it holds."""
    if not folder.writable or not (folder.path / "run.log").exists():
        return
    try:
        metrics = folder.read_metrics()
    except PrunekitError:
        folder.log(line)
        return
    folder.log(line if metrics.get("status") != "done" else f"{line}, after the run finished (its result stands)")
    if metrics.get("status") == "running":
        folder.write_metrics({**metrics, "status": status})


def stopped_by_divergence(folder: RunFolder | None, err: PrunekitError,
                          cli_fix: str = "add --force (it starts over there) or give it another --out"
                          ) -> PrunekitError:
    """``err`` as the run in ``folder`` ends with it: where a training (a fine-tune) diverged
    (``train.TrainingDiverged``) after the run saved a checkpoint, so that its folder keeps the run
    (``release_refused`` left it), run.log says why it stopped, metrics.json says "stopped", and
    the message says how to run with the lower learning rate it advises: the folder's run was
    made with this one (its config.toml names it; a gradual run's or a training's checkpoints
    were trained with it), so the lower one is another run, which ``force`` starts over in it
    (``cli_fix``: the command line's words; a sweep has no --force, and --resume takes none) or another folder takes. Any other error, or a folder the run left
    (released, or none): ``err`` as it is. Called by the process holding the folder's lock."""
    from .errors import worded
    from .options import cli_message
    from .train import TrainingDiverged
    if not (isinstance(err, TrainingDiverged) and folder is not None and folder.writable and folder.config.exists()):
        return err
    try:
        mark_stopped(folder, f"stopped: training diverged in {err.where} ({err.cause}) with {err.lr_name} {err.lr:g}; "
                             "nothing diverged was saved", status="stopped")
    except OSError:               # a full disk: the divergence itself is what the user is told
        pass
    kept = f"; {folder.path} keeps the run up to its last checkpoint, made with this"
    return worded(f"{err}{kept} {err.lr_name}: to run with a lower one, pass force=True (it starts over there) "
                  "or another out=",
                  f"{cli_message(err)}{kept} --{err.lr_name.replace('_', '-')}: to run with a lower one, {cli_fix}")


def is_run(path: str | Path) -> bool:
    return (Path(path) / METRICS).exists()


DATA_RNG = "data-rng.json"      # a Python run's: the RNG states its data is replayed from (``api._keep_streams``)
CODE_WRITTEN = "code-written.json"      # a Python run's: what it wrote into the code it was given (``api._note_written``)
CODE_SLOTS = "code-slots.json"          # a Python run's: where a refusal says other code differs (``api._note_slots``)

# What a run writes into its folder; ``force`` removes exactly these, nothing a user put there.
RUN_FILES = ("config.toml", "run.log", METRICS, DATA_RNG, CODE_WRITTEN, CODE_SLOTS, "checkpoints", "model.safetensors",
             "model.json", "result.json", "report.md", "plots", "export", "model.onnx")
RUN_PLOTS = ("accuracy_vs_budget.png", "accuracy_per_stage.png", "layer_density.png")   # report.md's, in plots/


# The files of a run folder prunekit writes atomically (``atomic_output``: a temporary
# ``.NAME.XXXXXXXX.tmp`` beside it, renamed into place): a kill before the rename leaves the temporary.
ATOMIC_FILES = ("config.toml", METRICS, DATA_RNG, CODE_WRITTEN, CODE_SLOTS, "model.safetensors", "model.json", "result.json",
                "report.md", "model.onnx")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")        # mkstemp's name: 8 of [a-z0-9_]


def _temporaries(folder: Path, own: Callable[[str], object]) -> list[Path]:
    """The temporary files in ``folder`` of killed atomic writes of files named so that ``own(name)``."""
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir()
            if (match := _TEMPORARY.fullmatch(p.name)) and own(match["name"]) and p.is_file() and not p.is_symlink()]


def stale_temporaries(path: str | Path) -> list[Path]:
    """The temporaries that killed atomic writes of prunekit's own run files left in run folder
    ``path``: of config.toml, metrics.json, data-rng.json, code-written.json, code-slots.json, the
    model and its sidecar, result.json, report.md, model.onnx; ``checkpoints/.stage-NNN.safetensors.*.tmp``; ``plots/`` temporaries of the
    report's plots. A file of the user's (another name) is none of them."""
    path = Path(path)
    return (_temporaries(path, ATOMIC_FILES.__contains__)
            + _temporaries(path / "checkpoints", lambda name: re.fullmatch(r"stage-\d+\.safetensors", name))
            + _temporaries(path / "plots", RUN_PLOTS.__contains__))


def only_leftovers(path: str | Path) -> bool:
    """Whether folder ``path`` holds nothing but what a prunekit process killed before its run took
    the folder leaves there (its lock file, the temporary of its config.toml or of another file of
    its own): the folder is as good as empty, a run may take it."""
    path = Path(path)
    stale = set(stale_temporaries(path))
    return path.is_dir() and all(p.name == LOCK_NAME or p in stale for p in path.iterdir())


def remove_stale_temporaries(folder: RunFolder) -> None:
    """Remove the temporaries killed writes left in ``folder`` (``stale_temporaries``): called once
    a run holds the folder's lock and has taken it, so no other process is writing them."""
    if not folder.writable:
        return
    for temp in stale_temporaries(folder.path):
        temp.unlink(missing_ok=True)


def read_config(path: str | Path) -> str:
    """The text of a run's config.toml (or of its temporary), without the byte-order mark an editor
    such as Notepad writes when the user saves it (it would read as an edit, or not as TOML)."""
    return Path(path).read_text(encoding="utf-8-sig")


def pending_config(path: str | Path) -> Path | None:
    """The config.toml of a run killed while it took folder ``path``, between writing the file's
    temporary (written whole and fsynced before its rename) and renaming it: in a folder holding
    nothing else (``only_leftovers``), the newest temporary of a config.toml that is valid TOML and
    names this folder as its ``out``. None when there is none."""
    path = Path(path)
    if (path / "config.toml").exists() or not only_leftovers(path):
        return None
    found = []
    for temp in _temporaries(path, "config.toml".__eq__):
        try:
            out = tomllib.loads(read_config(temp)).get("out")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if isinstance(out, str) and Path(out).resolve() == path.resolve():
            found.append(temp)
    return max(found, key=lambda temp: temp.stat().st_mtime, default=None)


def _present(path: Path) -> list[str]:
    return ([name for name in RUN_FILES if (path / name).exists()]
            + [p.name for p in path.glob("snapshot-*") if p.is_dir()])      # taper's; a file of that name is not


def _remove_own_files(folder: Path) -> None:
    """Remove the files a run wrote in its subfolder ``folder`` (checkpoints, plots, export,
    snapshot-*), then the folder if nothing else is left in it: a user's own file there stays."""
    from .export import _written_before
    if folder.name == "checkpoints":
        own = [*folder.glob("stage-*.safetensors"), *folder.glob(".stage-*.tmp")]
    elif folder.name == "plots":
        own = [folder / name for name in RUN_PLOTS]
    elif folder.name == "export":
        own = [folder / name for name in _written_before(folder)]
    else:
        own = [folder / name for name in ("model.safetensors", "model.json", "result.json")]
    own += [temp for file in own for temp in folder.glob(f".{file.name}.*.tmp")]    # a killed atomic write's
    for file in own:
        file.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()
