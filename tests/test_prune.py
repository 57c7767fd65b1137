"""prune (unstructured, magnitude / Wanda) and prune-structured (FFN neurons, attention heads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from offcomp.api import compress_, plan_units
from offcomp.checkpoint import load_compressed, save_compressed
from offcomp.errors import OffcompError
from offcomp.layers import CompressedModule
from offcomp.methods.prune import MaskedEmbedding, MaskedLinear, pack_mask, row_quotas, unpack_mask
from offcomp.methods.prune_structured import ColumnSubsetLinear, RowSubsetLinear
from offcomp.plan import Budget, parse_plan
from offcomp.registry import FitContext, FitUnit, get_method

from .conftest import tiny_bert, tiny_llama


def unit_of(mods: list[nn.Linear], budget: Budget, joint: bool = True, names: list[str] | None = None) -> FitUnit:
    names = names or [f"m{i}" for i in range(len(mods))]
    return FitUnit("t", names, [tuple(m.weight.shape) for m in mods], ["linear"] * len(mods), joint, budget)


def run(method: str, mods: list[nn.Linear], budget: Budget, options: dict | None = None, joint: bool = True,
        names: list[str] | None = None, stats: dict | None = None):
    m = get_method(method)
    cfg = m.parse_config(options or {}, "t")
    unit = unit_of(mods, budget, joint, names)
    hyper = m.solve(unit, cfg)
    layers = m.fit(unit, cfg, hyper, mods, FitContext(stats=stats))
    return unit, hyper, layers, m.stored_params(unit, cfg, hyper)


def rel_err(mods, layers) -> float:
    with torch.no_grad():
        num = sum((m.weight - lay.to_dense()).pow(2).sum() for m, lay in zip(mods, layers))
        return float((num / sum(m.weight.pow(2).sum() for m in mods)).sqrt())


def linears(*shapes, seed: int = 0, bias: bool = False) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(m, n, bias=bias) for n, m in shapes]


def plan(**group) -> object:
    return parse_plan({"groups": [group]})


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def roundtrip(model, report, tmp_path, head: str):
    """save_compressed → load_compressed of a model compressed in place; returns the loaded model."""
    save_compressed(model, None, tmp_path / "ckpt", {"head": head, "report": report.to_dict()})
    return load_compressed(tmp_path / "ckpt").model


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- unstructured


@pytest.mark.parametrize("options", [{}, {"compare": "row"}])
def test_error_falls_and_counts_exact(options):
    mods = linears((48, 32), (40, 32), (32, 64))
    errs = []
    for ratio in (0.1, 0.3, 0.6, 0.9):
        unit, hyper, layers, stored = run("prune", mods, Budget("ratio", ratio), options)
        assert stored == int(unit.original_params * ratio) == hyper["keep"]
        assert sum(int(lay.mask.sum()) for lay in layers) == stored
        assert all((lay.weight[~lay.mask] == 0).all() for lay in layers)
        errs.append(rel_err(mods, layers))
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 3


def test_magnitude_keeps_exactly_the_largest():
    mods = linears((20, 30))
    _, _, (layer,), stored = run("prune", mods, Budget("cr", 4.0), joint=False)
    w = mods[0].weight.detach().abs().flatten()
    kept = w[layer.mask.flatten()]
    assert kept.numel() == stored == 150
    assert kept.min() >= w[~layer.mask.flatten()].max()


def test_joint_threshold_is_global_separate_is_per_matrix():
    mods = linears((32, 32), (32, 32))
    with torch.no_grad():
        mods[1].weight.mul_(3.0)  # a "louder" layer keeps more under one global threshold
    _, _, layers, _ = run("prune", mods, Budget("ratio", 0.25), joint=True)
    a, b = (int(lay.mask.sum()) for lay in layers)
    assert a + b == 512 and b > 2 * a
    for mod in mods:  # separate: every matrix keeps exactly its share
        _, _, (layer,), _ = run("prune", [mod], Budget("ratio", 0.25), joint=False)
        assert int(layer.mask.sum()) == 256


def test_row_compare_gives_every_row_its_share():
    mods = linears((10, 30), (6, 30))
    _, _, layers, stored = run("prune", mods, Budget("ratio", 0.3), {"compare": "row"})
    per_row = torch.cat([lay.mask.sum(1) for lay in layers])
    assert int(per_row.sum()) == stored == 144 and set(per_row.tolist()) == {9}
    q = torch.cat(row_quotas([(3, 7), (2, 5)], 11))  # uneven rows: exact total, proportional
    assert int(q.sum()) == 11 and q.max() - q.min() <= 2


def test_wanda_uses_activation_norms():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.5]]))  # magnitude prefers input 0
    xtx = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))  # but input 1 carries 10x the signal
    budget = Budget("ratio", 0.5)
    _, _, (mag,), _ = run("prune", [lin], budget, joint=False, names=["x"])
    wanda = {"score": "wanda"}
    _, _, (wan,), _ = run("prune", [lin], budget, wanda, joint=False, names=["x"], stats={"x": {"xtx": xtx}})
    assert mag.mask.tolist() == [[True, False]] and wan.mask.tolist() == [[False, True]]
    act_sq = {"x": {"act_sq": torch.tensor([1.0, 100.0])}}
    _, _, (wan2,), _ = run("prune", [lin], budget, {"score": "wanda"}, joint=False, names=["x"], stats=act_sq)
    assert torch.equal(wan2.mask, wan.mask)


def test_wanda_beats_magnitude_on_output_error():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(512, 64) * torch.logspace(-1, 1, 64)  # channels of very different scale
    stats = {"x": {"xtx": (x.T @ x).double()}}
    outs = {}
    for score in ("magnitude", "wanda"):
        _, _, (layer,), _ = run("prune", [lin], Budget("ratio", 0.3), {"score": score, "compare": "row"},
                                joint=False, names=["x"], stats=stats)
        with torch.no_grad():
            outs[score] = (lin(x) - layer(x)).norm()
    assert outs["wanda"] < 0.8 * outs["magnitude"]


def test_wanda_without_stats_is_an_error(llama):
    p = plan(modules=["mlp.down"], joint=True, method="prune", cr=3, options={"score": "wanda"})
    with pytest.raises(OffcompError, match="offcomp capture"):
        compress_(llama, p)
    name = "model.layers.0.mlp.down_proj"
    with pytest.raises(OffcompError, match="act_sq"):
        compress_(tiny_llama(), p, stats={name: {"fisher_row": torch.ones(64)}})


def test_rank_budget_and_bad_budgets_are_errors(llama):
    with pytest.raises(OffcompError, match="rank means nothing"):
        plan_units(llama, plan(modules=["mlp.down"], method="prune", rank=8))
    with pytest.raises(OffcompError, match="keeps no weight"):
        run("prune", linears((2, 2)), Budget("ratio", 0.1))


def test_same_budget_as_svd_within_one_percent():
    # smollm2-135m's 30 mlp.down matrices as one joint group (solve needs shapes only)
    shapes = [(576, 1536)] * 30
    for cr in (3, 10, 25):
        counts = {}
        for name in ("svd", "prune"):
            m = get_method(name)
            cfg = m.parse_config({}, "t")
            unit = FitUnit("t", [f"l.{i}.down" for i in range(30)], shapes, ["linear"] * 30, True, Budget("cr", cr))
            counts[name] = m.stored_params(unit, cfg, m.solve(unit, cfg))
        assert counts["prune"] == int(30 * 576 * 1536 / cr)
        assert abs(counts["prune"] - counts["svd"]) <= 0.01 * counts["prune"]


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8), (7, 13)])
def test_bitmap_packs_8_entries_per_byte_and_round_trips(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.4
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(bits, shape), mask)


def test_pruned_layer_stores_kept_values_and_bitmap_only():
    mods = linears((16, 24))
    _, _, (layer,), _ = run("prune", mods, Budget("ratio", 0.5), joint=False)
    state = layer.state_dict()
    assert set(state) == {"values", "bitmap"}  # linears() of these tests have no bias
    assert state["values"].numel() == 16 * 24 // 2 and state["bitmap"].numel() == 16 * 24 // 8
    assert torch.equal(layer.to_dense(), mods[0].weight.detach() * layer.mask)


def test_half_pruned_checkpoint_is_smaller_than_dense_on_disk(tmp_path):
    """A 50 % pruned model's file is smaller than the dense one (it was larger with a byte mask)."""
    from .conftest import save_model_dir

    dense = tiny_llama(vocab_size=32)
    save_model_dir(dense, _NoTokenizer(), tmp_path / "dense")
    model = tiny_llama(vocab_size=32)
    plan = parse_plan({"groups": [{"modules": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate",
                                               "mlp.down"], "method": "prune", "ratio": 0.5}]})
    report = compress_(model, plan)
    save_compressed(model, None, tmp_path / "ck", {"head": "causal-lm", "report": report.to_dict()})
    manifest = load_compressed(tmp_path / "ck").manifest
    sizes = manifest["bytes"]
    # values: half the weights in fp32 (2 bytes/weight) + bitmap (1/8 byte/weight) = 2.125 of 4
    assert sizes["compressed_modules"] == int(sizes["compressed_modules_dense"] * 2.125 / 4)
    assert sizes["weights_file"] == (tmp_path / "ck" / "model.safetensors").stat().st_size
    assert sizes["weights_file"] < (tmp_path / "dense" / "model.safetensors").stat().st_size * 0.7


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


