"""The one exception type that reaches users.

Every check on user input raises :class:`PrunekitError` with a message that says what is
wrong *and what to change*. The CLI prints that message on one line and exits with code 2;
library users can catch it like any ``ValueError``.
"""


class PrunekitError(ValueError):
    """Bad input from the user: the message names the fix."""


def refusal_of(err: OSError) -> PrunekitError:
    """An ``OSError`` (an unwritable --out, a full disk, unreadable data) as our one line."""
    return PrunekitError(f"{err.strerror or err}: {err.filename or ''} (check the path and its permissions)")


class PrunekitWarning(UserWarning):
    """Something the user should know that does not stop the run (one line, our words; the
    CLI prints it as ``prunekit: warning: ...``)."""
