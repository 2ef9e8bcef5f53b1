"""Run folders: one pruning run on disk, readable by people and resumable after any kill.

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

``executor.execute`` runs a prune of any mode into a folder, resuming from the newest stage,
event or phase checkpoint if there is one (see ``pipelines.stages`` for the protocol).
A folder belongs to one run: ``claim`` refuses another request onto it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import tomllib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from .costs import CostModel, padding_zeros
from .errors import PrunekitError, PrunekitWarning, refusal_of, worded_warning
from .options import OptionError
from .pipelines.stages import StageState
from .record import finite as _finite
from .run_lock import LOCK_NAME, in_use
from .saving import atomic_write_bytes, atomic_write_json, write_tensor_file
from .errors import warn as warn_ours

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


def check_claim_on_rank_0(folder: RunFolder, config_text: str, device="cpu") -> None:
    """``check_claim`` (writes nothing) under torchrun: rank 0 checks the folder and its refusal is
    raised on every rank; then every rank must see the same folder (``check_ranks_share``). A
    collective: every rank calls it. One process: ``check_claim``."""
    from . import distributed
    collective = distributed.current()
    if not collective.distributed:
        check_claim(folder, config_text)
        return
    refusal = None
    if collective.rank == 0:
        try:
            check_claim(folder, config_text)
        except PrunekitError as err:
            refusal = err
    refusal = collective.broadcast_object(refusal)
    if refusal is not None:
        raise refusal
    check_ranks_share(folder, device)


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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB pieces (a checkpoint a run starts from, recorded to tell
    later whether it changed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def tensors_sha256(named) -> str:
    """SHA-256 of (name, tensor) pairs: each name, dtype, shape and the bytes of its values, in
    the order given (a model's ``state_dict().items()``: the weights a Python run starts from, as
    ``checkpoint_sha256`` is for the command line's file). Read one tensor at a time, on the CPU."""
    import torch
    digest = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach()
        if t.is_sparse:
            t = t.to_dense()
        if t.is_quantized:
            t = t.int_repr()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        digest.update(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))     # no copy
    return digest.hexdigest()


# The keys of a Python run's config.toml that fingerprint what it started from (recipe spelling).
# A folder written before prunekit recorded them has none: it is carried on, with a warning.
# ``data-sha256``: the data's contents where they can be hashed exactly (``api.data_identity``);
# ``data-form``: what holds them, absent for (X, Y) tensors (a folder of an older prunekit recorded
# ``data-sha256`` for those only, and for a loader ``data-samples`` alone).
FINGERPRINT_KEYS = ("weights-sha256", "data-sha256", "data-samples", "data-form")
# Recorded since: ``eval_data`` as ``data`` is (``eval-data-sha256``, ``eval-data-form``,
# ``eval-data-samples``) and the batch size the data is read in (``batch-size``, in every such
# config): a config without ``batch-size`` is an older prunekit's, carried on with a warning.
EVAL_BATCH_KEYS = ("eval-data-sha256", "eval-data-form", "eval-data-samples", "batch-size")


# Recorded since: a fingerprint of the code the user hands ``prunekit.prune`` (``api._code_fingerprints``):
# ``method-fingerprint`` in every such config ("built-in" for prunekit's own methods), ``loss-fingerprint``
# and ``<option>-fingerprint`` (``importance-fingerprint``) where given; a value starting with
# ``UNCHECKED`` records one that could not be hashed faithfully. A config without
# ``method-fingerprint`` is an older prunekit's, carried on with a warning. A ``-fingerprint`` line ends
# in a comment naming what it was taken of (not "built-in": ``api._config_text``); comments are no part
# of the run (``same_values``).
CODE_MARK = "method-fingerprint"
UNCHECKED = "unchecked: "


def _code_key(key: str) -> bool:
    return key.endswith("-fingerprint")


# The comment that config.toml's ``-fingerprint`` lines start under (``api.CODE_COMMENT``), written
# since prunekit took a code digest by its present rule (a function's docstring left out, a loss
# module's train/eval mode in): a config with digests but without it is an older prunekit's, its
# digests taken by the earlier rule, which a digest of the same code now need not match.
CODE_RULE_MARK = "# *-fingerprint:"


def _earlier_digests(old: str, before: dict, after: dict, keys: list[str]) -> list[str]:
    """Of ``keys`` (what differs), the code digests that config ``old`` (parsed: ``before``) took by
    the earlier rule (``CODE_RULE_MARK``) and this call's (``after``) by the present one: both
    digests, so whether the code is the same cannot be told. Empty where anything else differs."""
    if CODE_RULE_MARK in old or not keys:
        return []
    digest = lambda value: isinstance(value, str) and value != "built-in" and not value.startswith(UNCHECKED)
    if all(_code_key(k) and digest(before.get(k)) and digest(after.get(k)) for k in keys):
        return keys
    return []


def earlier_rule(folder_path, keys: list[str]) -> str:
    """The refusal of a run folder of an older prunekit whose code digests (``keys``) differ from this
    call's: taken by another rule, they cannot tell whether the code is the same, and carrying the
    run on could hand back a result of other code."""
    args = ", ".join(f"{k[:-len('-fingerprint')].replace('-', '_')}=" for k in keys)
    return (f"{folder_path} holds a run of an older prunekit, which took the digest of its {args} by an earlier "
            "rule (this version leaves out a function's docstring and counts a loss module's train/eval mode), so "
            "whether that code is the same as this call's cannot be told: clear that run and run it anew "
            "(force=True), or pick another out")


def _before_code(config: dict) -> bool:
    """Whether a Python run's config was written before prunekit fingerprinted the code it is given."""
    return CODE_MARK not in config


