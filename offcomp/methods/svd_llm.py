"""`svd-llm`: truncation-aware data whitening (Wang et al., "SVD-LLM: Truncation-aware Singular Value
Decomposition for Large Language Model Compression", ICLR 2025).

What matters is the layer's output on real inputs, ‖(W − Ŵ) Xᵀ‖_F, not ‖W − Ŵ‖_F. With
S Sᵀ = XᵀX (Cholesky of the captured Gram, key `xtx`), ‖(W − Ŵ) Xᵀ‖_F = ‖(W − Ŵ) S‖_F, so the
optimal rank-r Ŵ is [W S]_r S⁻¹ = U_r Σ_r V_rᵀ S⁻¹, and each dropped singular value of W S is
exactly the output error it costs. Computed in float64; singular Grams get jitter or an eigh
fallback (logged). Joint groups whiten with the sum of their distinct inputs' Grams (as the
cross-layer basis-sharing method does).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, Method, MethodConfig, register
from .lowrank import (
    RightScaling,
    assign_factors,
    build_lowrank,
    gram_whitening,
    solve_rank,
    split_rows,
    stacked_weight,
    stored_lowrank,
    unit_stats,
    weighted_factors,
)


class SVDLLMConfig(MethodConfig):
    # Ridge added to XᵀX as a fraction of its mean diagonal before whitening (0 = the paper's method);
    # a little damping trades calibration fit for robustness on unseen text.
    damp: float = Field(0.0, ge=0, le=1)
    compute_dtype: Literal["float64"] = "float64"


def unit_whitening(unit: FitUnit, stats: Any, damp: float, log: Any = None) -> RightScaling:
    """The whitening of a unit: Cholesky of the summed Gram of its distinct inputs."""
    grams = unit_stats(stats, unit, "xtx", unit.shapes[0][1], dim=2)
    C = grams[0].to(torch.float64)
    for g in grams[1:]:
        C = C + g.to(torch.float64)
    return gram_whitening(C, unit.label + ("" if unit.joint else f" {unit.names[0]}"), log, damp)


@register
class SVDLLM(Method):
    name = "svd-llm"
    Config = SVDLLMConfig
    joint_shapes = "columns"
    kinds = ("linear",)
    needs_stats = ("xtx",)

    def solve(self, unit: FitUnit, cfg: SVDLLMConfig) -> dict[str, Any]:
        return solve_rank(unit)

    def stored_params(self, unit: FitUnit, cfg: SVDLLMConfig, hyper: dict[str, Any]) -> int:
        return stored_lowrank(unit, hyper)

    def build(
        self, unit: FitUnit, cfg: SVDLLMConfig, hyper: dict[str, Any], originals: list[nn.Module]
    ) -> list[CompressedModule]:
        return build_lowrank(unit, hyper["rank"], originals)

    def fit(
        self, unit: FitUnit, cfg: SVDLLMConfig, hyper: dict[str, Any], originals: list[nn.Module], ctx: FitContext
    ) -> list[CompressedModule]:
        right = unit_whitening(unit, ctx.stats, cfg.damp, ctx.log)
        W = stacked_weight(originals, ctx.device, torch.float64)
        L, R = weighted_factors(W, hyper["rank"], unit.joint, right=right)
        if not (torch.isfinite(L).all() and torch.isfinite(R).all()):  # cannot happen with a finite Gram
            raise FloatingPointError(f"{unit.label}: svd-llm produced non-finite factors")
        layers = self.build(unit, cfg, hyper, originals)
        return assign_factors(layers, originals, split_rows(L, unit), [R])
