"""The one exception type that reaches users as a single line."""


class QuantkitError(Exception):
    """Bad input or environment: the CLI prints ``str(error)`` on one line and exits non-zero.

    Library code raises this (never ``sys.exit``) for anything the user can fix: a missing path,
    an unknown scheme, NaN weights, a file that is not what it claims to be.
    """


class RunInterrupted(QuantkitError):
    """The run was interrupted after committing some blocks; the message says how to resume."""

    exit_code = 130


def first_line(error: BaseException, limit: int = 200, typed: bool = False) -> str:
    """The first non-empty line of ``str(error)``, cut to ``limit`` characters, for a one-line message.

    An exception without text (``ValueError()``) gives its type name, so a message never ends in ``: ``
    and an empty text never raises here. ``typed`` prefixes the type name: ``"OSError: disk full"``.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    name = type(error).__name__
    if not lines:
        return name
    return f"{name}: {lines[0][:limit]}" if typed else lines[0][:limit]
