"""The one exception type that reaches users.

Every check on user input raises :class:`PrunekitError` with a message that says what is
wrong *and what to change*. The CLI prints that message on one line and exits with code 2;
library users can catch it like any ``ValueError``.
"""

import logging
import os
import shlex
import sys
import warnings


def _rebuilt(cls: type, args: tuple) -> BaseException:
    """``cls`` with ``args`` as its ``.args``, its ``__init__`` not called (``__reduce__``)."""
    return cls.__new__(cls, *args)


class PrunekitError(ValueError):
    """Bad input from the user: the message names the fix.

    Every subclass pickles (rank 0's refusal is broadcast to the other ranks) whatever its
    ``__init__`` takes: it is rebuilt from ``.args`` (the message) and its attributes
    (``params``, ``cli_text``, ...), not by calling its constructor again."""

    def __reduce__(self):
        return _rebuilt, (type(self), self.args), self.__dict__ or None


def pip_install(what: str) -> str:
    """The command that installs ``what`` (``onnx``, ``'prunekit[export]'``) into the interpreter
    running prunekit: ``/path/to/python -m pip install what``. A bare ``pip`` on PATH may be another
    environment's (a venv never activated), which would install it where prunekit does not look."""
    return f"{shlex.quote(sys.executable or 'python')} -m pip install {what}"


def worded(python: str, command_line: str) -> PrunekitError:
    """A refusal whose fix is spelt one way in Python (``load_dataset('mnist', ...)``, ``crop=``)
    and another on the command line (``--data mnist``, ``--crop``): ``str()`` gives the first,
    the CLI prints the second (``options.cli_message``)."""
    err = PrunekitError(python)
    err.cli_text = command_line
    return err


def refusal_of(err: OSError) -> PrunekitError:
    """An ``OSError`` (an unwritable --out, a full disk, unreadable data) as our one line."""
    return PrunekitError(f"{err.strerror or err}: {err.filename or ''} (check the path and its permissions)")


def single_sample_batchnorm(err: ValueError) -> PrunekitError | None:
    """torch's refusal of a batch of one sample in a BatchNorm layer that takes its statistics
    from the batch (training, re-estimation) as our one line; None for any other error."""
    if "Expected more than 1 value per channel when training" not in str(err):
        return None
    return PrunekitError("a training batch of one sample reached a BatchNorm layer, which takes its statistics from "
                         "the batch: give the training data no batch of one sample (a DataLoader with drop_last=True, "
                         "or another batch size)")


def input_fix(x, model, otherwise: str) -> str:
    """What to change when ``model`` failed on input ``x``: its dtype where that is not the
    weights' (float64 inputs, uint8 pixels), else ``otherwise``."""
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    dtype = getattr(x, "dtype", None)
    if weights is None or dtype is None or dtype == weights:
        return otherwise
    name = lambda d: str(d).removeprefix("torch.")      # noqa: E731
    if dtype.is_floating_point:
        return f"its inputs are {name(dtype)} and the model's weights {name(weights)}: convert them (x.to({weights}))"
    return (f"its inputs are {name(dtype)} and the model's weights {name(weights)}: convert them to {name(weights)}, "
            "scaled and normalized as the model was trained")


class PrunekitWarning(UserWarning):
    """Something the user should know that does not stop the run (one line, our words; the
    CLI prints it as ``prunekit: warning: ...``)."""

    __reduce__ = PrunekitError.__reduce__


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(warning: PrunekitWarning) -> None:
    """Issue one of prunekit's warnings (a ``PrunekitWarning``) as the user should see it: located
    at the user's line that called into prunekit (the caller of the outermost prunekit frame on the
    stack: the ``prunekit.prune(...)`` line of a script; for the CLI, which prints our warnings as
    one line, where no location is shown), not at the library line that noticed it; and under
    torch.distributed (torchrun) on rank 0 alone: every rank runs the same call on the same files,
    so each would say it (the README: warnings are rank 0's). Filters apply as to any warning
    (``-W error`` raises it; ``-W ignore`` hides it), on every rank: a filter that turns it into an
    error raises it on the other ranks too (each rank runs the same script, with the same filters),
    though they print nothing. Before, rank 0 alone raised under ``python -W error`` and the others
    went on to their next collective, to fail there on a raw connection error (or wait for rank 0
    until the group's timeout): now every rank raises the same warning at the same point, no
    collective needed (a rank may meet a warning where the others wait in none)."""
    frame, level, outermost = sys._getframe(1), 1, 1
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE):
            outermost = level
        frame, level = frame.f_back, level + 1
    if _not_rank_0():
        with warnings.catch_warnings(record=True):       # shown nowhere; an "error" filter still raises it
            warnings.warn(warning, stacklevel=outermost + 2)
        return
    warnings.warn(warning, stacklevel=outermost + 2)     # 1: this function; level + 1: the frame at level


def _not_rank_0() -> bool:
    """Whether this process is a rank other than 0 of a torch.distributed group of several."""
    torch = sys.modules.get("torch")
    try:
        dist = torch.distributed if torch is not None else None
        return bool(dist is not None and dist.is_available() and dist.is_initialized()
                    and dist.get_world_size() > 1 and dist.get_rank() != 0)
    except (AttributeError, RuntimeError, ValueError):
        return False


def worded_warning(python: str, command_line: str) -> PrunekitWarning:
    """A warning whose fix is spelt one way in Python (``example_input=``) and another on the
    command line (``--exclude down``): ``str()`` gives the first, the CLI prints the second."""
    warning = PrunekitWarning(python)
    warning.cli_text = command_line
    return warning


NOTES = logging.getLogger("prunekit")


def note(message: str) -> None:
    """Say something informational that is no possible mistake (a finished run given back, not
    run): not a ``PrunekitWarning``, so ``python -W error`` (or pytest's ``filterwarnings = error``)
    does not turn it into an exception. Logged at INFO on the ``"prunekit"`` logger where logging is
    configured (a handler on it or the root: routed and filtered as configured there); otherwise
    printed to stderr as ``prunekit: note: ...``, unless that logger's level was set above INFO
    (``logging.getLogger("prunekit").setLevel(logging.WARNING)`` silences notes) or logging was
    switched off at INFO or above (``logging.disable(logging.INFO)``, ``logging.disable()``)."""
    if NOTES.hasHandlers():
        NOTES.info(message)
    elif logging.root.manager.disable < logging.INFO \
            and (NOTES.level == logging.NOTSET or NOTES.isEnabledFor(logging.INFO)):
        print(f"prunekit: note: {message}", file=sys.stderr, flush=True)