def test_finetuning_keeps_pruned_weights_zero():
    mods = linears((16, 16))
    _, _, (layer,), _ = run("prune", mods, Budget("ratio", 0.5), joint=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(8, 16)).pow(2).sum().backward()
    opt.step()
    assert (layer.to_dense()[~layer.mask] == 0).all() and (layer.weight[~layer.mask] == 0).all()
    assert layer.values.grad is not None and layer.values.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_prune_roundtrip_identical_outputs(arch, tmp_path):
    model = tiny_llama() if arch == "llama" else tiny_bert()
    groups = [{"modules": ["mlp.down"], "joint": True, "method": "prune", "cr": 3},
              {"modules": ["attn.q", "attn.v"], "method": "prune", "ratio": 0.5, "options": {"compare": "row"}},
              {"modules": ["embed"], "method": "prune", "ratio": 0.5}]
    report = compress_(model, parse_plan({"groups": groups}))
    stored = sum(u.stored_params for u in report.units)
    masks = sum(int(m.mask.sum()) for m in model.modules() if isinstance(m, MaskedLinear | MaskedEmbedding))
    assert stored == masks
    loaded = roundtrip(model, report, tmp_path, "causal-lm" if arch == "llama" else "masked-lm")
    assert isinstance(loaded.get_submodule(report.units[0].names[0]), MaskedLinear)
    assert torch.equal(logits(model, IDS), logits(loaded, IDS))
    manifest = load_compressed(tmp_path / "ckpt").manifest
    assert manifest["report"]["units"][0]["hyper"]["index"] == "bitmap"


