"""Compressed checkpoints through transformers' quantizer plug-in (offcomp/hf_integration.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import offcomp
from offcomp.api import compress_
from offcomp.checkpoint import save_compressed
from offcomp.hf_integration import OffcompHfQuantizer
from offcomp.layers import CompressedModule, LowRankLinear
from offcomp.methods.prune import MaskedLinear
from offcomp.plan import parse_plan

from .conftest import tiny_bert, tiny_llama

REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
PLAN = {"groups": [{"modules": ["attn.q", "attn.k", "attn.v"], "joint": True, "method": "svd", "rank": 8},
                   {"modules": ["mlp.up"], "method": "prune", "ratio": 0.5},
                   {"modules": ["mlp.down"], "method": "svd", "ratio": 0.5}]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = tiny_llama()
    report = compress_(model, parse_plan(PLAN))
    out = tmp_path_factory.mktemp("hf") / "ck"
    save_compressed(model, None, out, {"head": "causal-lm", "plan": PLAN, "report": report.to_dict(), "base": {}})
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_vanilla_transformers_refuses_and_offcomp_loads_the_same_logits(ckpt, tmp_path):
    """Without offcomp registered: a stop naming the unknown method, never a randomly filled model.
    With `import offcomp`: plain `from_pretrained` gives the logits of offcomp.load."""
    load = f"from transformers import AutoModelForCausalLM\nm = AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
    vanilla = run_python(load + "print('LOADED')")
    assert vanilla.returncode != 0 and "LOADED" not in vanilla.stdout
    assert "Unknown quantization type, got offcomp" in vanilla.stderr
    assert "ignore_mismatched_sizes" in vanilla.stderr  # the dense weights are absent: a hard stop
    out = tmp_path / "logits.safetensors"
    code = ("import offcomp, torch\nfrom safetensors.torch import save_file\n" + load +
            f"ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))\n"
            f"save_file({{'logits': m(ids).logits.detach()}}, {str(out)!r})\n")
    registered = run_python(code)
    assert registered.returncode == 0, registered.stderr[-2000:]
    assert torch.equal(load_file(out)["logits"], logits(offcomp.load(str(ckpt)).model))


def test_from_pretrained_builds_on_meta_then_loads_factors(ckpt, monkeypatch):
    seen = []
    original = OffcompHfQuantizer._process_model_before_weight_loading

    def spy(self, model, **kw):
        names = [n for u in self.quantization_config.units for n in u["names"]]
        seen.extend(model.get_submodule(n).weight.device.type for n in names)
        return original(self, model, **kw)

    monkeypatch.setattr(OffcompHfQuantizer, "_process_model_before_weight_loading", spy)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert seen and set(seen) == {"meta"}  # the dense matrices were never allocated
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LowRankLinear) and attn.k_proj.V is attn.q_proj.V  # joint V shared again
    assert isinstance(model.model.layers[1].mlp.up_proj, MaskedLinear)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


def test_save_pretrained_round_trip_keeps_the_guard(ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    model.save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "offcomp"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again), logits(model))
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(tmp_path / "again" / "model.safetensors")


def test_device_map_auto_and_dtype_are_honoured(ckpt):
    ref = logits(offcomp.load(str(ckpt)).model)
    auto = AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto")
    assert torch.equal(logits(auto), ref)
    half = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    up = half.model.layers[0].mlp.up_proj
    assert half.model.layers[0].self_attn.q_proj.U.dtype == torch.bfloat16 and up.values.dtype == torch.bfloat16
    assert up.bitmap.dtype == torch.uint8  # the mask is never cast
    assert (logits(half).float() - ref).abs().max() < 0.1


def test_other_heads_load_the_compressed_base(ckpt):
    base = AutoModel.from_pretrained(ckpt)
    assert isinstance(base.layers[0].self_attn.q_proj, LowRankLinear)
    cls = AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=3)
    full = AutoModelForCausalLM.from_pretrained(ckpt)
    assert torch.equal(cls.model.layers[1].mlp.down_proj.U, full.model.layers[1].mlp.down_proj.U)
    bundle = offcomp.load(str(ckpt), head="sequence-classification", num_labels=3)
    assert bundle.manifest["loaded"]["new_keys"] == ["score.weight"]


def test_bert_base_checkpoint_under_a_classification_head(tmp_path):
    model = tiny_bert(head="base")
    plan = {"groups": [{"modules": ["attn.q", "mlp.up"], "method": "svd", "ratio": 0.5}]}
    report = compress_(model, parse_plan(plan))
    save_compressed(model, None, tmp_path / "ck", {"head": "base", "plan": plan, "report": report.to_dict()})
    cls = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ck", num_labels=2)
    q = cls.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, LowRankLinear)
    assert torch.equal(q.U, model.encoder.layer[0].attention.self.query.U)


def test_a_missing_factor_is_an_error_not_uninitialised_memory(ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    state = load_file(bad / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.U"]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks model.layers.1.mlp.down_proj.U"):
        AutoModelForCausalLM.from_pretrained(bad)
    with pytest.raises(offcomp.OffcompError, match="offcomp.json records"):  # its size changed: caught first
        offcomp.load(str(bad))


def test_a_model_compressed_in_memory_saves_like_a_loaded_one(tmp_path):
    """compress_ → save_compressed marks the model as transformers marks a loaded one."""
    model = tiny_llama()
    report = compress_(model, parse_plan(PLAN))
    save_compressed(model, None, tmp_path / "ck", {"head": "causal-lm", "report": report.to_dict()})
    assert model.hf_quantizer.quantization_config.quant_method == "offcomp"
    model.save_pretrained(tmp_path / "direct")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "direct")
    assert torch.equal(logits(again), logits(model))
    assert sum(isinstance(m, CompressedModule) for m in again.modules()) == 2 * 5


def test_registration_keeps_import_cheap_and_works_in_either_import_order():
    code = ("import sys, offcomp\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as Q\nprint('offcomp' in Q)\n")
    first = run_python(code)
    assert first.returncode == 0 and first.stdout.strip() == "True", first.stderr[-2000:]
    late = run_python("import transformers.modeling_utils, offcomp\n"
                      "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as C\n"
                      "print(C['offcomp'].__name__)\n")
    assert late.returncode == 0 and late.stdout.strip() == "OffcompConfig", late.stderr[-2000:]