def other_code(folder_path, before: dict, after: dict, keys: list[str], detail: dict | None = None) -> str:
    """The refusal of a Python run folder whose run was made with other code (``keys``: the
    ``-fingerprint`` keys, and ``loss``, that differ), naming each argument and the way out, and
    where the code differs (``detail``: ``{key: [place, ...]}``, ``api._code_detail``) when known."""
    said = []
    for key in keys:
        if key == "loss-fingerprint" and "loss" in keys:        # another class or function: said by its name
            continue
        arg = "loss" if key == "loss" else key[:-len("-fingerprint")].replace("-", "_")
        if key not in before:
            said.append(f"{arg}= (that run was made without one)")
        elif key not in after:
            said.append(f"{arg}= (that run was made with one, this call gives none)")
        elif arg == "method":
            said.append(f"method= ({before.get('method')!r}: its run function, options or defaults are not "
                        "the ones that run was made with)")
        elif key == "loss":
            said.append(f"loss= ({before[key]}, now {after[key]})")
        elif (detail or {}).get(key):
            said.append(f"{arg}= ({key} differs in {', '.join(detail[key])})")
        else:
            said.append(f"{arg}= ({key} differs: its code or state is not the one that run was made with)")
    return (f"{folder_path} holds another run, made with another {'; another '.join(said)}: pass what that run "
            "was made with, pick another out, or clear that run first (force=True)")


def _before_eval_batch(config: dict) -> bool:
    """Whether a Python run's config was written before prunekit recorded its eval_data and batch size."""
    return "batch-size" not in config


def _data_form(config: dict) -> str:
    """The form of the data a Python run's config records: its ``data-form``, else (X, Y) tensors
    where it records ``data-sha256``, else a loader (an older prunekit recorded no form)."""
    return config.get("data-form") or ("(X, Y) tensors" if "data-sha256" in config else "a loader")


def _counted_only(config: dict) -> bool:
    """Whether a Python run's config records its data by sample count only (an older prunekit's
    loader run: ``data-samples``, no ``data-sha256`` or ``data-form``)."""
    return "weights-sha256" in config and "data-sha256" not in config and "data-form" not in config


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
            out = tomllib.loads(temp.read_text(encoding="utf-8")).get("out")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if isinstance(out, str) and Path(out).resolve() == path.resolve():
            found.append(temp)
    return max(found, key=lambda temp: temp.stat().st_mtime, default=None)


def _present(path: Path) -> list[str]:
    return ([name for name in RUN_FILES if (path / name).exists()]
            + [p.name for p in path.glob("snapshot-*") if p.is_dir()])      # taper's; a file of that name is not


def _asked_onnx(config_text: str) -> bool:
    """Whether the run of ``config_text`` wrote model.onnx (``--onnx``)."""
    try:
        return bool(tomllib.loads(config_text).get("onnx"))
    except tomllib.TOMLDecodeError:
        return False


def _differing(old: str, new: str, here: str | Path | None = None) -> list[str]:
    """The settings where run configs ``old`` and ``new`` differ. With ``here``, the folder that
    holds ``old``: an ``out`` that names another place than ``here`` while ``new``'s names
    ``here`` is no difference (the folder was moved or copied since its run began; the folder is
    the run, ``moved_from``)."""
    try:
        before, after = by_value(tomllib.loads(old)), by_value(tomllib.loads(new))
    except tomllib.TOMLDecodeError:
        return []
    keys = [k for k in {**before, **after} if before.get(k) != after.get(k)]
    if here is not None and "out" in keys and moved_from(old, here) is not None and _names(after.get("out"), here):
        keys.remove("out")
    return keys


def _names(out, here: str | Path) -> bool:
    """Whether a config's ``out`` value names folder ``here``."""
    try:
        return isinstance(out, str) and Path(out).resolve() == Path(here).resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def moved_from(config_text: str, here: str | Path) -> str | None:
    """Where the run of ``config_text``, found in folder ``here``, was made (its ``out``, a
    resolved path) when that is another place: the folder was moved (renamed) or copied since.
    None when it is ``here``, or the config records no ``out`` (``prunekit.prune``'s)."""
    try:
        out = tomllib.loads(config_text).get("out")
    except tomllib.TOMLDecodeError:
        return None
    return out if isinstance(out, str) and not _names(out, here) else None


def same_run(old: str | None, new: str, here: str | Path) -> bool:
    """Whether config ``old`` in folder ``here`` is the run ``new`` asks for: the same values (its
    comments aside: ``same_values``), or one that differs only in an ``out`` naming where the
    folder was before it moved."""
    return old is not None and (same_values(old, new)
                                or not _differing(old, new, here) and bool(moved_from(old, here)))


def same_values(old: str, new: str) -> bool:
    """Whether run configs ``old`` and ``new`` hold the same keys and values: their comments (the
    name of the function a ``-fingerprint`` was taken of) are no part of the run."""
    if old == new:
        return True
    try:
        return by_value(tomllib.loads(old)) == by_value(tomllib.loads(new))
    except tomllib.TOMLDecodeError:
        return False


BUDGET_KEYS = ("sparsity", "flops", "params")


def by_value(config: dict) -> dict:
    """``config`` with its budgets (``BUDGET_KEYS``) as the amounts they spell, ``(value,
    absolute)``: the command line records a budget as typed, and "0.5", "0.50" and "50%" (or "50k"
    and "50000") are one budget, the run being made from the parsed amount alone. A value that
    parses as no budget stays as it is (its run refuses it)."""
    from .budget import Amount          # (budget imports what imports this module)
    out = dict(config)
    for key in BUDGET_KEYS:
        value = out.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            try:
                amount = Amount.parse(value, key)
            except PrunekitError:
                continue
            out[key] = (amount.value, amount.absolute)
    return out


def _asks_onnx(config_text: str) -> bool:
    try:
        return bool(tomllib.loads(config_text).get("onnx"))
    except tomllib.TOMLDecodeError:
        return False


