"""`asvd`: activation-aware SVD (Yuan et al., "ASVD: Activation-aware Singular Value Decomposition
for Compressing Large Language Models", 2023).

Input channels with large activations matter more for the output than the weights alone show.
ASVD scales the columns of W by S = diag(mean|x|^α) (mean |x| per input channel from `offcomp
capture`, key `abs_mean`), truncates W·S and folds S⁻¹ into the right factor: Ŵ = [W S]_r S⁻¹.
Joint groups use the mean of their distinct inputs' statistics.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..registry import FitContext, FitUnit, MethodConfig, register
from .lowrank import LowRankMethod, RightScaling, diag_scaling, unit_stats
from .util import ComputeDtype


class ASVDConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0, le=2, description="exponent of mean|x| in the column scaling")
    compute_dtype: ComputeDtype = "float64"
    floor: float = Field(1e-6, gt=0, lt=1, description="channels below floor·max are lifted to it")


@register
class ASVD(LowRankMethod):
    name = "asvd"
    Config = ASVDConfig
    kinds = ("linear",)
    needs_stats = ("abs_mean",)

    def scaling(self, unit: FitUnit, cfg: ASVDConfig, ctx: FitContext) -> tuple[None, RightScaling]:
        means = unit_stats(ctx.stats, unit, "abs_mean", unit.shapes[0][1])
        mean = torch.stack([m.to(torch.float64) for m in means]).mean(0)
        return None, diag_scaling(mean.pow(cfg.alpha), unit.label, ctx.log, cfg.floor)
