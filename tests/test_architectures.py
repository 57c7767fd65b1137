"""Structure discovery and architecture quirks, beyond the per-architecture contract in
test_contract.py: traced shared inputs, Conv1D orientation, scaled embeddings, LM-head biases,
head selection, refusals, and the data-aware paths (SVD-LLM, Wanda, sequential modular training,
GLUE fine-tuning) on architectures other than LLaMA and BERT."""

from __future__ import annotations

import pytest
import torch

import offcomp
from offcomp.errors import OffcompError
from offcomp.swap import discover, shared_inputs

from .conftest import save_model_dir, tiny_model, tiny_word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_discovered_structure_per_family():
    s = discover(tiny_model("gpt2"))
    assert (s.blocks, s.n_layers, s.embed, s.lm_head) == ("transformer.h", 2, "transformer.wte", "lm_head")
    assert s.block_paths() == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert s.transposed == {f"transformer.h.{i}.{p}" for i in range(2) for p in s.block_paths()}
    table = {m.name: m for m in s.modules}
    assert table["transformer.h.0.attn.c_attn"].shape == (192, 64)  # (out, in), although Conv1D stores (in, out)
    assert {"lm_head", "transformer.wte"} in [set(t) for t in s.tied]
    assert s.roles()["attn.qkv"] == "attn.c_attn" and s.roles()["attn.c_attn"] == "attn.c_attn"
    d = discover(tiny_model("distilbert"))
    assert d.blocks == "distilbert.transformer.layer" and d.lm_head == "vocab_projector"
    assert d.default_modules() == ["attn.k", "attn.o", "attn.q", "attn.v", "mlp.down", "mlp.up"]
    assert discover(tiny_model("opt")).blocks == "model.decoder.layers"


def test_unknown_family_works_by_path_suffix_and_regex(monkeypatch):
    """A model type with no alias table: default modules are the paths inside the blocks."""
    from offcomp import adapters

    monkeypatch.delitem(adapters.ALIASES, "gpt2")
    model = tiny_model("gpt2")
    s = discover(model)
    assert s.aliases == {} and s.default_modules() == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.c_fc"], "ratio": 0.5},
                                          {"modules": ["re:.*\\.attn\\.c_proj"], "joint": True, "ratio": 0.5},
                                          {"modules": ["c_attn"], "layers": "1", "ratio": 0.5}]})
    units = offcomp.plan_units(model, plan)
    assert [u.unit.names for u in units][-1] == ["transformer.h.1.attn.c_attn"]
    assert len(units) == 4


