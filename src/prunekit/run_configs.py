"""Whether two run configs (config.toml texts) ask for the same run: the settings where they
differ, budgets compared by the amounts they spell, comments aside, and an ``out`` that names where
a moved or copied folder was made."""

from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import PrunekitError


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


def _parsed(config_text: str | None) -> dict:
    try:
        return tomllib.loads(config_text) if config_text is not None else {}
    except tomllib.TOMLDecodeError:
        return {}
