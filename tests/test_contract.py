"""Every registered method × {tiny Llama, tiny Bert}: compress → forward consistent with to_dense,
exact stored-parameter counts, error falls as the budget grows, save → load gives identical logits.

A new method passes this table by default; add a row to CASES only when it needs other modules or
options (e.g. Tucker on attention projections)."""

from __future__ import annotations

import pytest
import torch

import offcomp
from offcomp.checkpoint import load_compressed, save_compressed
from offcomp.layers import CompressedModule
from offcomp.registry import available_methods, get_method

from .conftest import tiny_bert, tiny_llama

# method -> overrides of the default case (modules, options, joint support, exact tensor count).
CASES: dict[str, dict] = {
    # token embeddings only (the orientation-loss embedding AE)
    "ae-embed": {"modules": ["embed"]},
    # removes neurons from a whole gate/up/down chain; its layers narrow the activation in between,
    # so a single layer's forward is not x·Ŵᵀ (tests/test_prune.py checks the block against the masked dense model)
    # heads tensorised by the model's head_dim (taken from the config by plan_units)
    "tucker": {"modules": ["attn.q", "attn.k", "attn.v"]},
    "prune-structured": {"modules": ["mlp.gate", "mlp.up", "mlp.down"], "joint_only": True, "layer_forward": False},
}
DEFAULT = {"modules": ["mlp.up"], "options": {}, "count_tensors": True, "joint_only": False, "layer_forward": True}

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
    model = MODELS[arch]()
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
        model = tiny_llama()
        report = offcomp.compress_(model, make_plan(method, case(method)["joint_only"], cr=cr), seed=0)
        errors.append(sum(u.rel_error for u in report.units))
    assert errors[0] > errors[1] > errors[2]