def test_shared_inputs_are_traced_not_named():
    llama = shared_inputs(tiny_model("llama"))
    assert llama["model.layers.0.self_attn.v_proj"] == "model.layers.0.self_attn.q_proj"
    assert llama["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
    assert llama["model.layers.0.self_attn.o_proj"] == "model.layers.0.self_attn.o_proj"
    assert llama["model.layers.1.self_attn.q_proj"] == "model.layers.1.self_attn.q_proj"  # not across layers
    # Falcon's parallel attention: the fused QKV and the MLP read one layer-norm output
    falcon = shared_inputs(tiny_model("falcon"))
    assert falcon["transformer.h.0.mlp.dense_h_to_4h"] == "transformer.h.0.self_attention.query_key_value"
    opt = shared_inputs(tiny_model("opt"))  # OPT defines k before q but calls q first: the first called leads
    assert opt["model.decoder.layers.0.self_attn.k_proj"] == "model.decoder.layers.0.self_attn.q_proj"


def test_scaled_embedding_keeps_its_scale():
    """Gemma multiplies by √hidden inside the embedding's forward; the replacement must too."""
    model = tiny_model("gemma")
    emb = model.get_input_embeddings()
    ids = torch.arange(5, 15)[None]
    with torch.no_grad():
        dense = emb(ids)
    offcomp.compress_(model, offcomp.parse_plan({"groups": [{"modules": ["embed", "lm_head"], "rank": 20}]}))
    new = model.get_input_embeddings()
    with torch.no_grad():
        out, raw = new(ids), torch.nn.functional.embedding(ids, new.to_dense())
    assert float(new.embed_scale) == pytest.approx(8.0)  # √64
    torch.testing.assert_close(out, raw * 8.0)
    assert 0.5 * dense.norm() < out.norm() <= dense.norm()  # the dense output's magnitude (rank 20 of 64), not 1/8


def test_position_embedding_with_offset_is_refused():
    model = tiny_model("opt")
    plan = offcomp.parse_plan({"groups": [{"modules": ["embed_positions"], "rank": 4}]})
    with pytest.raises(OffcompError, match="embed_positions cannot be compressed: OPTLearnedPositionalEmbedding"):
        offcomp.plan_units(model, plan)


@pytest.mark.parametrize("model_type", ["bert", "deberta-v2", "distilbert", "electra", "modernbert", "roberta"])
def test_mlm_decoder_bias_survives(model_type):
    model = tiny_model(model_type)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.bias.normal_()  # a visible bias: dropping it would move every logit
    ids = torch.randint(5, 128, (1, 8))
    with torch.no_grad():
        before = model(ids).logits
    offcomp.compress_(model, offcomp.parse_plan({"groups": [{"modules": ["lm_head", "embed"], "rank": 20}]}))
    new = model.get_output_embeddings()
    assert torch.equal(new.bias, head.bias)
    with torch.no_grad():
        after = model(ids).logits
    # the bias is kept exactly: the error left is the rank truncation only
    assert (after - before).abs().mean() < (before - head.bias).abs().mean()


def test_conv1d_export_keeps_orientation(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from offcomp.checkpoint import export_dense
    from offcomp.pipeline import compress_model

    src = save_model_dir(tiny_model("gpt2"), tiny_word_tokenizer(), tmp_path / "src")
    compress_model(str(src), offcomp.parse_plan({"groups": [{"modules": ["attn.qkv", "mlp.up"], "ratio": 0.5}]}),
                   tmp_path / "ck")
    export_dense(tmp_path / "ck", tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert isinstance(dense.transformer.h[0].attn.c_attn, Conv1D)
    assert dense.transformer.h[0].attn.c_attn.weight.shape == (64, 192)


@pytest.mark.parametrize("config_kw, message", [
    ({"model_type": "t5"}, "encoder-decoder"),
    ({"model_type": "mixtral"}, "mixture-of-experts"),
])
def test_unsupported_structures_get_one_line(config_kw, message):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(config_kw["model_type"], d_model=32, hidden_size=32, num_layers=1,
                               num_hidden_layers=1, num_attention_heads=2, num_heads=2, intermediate_size=32,
                               d_ff=32, d_kv=16, vocab_size=64)
    with torch.device("meta"):
        model = AutoModel.from_config(cfg)
    with pytest.raises(OffcompError, match=message):
        discover(model)


def test_default_head_from_architectures():
    from transformers import AutoConfig

    from offcomp.models import default_head

    def cfg(*archs, model_type="gpt2"):
        c = AutoConfig.for_model(model_type)
        c.architectures = list(archs) or None
        return c

    assert default_head(cfg("GPT2LMHeadModel")) == "causal-lm"
    assert default_head(cfg("XLMWithLMHeadModel", model_type="xlm")) == "causal-lm"
    assert default_head(cfg("DistilBertForMaskedLM", model_type="distilbert")) == "masked-lm"
    assert default_head(cfg("BertModel", model_type="bert")) == "base"
    assert default_head(cfg(model_type="gpt_neox")) == "causal-lm"  # no architectures: the type's only LM head


def _random_stats(model, names, n=3, seq=16):
    from offcomp.capture_hooks import collect_stats

    batches = [{"input_ids": torch.randint(5, 128, (1, seq)), "labels": None} for _ in range(n)]
    batches = [{k: v for k, v in b.items() if v is not None} for b in batches]
    return collect_stats(model, batches, shared_inputs(model, names), gram=True, fisher=False).by_module()


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "phi3"])
def test_data_aware_paths_on_fused_and_conv1d_models(model_type):
    """SVD-LLM with calibration statistics, Wanda pruning and sequential modular training."""
    from offcomp.modular import modular_train, teacher_copy
    from offcomp.plan import ModularConfig

    model = tiny_model(model_type)
    s = discover(model)
    names = [m.name for m in s.modules if m.layer is not None and m.kind == "linear" and m.name not in s.slices]
    stats = _random_stats(model, names)
    ids = torch.randint(5, 128, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
    teacher = teacher_copy(model)
    ffn_in = s.block_paths()[-2]
    plan = offcomp.parse_plan({"groups": [
        {"modules": [p for p in s.block_paths() if p != ffn_in], "method": "svd-llm", "ratio": 0.6},
        {"modules": [ffn_in], "method": "prune", "options": {"score": "wanda"}, "ratio": 0.5}]})
    report = offcomp.compress_(model, plan, stats=stats)
    assert {n for u in report.units for n in u.names} == set(names)
    with torch.no_grad():
        compressed = model(ids).logits
    windows = torch.randint(5, 128, (6, 16))
    rec = modular_train(teacher, model, windows, ModularConfig(epochs=2, lr=1e-3, mode="sequential"))
    assert [b["block"] for b in rec["blocks"]] == ["layers.0", "layers.1"]
    assert all(b["nmse_after"] <= b["nmse_before"] for b in rec["blocks"])
    with torch.no_grad():
        trained = model(ids).logits
    assert torch.isfinite(trained).all() and not torch.equal(trained, compressed)
    assert (compressed - dense).abs().max() > 0


@pytest.mark.parametrize("model_type", ["distilbert", "deberta-v2", "electra", "modernbert"])
def test_glue_finetunes_compressed_encoders(model_type, tmp_path):
    from offcomp.eval.glue import FinetuneArgs, run_glue
    from offcomp.pipeline import compress_model, quick_plan

    from .finetune_torchrun import write_sst2

    model = tiny_model(model_type)
    src = save_model_dir(model, tiny_word_tokenizer(), tmp_path / "src")
    compress_model(str(src), quick_plan(model.config, "svd", ratio=0.8), tmp_path / "ck")
    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=8)
    args = FinetuneArgs(batch_size=8, grad_accum=1, epochs=1, eval_batch_size=8, max_length=32, logging_steps=1)
    rec = run_glue(str(tmp_path / "ck"), "sst2", data_dir=data, output_dir=tmp_path / "out", args=args)
    assert rec["model"]["compressed"] and rec["data"]["n_train"] == 16 and 0 <= rec["metrics"]["accuracy"] <= 1
    assert rec["model"]["compressed_modules"] == 2 * len(discover(model).block_paths())


SQUAD_DEV = "/work/shared/data/squad/dev-v1.1.json"  # the official file (SOURCES.md section 4)
SQUAD_DEV_SHA256 = "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"


@pytest.mark.parametrize("model_type", ["distilbert", "deberta-v2", "electra", "modernbert"])
def test_squad_on_compressed_encoders(model_type, tmp_path):
    """`offcomp squad` end to end on a compressed tiny encoder saved with its masked-LM head: the
    question-answering head is built on the compressed body, fine-tuned on 8 real SQuAD questions
    and scored on 4 of another article (split-dev protocol) with the official EM/F1."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from offcomp.cli import app
    from offcomp.pipeline import compress_model, quick_plan

    from .finetune_torchrun import tokenizer

    if not Path(SQUAD_DEV).is_file():
        pytest.skip(f"{SQUAD_DEV} is not here")
    tok = tokenizer()  # bert-base-uncased vocabulary: real SQuAD text, real answer offsets
    model = tiny_model(model_type, vocab_size=tok.vocab_size, max_position_embeddings=128)
    src = save_model_dir(model, tok, tmp_path / "src")
    compress_model(str(src), quick_plan(model.config, "svd", ratio=0.8), tmp_path / "ck")
    res = CliRunner().invoke(app, ["squad", "--model", str(tmp_path / "ck"), "--dev-file", SQUAD_DEV,
                                   "--split-dev", "47", "--max-train-samples", "8", "--max-eval-samples", "4",
                                   "--max-length", "128", "--doc-stride", "32", "--batch-size", "4", "--epochs", "1",
                                   "--checkpoint-steps", "0", "--out", str(tmp_path / "squad"), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec == json.loads((tmp_path / "squad" / "squad.json").read_text())
    assert rec["type"] == "squad" and rec["model"]["compressed"] and rec["model"]["head"] == "question-answering"
    assert rec["model"]["compressed_modules"] == 2 * len(discover(model).block_paths())
    data = rec["data"]
    assert data["protocol"] == "split-dev" and data["eval_articles"] == ["Force"]  # the dev file's last article
    assert data["sha256"] == {"dev-v1.1.json": SQUAD_DEV_SHA256}
    assert data["n_train_questions"] == 8 and data["n_eval_questions"] == 4
    assert data["n_train_features"] >= 8 and rec["train"]["steps"] == -(-data["n_train_features"] // 4)  # 1 epoch
    assert 0 < rec["train"]["loss"] < 20  # a finite cross-entropy over ≤ 128 positions (ln 128 ≈ 4.9 per end)
    m = rec["metrics"]
    assert m["n_questions"] == 4 and m["n_missing"] == 0 and 0 <= m["exact_match"] <= m["f1"] <= 100


def test_inspect_record_and_plan_skeleton(tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from offcomp.cli import app
    from offcomp.inspection import inspect_structure

    rec = inspect_structure(tiny_model("llama"))
    roles = {r["role"]: r for r in rec["roles"]}
    assert roles["self_attn.k_proj"]["alias"] == "attn.k" and roles["self_attn.k_proj"]["shape"] == [32, 64]
    assert roles["self_attn.k_proj"]["params"] == 2 * 32 * 64
    assert roles["self_attn.k_proj"]["break_even_rank"] == round(32 * 64 / 96, 1)
    assert roles["self_attn.k_proj"]["reads_input_with"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert rec["shared_inputs"][0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert sum(r["share"] for r in rec["roles"]) + sum(r["share"] for r in rec["other"]) == pytest.approx(
        1, abs=0.01)  # tied embeddings counted once; norms are the rest
    plan = offcomp.parse_plan(yaml.safe_load(rec["plan"]))  # the skeleton is a valid plan as is
    assert [g.modules for g in plan.groups] == [["attn.q", "attn.k", "attn.v"], ["attn.o"], ["mlp.gate", "mlp.up"],
                                                ["mlp.down"]]
    assert len(offcomp.plan_units(tiny_model("llama"), plan)) == 14

    phi = {r["role"]: r for r in inspect_structure(tiny_model("phi3"))["roles"]}
    assert phi["self_attn.qkv_proj"]["fused"] == ["q", "k", "v"] and phi["mlp.gate_up_proj"]["alias"] == "mlp.gate_up"

    src = save_model_dir(tiny_model("gpt2"), tiny_word_tokenizer(), tmp_path / "gpt2")
    res = CliRunner().invoke(app, ["inspect", str(src), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["blocks"] == {"path": "transformer.h", "type": "GPT2Block", "layers": 2}
    assert all(r["conv1d"] for r in out["roles"]) and out["tied"] == [["transformer.wte", "lm_head"]]


def test_saved_metadata_names_only_this_models_tensors(tmp_path):
    """save_model writes the dropped names of shared tensors into the metadata dict it is given;
    a module-level dict would carry one checkpoint's names into every later one (regression)."""
    from safetensors import safe_open

    from offcomp.checkpoint import WEIGHTS, save_compressed

    for i, mt in enumerate(("gemma", "gpt2")):
        model = tiny_model(mt)
        report = offcomp.compress_(model, offcomp.parse_plan({"groups": [{"modules": ["mlp.down"], "joint": True,
                                                                           "rank": 8}]}))
        save_compressed(model, None, tmp_path / str(i), {"head": "causal-lm", "plan": {}, "report": report.to_dict(),
                                                         "base": {}})
    for i in (0, 1):  # save_pretrained now writes them (transformers re-ties on load): format marks only
        with safe_open(str(tmp_path / str(i) / WEIGHTS), "pt") as f:
            assert set(f.metadata() or {}) == {"format", "offcomp_format"}


def test_structured_pruning_on_conv1d_and_refused_inside_fused_projections():
    model = tiny_model("gpt2")
    ids = torch.randint(5, 128, (1, 8))
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.up", "mlp.down"], "joint": True,
                                           "method": "prune-structured", "ratio": 0.5}]})
    offcomp.compress_(model, plan)
    assert model.transformer.h[0].mlp.c_fc.weight.shape[0] < 128  # neurons really removed
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    heads = offcomp.parse_plan({"groups": [{"modules": ["attn.qkv", "attn.o"], "joint": True, "ratio": 0.5,
                                            "method": "prune-structured", "options": {"head_dim": 16}}]})
    with pytest.raises(OffcompError, match=r"c_attn is a fused projection \(q/k/v in one matrix\)"):
        offcomp.plan_units(tiny_model("gpt2"), heads)
    for model_type in ("gpt2", "gpt_neox"):  # its slices too (they crashed inside the attention: regression)
        slices = offcomp.parse_plan({"groups": [{"modules": ["attn.q", "attn.k", "attn.v", "attn.o"], "joint": True,
                                                 "ratio": 0.5, "method": "prune-structured",
                                                 "options": {"head_dim": 16}}]})
        with pytest.raises(OffcompError, match=r"attn.c_attn:q is a row slice of a fused projection \(q/k/v in one"
                           if model_type == "gpt2" else "query_key_value:q is a row slice of a fused projection"):
            offcomp.plan_units(tiny_model(model_type), slices)
    gated = offcomp.parse_plan({"groups": [{"modules": ["mlp.gate_up", "mlp.down"], "joint": True, "ratio": 0.5,
                                            "method": "prune-structured"}]})
    with pytest.raises(OffcompError, match="gate/up in one matrix"):
        offcomp.plan_units(tiny_model("phi3"), gated)