def check_claim(folder: RunFolder, config_text: str, python: bool = False, code_detail: dict | None = None) -> None:
    """Refuse ``folder`` when it holds another run or files a run would overwrite (writes nothing);
    ``python``: the refusal in the API's words (``prunekit.prune`` has no resume, only the same
    call again); ``code_detail``: where the code given differs (``other_code``)."""
    present = _present(folder.path)
    if present:
        old = folder.config.read_text() if folder.config.exists() else None
        if not same_run(old, config_text, folder.path):
            check_finished_unchanged(folder, python, asked=config_text)     # asked as it ran, config.toml edited since
            keys = _differing(old, config_text, folder.path) if old is not None else []
            if python and keys and _before_code(_parsed(old)):      # a version that fingerprinted no code
                keys = [k for k in keys if not _code_key(k)]
                if not keys:
                    return
            if python and keys and _before_eval_batch(_parsed(old)):     # a version that recorded neither
                keys = [k for k in keys if k not in EVAL_BATCH_KEYS]       # eval_data nor batch size
                if not keys:
                    return
            if python and keys and not _fingerprinted(old):     # a version that recorded none:
                keys = [k for k in keys if k not in FINGERPRINT_KEYS]     # what differs is the rest
                if not keys:
                    return
            before, after = _parsed(old), _parsed(config_text)
            if python and keys and _counted_only(before) and "data-form" in after:
                # an older prunekit's loader run, recorded by its sample count: its contents cannot be compared
                keys = [k for k in keys if k not in ("data-sha256", "data-form")]
                if not keys:
                    return
            if python and keys and "data-form" in keys \
                    and not set(keys) - {"data-form", "data-sha256", "data-samples", "batch-size"} \
                    and ("data-sha256" not in keys or "data-sha256" not in before or "data-sha256" not in after):
                same = "the same data" if "data-sha256" not in keys else "data"
                unchecked = "" if "data-sha256" not in keys else "; their contents could not be compared"
                sizes = (f"; batch size {before.get('batch-size')}, now {after.get('batch-size')}"
                         if "batch-size" in keys else "")
                raise OptionError(f"{folder.path} holds a run over {same} in another form ({_data_form(before)}, "
                                  f"now {_data_form(after)}{unchecked}{sizes}), which reads other batches: pass the data "
                                  "as that run did, pick another out, or clear that run first (force=True)",
                                  ("out", "force"))
            if keys == ["onnx"] and _asks_onnx(config_text) and not python and folder.model_path.exists():
                onnx = folder.path / "export" / "model.onnx"
                raise OptionError(f"{folder.path} holds this run, made without --onnx: `prunekit export "
                                  f"{folder.path} --onnx` writes its model as ONNX ({onnx})")
            other = f" (other {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})" if keys else ""
            what = (f"another run{other}" if old is not None
                    else f"files a run would overwrite ({', '.join(present[:3])})")
            if python and "weights-sha256" in keys:
                shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
                raise OptionError(f"{folder.path} holds a run that started from other weights than this model's "
                                  f"({shown} differ{'s' if len(keys) == 1 else ''}): pass the "
                                  "model it started from (as it was before that call, which prunes in place), pick "
                                  "another out, or clear that run first (force=True)", ("out", "force"))
            if python and old is not None and _earlier_digests(old, before, after, keys):
                raise OptionError(earlier_rule(folder.path, keys), ("out", "force"))
            if python and old is not None and keys and all(_code_key(k) or k == "loss" for k in keys):
                raise OptionError(other_code(folder.path, before, after, keys, code_detail), ("out", "force"))
            if old is not None:         # the call that began an unfinished run, its config.toml edited since
                check_asked_as_begun(folder, config_text, keys, python)
            if python:
                raise OptionError(f"{folder.path} holds {what}: pick another out, carry that run on (the same call "
                                  "as its config.toml records) or clear it first (force=True)", ("out", "force"))
            raise OptionError(f"{folder.path} holds {what}: pick another out, carry that run on (resume) or clear "
                              "it first (force)", ("out", "resume", "force"))
        if old is not None:         # this run's config.toml: the run it holds must be the one it says
            check_finished_unchanged(folder, python)
            check_unfinished_unchanged(folder, python)


class EditedConfig(OptionError):
    """A finished run whose config.toml was edited since its run recorded it (``check_finished_unchanged``):
    ``changed``, the settings edited; ``since``, the file that recorded the run; ``finished``: False
    for an unfinished run's (``check_unfinished_unchanged``)."""

    def __init__(self, message: str, changed: list[str], since: str, params: tuple[str, ...] = (),
                 finished: bool = True):
        super().__init__(message, params)
        self.changed, self.since, self.finished = changed, since, finished


# A training run's result.json keys and the config.toml settings they record (a train folder has no metrics.json).
TRAINED_AS = {"epochs": "epochs", "lr": "lr", "batch_size": "batch-size", "seed": "seed"}


