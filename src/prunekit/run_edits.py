"""Whether a run folder's config.toml was edited since its run recorded it (metrics.json keeps the
config a prune run began with, result.json a training's settings, each checkpoint the config its
stage ran under), and the refusals that say so before a finished run is handed back for other
settings or an unfinished one is carried on under them."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from .errors import PrunekitError
from .options import OptionError
from .run_configs import _differing, _parsed, by_value, same_run, same_values
from .run_folder import METRICS, RunFolder


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
        now = folder.config_text()
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
        metrics, now = folder.read_metrics(), folder.config_text()
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
    now = folder.config_text()
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
