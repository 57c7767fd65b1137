"""Checkpoint format: exact round trip, loading under another task head, dense export that vanilla
transformers loads, and atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BertForSequenceClassification

import offcomp
from offcomp.checkpoint import export_dense, load_compressed, read_manifest, save_compressed
from offcomp.errors import OffcompError
from offcomp.layers import LowRankLinear
from offcomp.pipeline import compress_model

from .conftest import tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, llama_dir):
    out = tmp_path_factory.mktemp("c") / "ck"
    plan = offcomp.load_plan("sample_plans/ffn-joint-cr10.yaml")
    plan.groups[0].cr = plan.groups[1].cr = 2  # tiny matrices: cr 10 leaves no rank
    manifest = compress_model(str(llama_dir), plan, out, seed=0, plan_source="ffn-joint")
    return out, manifest


def test_manifest_records_protocol(compressed, llama_dir):
    out, _ = compressed
    m = read_manifest(out)
    assert m["format_version"] == 2 and m["base"]["name"] == str(llama_dir) and len(m["base"]["sha256"]) == 64
    rep = m["report"]
    assert rep["params_before"] > rep["params_after"] == rep["params_before"] - sum(
        u["original_params"] - u["stored_params"] for u in rep["units"])
    assert {u["label"] for u in rep["units"]} == {"ffn-in", "ffn-out"}
    assert all("seconds" in u and u["hyper"]["rank"] > 0 for u in rep["units"])
    assert {"torch", "transformers", "offcomp"} <= set(m["versions"])
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()


def test_load_gives_identical_logits_to_in_memory(tmp_path, bert_tokenizer):
    model = tiny_llama(vocab_size=len(bert_tokenizer))
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.gate", "mlp.up"], "joint": True, "cr": 3},
                                          {"modules": ["attn.q", "attn.o"], "ratio": 0.4}]})
    report = offcomp.compress_(model, plan)
    save_compressed(model, bert_tokenizer, tmp_path / "ck", {"head": "causal-lm", "plan": plan.model_dump(),
                                                             "report": report.to_dict(), "base": {}})
    ids = torch.randint(0, len(bert_tokenizer), (2, 16))
    loaded = offcomp.load(str(tmp_path / "ck"))
    with torch.no_grad():
        diff = (model(ids).logits - loaded.model(ids).logits).abs().max().item()
    assert diff < 1e-5
    layers = loaded.model.model.layers
    assert isinstance(layers[1].mlp.up_proj, LowRankLinear)
    assert layers[0].mlp.gate_proj.V is layers[1].mlp.up_proj.V  # sharing rebuilt, not duplicated


def test_dense_export_loads_in_vanilla_transformers(compressed, tmp_path):
    out, _ = compressed
    export_dense(out, tmp_path / "dense")
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    comp = load_compressed(out).model
    ids = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        assert (vanilla(ids).logits - comp(ids).logits).abs().max().item() < 1e-4


def test_load_under_another_head(tmp_path, bert_tokenizer):
    base = tiny_bert(vocab_size=len(bert_tokenizer), head="base")
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "joint": True, "cr": 2}]})
    report = offcomp.compress_(base, plan)
    save_compressed(base, bert_tokenizer, tmp_path / "ck", {"head": "base", "plan": plan.model_dump(),
                                                            "report": report.to_dict(), "base": {}})
    bundle = load_compressed(tmp_path / "ck", head="sequence-classification", num_labels=3)
    model = bundle.model
    assert isinstance(model, BertForSequenceClassification)
    assert isinstance(model.bert.encoder.layer[1].intermediate.dense, LowRankLinear)
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model.bert(ids).last_hidden_state, base(ids).last_hidden_state)
        assert model(ids).logits.shape == (2, 3)
    assert bundle.manifest["loaded"]["new_keys"] and all(k.startswith("classifier") for k in bundle.manifest["loaded"]["new_keys"])


def test_existing_output_is_refused_before_work(compressed, llama_dir):
    out, _ = compressed
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 2}]})
    with pytest.raises(OffcompError, match="already exists"):
        compress_model(str(llama_dir), plan, out)


def test_corrupt_weights_are_detected(compressed, tmp_path):
    out, _ = compressed
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = json.loads((bad / "offcomp.json").read_text())
    m["report"]["units"][0]["hyper"]["rank"] += 1  # manifest no longer matches the tensors
    (bad / "offcomp.json").write_text(json.dumps(m))
    with pytest.raises(OffcompError, match="offcomp.json does not match its recorded sha256"):
        load_compressed(bad)
    with pytest.raises(OffcompError, match="does not match its manifest"):  # unchecked: the tensors still refuse
        load_compressed(bad, verify=False)