def edited_since_run(folder: RunFolder, asked: str | None = None) -> tuple[list[str], str] | None:
    """Where ``folder`` holds a finished run whose config.toml is no longer the one it ran under:
    ``(settings changed, the file that recorded them)``: a prune run's metrics.json keeps the
    config it began with; a training run's result.json its epochs, lr, batch size and seed. None
    where it holds no finished run, nothing was changed, or the folder records nothing to compare
    (an unfinished run is checked at its checkpoints, ``_check_same_config``). ``asked``: only where
    the run was made with that config (a call asking for the run as it ran)."""
    if not folder.config.exists():
        return None
    try:
        now = folder.config.read_text()
        if folder.metrics_path.exists():
            metrics = folder.read_metrics()
            saved = metrics.get("config")
            if metrics.get("status") != "done" or not isinstance(saved, str) or same_values(saved, now) \
                    or asked is not None and not same_run(saved, asked, folder.path):
                return None
            changed = _differing(saved, now, folder.path)
            if asked is not None and (not changed or set(changed) - (_parsed(saved).keys() & _parsed(now).keys())):
                return None     # a setting added or left out: an older prunekit's folder, said as such by the claim
            return (changed or ["its text"]), METRICS
        result = folder.path / "result.json"
        if not (result.exists() and folder.model_path.exists()):
            return None
        record, config = json.loads(result.read_text()), tomllib.loads(now)
    except (OSError, UnicodeDecodeError, ValueError, PrunekitError):     # (TOMLDecodeError is a ValueError)
        return None         # a damaged file is said where it is read
    if not isinstance(record, dict):
        return None
    changed = [key for field, key in TRAINED_AS.items()
               if field in record and key in config and record[field] != config[key]]
    if asked is not None:       # the call asks for what result.json records, and differs from config.toml only there
        wanted = _parsed(asked)
        if not changed or any(wanted.get(TRAINED_AS[f]) != record[f] for f in TRAINED_AS if f in record) \
                or set(_differing(now, asked, folder.path)) - set(changed):
            return None
    return (changed, "result.json") if changed else None


def check_finished_unchanged(folder: RunFolder, python: bool = False, asked: str | None = None) -> None:
    """Refuse to give back the finished run in ``folder`` for a call that asks for what its
    config.toml now says, when that file was edited since the run recorded it
    (``edited_since_run``): the result there is another setting's, never this call's. ``asked``: a
    call that asks for the run as it ran (config.toml edited since), refused in words saying so
    (else it would read "holds another run")."""
    edited = edited_since_run(folder, asked)
    if edited is None:
        return
    changed, since = edited
    anew = "pass force=True" if python else "add --force"
    if asked is not None:
        raise EditedConfig(f"{folder.config} was changed ({', '.join(changed[:3])}) since {since} was saved; this "
                           f"call asks for the run it holds: put config.toml's values back to have that run's result "
                           f"again, or {anew} to run it anew", changed, since, ("force",))
    raise EditedConfig(f"{folder.config} was changed ({', '.join(changed[:3])}) since {since} was saved, so the "
                       f"finished run there is not the one it now records: put its values back to have that run's "
                       f"result again, or {anew} to run it anew with these values", changed, since, ("force",))


def edited_unfinished(folder: RunFolder) -> list[str] | None:
    """Where ``folder`` holds an unfinished prune run whose config.toml is no longer the one it
    began with (metrics.json keeps that one) and that saved some work (``_holds_work``): the
    settings changed (["its text"] where they cannot be told apart). Its checkpoints are the earlier
    values' run: carried on, the first one read would refuse it (``_check_same_config``). None where
    the run finished (``edited_since_run``), nothing was changed, the folder records no starting
    config (an older prunekit's: checked at its checkpoints), or the run stopped before its first
    checkpoint (nothing to lose: ``claim`` starts it with the edited values, ``_edited_before_work``)."""
    if not _holds_work(folder):
        return None
    return _edited_unfinished(folder)


def _holds_work(folder: RunFolder) -> bool:
    """Whether ``folder``'s run saved anything computed: a checkpoint (any file under checkpoints/), a
    taper snapshot or the pruned model."""
    return (folder.model_path.exists() or any(folder.path.glob("snapshot-*"))
            or (folder.checkpoints.is_dir() and any(folder.checkpoints.iterdir())))


def _edited_before_work(folder: RunFolder) -> list[str] | None:
    """``edited_unfinished`` for a run stopped before its first checkpoint: the settings changed, or None."""
    return None if _holds_work(folder) else _edited_unfinished(folder)


def _edited_unfinished(folder: RunFolder) -> list[str] | None:
    if not (folder.config.exists() and folder.metrics_path.exists()):
        return None
    try:
        metrics, now = folder.read_metrics(), folder.config.read_text()
    except (OSError, UnicodeDecodeError, ValueError, PrunekitError):
        return None         # a damaged file is said where it is read
    saved = metrics.get("config")
    if metrics.get("status") == "done" or not isinstance(saved, str) or same_values(saved, now):
        return None
    return _differing(saved, now, folder.path) or ["its text"]


def check_unfinished_unchanged(folder: RunFolder, python: bool = False) -> None:
    """Refuse, before anything is written, to carry on the unfinished run in ``folder`` when its
    config.toml was edited since it began (``edited_unfinished``): its checkpoints hold the earlier
    values' stages. One line naming both ways out: the values back, or ``force`` to run it anew."""
    changed = edited_unfinished(folder)
    if changed is None:
        return
    anew = "pass force=True" if python else "add --force"
    raise EditedConfig(f"{folder.config} was changed ({', '.join(changed[:3])}) since the unfinished run there "
                       f"began ({METRICS} keeps its values): put them back to carry it on, or {anew} to run it "
                       "anew with these values", changed, METRICS, ("force",), finished=False)


def check_asked_as_begun(folder: RunFolder, config_text: str, keys: list[str], python: bool = False) -> None:
    """Refuse, in words saying so, a call asking for the unfinished run in ``folder`` as it began
    (its values where it differs from config.toml, ``keys``, are those metrics.json keeps) when
    config.toml was edited since (``edited_unfinished``): else it read "holds another run", whose
    advice (--resume) is refused too. One line naming both fixes: config.toml's values back (then
    this same call carries the run on), or ``force`` to run it anew."""
    changed = edited_unfinished(folder)
    if not changed or not keys or set(keys) - set(changed):
        return
    try:
        began, asked = by_value(_parsed(folder.read_metrics().get("config"))), by_value(_parsed(config_text))
    except (OSError, ValueError, PrunekitError):
        return
    if any(began.get(key) != asked.get(key) for key in keys):
        return
    same, anew = (("call", "pass force=True") if python else ("command", "add --force"))
    raise EditedConfig(f"{folder.config} was edited since the unfinished run there began ({', '.join(changed[:3])}; "
                       f"{METRICS} keeps the values this {same} asks for): put them back in config.toml and this same "
                       f"{same} carries the run on, or {anew} to run it anew", changed, METRICS, ("force",),
                       finished=False)


