"""User-facing errors.

Anything the user can fix (a bad plan, a missing file, a rank that saves nothing) raises
`OffcompError`; the CLI prints its message as one line and exits with code 2. Bugs stay
ordinary exceptions so they keep their tracebacks.
"""


class OffcompError(Exception):
    """A problem with the user's input, with a message that says how to fix it."""
