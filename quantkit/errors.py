"""The one exception type that reaches users as a single line."""


class QuantkitError(Exception):
    """Bad input or environment: the CLI prints ``str(error)`` on one line and exits non-zero.

    Library code raises this (never ``sys.exit``) for anything the user can fix: a missing path,
    an unknown scheme, NaN weights, a file that is not what it claims to be.
    """


class RunInterrupted(QuantkitError):
    """The run was interrupted after committing some blocks; the message says how to resume."""

    exit_code = 130
