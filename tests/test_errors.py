"""CLI error contract: bad input → one line, exit 2; an internal error → one line naming it, exit 1
(--debug / OFFCOMP_DEBUG=1 for the traceback); a non-finite result → strict JSON with null + reason,
exit 3; with --json stdout holds exactly one JSON object even when C libraries print on fd 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from offcomp.cli import app
from offcomp.errors import EXIT_INTERNAL, EXIT_NON_FINITE, EXIT_USER
from offcomp.records import dumps, strict

from .conftest import save_model_dir, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = " ".join(f"The river number {i} flows past the old mill and into the sea." for i in range(200))


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def one_line(text: str) -> bool:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return len(lines) == 1 and "Traceback" not in text


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("t") / "river.txt"
    f.write_text(TEXT)
    return f


def _scaled_dir(tmp_path: Path, bert_tokenizer, scale: float) -> Path:
    model = tiny_llama(vocab_size=len(bert_tokenizer), layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # tied: the embedding too
    return save_model_dir(model, bert_tokenizer, tmp_path / f"scaled-{scale}")


def test_internal_error_is_one_line_exit_1_and_debug_shows_it(llama_dir, monkeypatch):
    import offcomp.pipeline

    def boom(*a, **k):
        raise ValueError("something internal\nsecond line")

    monkeypatch.setattr(offcomp.pipeline, "evaluate_ppl", boom)
    res = run("eval-ppl", str(llama_dir))
    assert res.exit_code == EXIT_INTERNAL
    assert one_line(res.stderr) and "ValueError: something internal" in res.stderr and "--debug" in res.stderr
    res = run("--debug", "eval-ppl", str(llama_dir))
    assert isinstance(res.exception, ValueError)
    res = run("eval-ppl", str(llama_dir), env={"OFFCOMP_DEBUG": "1"})
    assert isinstance(res.exception, ValueError)
    os.environ.pop("OFFCOMP_DEBUG", None)  # --debug exports it for worker processes


def test_usage_errors_are_one_line_exit_2(llama_dir):
    for args in (["compress", "--rank", "two"], ["compress", "--no-such-option"], ["eval-ppl"],
                 ["no-such-command"], ["eval-ppl", str(llama_dir), "--seq-len", "1e9"]):
        res = run(*args)
        assert res.exit_code == EXIT_USER, args
        assert one_line(res.stderr), (args, res.stderr)


def test_deeply_nested_option_value_is_one_line_exit_2(llama_dir, tmp_path):
    """`-o k=[[[[...]]]]` made json.loads raise RecursionError: exit 1 (internal error) instead of 2."""
    res = run("compress", "--model", str(llama_dir), "--method", "svd", "--rank", "2", "--dry-run",
              "-o", "x=" + "[" * 100_000 + "]" * 100_000)
    assert res.exit_code == EXIT_USER and one_line(res.stderr), res.stderr
    assert "nested too deeply" in res.stderr


@pytest.mark.parametrize("device", ["meta", "mps", "xla", "cuda:99", "gpu"])
def test_unsupported_devices_are_one_line(device, llama_dir):
    for args in (["compress", "--model", str(llama_dir), "--method", "svd", "--rank", "2", "--dry-run"],
                 ["eval-ppl", str(llama_dir)]):
        res = run(*args, "--device", device)
        assert res.exit_code == EXIT_USER, (args, res.stderr)
        assert one_line(res.stderr) and device.split(":")[0] in res.stderr


def test_compress_with_hub_id_offline_is_one_line(tmp_path):
    res = run("compress", "--model", "no-such-org/no-such-model", "--method", "svd", "--rank", "2",
              "--out", str(tmp_path / "o"), env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == EXIT_USER and one_line(res.stderr), res.stderr
    assert "no-such-org/no-such-model" in res.stderr and not (tmp_path / "o").exists()


def test_records_are_strict_json_with_reasons():
    rec = {"ppl": float("nan"), "nested": {"x": [1.0, float("inf")]}, "n": 3, "ok": 2.5}
    text = dumps(rec)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert back["ppl"] is None and back["nested"]["x"] == [1.0, None] and back["n"] == 3 and back["ok"] == 2.5
    assert any("ppl" in r for r in back["non_finite"]) and any("nested.x[1]" in r for r in back["non_finite"])
    assert strict({"a": 1.0}) == {"a": 1.0}


def _ppl_cli(model_dir: Path, text_file: Path, results: Path):
    return run("eval-ppl", str(model_dir), "--data", str(text_file), "--seq-len", "32", "--max-tokens", "256",
               "--results", str(results), "--json")


def _strict_lines(path: Path) -> list[dict]:
    return [json.loads(ln, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
            for ln in path.read_text().splitlines()]


def test_nan_loss_is_reported_null_with_reason_and_exit_3(tmp_path, bert_tokenizer, text_file):
    d = _scaled_dir(tmp_path, bert_tokenizer, float("nan"))
    res = _ppl_cli(d, text_file, tmp_path / "r.jsonl")
    assert res.exit_code == EXIT_NON_FINITE, res.output
    rec = json.loads(res.stdout)
    (line,) = _strict_lines(tmp_path / "r.jsonl")
    for r in (rec, line):
        assert r["ppl"] is None and r["nll"] is None
        assert r["n_nonfinite_windows"] == r["n_windows"] > 0
        assert "non-finite" in r["non_finite"][0]
    assert res.stderr.strip().splitlines()[-1].startswith("non-finite result: 8 of 8 windows")


def test_huge_finite_loss_keeps_nll_and_does_not_crash(tmp_path, bert_tokenizer, text_file):
    d = _scaled_dir(tmp_path, bert_tokenizer, 1e4)
    res = _ppl_cli(d, text_file, tmp_path / "r.jsonl")
    assert res.exit_code == EXIT_NON_FINITE, res.output
    rec = json.loads(res.stdout)
    assert rec["ppl"] is None and math.isfinite(rec["nll"]) and rec["nll"] > 709
    assert rec["n_nonfinite_windows"] == 0 and "overflows" in rec["non_finite"][0]
    assert _strict_lines(tmp_path / "r.jsonl")[0]["nll"] == rec["nll"]


def test_partly_non_finite_windows_keep_the_finite_nll(llama_dir, bert_tokenizer, text_file):
    from offcomp.data import TextSource
    from offcomp.eval.ppl import perplexity
    from offcomp.models import load_model

    model = load_model(str(llama_dir)).model
    source = TextSource("river", "test", [TEXT], "x")
    clean = perplexity(model, bert_tokenizer, source, seq_len=32, max_tokens=128)
    calls = {"n": 0}

    def poison_second(_mod, _inp, out):  # the second batch of windows produces NaN logits
        calls["n"] += 1
        if calls["n"] == 2:
            out.logits[:] = float("nan")
        return out

    h = model.register_forward_hook(poison_second)
    try:
        res = perplexity(model, bert_tokenizer, source, seq_len=32, max_tokens=128, batch_size=1)
    finally:
        h.remove()
    assert res["n_nonfinite_windows"] == 1 and res["n_windows"] == clean["n_windows"] == 4
    assert res["ppl"] is None and res["nll"] is None and res["n_tokens"] == clean["n_tokens"]
    assert math.isfinite(res["nll_finite"]) and "1 of 4 windows" in res["non_finite"][0]


def test_json_stdout_survives_c_level_prints(llama_dir):
    """A library printing on fd 1 (as MKL does on a LAPACK error) must not break --json."""
    code = (
        "import os, sys\n"
        "import offcomp.pipeline as p\n"
        "real = p.compress_model\n"
        "def noisy(*a, **k):\n"
        "    print('python print on stdout')\n"
        "    os.write(1, b'Intel MKL ERROR: Parameter 4 was incorrect on entry to SLASCL.\\n')\n"
        "    return real(*a, **k)\n"
        "p.compress_model = noisy\n"
        "from offcomp.cli import app\n"
        f"sys.argv = ['offcomp', 'compress', '--model', {str(llama_dir)!r}, '--method', 'svd', '--rank', '2',"
        " '--dry-run', '--json']\n"
        "app()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["dry_run"] is True and proc.stdout.count("\n") == 1
    assert "Intel MKL ERROR" in proc.stderr and "python print" in proc.stderr
