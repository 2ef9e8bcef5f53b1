"""Method options, declared once with their constraints and checked the same way for every caller.

Each method's options are a dataclass deriving from ``Options``; its ``constraints`` name, per
field, what a value must be (as scikit-learn's ``_parameter_constraints`` do)::

    @dataclass
    class QuadraticOptions(Options):
        fisher_samples: int = 1000
        schedule: str = "poly"
        constraints = {"fisher_samples": Integer(1), "schedule": OneOf(KINDS)}

``ChitaOptions.from_user(raw, method="chita")`` refuses an option the method does not take (by
name, listing the ones it does), a value that breaks its constraint, and returns the options
with the user's values over the defaults (``None`` = the default). Messages name the parameter
as Python spells it (``fisher_samples``); ``cli_message`` shows the same message with each
parameter as its command-line flag (``--fisher-samples``), so Python and the CLI refuse alike.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from .errors import PrunekitError
from .suggest import closest


class OptionError(PrunekitError):
    """A refused option; ``params`` are the parameter names the message mentions."""

    def __init__(self, message: str, params: tuple[str, ...] = (), listed: tuple[str, ...] = ()):
        super().__init__(message)
        self.params = tuple(params)
        self.listed = tuple(listed)     # a list of options the message gives, comma-separated


def cli_message(err: PrunekitError, flags: set[str] | None = None) -> str:
    """The message of ``err`` with every parameter it names written as its flag (``--flops``);
    ``flags``: the parameters that have a flag (default: all)."""
    text = getattr(err, "cli_text", None) or str(err)     # errors.worded: the command line's words
    listed = getattr(err, "listed", ())
    if listed and flags is not None:     # options without a flag of this command are Python's alone
        text = text.replace(", ".join(listed), ", ".join(n for n in listed if n in flags) or "none")
    for name in sorted(getattr(err, "params", ()), key=len, reverse=True):
        if flags is not None and name not in flags:
            continue
        text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", "--" + name.replace("_", "-"), text)
    return text


# float32, the precision models compute in: its largest finite value and its smallest normal one
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38
# counts (batches, samples, steps) are bounded by what Python's islice / range take
MAX_COUNT = sys.maxsize


# Real(..., use=...): how a value is used beyond itself, that must fit float32 too: (the largest
# value whose use fits, why)
SQUARED = (math.sqrt(FLOAT32_MAX), "its square scales the loss in float32")
ADAM_LR = (FLOAT32_MAX / 10, "Adam's first step is 10 times it, in float32")


def float32_problem(value: float, positive: bool = False, use: tuple[float, str] | None = None) -> str | None:
    """What is wrong with a finite number that a model uses in float32 (an lr, a decay, a
    temperature, a std), completing "must be ...", or None when it fits: beyond float32's range
    (it would overflow to inf mid-run), or, with ``positive`` (0 refused), nonzero but below
    float32's smallest normal number (0 or all precision lost there: an lr of 1e-320 trains
    nothing). ``use``: (top, why): its use overflows past ``top`` (``SQUARED``: a distillation
    temperature scales the loss by T²; ``ADAM_LR``)."""
    top, why = use or (FLOAT32_MAX, "the model computes in float32")
    if abs(value) > top:
        return f"at most {top:.3g} ({why}), got {value!r}"
    if positive and 0 < abs(value) < FLOAT32_TINY:
        return f"at least {FLOAT32_TINY:.3g} (smaller is 0 in float32, which the model computes in), got {value!r}"
    return None


@dataclass(frozen=True)
class Integer:
    """A whole number >= ``low`` (and <= ``high`` when given; at most ``MAX_COUNT`` always)."""

    low: int | None = None
    high: int | None = None

    def check(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"a whole number, got {value!r}"
        return _range(value, self.low, self.high if self.high is not None else MAX_COUNT)


@dataclass(frozen=True)
class IntegerOrAuto(Integer):
    """A whole number >= ``low``, or "auto" (chosen by the method, e.g. what fits in memory)."""

    def check(self, value) -> str | None:
        if value == "auto":
            return None
        problem = super().check(value)
        return problem and f"'auto' or {problem}"


@dataclass(frozen=True)
class Memory:
    """A size in bytes: an integer of at least 1 MiB, or a string like "16G", "1.5GiB", "500MB"."""

    def check(self, value) -> str | None:
        from .memory_plan import parse_memory
        try:
            parse_memory(value)
        except PrunekitError as err:
            return str(err).removeprefix("max_memory must be ")
        return None


@dataclass(frozen=True)
class Real:
    """A number in (``low``, ...) when ``open_low`` else [``low``, ...]; ``high`` likewise; and
    one that float32 holds (``float32_problem``; ``use``: its use too, e.g. ``SQUARED``)."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    use: tuple[float, str] | None = None

    def check(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"a number, got {value!r}"
        if not math.isfinite(value):
            return f"a finite number, got {value!r}"
        if self.open_low and self.low is not None and not value > self.low:
            return f"above {self.low:g}, got {value!r}"
        return _range(value, self.low, self.high) or float32_problem(
            value, positive=self.open_low and self.low == 0, use=self.use)


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def check(self, value) -> str | None:
        return None if value in self.choices else f"one of {', '.join(map(str, self.choices))}, got {value!r}"


@dataclass(frozen=True)
class Flag:
    def check(self, value) -> str | None:
        return None if isinstance(value, bool) else f"true or false, got {value!r}"


@dataclass(frozen=True)
class Shares:
    """A list of shares, each in (0, 1)."""

    def check(self, value) -> str | None:
        if not isinstance(value, (list, tuple)) or not value:
            return f"a list of shares in (0, 1), got {value!r}"
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1]
        return f"shares in (0, 1), got {bad[0]!r}" if bad else None


