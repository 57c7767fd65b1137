"""Text sources for evaluation and calibration.

Every source is resolved to the same shape: a list of *rows* exactly as HF `wikitext-2-raw-v1`
stores them, i.e. one row per line of the raw file, a non-blank line kept verbatim *with* its
trailing ``"\\n"`` and a blank line (``" \\n"`` in the raw file) stored as ``""`` (this is what
the original `wikitext` loading script yields). Mirroring HF byte for byte means the local raw
file and the hub dataset give the same rows, the same `sha256` and therefore the same numbers,
so a result measured offline is comparable with one measured against the hub.

Specs accepted by `load_text`:

- ``wikitext2``: the hub dataset (needs network or a warm HF cache).
- a path to a raw text file, e.g. ``/work/shared/data/wikitext-2-raw/wiki.test.raw``, or to a
  directory holding ``wiki.{test,valid,train}.raw`` (the file is then picked by `split`).
- ``embedded``: CPython's own reference prose (`pydoc_data.topics`), ~65k words that ship with
  every Python, so the demo and the tests need no download at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from offcomp.errors import OffcompError

WIKITEXT2 = "wikitext2"
EMBEDDED = "embedded"
EMBEDDED_NAME = "embedded:pydoc"

# Canonical split names; the HF wikitext dataset calls the dev split "validation".
_SPLITS: dict[str, str] = {
    "test": "test",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "train": "train",
}
# File stem for each split in the Salesforce `wikitext-2-raw-v1.zip` layout.
_RAW_FILE = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}
_OFFLINE_HINT = "pass --data PATH to a local raw file instead, e.g. ../shared/data/wikitext-2-raw/wiki.test.raw"


@dataclass(frozen=True)
class TextSource:
    """Rows of text plus what is needed to tell two runs apart.

    `sha256` hashes the rows themselves (not a file's bytes), so the same rows from the hub and
    from a local copy hash identically; record it with every result.
    """

    name: str
    split: str
    rows: list[str]
    sha256: str

    def describe(self) -> dict[str, object]:
        """JSON-able identity of the data, for results files."""
        return {"name": self.name, "split": self.split, "sha256": self.sha256, "n_rows": len(self.rows)}


def rows_sha256(rows: list[str]) -> str:
    """Hash of the rows as a JSON list: unambiguous about row boundaries and empty rows."""
    blob = json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def canonical_split(split: str) -> str:
    """Map user spellings (valid, val, dev, ...) to test / validation / train, or raise."""
    key = split.strip().lower()
    if key not in _SPLITS:
        raise OffcompError(f"unknown split {split!r}: use one of test, validation (valid), train")
    return _SPLITS[key]


def wikitext_rows(text: str) -> list[str]:
    """Split raw WikiText into rows exactly like HF's `wikitext` builder.

    The builder iterates the file's lines (newline kept) and stores whitespace-only lines as "".
    """
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def causal_text(source: TextSource) -> str:
    """The string a causal LM is scored on: ``"\\n\\n".join(rows)``.

    This is the HF perplexity guide's protocol on the wikitext ``text`` column; keeping it exact
    (odd blank-row padding included) is what makes our numbers comparable with published ones.
    """
    return "\n\n".join(source.rows)


def load_text(spec: str, split: str = "test") -> TextSource:
    """Resolve a data spec (``wikitext2``, ``embedded`` or a path) to a `TextSource`.

    Raises `OffcompError` with a fix-it hint for anything the user can correct: unknown split,
    missing file, hub unreachable.
    """
    canon = canonical_split(split)
    key = spec.strip()
    if key.lower() in (WIKITEXT2, "wikitext-2", "wikitext-2-raw-v1"):
        return _load_wikitext2_hub(canon)
    if key.lower() in (EMBEDDED, EMBEDDED_NAME):
        return _load_embedded(canon)
    return _load_path(key, canon)


def _load_wikitext2_hub(split: str) -> TextSource:
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        rows = list(ds["text"])
    except Exception as exc:  # offline, missing cache, hub errors: all fixable the same way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OffcompError(
            f"could not load wikitext-2-raw-v1 ({split}) from the HF hub ({first}); {_OFFLINE_HINT}"
        ) from exc
    return TextSource(name=WIKITEXT2, split=split, rows=rows, sha256=rows_sha256(rows))


def _load_path(spec: str, split: str) -> TextSource:
    path = Path(spec).expanduser()
    if path.is_dir():
        candidate = path / _RAW_FILE[split]
        if not candidate.is_file():
            present = sorted(p.name for p in path.glob("*.raw")) or ["no *.raw files"]
            raise OffcompError(
                f"{candidate} not found (split {split!r}); {path} holds: {', '.join(present)}"
            )
        path = candidate
    elif not path.is_file():
        raise OffcompError(
            f"data file {spec!r} not found: pass an existing raw text file, 'embedded' or 'wikitext2'"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OffcompError(f"data file {spec!r} is not UTF-8 text: {exc}") from exc
    rows = wikitext_rows(text)
    if not any(rows):
        raise OffcompError(f"data file {spec!r} holds no text")
    # A single file is its own split: record "file" so a result never claims a split it did not use.
    return TextSource(name=str(path), split="file", rows=rows, sha256=rows_sha256(rows))


def _pydoc_rows(text: str) -> list[str]:
    """One row per paragraph of a pydoc topic, wrapped lines joined, underlines dropped.

    pydoc text is hard-wrapped at ~70 columns; one paragraph per row mirrors WikiText, where a row
    is a whole paragraph, so the masked-LM line-by-line protocol sees real sentences.
    """
    rows = []
    for block in text.split("\n\n"):
        lines = [ln.strip() for ln in block.splitlines()]
        lines = [ln for ln in lines if ln and set(ln) - set("*=-~^")]
        if lines:
            rows.append(" ".join(lines) + "\n")
    return rows


def _load_embedded(split: str) -> TextSource:
    from pydoc_data.topics import topics

    if split == "train":
        raise OffcompError("the embedded corpus has only test and validation splits: use one of those")
    # Sorted topics alternate between the splits (test: even, validation: odd). Topics overlap
    # (e.g. "specialnames" contains "attribute-access" verbatim), so a paragraph belongs only to
    # the first topic that has it: the splits are then disjoint row by row (~27k / ~25k words) and
    # calibration on validation never sees a test paragraph.
    want = 0 if split == "test" else 1
    seen: set[str] = set()
    rows: list[str] = []
    for i, key in enumerate(sorted(topics)):
        for row in _pydoc_rows(topics[key]):
            if row in seen:
                continue
            seen.add(row)
            if i % 2 == want:
                rows.append(row)
    return TextSource(name=EMBEDDED_NAME, split=split, rows=rows, sha256=rows_sha256(rows))