def test_fused_slices_are_roles_of_their_own(tmp_path):
    """All key slices of GPT-2's fused c_attn compressed jointly across layers; q and v stay dense."""
    from transformers import AutoModelForCausalLM

    from offcomp.checkpoint import export_dense
    from offcomp.layers import FusedSlices, LowRankLinear
    from offcomp.models import load_model
    from offcomp.pipeline import compress_model

    model = tiny_model("gpt2")
    s = discover(model)
    assert s.slices["transformer.h.0.attn.c_attn:k"] == ("transformer.h.0.attn.c_attn", range(64, 128))
    assert s.roles()["attn.k"] == s.roles()["attn.qkv:k"] == "attn.c_attn:k"
    assert s.default_modules() == ["attn.o", "attn.qkv", "mlp.down", "mlp.up"]  # whole matrices by default
    src = save_model_dir(model, tiny_word_tokenizer(), tmp_path / "src")
    plan = offcomp.parse_plan({"groups": [{"modules": ["attn.k"], "joint": True, "rank": 8},
                                          {"modules": ["mlp.up"], "ratio": 0.5}]})
    manifest = compress_model(str(src), plan, tmp_path / "ck")
    unit = manifest["report"]["units"][0]
    assert unit["names"] == ["transformer.h.0.attn.c_attn:k", "transformer.h.1.attn.c_attn:k"]
    assert unit["stored_params"] == 8 * (2 * 64 + 64)
    ck = load_model(str(tmp_path / "ck")).model
    c_attn = ck.transformer.h[1].attn.c_attn
    assert isinstance(c_attn, FusedSlices) and isinstance(c_attn.parts["k"], LowRankLinear)
    assert c_attn.parts["k"].V is ck.transformer.h[0].attn.c_attn.parts["k"].V  # one joint factor
    dense_w = model.transformer.h[1].attn.c_attn.weight.T  # q and v rows untouched
    assert torch.equal(c_attn.parts["q"].weight, dense_w[:64]) and torch.equal(c_attn.parts["v"].weight, dense_w[128:])
    ids = torch.randint(5, 128, (2, 10))
    export_dense(tmp_path / "ck", tmp_path / "dense")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, ck(ids).logits, rtol=1e-4, atol=1e-4)

    with pytest.raises(OffcompError, match="row slice of transformer.h.0.attn.c_attn, which the plan also"):
        offcomp.plan_units(model, offcomp.parse_plan({"groups": [{"modules": ["attn.qkv"], "rank": 4},
                                                                 {"modules": ["attn.k"], "rank": 4}]}))


