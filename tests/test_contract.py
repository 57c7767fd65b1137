"""Every registered method × {tiny Llama, tiny Bert}: compress → forward consistent with to_dense,
exact stored-parameter counts, error falls as the budget grows, save → load gives identical logits.

A new method passes this table by default; add a row to CASES only when it needs other modules or
options (e.g. Tucker on attention projections)."""

from __future__ import annotations

import math

import pytest
import torch

import offcomp
from offcomp.checkpoint import load_compressed, save_compressed
from offcomp.layers import CompressedModule
from offcomp.registry import available_methods, get_method

from .conftest import (
    MASKED_TYPES,
    TINY_CONFIGS,
    save_model_dir,
    tiny_bert,
    tiny_llama,
    tiny_model,
    tiny_word_tokenizer,
    word_text,
)

# method -> overrides of the default case (modules, options, joint support, exact tensor count).
CASES: dict[str, dict] = {
    # token embeddings only (the orientation-loss embedding AE)
    # (untied models: compressing a tied embedding alone keeps the head's full copy and saves nothing)
    "ae-embed": {"modules": ["embed"], "tie": False},
    # removes neurons from a whole gate/up/down chain; its layers narrow the activation in between,
    # so a single layer's forward is not x·Ŵᵀ (tests/test_prune.py checks the block against the masked dense model)
    # heads tensorised by the model's head_dim (taken from the config by plan_units)
    "tucker": {"modules": ["attn.q", "attn.k", "attn.v"]},
    "prune-structured": {"modules": ["mlp.gate", "mlp.up", "mlp.down"], "joint_only": True, "layer_forward": False},
}
DEFAULT = {"modules": ["mlp.up"], "options": {}, "count_tensors": True, "joint_only": False, "layer_forward": True,
           "tie": True}

METHODS = [m for m in available_methods() if not get_method(m).needs_stats]
MODELS = {"llama": tiny_llama, "bert": tiny_bert}


def case(method: str) -> dict:
    return {**DEFAULT, **CASES.get(method, {})}


def make_plan(method: str, joint: bool, cr: float) -> offcomp.Plan:
    c = case(method)
    return offcomp.parse_plan({"groups": [{"modules": c["modules"], "joint": joint, "method": method,
                                            "options": c["options"], "cr": cr}]})


def stored_tensor_count(model, names) -> int:
    seen: dict[int, int] = {}
    for n in names:
        mod = model.get_submodule(n)
        if hasattr(mod, "stored_values"):  # masked sparse layers: the mask's population, not the dense tensor
            seen[id(mod)] = mod.stored_values()
            continue
        for pname, p in list(mod.named_parameters()) + list(mod.named_buffers()):
            # only the layer's own bias is excluded; biases inside a stored decoder count
            if pname != "bias" and p.dtype.is_floating_point:
                seen[id(p)] = p.numel()
    return sum(seen.values())


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_method_contract(method, joint, arch, tmp_path):
    if not joint and case(method)["joint_only"]:
        pytest.skip(f"{method} needs joint groups")
    model = MODELS[arch](tie=case(method)["tie"])
    ids = torch.randint(0, 128, (2, 12))
    report = offcomp.compress_(model, make_plan(method, joint, cr=2.0), seed=0)
    names = [n for u in report.units for n in u.names]
    assert names and all(isinstance(model.get_submodule(n), CompressedModule) for n in names)

    # forward agrees with the dense weight the layer claims to stand for
    for n in names if case(method)["layer_forward"] else []:
        layer = model.get_submodule(n)
        if layer.kind == "linear":
            x = torch.randn(3, layer.to_dense().shape[1])
            ref = x @ layer.to_dense().T + (layer.bias if getattr(layer, "bias", None) is not None else 0)
            torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-5)

    # stored parameter accounting is exact
    stored = sum(u.stored_params for u in report.units)
    if case(method)["count_tensors"]:
        assert stored == stored_tensor_count(model, names)
    original = sum(u.original_params for u in report.units)
    assert stored <= original / 2 * 1.0001
    # an embedding compressed out of a tie leaves the head its own copy, which is stored too
    untied = sum(p.numel() for p in model.get_output_embeddings().parameters()) if report.untied_embeddings else 0
    assert report.params_after == report.params_before - original + stored + untied

    # save → load round trip gives the same logits
    with torch.no_grad():
        before = model(ids).logits if hasattr(model(ids), "logits") else model(ids).last_hidden_state
    save_compressed(model, None, tmp_path / "ck", {"head": "masked-lm" if arch == "bert" else "causal-lm",
                                                  "plan": {}, "report": report.to_dict(), "base": {}})
    loaded = load_compressed(tmp_path / "ck").model
    with torch.no_grad():
        after = loaded(ids).logits
    assert (before - after).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_error_falls_with_budget(method):
    errors = []
    for cr in (6.0, 3.0, 1.5):
        model = tiny_llama(tie=case(method)["tie"])
        report = offcomp.compress_(model, make_plan(method, case(method)["joint_only"], cr=cr), seed=0)
        errors.append(sum(u.rel_error for u in report.units))
    assert errors[0] > errors[1] > errors[2]


