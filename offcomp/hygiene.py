"""Calibration hygiene: the text a model was calibrated, trained or validated on must never be the
text it is scored on.

Two guards. (1) Calibration/validation text is refused when its content is a known evaluation set
(WikiText-2 test, GLUE dev, SQuAD dev, ...), whatever the file is called: by the sha256 of its
bytes, of its rows as offcomp normalises them, or by holding paragraphs of the WikiText-2 test
split. (2) A compressed checkpoint records the identity of every text it saw (`calibration_data`:
content hashes plus a fingerprint of its longest rows); every evaluation record carries it and is
flagged `contaminated: true` when the evaluated text overlaps it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .data import TextSource, rows_sha256, wikitext_rows
from .errors import OffcompError
from .integrity import file_sha256

# sha256 of the file's bytes, and of its rows as `offcomp.data` normalises them, for evaluation sets
# shipped in ../shared/data (see its SOURCES.md): label -> (file sha256, rows sha256).
KNOWN_EVAL_SETS = {
    "WikiText-2 raw test (wiki.test.raw)": (
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
        "8a970098c794df2d25494abf3caf6cb8499f57cc54bca35e45b70e168f7d9a74"),
    "WikiText-2 tokenized test (wiki.test.tokens)": (
        "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        "42fef4c3e4a9630e967871651a16a0356130773eddcea05972ba74b55b0f1eae"),
    "SQuAD v1.1 dev (dev-v1.1.json)": (
        "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9",
        "750bfca1d3256bb5049e1b99c252ecb8d059dd85ab2fc62a59c6b03e804c2786"),
    "MRPC test (msr_paraphrase_test.txt)": (
        "a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784",
        "d45e30aa5f5b31e7dd49b920828c1f098b6c942d41cb0ac39ecc0992117646eb"),
    "GLUE CoLA dev": ("8c013e21dc39957cac37378d87bebe225b694a0d5fe13eded66c2856628833fd",
                      "210ea5b85f88bc8d35c476f70c4f9c13bf02448357a8e3f26c08dfbdac17b810"),
    "GLUE MRPC dev": ("9e8f284788040f7c9ecde2e1b3c07237c756f926bd9ef8548ef5d34b56f69f17",
                      "2c1cc30e0c6f8f7ee830d8654265fb45b747f452d7bde845f3011c593e5a5068"),
    "GLUE QNLI dev": ("ac19409dcb04631eaaa094bdebdcf621086bc352503dfb6a1a648b614986f4fd",
                      "2aec1a5532d24335e8498f5aa62738b4f5f8f23903908ce50ecda1be103bcabb"),
    "GLUE RTE dev": ("80230dfa1347282e7b532b06a1004a76a710087541189bf874223ddf0e3819fb",
                     "d11005e49928c136a93572a41757f3a5b0353b418806f7c162a113e0837a45ad"),
    "GLUE SST-2 dev": ("54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
                       "9743cb57fa122aa3947890a9152427b2d90e87661ec66f570928b3e97e1d670d"),
    "GLUE STS-B dev": ("fe7dc0632a5033562f3cadff991f6e8d9b9b6311861660e78c3c82eb7db67f59",
                       "25769e81dc80bded29f2a2925da097ec00303c631fd446a6ba086f70414e50fc"),
    "GLUE WNLI dev": ("cba00490596dd14be8cf53b4f53bb744abe3a7b89f81ab210528d80225338ed5",
                      "f4af8c048cfd1f5ab7288d79dcd251e7084a43be9ac1573593161f9798cb225c"),
}
# `row_hash` of the 64 longest paragraphs of wiki.test.raw: a copy of part of the test split
# (rows dropped, reordered or mixed into other text) still contains some of them.
WIKITEXT2_TEST_ROWS = frozenset((
    "0205765455b10c3c", "043545ba2a4b65ec", "05fa77c24999f77e", "06aed3496625f67a",
    "07f9c139084086fa", "0d0a45906ab58f0e", "0d74e55b49b52e30", "0f8104c3a1497c4d",
    "1076d524cd9c7722", "14671d1a03eaac3f", "16ecb74cda00eecf", "1a7573c9ee9a01ea",
    "1dbfb6c7e1e6c10f", "1dc11c885eabcffd", "24814661f539498c", "29833d38a4d554d2",
    "321e7b276cb12c8e", "45c149ed34bb782d", "4721f8cc5bcdf58b", "496716501f182fb7",
    "497548bcf7022b66", "4df948f06b9151e7", "54834f681e69cc4c", "55873127dc3dd470",
    "55b59c749d29c6e2", "5d2029d69670591f", "5ed9f8316e750529", "5f7ddb80f0a4e4e6",
    "62053dece57a4a47", "6bb9cd721a16bfb9", "7369d94faedb8943", "7ab69725d6d45c8b",
    "7e6909ea1ee7b39c", "9589013a3ee3fba3", "98938c90a549391e", "9aad3e2d04b9f2ef",
    "9fb23d195a1d1dd4", "a3ab452e0fb33325", "af141a5f8f976dd7", "afb4858de76d01ad",
    "b24b35fa5a98dbde", "b37f89ef3a00849a", "b409459646620040", "bd8f012ae36e7895",
    "c0f3f746bba74e45", "c224f61d1d958ae9", "c34b426e15f8e175", "c58b74e73c66b335",
    "c6652989f7c70667", "cb35f7b67162a611", "cc587586e788b820", "ccd16fba89530a72",
    "cd80664344dd7111", "ce5aa937a5969b65", "d107a06bb49c14d7", "d1286da86ddf052e",
    "d958e3c59b109c24", "d9a47056c2968dfa", "dbb0d9ee17763a36", "ebd4c7f1bf72cb52",
    "f2d31ddc29272261", "f8dab778de8cb872", "fb75d8fc75622380", "fdeca7f84e7dcc36",
))
FINGERPRINT_ROWS = 64
MIN_ROW_CHARS = 80  # shorter rows (headings, "= = Reception = =") recur across unrelated texts


def row_hash(row: str) -> str:
    return hashlib.sha256(row.strip().encode("utf-8")).hexdigest()[:16]


def fingerprint(rows: list[str], n: int = FINGERPRINT_ROWS) -> list[str]:
    """Hashes of the `n` longest distinct rows: what identifies a text's content in a few hundred bytes."""
    longest = sorted({r.strip() for r in rows if len(r.strip()) >= MIN_ROW_CHARS}, key=lambda r: (-len(r), r))[:n]
    return sorted(row_hash(r) for r in longest)


