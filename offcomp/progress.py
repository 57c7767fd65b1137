"""Progress reporting without a UI dependency: the library calls `progress(label, done, total)`,
trained methods add what they are minimising, `progress(label, done, total, {"loss": 0.12})`;
the CLI turns it into one rich progress line (`offcomp.cli.rich_progress`).

The fourth argument is optional on both sides: a callback written for three arguments keeps
working (`with_info` drops the extra), and callers that have no loss never pass one."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol


class ProgressFn(Protocol):
    def __call__(self, label: str, done: int, total: int, info: dict[str, float] | None = None, /) -> None: ...


def no_progress(label: str, done: int, total: int, info: dict[str, float] | None = None) -> None:
    return None


def with_info(progress: Callable[..., None]) -> ProgressFn:
    """`progress` if it takes the optional info argument, else a wrapper that drops it."""
    try:
        params = list(inspect.signature(progress).parameters.values())
    except (TypeError, ValueError):  # builtins and C callables: assume the three-argument form
        params = []
    if any(p.kind is p.VAR_POSITIONAL for p in params) or len(params) >= 4:
        return progress  # type: ignore[return-value]

    def three(label: str, done: int, total: int, info: dict[str, float] | None = None, /) -> None:
        progress(label, done, total)

    return three
