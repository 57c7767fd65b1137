"""File hashes for checkpoints and captures, and their verification on load.

A compressed checkpoint's `offcomp.json` and a capture's `capture.json` record the size and sha256
of every file of their directory (`files`) and a hash of their own content (`self_sha256`, the
canonical JSON of the document without that key). Loading checks every recorded size always and
every hash unless the caller opts out (`verify=False`, the CLI's `--no-verify`): one flipped byte in
the weights would otherwise give a finite, plausible-looking and wrong number.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import OffcompError

CHUNK = 1 << 24  # 16 MiB: streams files of any size in constant memory
SELF_KEY = "self_sha256"


def file_sha256(path: str | Path, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(root: Path, skip: set[str], known: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under `root` except the names in `skip`;
    `known` gives hashes computed already (each file is read once)."""
    known = known or {}
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in skip:
            files[rel] = {"size": p.stat().st_size, "sha256": known.get(rel) or file_sha256(p)}
    return files


def document_sha256(doc: dict[str, Any]) -> str:
    """Hash of a JSON document without its own `self_sha256` entry (canonical form: sorted keys)."""
    body = {k: v for k, v in doc.items() if k != SELF_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with its own hash added (written last, after `files`)."""
    from .records import dumps

    doc = json.loads(dumps(doc))  # the hash is of what a reader will parse back (strict JSON)
    return {**doc, SELF_KEY: document_sha256(doc)}


def read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    """A JSON object from `path`, or one clear error (missing, not UTF-8, not JSON, not an object)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OffcompError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OffcompError(f"{path} is not a valid {what} ({type(e).__name__}: {str(e)[:80]}); {fix}") from None
    if not isinstance(doc, dict):
        raise OffcompError(f"{path} is not a valid {what} (a JSON {type(doc).__name__}, not an object); {fix}")
    return doc


def verify_document(doc: dict[str, Any], path: Path, fix: str) -> None:
    """Check a document against its recorded own hash (a no-op for documents written without one)."""
    recorded = doc.get(SELF_KEY)
    if recorded is not None and recorded != document_sha256(doc):
        raise OffcompError(f"{path} does not match its recorded sha256 (edited or damaged); {fix}, "
                           "or pass --no-verify to load it anyway")


def verify_files(root: Path, files: Any, *, verify: bool = True, fix: str, manifest: str) -> dict[str, str]:
    """Check every file `files` records under `root`: present and of its size always, of its sha256
    when `verify`. Returns the hashes computed (so a caller that needs one does not read it twice)."""
    if not isinstance(files, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("size"), int) and isinstance(r.get("sha256"), str)
            for r in files.values()):
        raise OffcompError(f"{root / manifest}: malformed `files` entry (expected name → {{size, sha256}}); {fix}")
    hashes: dict[str, str] = {}
    for rel, rec in files.items():
        p = root / rel
        if not p.is_file():
            raise OffcompError(f"{p} is missing ({manifest} records it); {fix}")
        size = p.stat().st_size
        if size != rec["size"]:
            raise OffcompError(f"{p} has {size} bytes, {manifest} records {rec['size']} (truncated or "
                               f"replaced); {fix}")
        if verify:
            hashes[rel] = file_sha256(p)
            if hashes[rel] != rec["sha256"]:
                raise OffcompError(f"{p} does not match the sha256 recorded in {manifest} (damaged or edited); "
                                   f"{fix}, or pass --no-verify to load it anyway")
    return hashes
