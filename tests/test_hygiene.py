"""Calibration hygiene (issue 10, finding 10): evaluation sets are refused for calibration by content,
not only by name, and every evaluation record carries the calibration data of the model it scores
and says when the evaluated text overlaps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import offcomp
from offcomp.capture import load_calibration_text
from offcomp.cli import app
from offcomp.data import load_text
from offcomp.errors import OffcompError
from offcomp.eval.sts import run_sts
from offcomp.hygiene import contamination, fingerprint
from offcomp.pipeline import compress_model, evaluate_ppl

from .conftest import save_model_dir, tiny_bert, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).resolve().parents[2] / "shared/data"
WIKI = DATA / "wikitext-2-raw"
needs_data = pytest.mark.skipif(not (WIKI / "wiki.test.raw").is_file() or not (DATA / "glue/STS-B").is_dir(),
                                reason="needs ../shared/data")


def _copy(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text, encoding="utf-8")
    return p


@needs_data
@pytest.mark.parametrize("variant", ["renamed", "partial", "glue-dev", "tokens"])
def test_evaluation_text_under_another_name_is_refused_for_calibration(variant, tmp_path):
    """A renamed copy of wiki.test.raw was accepted for calibration (the check read only the name)."""
    test = (WIKI / "wiki.test.raw").read_text(encoding="utf-8")
    lines = test.splitlines(keepends=True)
    text = {"renamed": test, "partial": "".join(lines[1000:1600]),
            "glue-dev": (DATA / "glue/STS-B/dev.tsv").read_text(encoding="utf-8"),
            "tokens": (DATA / "wikitext-2/wiki.test.tokens").read_text(encoding="utf-8")}[variant]
    f = _copy(tmp_path, "my-calibration.txt", text)
    with pytest.raises(OffcompError, match="refused"):
        load_calibration_text(str(f), "validation")
    # through the CLI: one line, exit 2, before any model is loaded (the model does not exist)
    res = CliRunner().invoke(app, ["capture", "--model", str(tmp_path / "nope"), "--data", str(f)])
    assert res.exit_code == 2 and "refused" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    with pytest.raises(OffcompError, match="refused"):
        compress_model(str(tmp_path / "nope"), offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 2}]}),
                       tmp_path / "out", calib={"data": str(f), "split": "validation", "samples": 2, "seq_len": 16,
                                                "seed": 0})


@needs_data
def test_validation_text_is_checked_by_content_too(llama_dir, tmp_path, bert_tokenizer):
    from offcomp.validation import make_validator

    f = _copy(tmp_path, "held-out.txt", (WIKI / "wiki.test.raw").read_text(encoding="utf-8"))
    with pytest.raises(OffcompError, match="WikiText-2 raw test"):
        make_validator(tiny_llama(vocab_size=len(bert_tokenizer)), bert_tokenizer, load_text(str(f)))


@needs_data
def test_the_validation_split_itself_is_accepted():
    assert load_calibration_text(str(WIKI / "wiki.valid.raw"), "validation").rows


def _paragraphs(path: Path, start: int, stop: int) -> str:
    return "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[start:stop])


@needs_data
def test_ppl_record_carries_calibration_data_and_flags_overlap(llama_dir, tmp_path):
    calib = _copy(tmp_path, "calib.txt", _paragraphs(WIKI / "wiki.valid.raw", 0, 400))
    ck = tmp_path / "ck"
    manifest = compress_model(str(llama_dir), offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 4,
                                                                              "method": "svd-llm"}]}),
                              ck, calib={"data": str(calib), "split": "validation", "samples": 2, "seq_len": 32,
                                         "seed": 0})
    (seen,) = manifest["calibration_data"]
    assert seen["role"] == "calibration" and len(seen["sha256"]) == 64 and len(seen["fingerprint"]) == 64
    clean = evaluate_ppl(str(ck), "embedded", seq_len=32, max_tokens=96, results=tmp_path / "r.jsonl")
    assert clean["contaminated"] is False and clean["calibration_data"][0]["sha256"] == seen["sha256"]
    same = evaluate_ppl(str(ck), str(calib), seq_len=32, max_tokens=96, results=tmp_path / "r.jsonl")
    assert same["contaminated"] is True and "same content sha256" in same["contamination"]
    # evaluated text that merely contains calibration paragraphs among others
    mixed = _copy(tmp_path, "mixed.txt", _paragraphs(WIKI / "wiki.valid.raw", 300, 900))
    res = CliRunner().invoke(app, ["eval-ppl", str(ck), "--data", str(mixed), "--seq-len", "32", "--max-tokens",
                                   "96", "--results", str(tmp_path / "r.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["contaminated"] is True and "longest rows" in rec["contamination"]
    assert "contaminated evaluation" in res.stderr
    lines = [json.loads(ln) for ln in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["contaminated"] for r in lines] == [False, True, True]


@needs_data
def test_sts_record_flags_calibration_on_its_dev_sentences(tmp_path, bert_tokenizer):
    """Calibrating on part of STS-B dev (not the whole file: its hash would be refused) and scoring
    STS-B dev: the record says contaminated."""
    base = save_model_dir(tiny_bert(vocab_size=len(bert_tokenizer)), bert_tokenizer, tmp_path / "bert")
    calib = _copy(tmp_path, "sts-part.txt", _paragraphs(DATA / "glue/STS-B/dev.tsv", 1, 300))
    ck = tmp_path / "ck"
    compress_model(str(base), offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 4,
                                                              "method": "svd-llm"}]}),
                   ck, calib={"data": str(calib), "split": "validation", "samples": 2, "seq_len": 32, "seed": 0})
    rec = run_sts(str(ck), data_dir=DATA / "glue/STS-B", max_eval_samples=16)
    assert rec["contaminated"] is True and rec["calibration_data"][0]["name"] == str(calib)
    assert run_sts(str(base), data_dir=DATA / "glue/STS-B", max_eval_samples=16)["contaminated"] is False


def test_contamination_of_a_base_model_is_false_and_fingerprint_ignores_short_rows():
    assert contamination(None, rows=["x" * 100]) == {"calibration_data": [], "contaminated": False,
                                                     "contamination": None}
    assert fingerprint([" = = Reception = = \n", "short\n"]) == []
    assert len(fingerprint(["y" * 100, "z" * 120])) == 2