# ---------------------------------------------------------------- every architecture

ARCHS = sorted(TINY_CONFIGS)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return word_text(tmp_path_factory.mktemp("text") / "words.txt")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("model_type", ARCHS)
def test_architecture_contract(model_type, tmp_path, words, one_thread):
    """Default-module SVD at ratio 0.8, one joint group and the embedding, through the CLI's path:
    compress a saved directory, save → load gives identical logits, the dense export computes the
    same function, eval-ppl runs."""
    from offcomp.checkpoint import export_dense
    from offcomp.models import load_model
    from offcomp.pipeline import compress_model, evaluate_ppl, quick_plan
    from offcomp.swap import discover

    model = tiny_model(model_type)
    src = save_model_dir(model, tiny_word_tokenizer(), tmp_path / "src")
    structure = discover(model)
    assert structure.n_layers == 2 and structure.embed and structure.lm_head
    joint = structure.block_paths()[-1]  # the FFN output projection, one shape in every layer
    plan = quick_plan(model.config, "svd", ratio=0.8)
    plan = offcomp.parse_plan({"groups": [
        {**plan.groups[0].model_dump(), "exclude": [joint]},
        {"name": "joint", "modules": [joint], "joint": True, "method": "svd", "ratio": 0.8},
        {"name": "embed", "modules": ["embed"], "method": "svd", "ratio": 0.8}]})
    manifest = compress_model(str(src), plan, tmp_path / "ck")
    units = manifest["report"]["units"]
    linears = [m.name for m in structure.modules if m.layer is not None and m.kind == "linear"
               and m.name not in structure.slices]
    assert sorted(n for u in units for n in u["names"]) == sorted(linears + [structure.embed])
    assert manifest["report"]["params_after"] < manifest["report"]["params_before"]

    ids = torch.randint(5, 128, (2, 10))
    compressed = load_model(str(tmp_path / "ck"))
    assert compressed.head == ("masked-lm" if model_type in MASKED_TYPES else "causal-lm")
    again = load_model(str(tmp_path / "ck"))
    assert torch.equal(_logits(compressed.model, ids), _logits(again.model, ids))

    export_dense(tmp_path / "ck", tmp_path / "dense")
    dense = load_model(str(tmp_path / "dense"))
    torch.testing.assert_close(_logits(dense.model, ids), _logits(compressed.model, ids), rtol=1e-4, atol=1e-4)

    rec = evaluate_ppl(str(tmp_path / "ck"), str(words), seq_len=32, max_tokens=128, results=tmp_path / "r.jsonl")
    assert rec["n_tokens"] > 0 and math.isfinite(rec["ppl"])


@pytest.mark.parametrize("model_type", ARCHS)
def test_full_rank_reproduces_dense_logits(model_type, monkeypatch, one_thread):
    """Every matrix, the embedding and the LM head included, at full rank: the logits must not move.
    Catches anything a replacement drops (Gemma's embed_scale, an LM-head or MLM-decoder bias, a
    transposed Conv1D, a tie)."""
    from offcomp.methods.svd import SVD
    from offcomp.swap import discover

    monkeypatch.setattr(SVD, "solve", lambda self, unit, cfg: {"rank": min(unit.shapes[0])})
    monkeypatch.setattr("offcomp.api.check_savings", lambda model, planned: None)  # full rank saves nothing
    model = tiny_model(model_type)
    ids = torch.randint(5, 128, (2, 10))
    before = _logits(model, ids)
    structure = discover(model)
    plan = offcomp.parse_plan({"groups": [{"modules": ["re:.*"], "exclude": sorted(structure.refused),
                                           "method": "svd", "rank": 1}]})
    report = offcomp.compress_(model, plan)
    names = {n for u in report.units for n in u.names}
    assert {structure.embed, structure.lm_head} <= names
    assert len(names) == len(structure.modules) - len(structure.refused) - len(structure.slices)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-4)
