"""Data-aware training losses shared by ae / kronecker / tucker: the whitened row error, Fisher row
weights, and the statistics each configuration asks for at plan time."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import offcomp
from offcomp.errors import OffcompError
from offcomp.methods.ae_train import cos_rmse_loss, data_loss, whitening_matrix
from offcomp.plan import Budget
from offcomp.registry import FitContext, FitUnit, get_method

from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(n: int, m: int, name: str = "m0") -> FitUnit:
    return FitUnit("g", [name], [(n, m)], ["linear"], False, Budget("cr", 2))


def anisotropic_inputs(m: int, tokens: int = 512, strong: int = 4, seed: int = 0) -> torch.Tensor:
    """Inputs that live almost entirely in `strong` directions (as activation outliers do)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.full((m,), 0.01)
    scale[:strong] = 10.0
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    return (torch.randn(tokens, m, generator=g) * scale) @ Q.T


def test_whitening_matrix_factors_the_gram_and_is_identity_for_isotropic_inputs():
    m = 12
    X = anisotropic_inputs(m)
    C = (X.T @ X).double()
    S = whitening_matrix(unit(8, m), FitContext(seed=0, stats={"m0": {"xtx": C}})).double()
    k = C.trace() / m  # S is scaled to ‖S‖²_F = m
    torch.testing.assert_close(S @ S.T, C / k, rtol=1e-4, atol=1e-6)
    S_iso = whitening_matrix(unit(8, m), FitContext(seed=0, stats={"m0": {"xtx": 7.0 * torch.eye(m)}}))
    torch.testing.assert_close(S_iso, torch.eye(m))
    # with isotropic inputs the whitened loss is the plain loss
    pred, target = torch.randn(5, m), torch.randn(5, m)
    loss, _ = data_loss(cos_rmse_loss(), unit(8, m), offcomp.methods.ae.AEConfig(loss_space="whitened"),
                        FitContext(seed=0, stats={"m0": {"xtx": 3.0 * torch.eye(m, dtype=torch.float64)}}))
    torch.testing.assert_close(loss(pred, target, None, 0), cos_rmse_loss()(pred, target, None, 0))


def test_whitened_ae_reaches_the_whitened_svd_optimum_in_output_error():
    """At the same budget, training in the whitened space spends the latent on the input directions
    that carry signal: the linear AE (PCA-initialised in the whitened space, least-squares scales)
    matches svd-llm's optimal ‖(W − Ŵ) Xᵀ‖, far below the weight-space AE, at a higher ‖W − Ŵ‖."""
    from offcomp.methods.lowrank import gram_whitening, weighted_factors

    torch.manual_seed(0)
    n, m = 48, 24
    W = torch.randn(n, m)
    X = anisotropic_inputs(m)
    stats = {"m0": {"xtx": (X.T @ X).double()}}
    meth = get_method("ae")
    errs = {}
    for space in ("weights", "whitened"):
        cfg = meth.parse_config({"arch": "linear", "epochs": 10, "lr": 3e-3, "loss_space": space, "scale": "fit"},
                                "g")
        u = FitUnit("g", ["m0"], [(n, m)], ["linear"], False, Budget("rank", 4))
        lin = nn.Linear(m, n, bias=False)
        lin.weight.data.copy_(W)
        (layer,) = meth.fit(u, cfg, meth.solve(u, cfg), [lin], FitContext(seed=0, stats=stats))
        D = layer.to_dense().detach() - W
        errs[space] = ((D @ X.T).norm().item(), D.norm().item())
    L, R = weighted_factors(W.double(), 4, False, right=gram_whitening(stats["m0"]["xtx"], "g"))
    optimum = (((L @ R).float() - W) @ X.T).norm().item()
    assert errs["whitened"][0] < 1.1 * optimum < 0.05 * errs["weights"][0]
    assert errs["whitened"][1] > errs["weights"][1]


def test_data_aware_options_are_checked_at_plan_time():
    model = tiny_llama()
    for method, options, key in (("ae", {"loss_space": "whitened"}, "xtx"),
                                 ("ae", {"row_weights": "fisher_row"}, "fisher_row"),
                                 ("kronecker", {"loss_space": "whitened", "refine_epochs": 1}, "xtx"),
                                 ("prune", {"score": "wanda"}, "act_sq")):
        plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.down"], "method": method, "cr": 2,
                                               "options": options}]})
        with pytest.raises(OffcompError, match=key):
            offcomp.plan_units(model, plan)
    ok = offcomp.parse_plan({"groups": [{"modules": ["mlp.down"], "method": "ae", "cr": 2}]})
    assert offcomp.plan_units(model, ok)
    with pytest.raises(OffcompError, match="refine_epochs"):
        get_method("tucker").parse_config({"row_weights": "fisher_row"}, "g")


def test_kronecker_refinement_with_row_weights_favours_the_weighted_rows():
    torch.manual_seed(0)
    W = torch.randn(16, 16)
    w = torch.ones(16)
    w[8:] = 0.0  # only the first half of the rows count
    meth = get_method("kronecker")
    u = FitUnit("g", ["m0"], [(16, 16)], ["linear"], False, Budget("rank", 2))
    errs = {}
    for opts in ({"refine_epochs": 30, "refine_lr": 1e-2}, {"refine_epochs": 30, "refine_lr": 1e-2,
                                                             "row_weights": "fisher_row"}):
        cfg = meth.parse_config(opts, "g")
        lin = nn.Linear(16, 16, bias=False)
        lin.weight.data.copy_(W)
        (layer,) = meth.fit(u, cfg, meth.solve(u, cfg), [lin], FitContext(seed=0, stats={"m0": {"fisher_row": w}}))
        err = (layer.to_dense().detach() - W).norm(dim=1)
        errs["row_weights" in opts] = (err[:8].norm().item(), err[8:].norm().item())
    assert errs[True][0] < errs[False][0]
