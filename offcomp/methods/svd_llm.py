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
from pydantic import Field

from ..registry import FitContext, FitUnit, MethodConfig, register
from .lowrank import LowRankMethod, RightScaling, gram_whitening, unit_stats


class SVDLLMConfig(MethodConfig):
    # Ridge added to XᵀX as a fraction of its mean diagonal before whitening (0 = the paper's method);
    # a little damping trades calibration fit for robustness on unseen text.
    damp: float = Field(0.0, ge=0, le=1, description="added to the Gram diagonal, relative to its mean (0: none)")
    compute_dtype: Literal["float64"] = Field("float64", description="precision of the whitening and SVD")


def unit_whitening(unit: FitUnit, stats: Any, damp: float, log: Any = None) -> RightScaling:
    """The whitening of a unit: Cholesky of the summed Gram of its distinct inputs."""
    grams = unit_stats(stats, unit, "xtx", unit.shapes[0][1], dim=2)
    C = grams[0].to(torch.float64)
    for g in grams[1:]:
        C = C + g.to(torch.float64)
    return gram_whitening(C, unit.label + ("" if unit.joint else f" {unit.names[0]}"), log, damp)


@register
class SVDLLM(LowRankMethod):
    name = "svd-llm"
    Config = SVDLLMConfig
    kinds = ("linear",)
    needs_stats = ("xtx",)

    def scaling(self, unit: FitUnit, cfg: SVDLLMConfig, ctx: FitContext) -> tuple[None, RightScaling]:
        return None, unit_whitening(unit, ctx.stats, cfg.damp, ctx.log)
