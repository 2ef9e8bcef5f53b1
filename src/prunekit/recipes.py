"""Recipes: a command's options in a TOML file (``prunekit prune --recipe run.toml``).

The schema is the command's own argparse parser: every option of the command is a key (its
long name, with ``-`` or ``_``: ``fisher-samples`` or ``fisher_samples``), with the option's type
(int, float, string; a list for options taking several values; true/false for switches) and
choices. Any other key, or a value of the wrong type, is refused naming the key. Recipe values
become the parser's defaults, so flags given on the command line override them. Relative paths
are relative to the working directory, as on the command line.

``dump_recipe`` writes resolved options back as TOML (the run folder's ``config.toml``), which
``--recipe`` and ``--resume`` read again.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import tomllib
from pathlib import Path

from .errors import PrunekitError
from .suggest import closest

# Options that are about *this* invocation, not the run: never in a recipe.
NOT_IN_RECIPES = {"help", "recipe", "resume", "json", "func", "command"}


def int_or_auto(value) -> int | str:
    """An option type: a whole number, or "auto" (``--fisher-samples``)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {value!r}") from None


def schema(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The recipe keys of ``parser`` (option dests) and their argparse actions."""
    return {a.dest: a for a in parser._actions if a.dest not in NOT_IN_RECIPES and a.option_strings}


def _special_kind(path: Path) -> str:
    """What a path that exists but is neither a file nor a folder is (``/dev/null``: a device)."""
    mode = path.stat().st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def _recipe_text(path: Path) -> str:
    """The recipe's text (utf-8-sig: a byte-order mark, as Notepad writes, is no key). A pipe is read
    as a file is (``--recipe <(sed ... base.toml)``, ``/dev/stdin``), but opened without waiting for a
    writer: a named pipe nobody writes to is refused instead of blocking the read forever."""
    if not (path.exists() and stat.S_ISFIFO(path.stat().st_mode)):
        return path.read_text(encoding="utf-8-sig")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)            # a writer there: read to its end; none: the end at once
    with os.fdopen(fd, "rb") as pipe:
        data = pipe.read()
    if not data:
        raise PrunekitError(f"recipe {path} is a pipe nothing was written to: pass the TOML file (keys = option "
                            "names), or write the recipe into the pipe")
    return data.decode("utf-8-sig")


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> dict:
    """Read and validate a TOML recipe against ``parser``; returns {dest: value}."""
    path = Path(path)
    if path.is_dir():
        raise PrunekitError(f"recipe {path} is a folder: pass the TOML file (e.g. {path / 'config.toml'})")
    if path.exists() and not path.is_file() and not stat.S_ISFIFO(path.stat().st_mode):
        raise PrunekitError(f"recipe {path} is {_special_kind(path)}, not a file: pass the TOML file (keys = "
                            "option names)")
    try:
        raw = tomllib.loads(_recipe_text(path))
    except FileNotFoundError:
        raise PrunekitError(f"recipe {path} does not exist: check the path") from None
    except UnicodeDecodeError:
        raise PrunekitError(f"recipe {path} is not a text file: pass a TOML recipe (keys = option names)") from None
    except OSError as err:
        raise PrunekitError(f"cannot read recipe {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise PrunekitError(f"recipe {path} is not valid TOML: {err}") from None
    return validate(raw, parser, str(path))


def validate(raw: dict, parser: argparse.ArgumentParser, where: str = "recipe") -> dict:
    """Check every key and value of ``raw`` against ``parser``'s options; returns {dest: value}."""
    actions = schema(parser)
    values = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if isinstance(value, dict):
            raise PrunekitError(f"{where} has a table [{key}]: a recipe holds flat keys (option = value) "
                                "and no tables; move its keys to the top, or remove it")
        if dest in ("recipe", "resume", "json"):         # flags of one invocation, not options of the run
            raise PrunekitError(f"key {key!r} can't be in a recipe ({where}): it is about one command, not the run; "
                                f"give --{dest.replace('_', '-')} on the command line and remove the key")
        if dest not in actions:
            close = closest(dest, actions)
            if close and not _underscored(key, raw):     # in the spelling the recipe uses
                close = close.replace("_", "-")
            hint = f" (did you mean {close!r}?)" if close else ""
            raise PrunekitError(f"unknown key {key!r} in {where}: not an option of `{parser.prog}`{hint}")
        if dest in values:          # fisher-samples and fisher_samples: the last would win unseen
            raise PrunekitError(f"key {key!r} in {where} is given twice (with - and with _): keep one")
        values[dest] = _convert(actions[dest], key, value, where)
    return values


def _underscored(key: str, raw: dict) -> bool:
    """The recipe spells keys with underscores (fisher_samples), judged by ``key`` itself, else by
    its other keys; hyphens (fisher-samples, as saved run configs and the flags spell them) otherwise."""
    if "-" in key or "_" in key:
        return "_" in key
    return any("_" in other for other in raw) and not any("-" in other for other in raw)


def apply_recipe(parser: argparse.ArgumentParser, values: dict) -> None:
    """Make ``values`` the parser's defaults (flags still override); options they give are no
    longer required on the command line."""
    for action in schema(parser).values():
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)


def _convert(action: argparse.Action, key: str, value, where: str):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise PrunekitError(f"key {key!r} in {where} is a switch: give true or false, not {value!r}")
        return value
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            value = [value]                 # one value where a list is taken: method = "falcon" in a sweep
        if action.nargs == "+" and not value:
            raise PrunekitError(f"key {key!r} in {where} needs at least one value")
        return [_scalar(action, key, v, where) for v in value]
    return _scalar(action, key, value, where)


def _scalar(action: argparse.Action, key: str, value, where: str):
    kind = action.type or str
    ok = not isinstance(value, (bool, list, dict))
    if kind is int:
        ok = ok and isinstance(value, int)
    elif kind is float:
        ok = ok and isinstance(value, (int, float))
        value = float(value) if ok else value
    elif kind is int_or_auto:
        ok = ok and (value == "auto" or isinstance(value, int))
    elif kind is str:
        ok = ok and isinstance(value, (str, int, float))   # budgets read well as numbers: flops = 0.3
        value = str(value) if ok else value
    else:               # an option type of its own (--device, a share): it reads the text as on the command line
        ok = ok and isinstance(value, (str, int, float))
        try:
            value = kind(str(value)) if ok else value
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise PrunekitError(f"key {key!r} in {where}: {err}") from None
    if not ok:
        several = " (one value here: a sweep takes lists)" if isinstance(value, list) else ""
        raise PrunekitError(f"key {key!r} in {where} must be {_type_name(kind)}{several}, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise PrunekitError(f"key {key!r} in {where} must be one of {', '.join(map(str, action.choices))}, "
                            f"got {value!r}")
    return value


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", int_or_auto: "an integer or auto"}.get(kind, "a string or a number")


def dump_recipe(values: dict) -> str:
    """TOML for flat {key: str | int | float | bool | list}; None values are left out (= default)."""
    lines = []
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key.replace('_', '-')} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)    # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise PrunekitError(f"cannot write {value!r} to a recipe")
