"""User-facing errors.

Anything the user can fix (a bad plan, a missing file, a rank that saves nothing) raises
`OffcompError`; the CLI prints its message as one line and exits with code 2. Bugs stay
ordinary exceptions: the CLI names them in one line (exit code 1) and `--debug` / OFFCOMP_DEBUG=1
shows their traceback.
"""


class OffcompError(Exception):
    """A problem with the user's input, with a message that says how to fix it."""


# Exit codes of the `offcomp` command (documented in its --help and the README).
EXIT_INTERNAL = 1  # an unexpected exception (a bug): one line, --debug / OFFCOMP_DEBUG=1 for the traceback
EXIT_USER = 2  # OffcompError or a bad option value: one line, nothing written
EXIT_NON_FINITE = 3  # the result holds a NaN/Inf or overflowing number: recorded as null + reason