def _parsed(config_text: str | None) -> dict:
    try:
        return tomllib.loads(config_text) if config_text is not None else {}
    except tomllib.TOMLDecodeError:
        return {}


def _fingerprinted(old: str) -> bool:
    """Whether config ``old`` records a fingerprint of what its run started from (any of
    ``FINGERPRINT_KEYS``; a Python run's of an older version records none)."""
    try:
        return bool(set(FINGERPRINT_KEYS) & tomllib.loads(old).keys())
    except tomllib.TOMLDecodeError:
        return True


def claim(folder: RunFolder, config_text: str, *, resume: bool = False, force: bool = False,
          python: bool = False, code_detail: dict | None = None) -> None:
    """Make ``folder`` this run's: refuse it when it holds another run or files a run would
    overwrite (unless ``force``, which first removes the other run's files, or this run's own once it
    finished: it runs anew); the same request again (or ``resume``) carries on where it stopped."""
    path = folder.path
    old = folder.config.read_text() if folder.config.exists() else None
    # another run's files; this run's own are carried on unless it finished, or its config.toml was
    # edited since it began (its checkpoints are the earlier values' run): force redoes it
    if force and (not same_run(old, config_text, path) or _finished_or_damaged(folder)
                  or edited_unfinished(folder) is not None):
        wrote_onnx = old is not None and _asked_onnx(old)
        for name in _present(path):
            if name == "model.onnx" and not wrote_onnx:       # the user's own file of that name
                continue
            target = path / name
            _remove_own_files(target) if target.is_dir() else target.unlink()
    elif not resume:
        check_claim(folder, config_text, python, code_detail)
        if python and old is not None and not same_values(old, config_text) and folder.writable:    # an old folder
            done = "its stored result is given back" if finished_run(folder) else "it is carried on"
            before = _parsed(old)
            counted = _counted_only(before)
            code = (", nor that this call's loss, importance function or own Method are the ones it was given"
                    if _before_code(before) else "")
            if _fingerprinted(old) and not counted and not _before_eval_batch(before):    # only the code unrecorded
                message = (f"{path} was written by a prunekit that recorded no fingerprint of the code a run is given "
                           f"(a loss, an importance function, an own Method): {done} without checking that this "
                           "call's are the ones it was made with (clear it with force=True to run anew)")
            elif _fingerprinted(old) and (counted or not _before_eval_batch(before)):
                # the weights are checked; the loader's data by its sample count only
                unrecorded = ", and neither its eval_data nor its batch size" if _before_eval_batch(before) else ""
                unchecked = ", eval_data and batch size are" if unrecorded else " is the data"
                message = (f"{path} was written by a prunekit that recorded its data by sample count only"
                           f"{unrecorded}: {done} without checking that this data{unchecked} it started from{code} "
                           "(clear it with force=True to run anew)")
            elif _fingerprinted(old):
                message = (f"{path} was written by a prunekit that recorded neither the eval_data nor the batch size "
                           f"a run reads: {done} without checking that this eval_data and batch size are the ones it "
                           f"started with{code} (clear it with force=True to run anew)")
            else:
                message = (f"{path} was written by a prunekit that recorded no fingerprint of the weights (and data) a "
                           f"run starts from: {done} without checking that this model is the one it "
                           f"started from{code} (clear it with force=True to run anew)")
            folder.log(message)
            warn_ours(PrunekitWarning(message))
    if folder.writable and (changed := _edited_before_work(folder)) is not None:
        # Decided (s53 review): an unfinished run stopped before its first checkpoint computed nothing,
        # so its edited config.toml (the call's values: check_claim refused any other) is simply started,
        # as before the edited-run refusal; the stopped attempt's own state (its starting config in
        # metrics.json, its data RNG states and code notes) goes, so the run begins from these values.
        for name in (METRICS, DATA_RNG, CODE_WRITTEN, CODE_SLOTS):
            (path / name).unlink(missing_ok=True)
        folder.log(f"config.toml was changed ({', '.join(changed[:3])}) after the unfinished run there stopped "
                   "before its first checkpoint (nothing computed to lose): started with these values")
    if folder.config.exists() and folder.writable and (made_at := moved_from(folder.config.read_text(), path)):
        moved = f"this run folder was made at {made_at} and has moved to {Path(path).resolve()}"
        if not _logged(folder, moved):        # once per move, not at every rerun or resume there
            folder.log(f"{moved}: carried on here (its config.toml keeps the out it was made with)")
    remove_stale_temporaries(folder)      # this process holds the folder's lock: no one else writes them
    if not folder.config.exists():
        atomic_write_bytes(folder.config, config_text.encode())
        folder.claimed_afresh = True


def _logged(folder: RunFolder, text: str) -> bool:
    """Whether ``folder``'s run.log has a line holding ``text`` already."""
    try:
        with open(folder.path / "run.log", encoding="utf-8", errors="replace") as log:
            return any(text in line for line in log)
    except OSError:
        return False


def _finished_or_damaged(folder: RunFolder) -> bool:
    """Whether ``folder``'s run finished (or its metrics.json cannot be read): ``force`` runs it anew."""
    try:
        return finished_run(folder)
    except PrunekitError:
        return True