# Head-interleaved fused QKV layouts (offcomp.adapters.FUSED), every one transformers has: GPT-NeoX
# and Bloom [q k v] per head; Falcon per head (multi_query False), q then one k and one v head
# (multi_query, the default), or per key/value group (new_decoder_architecture).
INTERLEAVED = {"gpt_neox": ("gpt_neox", {}), "bloom": ("bloom", {}),
               "falcon-multi-query": ("falcon", {"multi_query": True}),
               "falcon-per-head": ("falcon", {"multi_query": False}),
               "falcon-new-decoder": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2})}
LAYOUT = {"gpt_neox": "per_head", "bloom": "per_head", "falcon-multi-query": "blocks",
          "falcon-per-head": "per_head", "falcon-new-decoder": "per_group"}


@pytest.mark.parametrize("case", sorted(INTERLEAVED))
def test_interleaved_slices_are_the_models_own_q_k_v(case):
    """Checked against transformers' own forward, not against offcomp's split: scaling the rows
    offcomp calls k by 2 and those it calls q by 1/2 leaves every attention score, hence the logits,
    exactly as they were (rotary and ALiBi included); scaling the v rows by 2 and the output
    projection by 1/2 too. Rows that are not exactly the model's q/k/v would move the logits (the
    contiguous-thirds control below does, for every interleaved layout)."""
    model_type, kw = INTERLEAVED[case]
    model = tiny_model(model_type, **kw)
    s = discover(model)
    path = next(iter(s.fused))
    assert s.fused[path] == (("q", "k", "v"), LAYOUT[case])
    ids = torch.randint(5, 128, (2, 10))
    qkv = [m.name for m in s.modules if m.role == path]
    rows = {n: {k: torch.as_tensor(list(s.slices[f"{n}:{k}"][1])) for k in "qkv"} for n in qkv}
    assert all(sorted(torch.cat(list(r.values())).tolist()) == list(range(model.get_submodule(n).weight.shape[0]))
               for n, r in rows.items())  # each row in exactly one slice

    def scaled(row_sets):
        m = tiny_model(model_type, **kw)
        with torch.no_grad():
            for n, r in row_sets.items():
                mod = m.get_submodule(n)
                for k, f in (("q", 0.5), ("k", 2.0), ("v", 2.0)):
                    mod.weight[r[k]] *= f
                    if mod.bias is not None:
                        mod.bias[r[k]] *= f
                o = m.get_submodule(n.replace("query_key_value", "dense"))
                o.weight *= 0.5
            return m(ids).logits

    with torch.no_grad():
        dense = model(ids).logits
    torch.testing.assert_close(scaled(rows), dense, rtol=0, atol=1e-6)
    if LAYOUT[case] != "blocks":
        n_out = model.get_submodule(qkv[0]).weight.shape[0]
        thirds = {n: dict(zip("qkv", torch.arange(n_out).chunk(3))) for n in qkv}
        assert (scaled(thirds) - dense).abs().max() > 1e-3


