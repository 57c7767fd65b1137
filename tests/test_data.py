"""Text sources: HF-identical rows, split handling, hashing and fix-it errors."""

import sys
import types
from pathlib import Path

import pytest

from offcomp.data import causal_text, load_text, rows_sha256, wikitext_rows
from offcomp.errors import OffcompError

WIKI_RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw"


def test_raw_file_rows_mirror_hf_wikitext(tmp_path):
    path = tmp_path / "tiny.raw"
    path.write_text(" \n = Title = \n \n Some text here .\nlast line without newline", encoding="utf-8")
    src = load_text(str(path))
    # HF's builder keeps a non-blank line verbatim with its newline and stores a blank line as "".
    assert src.rows == ["", " = Title = \n", "", " Some text here .\n", "last line without newline"]
    assert src.name == str(path) and src.split == "file"
    assert src.sha256 == rows_sha256(src.rows)
    assert causal_text(src) == "\n\n = Title = \n\n\n\n\n Some text here .\n\n\nlast line without newline"


def test_sha256_tracks_rows_not_bytes():
    assert rows_sha256(["a\n", ""]) != rows_sha256(["a\n"])
    assert rows_sha256(["a", "b"]) != rows_sha256(["ab"])
    assert rows_sha256(wikitext_rows(" \nx\n")) == rows_sha256(["", "x\n"])


@pytest.mark.skipif(not (WIKI_RAW / "wiki.test.raw").is_file(), reason="shared WikiText-2 not present")
def test_real_wikitext_test_file_matches_hf_row_layout():
    src = load_text(str(WIKI_RAW / "wiki.test.raw"))
    assert len(src.rows) == 4358  # HF wikitext-2-raw-v1 test has 4358 rows
    assert src.rows[0] == "" and src.rows[1] == " = Robert Boulter = \n"
    assert sum(r == "" for r in src.rows) == 1467
    # A directory resolves by split, with the usual spellings.
    valid = load_text(str(WIKI_RAW), split="valid")
    assert valid.name.endswith("wiki.valid.raw") and len(valid.rows) == 3760


def test_missing_file_and_bad_split_are_user_errors(tmp_path):
    missing = tmp_path / "nope.raw"
    with pytest.raises(OffcompError, match="nope.raw"):
        load_text(str(missing))
    with pytest.raises(OffcompError, match="wiki.valid.raw"):
        load_text(str(tmp_path), split="validation")
    with pytest.raises(OffcompError, match="unknown split"):
        load_text("embedded", split="holdout")
    with pytest.raises(OffcompError, match="test and validation"):
        load_text("embedded", split="train")


def test_embedded_is_large_deterministic_and_splits_disjoint():
    test = load_text("embedded", "test")
    valid = load_text("embedded", "valid")
    assert test.name == "embedded:pydoc" and valid.split == "validation"
    for src in (test, valid):
        assert sum(len(r.split()) for r in src.rows) > 20_000  # enough for a meaningful PPL
        assert all(r.endswith("\n") and r.strip() for r in src.rows)
    assert not set(test.rows) & set(valid.rows)
    assert load_text("embedded", "test").sha256 == test.sha256 != valid.sha256


def test_wikitext2_hub_split_mapping_and_offline_error(monkeypatch):
    # A stand-in `datasets` module: the real import is slow and the hub is unreachable here.
    datasets = types.ModuleType("datasets")
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        return {"text": ["", " = A = \n", " b\n"]}

    datasets.load_dataset = fake_load
    src = load_text("wikitext2", split="valid")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation")]
    assert src.name == "wikitext2" and src.split == "validation" and src.rows == ["", " = A = \n", " b\n"]
    # Same rows from the hub and from a file must hash the same, so results stay comparable.
    assert src.sha256 == rows_sha256(wikitext_rows(" \n = A = \n b\n"))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    datasets.load_dataset = offline
    with pytest.raises(OffcompError, match="--data PATH") as err:
        load_text("wikitext2")
    assert "\n" not in str(err.value)