def release_refused(folder: RunFolder | None) -> None:
    """Undo the claim of a run refused before its first checkpoint (bad input that only the run
    itself finds, e.g. fewer training samples than gradient rows): the config, metrics and log it
    wrote go, so that the corrected command may use the same folder. A folder this process did not
    claim afresh (a resume, the same request again) or that holds a checkpoint or a saved model keeps
    everything."""
    if folder is None or not (folder.claimed_afresh and folder.writable):
        return
    if folder.model_path.exists() or any(folder.checkpoints.glob("stage-*.safetensors")):
        return
    for name in ("config.toml", METRICS, DATA_RNG, CODE_WRITTEN, CODE_SLOTS, "run.log"):
        (folder.path / name).unlink(missing_ok=True)


def claim_on_rank_0(path: str | Path, config_text: str, *, resume: bool = False, force: bool = False,
                    device="cpu", python: bool = False, code_detail: dict | None = None) -> RunFolder:
    """``claim`` under torchrun: rank 0, the rank that writes, claims the folder and works in it;
    every other rank gets it read-only (``RunFolder.follower``) once rank 0 has claimed it, and
    then every rank must see the same folder (``check_ranks_share``). A refusal of rank 0's (an
    ``OSError`` too, as a ``PrunekitError``) is raised on every rank, so all of them stop with its
    one line rather than wait for rank 0 until the timeout. A collective: every rank calls it. One
    process: ``claim``; returns the folder."""
    from . import distributed
    collective = distributed.current()
    folder = RunFolder(path)
    if not collective.distributed:
        claim(folder, config_text, resume=resume, force=force, python=python, code_detail=code_detail)
        return folder
    collective.barrier()                 # every rank has checked the folder before rank 0 writes in it
    refusal = None
    if collective.rank == 0:
        try:
            claim(folder, config_text, resume=resume, force=force, python=python, code_detail=code_detail)
        except PrunekitError as err:
            refusal = err
        except OSError as err:              # a folder rank 0 cannot write: every rank says so
            refusal = refusal_of(err)
        except PrunekitWarning as warning:  # its warning over an older folder, made an error (-W error):
            refusal = warning               # raised on every rank, as ``errors.warn`` does, none waits alone
    refusal = collective.broadcast_object(refusal)
    if refusal is not None:
        raise refusal
    if collective.rank != 0:
        folder = folder.follower()
    check_ranks_share(folder, device)
    return folder


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


# passes over the loader per training epoch this version's checkpoints were written with (recorded
# in each checkpoint's metadata); versions before it recorded none and read their loader twice
EPOCH_PASSES = 1