# ---------------------------------------------------------------- structured


def masked_dense_reference(model, compressed) -> nn.Module:
    """The original model with the removed rows (producers) and columns (consumer) zeroed."""
    for name, mod in compressed.named_modules():
        if isinstance(mod, RowSubsetLinear | ColumnSubsetLinear):
            orig = model.get_submodule(name)
            dim = 0 if isinstance(mod, RowSubsetLinear) else 1
            keep = torch.zeros(orig.weight.shape[dim], dtype=torch.bool)
            keep[mod.index] = True
            with torch.no_grad():
                orig.weight.mul_(keep[:, None] if dim == 0 else keep[None, :])
                if dim == 0 and orig.bias is not None:
                    orig.bias.mul_(keep)
    return model


@pytest.mark.parametrize("arch,modules,options", [
    ("llama", ["mlp.gate", "mlp.up", "mlp.down"], {}),
    ("llama", ["mlp.gate", "mlp.up", "mlp.down"], {"allocation": "global"}),
    ("llama", ["attn.q", "attn.k", "attn.v", "attn.o"], {"head_dim": 16}),
    ("bert", ["mlp.up", "mlp.down"], {}),
    ("bert", ["attn.q", "attn.k", "attn.v", "attn.o"], {"head_dim": 16}),
])
def test_structured_equals_masked_dense_and_roundtrips(arch, modules, options, tmp_path):
    make = tiny_llama if arch == "llama" else tiny_bert
    model = make()
    p = plan(modules=modules, joint=True, method="prune-structured", cr=1.9, options=options)
    report = compress_(model, p)
    unit = report.units[0]
    layers = [model.get_submodule(n) for n in unit.names]
    real = sum(lay.weight.numel() for lay in layers)
    assert real == unit.stored_params <= unit.original_params / 1.9
    assert all(isinstance(lay, CompressedModule) for lay in layers)
    ref = masked_dense_reference(make(), model)
    torch.testing.assert_close(logits(model, IDS), logits(ref, IDS), rtol=1e-5, atol=1e-5)
    loaded = roundtrip(model, report, tmp_path, "causal-lm" if arch == "llama" else "masked-lm")
    assert torch.equal(logits(model, IDS), logits(loaded, IDS))