@pytest.mark.parametrize("case", sorted(INTERLEAVED))
def test_interleaved_key_slices_jointly_across_layers(case, tmp_path, monkeypatch):
    """All key slices of an interleaved fused QKV compressed as one joint group: at full rank the
    logits are the dense ones; at a lower rank only the key rows move; save → load → identical
    logits; to_dense() is the fused weight; the dense export computes the same function."""
    from transformers import AutoModelForCausalLM

    from offcomp.checkpoint import export_dense
    from offcomp.layers import FusedSlices, LowRankLinear
    from offcomp.models import load_model
    from offcomp.pipeline import compress_model

    model_type, kw = INTERLEAVED[case]
    model = tiny_model(model_type, **kw)
    s = discover(model)
    path = next(iter(s.fused))
    qkv = [m.name for m in s.modules if m.role == path]
    keys = {n: list(s.slices[f"{n}:k"][1]) for n in qkv}
    dense_w = {n: model.get_submodule(n).weight.detach().clone() for n in qkv}
    ids = torch.randint(5, 128, (2, 10))
    with torch.no_grad():
        dense = model(ids).logits

    from offcomp.methods.svd import SVD

    full = tiny_model(model_type, **kw)
    rank = min(sum(len(k) for k in keys.values()), 64)  # the stacked key rows' full rank: V is rank × 64
    monkeypatch.setattr(SVD, "solve", lambda self, unit, cfg: {"rank": rank})  # a rank check would refuse it
    monkeypatch.setattr("offcomp.api.check_savings", lambda model, planned: None)  # full rank saves nothing
    report = offcomp.compress_(full, offcomp.parse_plan({"groups": [{"modules": ["attn.k"], "joint": True,
                                                                      "method": "svd", "rank": 1}]}))
    assert report.units[0].names == [f"{n}:k" for n in qkv]
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, dense, rtol=1e-4, atol=1e-5)
    for n in qkv:
        torch.testing.assert_close(full.get_submodule(n).to_dense(), dense_w[n], rtol=1e-4, atol=1e-5)
    monkeypatch.undo()

    src = save_model_dir(model, tiny_word_tokenizer(), tmp_path / "src")
    plan = offcomp.parse_plan({"groups": [{"modules": ["attn.k"], "joint": True, "rank": 4}]})
    compress_model(str(src), plan, tmp_path / "ck")
    ck = load_model(str(tmp_path / "ck")).model
    again = load_model(str(tmp_path / "ck")).model
    x = torch.randn(3, 64)
    for n in qkv:
        fused = ck.get_submodule(n)
        assert isinstance(fused, FusedSlices) and isinstance(fused.parts["k"], LowRankLinear)
        assert fused.parts["k"].V is ck.get_submodule(qkv[0]).parts["k"].V  # one joint factor
        w = fused.to_dense()
        moved = (w != dense_w[n]).any(dim=1).nonzero().flatten().tolist()
        assert moved and set(moved) <= set(keys[n])  # only key rows differ, q and v rows bit for bit
        bias = model.get_submodule(n).bias
        with torch.no_grad():  # the container computes its to_dense() (and the fused bias, in fused order)
            torch.testing.assert_close(fused(x), x @ w.T + (bias if bias is not None else 0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        compressed = ck(ids).logits
        assert torch.equal(compressed, again(ids).logits)
        assert (compressed - dense).abs().max() > 1e-4
    export_dense(tmp_path / "ck", tmp_path / "dense")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    for n in qkv:
        torch.testing.assert_close(exported.get_submodule(n).weight, ck.get_submodule(n).to_dense())
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, compressed, rtol=1e-4, atol=1e-5)


def test_slices_that_cannot_be_located_are_refused_in_one_line(monkeypatch):
    """A config whose head count does not describe the fused rows, or a layout offcomp does not
    know: the slices are not roles (never guessed), the fused matrix still compresses whole."""
    from offcomp import adapters

    model = tiny_model("gpt_neox")
    model.config.num_attention_heads = 3  # 192 rows are not 3 heads × 3 × 21
    s = discover(model)
    assert not s.slices and "attn.k" not in s.roles()
    plan = offcomp.parse_plan({"groups": [{"modules": ["attn.k"], "joint": True, "rank": 4}]})
    with pytest.raises(OffcompError, match=r"^group 'group0': attn.k: the k rows of gpt_neox.layers.0.attention."
                                           r"query_key_value cannot be located: 192 rows are not 3 heads × \(q, k, v\)"
                                           r" × 21; compress attention.query_key_value whole$"):
        offcomp.plan_units(model, plan)
    assert len(offcomp.plan_units(model, offcomp.parse_plan({"groups": [{"modules": ["attn.qkv"], "rank": 4}]}))) == 2
    monkeypatch.setitem(adapters.FUSED, "bloom", {"self_attention.query_key_value": (("q", "k", "v"), "diagonal")})
    with pytest.raises(OffcompError, match="knows no fused-projection layout 'diagonal'"):
        offcomp.plan_units(tiny_model("bloom"), offcomp.parse_plan({"groups": [{"modules": ["self_attention.query_key_value:v"],
                                                                               "rank": 4}]}))


FULL_RANK_SLICES = {"gpt2": ("gpt2", {}), "phi3": ("phi3", {}), "modernbert": ("modernbert", {}), **INTERLEAVED}


@pytest.mark.parametrize("case", sorted(FULL_RANK_SLICES))
def test_every_fused_slice_at_full_rank_reproduces_dense(case, monkeypatch):
    from offcomp.methods.svd import SVD

    monkeypatch.setattr(SVD, "solve", lambda self, unit, cfg: {"rank": min(unit.shapes[0])})
    monkeypatch.setattr("offcomp.api.check_savings", lambda model, planned: None)  # full rank saves nothing
    model_type, kw = FULL_RANK_SLICES[case]
    model = tiny_model(model_type, **kw)
    ids = torch.randint(5, 128, (2, 10))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    s = discover(model)
    roles = sorted({m.role for m in s.modules if m.name in s.slices})
    assert len(roles) == {"phi3": 5, "modernbert": 5}.get(model_type, 3)
    offcomp.compress_(model, offcomp.parse_plan({"groups": [{"modules": roles, "rank": 1}]}))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_slices_with_calibration_statistics():
    """SVD-LLM on Phi-3's gate and up slices: the slices read the fused module's captured input."""
    model = tiny_model("phi3")
    s = discover(model)
    stats = _random_stats(model, [m.name for m in s.modules if m.layer is not None and m.name not in s.slices])
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.gate", "mlp.up"], "method": "svd-llm", "ratio": 0.5}]})
    report = offcomp.compress_(model, plan, stats=stats)
    assert [u.names[0] for u in report.units][:2] == ["model.layers.0.mlp.gate_up_proj:gate",
                                                      "model.layers.0.mlp.gate_up_proj:up"]
    assert all(u.rel_error < 1 for u in report.units)

    neox = tiny_model("gpt_neox")  # interleaved key rows: their Gram is the fused module's input's
    s = discover(neox)
    stats = _random_stats(neox, [m.name for m in s.modules if m.layer is not None and m.name not in s.slices])
    plan = offcomp.parse_plan({"groups": [{"modules": ["attn.k"], "joint": True, "method": "svd-llm", "ratio": 0.5}]})
    report = offcomp.compress_(neox, plan, stats=stats)
    assert report.units[0].names == [f"gpt_neox.layers.{i}.attention.query_key_value:k" for i in (0, 1)]
    assert report.units[0].rel_error < 1


def test_block_capture_finds_fused_block_inputs():
    """--blocks needs each block's attention/FFN inputs and outputs: a fused QKV reads the attention input."""
    from offcomp.capture import block_roles

    roles = block_roles(tiny_model("gpt2"), "1")
    assert roles == {1: {"attn.q": "transformer.h.1.attn.c_attn", "attn.o": "transformer.h.1.attn.c_proj",
                         "mlp.up": "transformer.h.1.mlp.c_fc", "mlp.down": "transformer.h.1.mlp.c_proj"}}
    from offcomp.capture import select_inputs

    assert select_inputs(tiny_model("gpt2"), ("attn.k",), "0") == {"transformer.h.0.attn.c_attn":
                                                                   "transformer.h.0.attn.c_attn"}
    with pytest.raises(OffcompError, match="layer 0 has no attn.q module"):
        from offcomp import adapters

        saved = adapters.ALIASES.pop("gpt2")
        try:
            block_roles(tiny_model("gpt2"), "0")
        finally:
            adapters.ALIASES["gpt2"] = saved


@pytest.mark.parametrize("case", sorted({**FULL_RANK_SLICES}))
def test_inspect_skeleton_of_fused_models_is_a_valid_plan(case):
    """The skeleton names each fused matrix once (its slices listed as well made it a plan that
    compress refused: regression), and its commented slice example, put in the matrix's place, runs."""
    import yaml

    from offcomp.cli import _fused_note
    from offcomp.inspection import inspect_structure

    model_type, kw = FULL_RANK_SLICES[case]
    model = tiny_model(model_type, **kw)
    rec = inspect_structure(model)
    plan = yaml.safe_load(rec["plan"])
    assert len(offcomp.plan_units(model, offcomp.parse_plan(plan))) == 2 * sum(len(g["modules"]) for g in plan["groups"])
    fused = [r for r in rec["roles"] if r["fused"]]
    assert fused and all(r["slices_refused"] is None for r in fused)
    assert _fused_note(fused[0]).startswith("fused q/k/v" if len(fused[0]["fused"]) == 3 else "fused ")
    assert ("per head" in _fused_note(fused[0])) == (LAYOUT.get(case) == "per_head")
    example = yaml.safe_load(rec["plan"].split("e.g.\n")[1].splitlines()[0].replace("  # ", "", 1))[0]
    whole = fused[0]["alias"]
    for g in plan["groups"]:  # Falcon's parallel attention: the fused QKV shares a group with mlp.up
        g["modules"] = [m for m in g["modules"] if m != whole]
    plan["groups"] = [g for g in plan["groups"] if g["modules"]] + [example]
    units = offcomp.plan_units(model, offcomp.parse_plan(plan))
    assert [n.partition(":")[2] for n in units[-1].unit.names] == [example["modules"][0].split(".")[-1]] * 2


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "phi3", "gpt_neox"])
def test_fisher_allocation_and_block_modular_training_on_other_architectures(model_type):
    """Fisher capture (per-sequence LM-loss gradients), Fisher-weighted rank allocation over the
    default modules (GPT-NeoX: its interleaved key slices too, a group of their own) and block-wise
    modular training, where the attention and FFN sub-blocks are found in each architecture."""
    from offcomp.allocate import allocate_plan
    from offcomp.capture import collect_stats, select_inputs
    from offcomp.modular import modular_train, teacher_copy
    from offcomp.plan import ModularConfig

    model = tiny_model(model_type)
    s = discover(model)
    ids = torch.randint(5, 128, (3, 16))
    stats = collect_stats(model, [{"input_ids": ids[i:i + 1], "labels": ids[i:i + 1]} for i in range(3)],
                          select_inputs(model)).by_module()
    assert all(v["fisher_row"].abs().sum() > 0 for v in stats.values())
    groups = [{"modules": s.default_modules(), "method": "svd-llm"}]
    if model_type == "gpt_neox":
        groups = [{"modules": [m for m in s.default_modules() if m != "attn.qkv"], "method": "svd-llm"},
                  {"modules": ["attn.k", "attn.v"], "method": "svd-llm"}]
    # ratio 0.3: random weights have flat spectra, so at 0.5 the allocation keeps most units dense
    res = allocate_plan(model, offcomp.parse_plan({"allocate": {"ratio": 0.3, "criterion": "fisher"},
                                                   "groups": groups}), stats)
    rec = res.record
    assert rec["criterion"] == "fisher" and rec["allocated_params"] <= rec["budget_params"]
    teacher = teacher_copy(model)
    report = offcomp.compress_(model, res.plan, stats=stats)
    # every unit the allocation factored is compressed; those it kept dense are not
    assert {n for u in report.units for n in u.names} == {n for u in rec["units"] if not u["dense"] for n in u["names"]}
    # (allocated slices were re-selected by a regex of their name, which never selects a slice: regression)
    assert (model_type == "gpt_neox") == any(n in s.slices for u in report.units for n in u.names)
    windows = torch.randint(5, 128, (6, 16))
    trained = modular_train(teacher, model, windows, ModularConfig(epochs=2, lr=1e-3, mode="blocks"))
    assert len(trained["blocks"]) >= 2 and all(b["nmse_after"] <= b["nmse_before"] for b in trained["blocks"])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
