"""End-to-end on the embedded models (marked e2e; `make test-fast` skips them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import offcomp
from offcomp.cli import app

pytestmark = pytest.mark.e2e
WIKI_TEST = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def run(args: list[str]) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smollm2_attn_k(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "smollm2-k"
    manifest = run(["compress", "--model", "smollm2-135m", "--plan", "sample_plans/attn-k-joint.yaml",
                    "--out", str(out)])
    return out, manifest


def test_smollm2_compress_eval_roundtrip_export(smollm2_attn_k, tmp_path):
    out, manifest = smollm2_attn_k
    rep = manifest["report"]
    assert rep["params_before"] == 134_515_008  # tied embeddings counted once
    (unit,) = rep["units"]
    assert len(unit["names"]) == 30 and unit["joint"]
    # 30 × (192 × 576) keys at ratio 0.5 → rank = ⌊0.5·30·192·576 / (30·192 + 576)⌋
    assert unit["hyper"]["rank"] == int(0.5 * 30 * 192 * 576) // (30 * 192 + 576)

    data = str(WIKI_TEST) if WIKI_TEST.is_file() else "embedded"
    common = ["--data", data, "--max-tokens", "2048", "--seq-len", "1024"]
    dense = run(["eval-ppl", "smollm2-135m", *common, "--results", str(tmp_path / "dense.jsonl")])
    comp = run(["eval-ppl", str(out), *common])
    assert dense["n_tokens"] == comp["n_tokens"] == 2 * 1023
    assert 5 < dense["ppl"] < 60 and dense["ppl"] < comp["ppl"] < 10 * dense["ppl"]
    assert comp["model"]["sha256"] != dense["model"]["sha256"]
    assert comp["params_after"] < dense["params_after"]

    # exported dense weights reproduce the compressed model's perplexity
    from offcomp.checkpoint import export_dense

    export_dense(out, tmp_path / "dense-export")
    exp = run(["eval-ppl", str(tmp_path / "dense-export"), *common, "--results", str(tmp_path / "e.jsonl")])
    assert exp["ppl"] == pytest.approx(comp["ppl"], rel=1e-4)


def test_smollm2_load_matches_in_memory(smollm2_attn_k):
    out, _ = smollm2_attn_k
    from offcomp.models import load_model

    bundle = load_model("smollm2-135m")
    offcomp.compress_(bundle.model, offcomp.load_plan("sample_plans/attn-k-joint.yaml"), seed=0)
    loaded = offcomp.load(str(out)).model
    ids = torch.randint(0, 49152, (1, 64))
    with torch.no_grad():
        assert (bundle.model(ids).logits - loaded(ids).logits).abs().max().item() < 1e-5


def test_minilm_ffn_joint_and_task_head(tmp_path):
    out = tmp_path / "mini"
    manifest = run(["compress", "--model", "minilm-l6", "--plan", "sample_plans/ffn-joint-cr10.yaml",
                    "--out", str(out)])
    assert {u["label"] for u in manifest["report"]["units"]} == {"ffn-in", "ffn-out"}
    from offcomp.models import load_model

    bundle = load_model(str(out), head="sequence-classification", num_labels=2)
    enc = bundle.tokenizer(["a small test", "another one"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert bundle.model(**enc).logits.shape == (2, 2)