class RunCheckpointer:
    """A ``StageCheckpointer`` writing ``checkpoints/stage-NNN.safetensors`` in a run folder.

    One file per stage holds the model state (``model/<key>``), the pipeline's own tensors
    (``kept/<key>``), the torch RNG states (``rng/torch``; each GPU's ``rng/cuda/<i>``) and, in the safetensors metadata, the
    stage number and history as JSON (and ``rng``: ``{}``; an older version's held NumPy's and
    ``random``'s states there, read as before and left unused: ``stages.capture_rng``); one atomic write, so a
    file is complete or absent. ``measure(model) -> dict`` (optional) adds measurements (accuracy,
    loss, counts) to the stage's record before it is written; ``on_saved(history)`` is told after
    each write. ``measure_seconds``: the time spent in ``measure`` so far, which pipelines leave
    out of their pruning time.
    """

    def __init__(self, folder: RunFolder, measure: Callable[[nn.Module], dict] | None = None,
                 on_saved: Callable[[list[dict]], None] | None = None, unit: str = "stage"):
        self.folder, self.measure, self.on_saved = folder, measure, on_saved
        self.unit = unit                # a checkpoint in run.log: stage, event (gradual), epoch (train), phase (structured)
        # how a warning over an older folder says to run it anew, in the command line's words (a
        # sweep's run, or ``prune --resume``, which takes no --force, say it otherwise)
        self.redo = "run it anew with --force"
        self.restored_seconds = 0.0     # time the stages restored by ``last`` took in earlier runs
        self.measure_seconds = 0.0
        # run.log's "resuming after stage N from ..." as ``last`` resumes; off where the command's own
        # "resume: ..." line said it already (``train``: one line per resume)
        self.log_resuming = True
        self.announced: str | None = None      # the checkpoint the "resume: ..." line named (resume_point)
        # the world size (torchrun's ranks; 1 alone) of each session whose stages the newest checkpoint
        # carries, this one last, once each time it changed: [2, 1] for a 2-rank run resumed with 1
        self.world_sizes = [_world_size()]
        # told the state ``last`` resumes from, before the pipeline carries on (the executor sets its
        # evaluation replay at the pass an uninterrupted run would read next)
        self.restored: Callable[[StageState], None] | None = None

    def _named(self, state: StageState) -> str:
        """'stage 2'; a phase with what it was: 'phase 3 (finetune, flops 0.5, epoch 1)'."""
        return self._named_at(state.stage, state.history)

    def _named_at(self, stage: int, history: list[dict]) -> str:
        last = history[-1] if self.unit == "phase" and history else {}
        if "phase" not in last:
            return f"{self.unit} {stage}"
        what = [str(last["phase"])] + [f"{k} {last[k]:g}" for k in ("flops", "epoch")
                                       if isinstance(last.get(k), (int, float))]
        return f"{self.unit} {stage} ({', '.join(what)})"

    def resume_point(self) -> str | None:
        """Where a resume carries on, for run.log's one "resume: ..." line: "after stage 2 from
        stage-002.safetensors" (a phase named with what it was), read from the newest checkpoint
        whose header reads (its tensors are read by ``last``); None when there is none. It turns
        ``last``'s own "resuming after ..." line off (``log_resuming``): ``last`` says where it
        resumed only where it had to fall back past a checkpoint that does not read."""
        for path in sorted(self.folder.checkpoints.glob("stage-*.safetensors"), reverse=True):
            try:
                with safe_open(str(path), "pt") as handle:
                    meta = handle.metadata()
                named = self._named_at(int(meta["stage"]), json.loads(meta["history"]))
            except (SafetensorError, KeyError, ValueError, TypeError, OSError):
                continue
            self.log_resuming = False
            self.announced = path.name
            return f"after {named} from {path.name}"
        return None

    def path(self, stage: int) -> Path:
        return self.folder.checkpoints / f"stage-{stage:03d}.safetensors"

    def save(self, state: StageState, model: nn.Module) -> None:
        if self.measure is not None and state.history:
            self.measure_seconds += _measure_into(state.history[-1], self.measure, model)
        if not self.folder.writable:          # another rank writes the checkpoint
            if self.on_saved is not None:
                self.on_saved(state.history)
            return
        tensors = {f"model/{k}": v.contiguous() for k, v in state.model_state.items()}
        tensors.update({f"kept/{k}": v.contiguous() for k, v in state.tensors.items()})
        tensors["rng/torch"] = state.rng["torch"]
        tensors.update({f"rng/cuda/{i}": t for i, t in enumerate(state.rng.get("cuda", []))})
        meta = {"stage": str(state.stage), "history": json.dumps(_finite(state.history)),
                "rng": json.dumps({k: v for k, v in state.rng.items() if k not in ("torch", "cuda")}),
                "extra": json.dumps(_finite(state.extra))}
        if self.folder.config.exists():       # the options the stage ran with: a resume under others is refused
            meta["config"] = self.folder.config.read_text()
        meta["world_sizes"] = json.dumps(self.world_sizes)
        meta["epoch_passes"] = str(EPOCH_PASSES)      # a resume tells this version's checkpoints from older ones
        write_tensor_file(self.path(state.stage), tensors, meta)
        self.folder.log(f"{self._named(state)} saved to {self.path(state.stage).name}")
        if self.on_saved is not None:
            self.on_saved(state.history)

    def last(self) -> StageState | None:
        """The newest readable checkpoint (a damaged one falls back to the one before); None when
        there is none. Refuses (``PrunekitError``) checkpoints none of which can be read, rather
        than starting the run over on top of them."""
        unreadable = []
        for path in sorted(self.folder.checkpoints.glob("stage-*.safetensors"), reverse=True):
            try:
                with safe_open(str(path), "pt") as handle:
                    meta = handle.metadata()
                    tensors = {k: handle.get_tensor(k) for k in handle.keys()}
                rng = {**json.loads(meta["rng"]), "torch": tensors.pop("rng/torch")}
                cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.split("/")[-1]))
                if cuda:
                    rng["cuda"] = [tensors.pop(k) for k in cuda]
                model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
                kept = {k[len("kept/"):]: v for k, v in tensors.items() if k.startswith("kept/")}
                state = StageState(int(meta["stage"]), model_state, json.loads(meta["history"]), rng,
                                   json.loads(meta.get("extra", "{}")), kept)
            except (SafetensorError, KeyError, ValueError, TypeError, OSError) as err:     # as resume_point's
                self.folder.log(f"skipping unreadable checkpoint {path.name}: {err}")
                unreadable.append(f"{path.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
                continue
            _check_same_config(self.folder, meta.get("config"), path.name)
            if self.log_resuming or (unreadable and path.name != self.announced):
                self.folder.log(f"resuming after {self._named(state)} from {path.name}")
            if self.folder.echo is not None:        # the console says what run.log says
                self.folder.echo(f"resuming {self.folder.path} after {self._named(state)}")
            self._tell_other_world_size(_world_sizes(meta), path.name)
            self._tell_older_epoch_passes(meta)
            self.restored_seconds = sum(h.get("seconds") or 0.0 for h in state.history)
            if self.restored is not None:
                self.restored(state)
            return state
        if unreadable:
            raise PrunekitError(f"no checkpoint in {self.folder.checkpoints} can be read ({unreadable[0]}): restore "
                                "it, or delete that checkpoints folder to start the run over")
        return None


    def _tell_other_world_size(self, before: list[int] | None, name: str) -> None:
        """Carry on ``world_sizes`` from the checkpoint (``before``; None: written before they were
        kept) and, where this session runs with another world size than the one that wrote it, say
        so in run.log and on stderr (a warning; rank 0 alone, the one that writes the folder): the
        ranks split the rows and sums otherwise, so the result is not the bits an uninterrupted run
        gives, only within the rounding the README documents."""
        if not before:
            return
        now = self.world_sizes[-1]
        self.world_sizes = before + ([now] if before[-1] != now else [])
        if before[-1] == now:
            return
        line = (f"resumed with {now} rank{'s' if now != 1 else ''}; {name} was written with {before[-1]}: the result "
                f"matches an uninterrupted run only within the documented rounding (resume with {before[-1]} "
                f"rank{'s' if before[-1] != 1 else ''} for the same bits)")
        self.folder.log(line)
        warn_ours(PrunekitWarning(line))        # every rank: ``errors.warn`` shows it on rank 0 alone


    def _tell_older_epoch_passes(self, meta: dict) -> None:
        """Where the checkpoint carries loader state or event records (an event, epoch or phase:
        gradual, train, structured) and was written by a prunekit older than ``EPOCH_PASSES`` (no
        ``epoch_passes`` in its metadata: that version read its loader twice per training epoch),
        say so once in run.log and on stderr: carried on, the run's data order is neither
        version's, so its weights match no uninterrupted run. Exact continuation cannot be had."""
        if self.unit not in ("event", "epoch", "phase") or "epoch_passes" in meta:
            return
        def said(fix: str) -> str:
            return (f"{self.folder.path} was written by an older prunekit that read its loader twice per epoch: "
                    "carried on, this run's weights match no uninterrupted run (of either version); "
                    f"{fix} for a reproducible result")
        self.folder.log(said(self.redo))
        warn_ours(worded_warning(said("run it anew with force=True"), said(self.redo)))     # every rank (errors.warn)


def _world_size() -> int:
    """This process's world size: the ranks of its torchrun group, 1 alone."""
    from . import distributed          # (distributed imports the solvers, which import this module's users)
    return distributed.current().size


def _world_sizes(meta: dict) -> list[int] | None:
    """A checkpoint's ``world_sizes`` (its metadata), None where it has none or they are damaged."""
    try:
        sizes = json.loads(meta.get("world_sizes") or "null")
    except ValueError:
        return None
    if not (isinstance(sizes, list) and sizes and all(isinstance(n, int) and n >= 1 for n in sizes)):
        return None
    return sizes


def check_config_unchanged(path: str | Path, anew: str | None = None) -> None:
    """Refuse, before anything is imported or run, a run folder whose config.toml is no longer the
    one its run began with (kept in metrics.json): ``--resume`` would otherwise import the model
    file an edited config names, or hand back a finished run's result for options it was not run
    with. Folders written before metrics.json kept the config are checked at their checkpoints.
    ``anew``: the command that runs it anew with config.toml's values (``--resume`` takes no --force)."""
    folder = RunFolder(path)
    saved = folder.read_metrics().get("config")
    if isinstance(saved, str):
        _check_same_config(folder, saved, METRICS, anew)


def _check_same_config(folder: RunFolder, saved: str | None, name: str, anew: str | None = None) -> None:
    """Refuse to resume from checkpoint ``name`` when the folder's config.toml is no longer the
    ``saved`` one it was written under (the stages left would run with other options). ``anew``:
    the command that runs it anew with config.toml's values, named as the other fix."""
    if saved is None or not folder.config.exists():
        return
    now = folder.config.read_text()
    if same_values(now, saved):         # (a comment is no option)
        return
    try:
        before, after = tomllib.loads(saved), tomllib.loads(now)
        changed = [k for k in {**before, **after} if before.get(k) != after.get(k)] or ["its text"]
    except tomllib.TOMLDecodeError:
        changed = ["its text"]
    other = (f"run it anew with these values (`{anew}`)" if anew is not None
             else "start a new run in another folder")
    raise PrunekitError(f"{folder.config} was changed ({', '.join(changed[:3])}) since {name} was saved: put "
                        f"its values back to carry the run on, or {other}")


class StageMeter:
    """A ``StageCheckpointer`` that keeps nothing: it only adds ``measure(model)`` to each stage's
    record (per-stage accuracy without a run folder); ``on_saved(record)`` is told after each.
    ``measure_seconds``: as ``RunCheckpointer``'s."""

    def __init__(self, measure: Callable[[nn.Module], dict], on_saved: Callable[[dict], None] | None = None):
        self.measure, self.on_saved = measure, on_saved
        self.measure_seconds = 0.0

    def last(self) -> None:
        return None

    def save(self, state: StageState, model: nn.Module) -> None:
        if state.history:
            self.measure_seconds += _measure_into(state.history[-1], self.measure, model)
            if self.on_saved is not None:
                self.on_saved(state.history[-1])


def _measure_into(record: dict, measure: Callable[[nn.Module], dict], model: nn.Module) -> float:
    """Add ``measure(model)`` to ``record``; returns the seconds it took."""
    start = time.perf_counter()
    record.update(measure(model))
    return time.perf_counter() - start


def layer_density(costs: CostModel, model: nn.Module) -> list[dict]:
    """Per weight layer: weights kept (``params``, biases aside: its nonzero weights, an embedding's
    padding row counted as kept, as ``Counts.params`` counts it) and MACs kept against dense (from
    ``costs.count``, so it holds for masked and for shrunk models alike)."""
    counts = costs.count(model)
    padding = padding_zeros(model)
    rows = []
    for layer in costs.weight_layers():
        weights = math.prod(layer.weight_shape)
        params = counts.nonzeros_by_layer.get(layer.name, 0) + padding.get(layer.param_name, 0)
        macs = counts.macs_by_layer.get(layer.name, 0)
        rows.append({"name": layer.name, "kind": layer.kind, "dense_params": weights, "params": params,
                     "dense_macs": layer.macs, "macs": macs,
                     "params_kept": params / weights if weights else 1.0,
                     "macs_kept": macs / layer.macs if layer.macs else 1.0})
    return rows


def check_ranks_share(folder: RunFolder, device="cpu") -> None:
    """Under torchrun, refuse (on every rank, one line) ranks that see different things in the run
    folder: on several machines it must be one folder they share. Otherwise the ranks would carry
    on from different stages or epochs (a collective mismatch, or another run). A collective."""
    from . import distributed
    names = sorted(p.name for p in folder.checkpoints.glob("stage-*.safetensors"))
    done = folder.read_metrics().get("status") == "done" or (
        (folder.path / "result.json").exists() and folder.model_path.exists())     # a prune or a training run
    listed = int.from_bytes(hashlib.sha256(",".join(names).encode()).digest()[:8], "little") >> 1
    differ = distributed.disagreeing({"done": int(done), "checkpoints": len(names), "names": listed}, device)
    if differ:
        size = distributed.current().size
        dones, counts = differ.get("done", [int(done)] * size), differ.get("checkpoints", [len(names)] * size)
        others = [r for r in range(size) if any(v[r] != v[0] for v in differ.values())]
        views = ", ".join(f"rank {r} finds " + ("a finished run" if dones[r] else f"{counts[r]} checkpoint(s)"
                                                if counts[r] else "nothing") for r in [0, *others])
        raise PrunekitError(f"the ranks see different run folders at {folder.path} ({views}): on "
                            "several machines the run folder must be on a file system they all share, at the same "
                            "path (rank 0 writes it, every rank reads it to resume)")
