"""The shipped encoder recipe (`encoder-ratio-0.7-svdllm`) parses, runs end to end on a tiny random
BERT with on-the-fly calibration on short windows, and keeps 70 % of the compressed parameters."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import offcomp
from offcomp.cli import app
from tests.conftest import save_model_dir, tiny_bert


def test_encoder_plan_runs_on_tiny_bert(tmp_path, bert_tokenizer, monkeypatch, one_thread):
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    plan = offcomp.load_plan("encoder-ratio-0.7-svdllm")
    assert plan.groups[0].method == "svd-llm" and plan.groups[0].ratio == 0.7 and plan.modular is None
    d = save_model_dir(tiny_bert(vocab_size=len(bert_tokenizer), head="base"), bert_tokenizer, tmp_path / "bert")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compress", "-m", str(d), "--plan", "encoder-ratio-0.7-svdllm",
                                 "--calib-data", "embedded", "--calib-samples", "8", "--calib-seq-len", "16",
                                 "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "offcomp.json").read_text())
    rep = manifest["report"]
    # every linear of both layers (q, k, v, o, up, down), each its own unit, whitened on 8 × 16 tokens
    assert len(rep["units"]) == 2 * 6
    assert manifest["calibration"]["n_tokens"] == 8 * 16
    kept = rep["compressed_stored_params"] / rep["compressed_original_params"]
    assert 0.65 < kept <= 0.7
    ids = torch.randint(0, 1000, (2, 10))
    loaded = offcomp.checkpoint.load_compressed(out).model
    with torch.no_grad():
        hidden = loaded(input_ids=ids).last_hidden_state
    assert hidden.shape == (2, 10, 64) and torch.isfinite(hidden).all()
