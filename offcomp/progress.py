"""Progress reporting without a UI dependency: the library calls `progress(label, done, total)`;
the CLI turns it into a rich progress bar."""

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]


def no_progress(label: str, done: int, total: int) -> None:
    return None