@dataclass(frozen=True)
class Callable_:
    """A function (e.g. an importance score)."""

    def check(self, value) -> str | None:
        return None if callable(value) else f"a function, got {type(value).__name__}"


def _range(value, low, high) -> str | None:
    shown = lambda bound: str(bound) if isinstance(bound, int) else f"{bound:g}"     # noqa: E731
    if low is not None and value < low:
        return f"at least {shown(low)}, got {value!r}"
    if high is not None and value > high:
        return f"at most {shown(high)}, got {value!r}"
    return None


@dataclass
class Options:
    """Base of every method's options: the fields and ``constraints`` say it all.

    ``given``: the names of the options the user set (``from_user`` records them; empty for
    options built directly), for the "auto" choices that keep what the user asked for."""

    constraints: ClassVar[dict[str, Any]] = {}
    # option -> (the option it needs, an example of that option): one given without the other is
    # refused ("auto" does not count as given: it may turn the needed option off)
    requires: ClassVar[dict[str, tuple[str, str]]] = {}

    given: ClassVar[frozenset] = frozenset()

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_user(cls, raw: dict, method: str, **defaults) -> "Options":
        """Check ``raw`` (user options; None = default) for ``method`` and build the options.

        ``defaults`` are the method's own defaults over the class's (chita++: ``stages=15``).
        """
        given = {k: v for k, v in raw.items() if v is not None}
        names = cls.names()
        for key in given:
            if key not in names:
                raise unknown_option(key, method, names)
        for key, value in given.items():
            rule = cls.constraints.get(key)
            problem = rule.check(value) if rule is not None else None
            if problem:
                raise OptionError(f"{key} must be {problem}", (key,))
        values = {**defaults, **given}
        for key, (needed, example) in cls.requires.items():
            needed_value = values.get(needed, defaults_of(cls).get(needed))
            if key in given and (not needed_value or needed_value == "auto"):
                raise OptionError(f"{key} {given[key]} needs {needed} ({example})", (key, needed))
        options = cls(**values)
        options.given = frozenset(given)
        options.check_given()
        return options

    def check_given(self) -> None:
        """Refuse options the user set that the other settings leave idle (``given`` is known)."""

    def to_dict(self) -> dict:
        """The options as plain values (functions by their name), for records and config files."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = getattr(value, "__name__", repr(value)) if callable(value) else value
        return out


BUDGET_KEYS = ("sparsity", "flops", "params")     # given beside a method's options, not among them


def unknown_option(key: str, method: str, names: list[str]) -> OptionError:
    close = closest(key, [*names, *BUDGET_KEYS])      # "flop" is most likely the budget's "flops"
    hint = f" (did you mean {close}?)" if close else ""
    takes = ", ".join(names) if names else "none"
    return OptionError(f"method {method} takes no option {key}{hint}; its options: {takes}",
                       (key, *([close] if close else []), *names), listed=tuple(names))


def defaults_of(cls) -> dict:
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