def test_structured_shapes_counts_and_error_falls():
    torch.manual_seed(0)
    gate, up, down = nn.Linear(8, 24, bias=False), nn.Linear(8, 24, bias=False), nn.Linear(24, 8, bias=False)
    names = ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    errs = []
    for rank in (4, 12, 20):
        _, hyper, layers, stored = run("prune-structured", [gate, up, down], Budget("rank", rank), names=names)
        assert [tuple(lay.weight.shape) for lay in layers] == [(rank, 8), (rank, 8), (8, rank)]
        assert stored == 3 * 8 * rank == sum(lay.weight.numel() for lay in layers)
        errs.append(rel_err([gate, up, down], layers))
    assert errs == sorted(errs, reverse=True)
    _, hyper, _, stored = run("prune-structured", [gate, up, down], Budget("ratio", 0.5), names=names)
    assert hyper["keep"] == [12] and stored == 288


def test_structured_global_allocation_is_layer_adaptive():
    mods = linears((16, 8), (8, 16), (16, 8), (8, 16))
    with torch.no_grad():
        for m in mods[2:]:
            m.weight.mul_(4.0)  # layer 1 matters more
    names = ["l.0.up", "l.0.down", "l.1.up", "l.1.down"]
    _, hyper, layers, stored = run("prune-structured", mods, Budget("ratio", 0.5), {"allocation": "global"},
                                   names=names)
    assert sum(hyper["keep"]) == 16 and hyper["keep"][1] > hyper["keep"][0] >= 1
    assert stored == sum(lay.weight.numel() for lay in layers)


def test_structured_wanda_follows_intermediate_activations():
    up, down = nn.Linear(4, 3, bias=False), nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        up.weight.fill_(1.0)
        down.weight.copy_(torch.tensor([[3.0, 2.0, 1.0]] * 4))  # magnitude ranks neuron 0 first
    names = ["l.0.up", "l.0.down"]
    stats = {"l.0.down": {"act_sq": torch.tensor([1.0, 1.0, 100.0])}}  # but neuron 2 fires 10x harder
    _, _, mag, _ = run("prune-structured", [up, down], Budget("rank", 1), names=names)
    _, _, wan, _ = run("prune-structured", [up, down], Budget("rank", 1), {"score": "wanda"}, names=names, stats=stats)
    assert mag[1].index.tolist() == [0] and wan[1].index.tolist() == [2]
    with pytest.raises(OffcompError, match="offcomp capture"):
        run("prune-structured", [up, down], Budget("rank", 1), {"score": "wanda"}, names=names)


def test_structured_plan_errors(llama):
    with pytest.raises(OffcompError, match="joint: true"):
        plan_units(llama, plan(modules=["mlp.gate", "mlp.up", "mlp.down"], method="prune-structured", cr=2))
    with pytest.raises(OffcompError, match="consumer last"):  # shapes are ambiguous, so this shows at the forward
        model = tiny_llama()
        compress_(model, plan(modules=["mlp.down", "mlp.gate", "mlp.up"], joint=True, method="prune-structured",
                              cr=2))
        logits(model, IDS)
    with pytest.raises(OffcompError, match="consumer last"):  # caught by shapes at plan time
        plan_units(llama, plan(modules=["mlp.down", "mlp.up", "mlp.gate"], joint=True, method="prune-structured",
                               cr=2))
    with pytest.raises(OffcompError, match="producers and its consumer"):
        plan_units(llama, plan(modules=["mlp.up"], joint=True, method="prune-structured", cr=2))
    with pytest.raises(OffcompError, match="between 1 and 128"):
        plan_units(llama, plan(modules=["mlp.up", "mlp.down"], joint=True, method="prune-structured", rank=200))
