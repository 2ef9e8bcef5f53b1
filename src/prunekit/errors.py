"""The one exception type that reaches users.

Every check on user input raises :class:`PrunekitError` with a message that says what is
wrong *and what to change*. The CLI prints that message on one line and exits with code 2;
library users can catch it like any ``ValueError``.
"""

import codecs
import contextlib
import errno
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
    """An ``OSError`` (an unwritable --out, a full disk, unreadable data) as our one line. A full
    disk is no matter of paths or permissions, and an error with no file named (a write to an open
    file or to stdout: ``prunekit info > /dev/full``) names none."""
    where = f" {err.filename}" if err.filename else ""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return PrunekitError(f"{err.strerror or err} writing{where or ' the output'}: the disk (or the quota) it "
                             "goes to is full; free some space there, or write the output elsewhere")
    if not where:
        return PrunekitError(f"{err.strerror or err} reading or writing a file or the output: check the files and "
                             "folders the command uses, where its output goes, and their permissions")
    return PrunekitError(f"{err.strerror or err}:{where} (check the path and its permissions)")


def say(line: str) -> None:
    """Print ``line`` (a refusal) to stderr. Where stderr cannot be written (``2>/dev/full``, a
    closed pipe), the line is lost but the exit code (2) still says it: stderr is pointed at
    os.devnull, so neither this write nor the interpreter's last flush raises (exit 1, 120)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stderr.fileno())
            os.close(devnull)
            sys.stderr.flush()                  # what was kept of the line goes to devnull
        except (OSError, ValueError, AttributeError):
            pass


def _shown(err: UnicodeError) -> tuple[str, int]:
    """Codec error handler "prunekit-shown": a character the output's encoding cannot take, shown
    as its escape: a byte of a file name that is not valid UTF-8 (read as a surrogate, U+DC80..U+DCFF)
    as that byte, ``\\xff``; any other as ``\\uXXXX`` (as "backslashreplace" does)."""
    if not isinstance(err, UnicodeEncodeError):
        raise err
    text = err.object[err.start:err.end]
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("ascii", "backslashreplace").decode("ascii") for c in text), err.end


codecs.register_error("prunekit-shown", _shown)


@contextlib.contextmanager
def printable_paths():
    """While in it, stdout and stderr print any user path: a path whose name is not valid UTF-8
    (``--out $'bad\\xffname'``, read by Python with surrogates in it) would raise
    UnicodeEncodeError from print on a stream of strict encoding errors (a UTF-8 locale's stdout),
    after the run was done; here it prints as ``bad\\xffname`` (``_shown``). A stream that already
    copes (the C locale's surrogateescape writes the bytes back as they were) is left as it is,
    and each is put back as it was."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) in ("strict", "backslashreplace") and hasattr(stream, "reconfigure"):
            try:
                before = stream.errors
                stream.reconfigure(errors="prunekit-shown")
                changed.append((stream, before))
            except (OSError, ValueError, AttributeError):    # closed, or its buffer cannot be flushed
                pass
    try:
        yield
    finally:
        for stream, before in changed:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.reconfigure(errors=before)


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
