"""SVD: Eckart–Young optimality, exact parameter arithmetic for separate vs joint groups, and the
LowRankLinear replacement computing the thin products."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import offcomp
from offcomp.errors import OffcompError
from offcomp.layers import LowRankLinear
from offcomp.plan import Budget
from offcomp.registry import FitContext, FitUnit, get_method


def fit_linear(weights, joint, rank, solve=True):
    mods = []
    for w in weights:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=True)
        lin.weight.data.copy_(w)
        mods.append(lin)
    shapes = [tuple(w.shape) for w in weights]
    unit = FitUnit("g", [f"m{i}" for i in range(len(weights))], shapes, ["linear"] * len(weights), joint,
                   Budget("rank", rank))
    svd = get_method("svd")
    cfg = svd.Config()
    hyper = svd.solve(unit, cfg) if solve else {"rank": rank}
    return svd.fit(unit, cfg, hyper, mods, FitContext()), mods, svd.stored_params(unit, cfg, hyper)


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_error_equals_tail_singular_values(rank):
    torch.manual_seed(0)
    W = torch.randn(48, 40, dtype=torch.float64).float()
    (layer,), _, _ = fit_linear([W], False, rank)
    S = torch.linalg.svdvals(W.double())
    err = (W.double() - layer.to_dense().double()).norm() ** 2
    assert err.item() == pytest.approx(S[rank:].pow(2).sum().item(), rel=1e-5)


def test_joint_error_equals_tail_of_stacked_matrix():
    torch.manual_seed(1)
    Ws = [torch.randn(24, 16) for _ in range(3)]
    layers, _, _ = fit_linear(Ws, True, 6)
    S = torch.linalg.svdvals(torch.cat(Ws).double())
    err = sum((w.double() - lay.to_dense().double()).norm() ** 2 for w, lay in zip(Ws, layers))
    assert err.item() == pytest.approx(S[6:].pow(2).sum().item(), rel=1e-5)
    assert all(lay.V is layers[0].V for lay in layers)  # one shared right factor


def test_separate_vs_joint_parameter_counts_exact(llama):
    # tiny llama: mlp.up is 128 x 64 in each of 2 layers
    sep = offcomp.plan_units(llama, offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 10}]}))
    joint = offcomp.plan_units(llama, offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 10, "joint": True}]}))
    assert [p.stored_params for p in sep] == [10 * (128 + 64)] * 2
    assert [p.stored_params for p in joint] == [10 * (2 * 128 + 64)]
    # the budget: cr 4 of 2·128·64 = 16384 params → ≤ 4096 stored
    joint_cr = offcomp.plan_units(llama, offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "cr": 4, "joint": True}]}))
    assert joint_cr[0].hyper["rank"] == 4096 // (2 * 128 + 64) == 12
    sep_ratio = offcomp.plan_units(llama, offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "ratio": 0.25}]}))
    assert sep_ratio[0].hyper["rank"] == int(0.25 * 128 * 64) // (128 + 64) == 10


def test_break_even_rank_is_rejected_one_below_is_accepted(llama):
    # 128 x 64: break-even n·m/(n+m) = 42.67 → rank 42 saves, rank 43 does not
    ok = offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 42}]})
    assert offcomp.plan_units(llama, ok)[0].stored_params == 42 * 192 < 128 * 64
    bad = offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 43}]})
    with pytest.raises(offcomp.OffcompError, match="use rank <= 42"):
        offcomp.plan_units(llama, bad)


def test_lowrank_linear_is_thin_and_matches_dense():
    torch.manual_seed(0)
    (layer,), (orig,), _ = fit_linear([torch.randn(32, 20)], False, 20, solve=False)  # full rank: exact
    x = torch.randn(5, 20)
    torch.testing.assert_close(layer(x), orig(x), rtol=1e-4, atol=1e-5)
    assert isinstance(layer, LowRankLinear)
    assert layer.U.shape == (32, 20) and layer.V.shape == (20, 20)
    assert not any(p.shape == (32, 20) and p is not layer.U for p in layer.parameters())


def test_embedding_svd_and_untying(llama):
    ids = torch.randint(0, 128, (2, 9))
    # the untied head keeps a full copy, so the embedding alone saves nothing: refused at plan time
    with pytest.raises(OffcompError, match="saves nothing"):
        offcomp.compress_(llama, offcomp.parse_plan({"groups": [{"modules": ["embed"], "rank": 8}]}))
    plan = offcomp.parse_plan({"groups": [{"modules": ["embed"], "rank": 8},
                                          {"modules": ["mlp.up", "mlp.gate"], "rank": 4}]})
    report = offcomp.compress_(llama, plan)
    assert report.untied_embeddings and llama.config.tie_word_embeddings is False
    assert isinstance(llama.lm_head.weight, nn.Parameter) and llama.lm_head.weight.shape == (128, 64)
    # the untied output head keeps a full copy, which is counted as stored
    mlp = 4 * 128 * 64
    assert report.params_after == report.params_before - 128 * 64 - mlp + 8 * (128 + 64) + 4 * 4 * 192 + 128 * 64
    llama(ids)
