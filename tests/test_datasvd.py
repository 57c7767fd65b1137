"""Data-aware low-rank methods: svd-llm is optimal in ‖(W − Ŵ)Xᵀ‖ (closed form of reduced-rank
regression), fwsvd with uniform weights is plain SVD, asvd with α = 0 is plain SVD, singular or
broken statistics never crash or give NaN, joint groups use the summed Gram, and the methods run
end to end (compress → save → load) on tiny models with captured statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import offcomp
from offcomp.capture import collect_stats, select_inputs
from offcomp.checkpoint import load_compressed, save_compressed
from offcomp.errors import OffcompError
from offcomp.methods.lowrank import gram_whitening, weighted_factors
from offcomp.plan import Budget
from offcomp.registry import FitContext, FitUnit, get_method

from .conftest import tiny_bert, tiny_llama
from .test_contract import stored_tensor_count

DATA_METHODS = ["fwsvd", "asvd", "svd-llm"]


def linears(weights):
    mods = []
    for w in weights:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)  # float64: exact comparisons
        lin.weight.data.copy_(w)
        mods.append(lin)
    return mods


def fit(method, weights, stats, rank, joint=False, options=None, log=None):
    m = get_method(method)
    names = [f"m{i}" for i in range(len(weights))]
    unit = FitUnit("g", names, [tuple(w.shape) for w in weights], ["linear"] * len(weights), joint,
                   Budget("rank", rank))
    cfg = m.Config(**(options or {}))
    ctx = FitContext(stats=stats, log=log or (lambda msg: None))
    layers = m.fit(unit, cfg, m.solve(unit, cfg), linears(weights), ctx)
    return [lay.to_dense().detach().double() for lay in layers]


def correlated_inputs(tokens, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(m, m, generator=g, dtype=torch.float64) * torch.logspace(0, -2, m, dtype=torch.float64)
    return torch.randn(tokens, m, generator=g, dtype=torch.float64) @ mix + 0.1


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_whitened_svd_is_optimal_output_error(rank):
    torch.manual_seed(0)
    W = torch.randn(24, 16, dtype=torch.float64)
    X = correlated_inputs(200, 16)
    (What,) = fit("svd-llm", [W], {"m0": {"xtx": X.T @ X}}, rank)
    err = ((W - What) @ X.T).norm() ** 2
    # Closed form (reduced-rank regression): the best rank-r Ŵ has error Σ_{i>r} σ_i(W Xᵀ)²
    tail = torch.linalg.svdvals(W @ X.T)[rank:].pow(2).sum()
    assert err.item() == pytest.approx(tail.item(), rel=1e-6)
    # ... and the Ŵ = U_r U_rᵀ W of that closed form is the same matrix
    U = torch.linalg.svd(W @ X.T, full_matrices=False)[0][:, :rank]
    torch.testing.assert_close(What, U @ U.T @ W, rtol=1e-4, atol=1e-6)  # layers hold float32
    (plain,) = fit("svd", [W], None, rank)
    assert err < ((W - plain) @ X.T).norm() ** 2


@pytest.mark.parametrize("joint", [False, True])
def test_fwsvd_uniform_weights_equal_svd(joint):
    torch.manual_seed(1)
    Ws = [torch.randn(20, 12, dtype=torch.float64), torch.randn(8, 12, dtype=torch.float64)]
    stats = {f"m{i}": {"fisher_row": torch.full((w.shape[0],), 3.7, dtype=torch.float64)} for i, w in enumerate(Ws)}
    for a, b in zip(fit("fwsvd", Ws, stats, 5, joint), fit("svd", Ws, None, 5, joint)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fwsvd_minimises_fisher_weighted_error():
    torch.manual_seed(2)
    W = torch.randn(30, 10, dtype=torch.float64)
    imp = torch.rand(30, dtype=torch.float64) ** 4 + 1e-3
    (What,) = fit("fwsvd", [W], {"m0": {"fisher_row": imp}}, 3)
    (plain,) = fit("svd", [W], None, 3)
    d = imp.sqrt()[:, None]
    err = (d * (W - What)).norm() ** 2
    assert err.item() == pytest.approx(torch.linalg.svdvals(d * W)[3:].pow(2).sum().item(), rel=1e-8)
    assert err < (d * (W - plain)).norm() ** 2


def test_asvd_alpha_zero_is_svd_and_scaling_is_folded():
    torch.manual_seed(3)
    W = torch.randn(16, 12, dtype=torch.float64)
    s = torch.rand(12, dtype=torch.float64) * 5
    stats = {"m0": {"abs_mean": s}}
    torch.testing.assert_close(fit("asvd", [W], stats, 4, options={"alpha": 0.0})[0], fit("svd", [W], None, 4)[0])
    (What,) = fit("asvd", [W], stats, 4, options={"alpha": 1.0})
    S = torch.diag(s)
    best = torch.linalg.svdvals(W @ S)[4:].pow(2).sum()
    assert ((W - What) @ S).norm().pow(2).item() == pytest.approx(best.item(), rel=1e-8)


@pytest.mark.parametrize("case", ["rank_deficient", "dead_channel", "zero", "indefinite"])
def test_singular_gram_never_crashes_or_nans(case):
    torch.manual_seed(4)
    W = torch.randn(20, 16, dtype=torch.float64)
    X = torch.randn(5, 16, dtype=torch.float64)  # 5 tokens < 16 inputs: rank 5
    C = X.T @ X
    if case == "dead_channel":
        X = torch.randn(100, 16, dtype=torch.float64)
        X[:, 3] = 0
        C = X.T @ X
    elif case == "zero":
        C = torch.zeros(16, 16, dtype=torch.float64)
    elif case == "indefinite":
        C = C - 1e-3 * torch.eye(16, dtype=torch.float64)  # not a Gram at all: rounding gone wrong
    logs = []
    (What,) = fit("svd-llm", [W], {"m0": {"xtx": C}}, 6, log=logs.append)
    assert torch.isfinite(What).all()
    if case != "dead_channel":
        assert logs  # the fallback was reported
    if case == "rank_deficient":  # the seen directions are still fitted: 5 < rank 6 → exact on them
        assert ((W - What) @ X.T).norm() < 1e-6 * (W @ X.T).norm()


def test_whitening_fallback_chain():
    logs = []
    sym_neg = torch.diag(torch.tensor([1.0, 1.0, 1.0, -2.0], dtype=torch.float64))  # jitter cannot fix it
    s = gram_whitening(sym_neg, "x", logs.append)
    assert s.how == "eigh" and torch.isfinite(s.S).all() and "eigh" in logs[-1]
    pd = torch.eye(4, dtype=torch.float64) * 2
    assert gram_whitening(pd, "x").how == "cholesky"
    W = torch.randn(3, 4, dtype=torch.float64)
    L, R = weighted_factors(W, 3, False, right=s)
    torch.testing.assert_close(L @ R, W)  # full rank: the whitening is undone exactly


def test_broken_statistics_are_user_errors():
    W = torch.randn(8, 6)
    with pytest.raises(OffcompError, match="inf/NaN"):
        fit("svd-llm", [W], {"m0": {"xtx": torch.full((6, 6), float("nan"))}}, 2)
    with pytest.raises(OffcompError, match="another model"):
        fit("svd-llm", [W], {"m0": {"xtx": torch.eye(5)}}, 2)
    with pytest.raises(OffcompError, match="no 'fisher_row'"):
        fit("fwsvd", [W], {"m0": {}}, 2)


def test_joint_svd_llm_uses_summed_gram_of_distinct_inputs():
    torch.manual_seed(5)
    Ws = [torch.randn(10, 8, dtype=torch.float64) for _ in range(3)]
    X1, X2 = correlated_inputs(50, 8, 1), correlated_inputs(50, 8, 2) * 3
    C1, C2 = X1.T @ X1, X2.T @ X2
    stats = {"m0": {"xtx": C1}, "m1": {"xtx": C1}, "m2": {"xtx": C2}}  # m0, m1 share one input object
    got = fit("svd-llm", Ws, stats, 4, joint=True)
    L, R = weighted_factors(torch.cat(Ws), 4, True, right=gram_whitening(C1 + C2, "ref"))
    torch.testing.assert_close(torch.cat(got), L @ R, rtol=1e-8, atol=1e-10)


def captured(model, kind="causal"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 128, (3, 20), generator=g)
    if kind == "causal":
        batches = [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(3)]
    else:
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        labels[:, 1] = ids[:, 1]
        batches = [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(3)]
    return collect_stats(model, batches, select_inputs(model)).by_module()


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("method", DATA_METHODS)
def test_data_methods_end_to_end(method, joint, arch, tmp_path):
    model = tiny_llama() if arch == "llama" else tiny_bert()
    stats = captured(model, "causal" if arch == "llama" else "masked")
    ids = torch.randint(0, 128, (2, 12))
    plan = offcomp.parse_plan({"groups": [{"modules": ["attn.q", "attn.k", "attn.v"], "joint": joint,
                                            "method": method, "cr": 2.0}]})
    with pytest.raises(OffcompError, match="needs calibration statistics"):
        offcomp.plan_units(model, plan, None)
    report = offcomp.compress_(model, plan, stats=stats, seed=0)
    names = [n for u in report.units for n in u.names]
    assert sum(u.stored_params for u in report.units) == stored_tensor_count(model, names)
    with torch.no_grad():
        before = model(ids).logits
    assert torch.isfinite(before).all()
    save_compressed(model, None, tmp_path / "ck", {"head": "masked-lm" if arch == "bert" else "causal-lm",
                                                  "plan": {}, "report": report.to_dict(), "base": {}})
    with torch.no_grad():
        after = load_compressed(tmp_path / "ck").model(ids).logits
    assert (before - after).abs().max().item() < 1e-5


def test_data_methods_beat_svd_on_output_error():
    """On a tiny Llama, each data-aware method lowers its own criterion against plain SVD."""
    base = tiny_llama()
    stats = captured(base)
    name = "model.layers.1.mlp.down_proj"
    W = base.get_submodule(name).weight.detach().double()
    C = stats[name]["xtx"]
    errs = {}
    for method in ["svd", *DATA_METHODS]:
        model = tiny_llama()
        plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.down"], "method": method, "rank": 8}]})
        offcomp.compress_(model, plan, stats=stats)
        D = W - model.get_submodule(name).to_dense().detach().double()
        errs[method] = torch.trace(D @ C @ D.T).item()
    assert errs["svd-llm"] < errs["asvd"] < errs["svd"]
