"""What eval-ppl reports beside token PPL: word PPL, bits per byte, scored tokens, forward
throughput, and where a base model's record goes (tiny llama + tiny byte-level tokenizer)."""

from __future__ import annotations

import json
import math
import os

import pytest
from typer.testing import CliRunner

from offcomp.cli import app
from offcomp.data import TextSource, causal_text, load_text, rows_sha256
from offcomp.eval.ppl import perplexity, token_text_spans

from .conftest import save_model_dir, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
L = 32


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def src():
    rows = load_text("embedded", "test").rows[:120]
    return TextSource(name="embedded:pydoc", split="test", rows=rows, sha256=rows_sha256(rows))


def test_word_and_byte_metrics_count_exactly_the_scored_tokens(tok, src):
    model = tiny_llama(vocab_size=len(tok))
    res = perplexity(model, tok, src, seq_len=L, max_tokens=4 * L + 7)
    ids, nbytes, nwords = token_text_spans(tok, causal_text(src))
    scored = [i for w in range(4) for i in range(w * L + 1, (w + 1) * L)]  # each window's first is context
    assert res["n_tokens"] == len(scored) == 4 * (L - 1)
    assert res["n_bytes"] == sum(int(nbytes[i]) for i in scored)
    assert res["n_words"] == sum(int(nwords[i]) for i in scored) > 0
    nll_sum = res["nll"] * res["n_tokens"]
    assert res["bits_per_byte"] == pytest.approx(nll_sum / res["n_bytes"] / math.log(2), rel=1e-9)
    assert res["byte_perplexity"] == pytest.approx(2 ** res["bits_per_byte"], rel=1e-9)
    assert res["word_perplexity"] == pytest.approx(math.exp(nll_sum / res["n_words"]), rel=1e-9)
    # sliding windows score more tokens, and the bytes follow them
    slide = perplexity(model, tok, src, seq_len=L, stride=L // 2, max_tokens=4 * L)
    assert slide["n_bytes"] == sum(int(nbytes[i]) for i in range(1, L)) + sum(
        int(nbytes[i]) for s in range(L // 2, 4 * L - L + 1, L // 2) for i in range(s + L // 2, s + L))


def test_slow_tokenizer_reports_token_ppl_only(tok, src):
    class NoOffsets:  # a slow tokenizer: no offsets, so no honest byte attribution
        is_fast = False
        bos_token_id = None

        def __call__(self, text, add_special_tokens=True):
            return tok(text, add_special_tokens=False)

    res = perplexity(tiny_llama(vocab_size=len(tok)), NoOffsets(), src, seq_len=L, max_tokens=2 * L)
    assert res["bits_per_byte"] is None and res["word_perplexity"] is None and math.isfinite(res["ppl"])


def test_throughput_is_the_forward_alone(tok, src):
    res = perplexity(tiny_llama(vocab_size=len(tok)), tok, src, seq_len=L, max_tokens=3 * L)
    assert 0 < res["forward_s"] <= res["elapsed_s"]
    assert res["tokens_per_s"] == pytest.approx(res["n_input_tokens"] / res["forward_s"], rel=0.01)


def test_base_model_results_go_to_the_results_dir_not_cwd(tok, tmp_path, monkeypatch):
    model_dir = save_model_dir(tiny_llama(vocab_size=len(tok)), tok, tmp_path / "tiny")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("OFFCOMP_RESULTS", str(tmp_path / "results"))
    res = CliRunner().invoke(app, ["eval-ppl", str(model_dir), "--seq-len", "32", "--max-tokens", "64", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert list(work.iterdir()) == []  # no ./runs/base/... under the current directory
    written = list((tmp_path / "results").rglob("results.jsonl"))
    assert [str(p) for p in written] == [rec["results_file"]]
    assert "results appended to" in res.stderr and rec["results_file"] in res.stderr.replace("\n", "")
    stored = json.loads(written[0].read_text())
    assert stored["n_tokens"] == 62 and stored["bits_per_byte"] == rec["bits_per_byte"]
    # the table says how many tokens were scored, and why that is less than --max-tokens
    table = CliRunner().invoke(app, ["eval-ppl", str(model_dir), "--seq-len", "32", "--max-tokens", "64",
                                     "--results", str(tmp_path / "t.jsonl")], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    assert "2 windows × 32 tokens; 62 scored" in table.stdout.replace("\n", " ")
    # in 80 columns the numbers stay whole (the data name folds instead)
    assert f"{rec['params_after']:,}" in table.stdout and f"{rec['bits_per_byte']:.4f}" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80


WRECKED = {"data": {"name": "/work/shared/data/wikitext-2-raw/wiki.test.raw", "split": "file"}, "n_tokens": 16368,
           "ppl": 96012345.6789, "word_perplexity": 5.5e12, "bits_per_byte": 4.1234, "params_after": 134515008,
           "tokens_per_s": 671.2, "n_windows": 16, "protocol": {"seq_len": 1024}, "results_file": "/tmp/r.jsonl"}


@pytest.mark.parametrize("columns", ["80", "50"])
def test_eval_ppl_table_keeps_the_data_name_when_ppl_is_wide(monkeypatch, columns):
    """Regression: a wrecked model's PPL (9.6e7 printed with 4 decimals) and word PPL took every
    column of an 80-column table and the data column came out blank. Hand-built record, golden text."""
    import offcomp.pipeline

    from .test_report import GOLDEN

    monkeypatch.setattr(offcomp.pipeline, "evaluate_ppl", lambda *a, **k: dict(WRECKED))
    res = CliRunner().invoke(app, ["eval-ppl", "runs/svd"], env={"COLUMNS": columns})
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert max(len(line) for line in text.splitlines()) <= int(columns)
    # the data name folds over lines, in the first column (80) or the title (50); none of it is lost
    first = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    title = "".join(text.split("┏")[0].split())
    assert "/work/shared/data/wikitext-2-raw/wiki.test.raw:file" in (first if columns == "80" else title)
    for number in ("9.601e+07", "5.500e+12", "4.1234", "16,368", "134,515,008", "671"):
        assert number in text  # whole, on one line
    golden = GOLDEN / f"eval-ppl-{columns}.txt"
    if os.environ.get("OFFCOMP_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