def _file_of(source: TextSource) -> Path | None:
    p = Path(source.name)
    return p if p.is_file() else None


def refuse_evaluation_text(source: TextSource, purpose: str) -> None:
    """Refuse calibration/validation text whose content is a known evaluation set (any file name)."""
    f = _file_of(source)
    file_sha = file_sha256(f) if f is not None else None
    for label, (raw, rows) in KNOWN_EVAL_SETS.items():
        if file_sha == raw or source.sha256 == rows:
            raise OffcompError(f"{source.name} is {label} by content (sha256); {purpose} on evaluation data is "
                               "refused; use a validation or train split, e.g. wiki.valid.raw")
    shared = WIKITEXT2_TEST_ROWS.intersection(row_hash(r) for r in source.rows if len(r.strip()) >= MIN_ROW_CHARS)
    if shared:
        raise OffcompError(f"{source.name} contains {len(shared)} paragraph(s) of the WikiText-2 test split; "
                           f"{purpose} on evaluation data is refused; use e.g. wiki.valid.raw")


def text_identity(source: TextSource, role: str) -> dict[str, Any]:
    """What a checkpoint records about a text it saw (role: calibration, modular, validation)."""
    f = _file_of(source)
    return {"role": role, **source.describe(), "file_sha256": file_sha256(f) if f is not None else None,
            "fingerprint": fingerprint(source.rows)}


def calibration_data(manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every text a compressed checkpoint saw, from its manifest (older manifests: the capture's data)."""
    if not manifest:
        return []
    recorded = manifest.get("calibration_data")
    if isinstance(recorded, list):
        return [t for t in recorded if isinstance(t, dict)]
    data = (manifest.get("calibration") or {}).get("data")
    return [{"role": "calibration", **data}] if isinstance(data, dict) else []


def contamination(manifest: dict[str, Any] | None, *, rows: list[str] | None = None, sha256: str | None = None,
                  files: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Record fields: the calibration data of the scored model, and whether the evaluated text
    (its rows, rows hash and/or files) overlaps it."""
    seen = calibration_data(manifest)
    file_shas = {file_sha256(f) for f in files if Path(f).is_file()}
    eval_rows = list(rows or [])
    for f in files:
        if Path(f).is_file():
            eval_rows += wikitext_rows(Path(f).read_text(encoding="utf-8", errors="replace"))
    eval_hashes = {row_hash(r) for r in eval_rows if len(r.strip()) >= MIN_ROW_CHARS}
    reasons = []
    for t in seen:
        what = f"{t.get('role', 'calibration')} text {t.get('name')}"
        if t.get("sha256") and t.get("sha256") in {sha256, rows_sha256(eval_rows) if eval_rows else None}:
            reasons.append(f"{what} is the evaluated text (same content sha256)")
        elif t.get("file_sha256") and t["file_sha256"] in file_shas:
            reasons.append(f"{what} is an evaluated file (same sha256)")
        elif shared := eval_hashes.intersection(t.get("fingerprint") or []):
            reasons.append(f"{what} shares {len(shared)} of its longest rows with the evaluated text")
    return {"calibration_data": [{k: t.get(k) for k in ("role", "name", "split", "sha256")} for t in seen],
            "contaminated": bool(reasons), "contamination": "; ".join(reasons) or None}
