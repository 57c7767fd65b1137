"""`svd`: truncated SVD, the data-free baseline. Optimal in Frobenius norm for each unit."""

from __future__ import annotations

from typing import Any, Literal

import torch.nn as nn

from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, Method, MethodConfig, register
from .lowrank import (
    assign_factors,
    build_lowrank,
    solve_rank,
    split_rows,
    split_singular,
    stacked_weight,
    stored_lowrank,
    truncated_svd,
)
from .util import torch_dtype


class SVDConfig(MethodConfig):
    compute_dtype: Literal["float64", "float32"] = "float64"


@register
class SVD(Method):
    name = "svd"
    Config = SVDConfig
    joint_shapes = "columns"

    def solve(self, unit: FitUnit, cfg: SVDConfig) -> dict[str, Any]:
        return solve_rank(unit)

    def stored_params(self, unit: FitUnit, cfg: SVDConfig, hyper: dict[str, Any]) -> int:
        return stored_lowrank(unit, hyper)

    def build(
        self, unit: FitUnit, cfg: SVDConfig, hyper: dict[str, Any], originals: list[nn.Module]
    ) -> list[CompressedModule]:
        return build_lowrank(unit, hyper["rank"], originals)

    def fit(
        self, unit: FitUnit, cfg: SVDConfig, hyper: dict[str, Any], originals: list[nn.Module], ctx: FitContext
    ) -> list[CompressedModule]:
        W = stacked_weight(originals, ctx.device, torch_dtype(cfg.compute_dtype))
        L, R = split_singular(*truncated_svd(W, hyper["rank"]), unit.joint)
        layers = self.build(unit, cfg, hyper, originals)
        return assign_factors(layers, originals, split_rows(L, unit), [R])
