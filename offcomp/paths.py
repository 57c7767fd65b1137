"""Output paths, checked before any work: a bad destination must cost seconds, not a fitted model.

`check_output` is the one check every command runs on its destinations (compress --out, eval-ppl
--results, export's destination, capture --out, finetune-glue/squad/eval-sts --out).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from .errors import OffcompError


def local_dir(name: str | Path | None) -> Path | None:
    """The directory a model name points at, if it is a local one (hub ids and embedded names: None)."""
    if name is None:
        return None
    p = Path(name).expanduser()
    return p.resolve() if p.is_dir() else None


def check_output(
    path: str | Path,
    *,
    kind: Literal["dir", "file"],
    option: str,
    sources: Iterable[str | Path | None] = (),
    exists_ok: bool = True,
    replaces: bool = False,
) -> Path:
    """Refuse an output path that cannot or must not be written, before anything is computed.

    `kind`: a directory (written whole) or a file (appended to). `sources`: input directories it must
    not be, lie inside, or (when `replaces`, i.e. an existing directory is swapped out) contain.
    `exists_ok=False`: an existing destination is an error (the caller did not ask to overwrite)."""
    p = Path(path).expanduser()
    where = p.resolve()
    for src in filter(None, (local_dir(s) for s in sources)):
        if where == src:
            raise OffcompError(f"{option} {p} is the source model directory; choose another path")
        if src in where.parents:
            raise OffcompError(f"{option} {p} lies inside the source model directory {src}; choose a path outside it")
        if replaces and where in src.parents:
            raise OffcompError(f"{option} {p} contains the source model directory {src}, which replacing it "
                               "would destroy; choose another path")
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise OffcompError(f"{option} {p} exists and is not a directory; choose a directory path")
        if kind == "file" and p.is_dir():
            raise OffcompError(f"{option} {p} is a directory; give a file path (e.g. {p}/results.jsonl)")
        if not exists_ok:
            raise OffcompError(f"{p} already exists; choose another {option} or pass --overwrite")
        if kind == "file" and not os.access(p, os.W_OK):
            raise OffcompError(f"{option} {p} is not writable")
    # The nearest existing ancestor must be a writable directory (the rest is created later).
    anc = where.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OffcompError(f"cannot create {option} {p}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OffcompError(f"cannot write {option} {p}: {anc} is not writable")
    return p
