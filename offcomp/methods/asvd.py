"""`asvd`: activation-aware SVD (Yuan et al., "ASVD: Activation-aware Singular Value Decomposition
for Compressing Large Language Models", 2023).

Input channels with large activations matter more for the output than the weights alone show.
ASVD scales the columns of W by S = diag(mean|x|^α) (mean |x| per input channel from `offcomp
capture`, key `abs_mean`), truncates W·S and folds S⁻¹ into the right factor: Ŵ = [W S]_r S⁻¹.
Joint groups use the mean of their distinct inputs' statistics.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field

from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, Method, MethodConfig, register
from .lowrank import (
    assign_factors,
    build_lowrank,
    diag_scaling,
    solve_rank,
    split_rows,
    stacked_weight,
    stored_lowrank,
    unit_stats,
    weighted_factors,
)
from .util import torch_dtype


class ASVDConfig(MethodConfig):
    alpha: float = Field(0.5, ge=0, le=2, description="exponent of mean|x| in the column scaling")
    compute_dtype: Literal["float64", "float32"] = "float64"
    floor: float = Field(1e-6, gt=0, lt=1, description="channels below floor·max are lifted to it")


@register
class ASVD(Method):
    name = "asvd"
    Config = ASVDConfig
    joint_shapes = "columns"
    kinds = ("linear",)
    needs_stats = ("abs_mean",)

    def solve(self, unit: FitUnit, cfg: ASVDConfig) -> dict[str, Any]:
        return solve_rank(unit)

    def stored_params(self, unit: FitUnit, cfg: ASVDConfig, hyper: dict[str, Any]) -> int:
        return stored_lowrank(unit, hyper)

    def build(
        self, unit: FitUnit, cfg: ASVDConfig, hyper: dict[str, Any], originals: list[nn.Module]
    ) -> list[CompressedModule]:
        return build_lowrank(unit, hyper["rank"], originals)

    def fit(
        self, unit: FitUnit, cfg: ASVDConfig, hyper: dict[str, Any], originals: list[nn.Module], ctx: FitContext
    ) -> list[CompressedModule]:
        dtype = torch_dtype(cfg.compute_dtype)
        means = unit_stats(ctx.stats, unit, "abs_mean", unit.shapes[0][1])
        mean = torch.stack([m.to(torch.float64) for m in means]).mean(0)
        right = diag_scaling(mean.pow(cfg.alpha), unit.label, ctx.log, cfg.floor)
        W = stacked_weight(originals, ctx.device, dtype)
        L, R = weighted_factors(W, hyper["rank"], unit.joint, right=right)
        layers = self.build(unit, cfg, hyper, originals)
        return assign_factors(layers, originals, split_rows(L, unit), [R])
