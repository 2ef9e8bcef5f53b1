"""The claim of a run folder: making it one run's (``claim``; ``force`` clears another run's files),
refusing it when it holds another run or files a run would overwrite (``check_claim``), undoing a
claim refused before its first checkpoint, and the same under torchrun (rank 0 claims, every rank
checks that it sees the same folder). A folder belongs to one run: ``claim`` refuses another
request onto it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import PrunekitError, PrunekitWarning, refusal_of
from .options import OptionError
from .saving import atomic_write_bytes
from .errors import warn as warn_ours
from .run_configs import _asked_onnx, _asks_onnx, _differing, _parsed, moved_from, same_run, same_values
from .run_digests import (EVAL_BATCH_KEYS, FINGERPRINT_KEYS, _before_code, _before_eval_batch, _code_key,
                          _counted_only, _data_form, _earlier_digests, _fingerprinted, earlier_rule, other_code)
from .run_edits import (_edited_before_work, check_asked_as_begun, check_finished_unchanged,
                        check_unfinished_unchanged, edited_unfinished)
from .run_folder import (CODE_SLOTS, CODE_WRITTEN, DATA_RNG, METRICS, RunFolder, _present, _remove_own_files,
                         finished_run, remove_stale_temporaries)


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


def check_claim(folder: RunFolder, config_text: str, python: bool = False, code_detail: dict | None = None) -> None:
    """Refuse ``folder`` when it holds another run or files a run would overwrite (writes nothing);
    ``python``: the refusal in the API's words (``prunekit.prune`` has no resume, only the same
    call again); ``code_detail``: where the code given differs (``other_code``)."""
    present = _present(folder.path)
    if present:
        old = folder.config_text() if folder.config.exists() else None
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


def claim(folder: RunFolder, config_text: str, *, resume: bool = False, force: bool = False,
          python: bool = False, code_detail: dict | None = None) -> None:
    """Make ``folder`` this run's: refuse it when it holds another run or files a run would
    overwrite (unless ``force``, which first removes the other run's files, or this run's own once it
    finished: it runs anew); the same request again (or ``resume``) carries on where it stopped."""
    path = folder.path
    old = folder.config_text() if folder.config.exists() else None
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
    if folder.config.exists() and folder.writable and (made_at := moved_from(folder.config_text(), path)):
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
