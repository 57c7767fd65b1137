"""`fwsvd`: Fisher-weighted SVD (Hsu et al., "Language model compression with weighted low-rank
factorization", ICLR 2022).

Plain SVD treats every weight as equally important; FWSVD weights each output row i by the square
root of its Fisher importance Iᵢ = Σⱼ Σ_batches (∂L/∂Wᵢⱼ)² (captured by `offcomp capture`, key
`fisher_row`), truncates diag(√I)·W and undoes the weighting on the left factor:
    Ŵ = diag(√I)⁻¹ [diag(√I) W]_r.
Joint groups stack the rows of all their matrices, each row keeping its own layer's weight, so the
shared right factor favours the rows the loss is sensitive to. Uniform weights give plain SVD.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..errors import OffcompError
from ..registry import FitContext, FitUnit, MethodConfig, register
from .lowrank import LowRankMethod
from .util import ComputeDtype


class FWSVDConfig(MethodConfig):
    compute_dtype: ComputeDtype = "float64"
    # Rows with (near) zero Fisher importance are lifted to floor·max so the weighting stays invertible.
    floor: float = Field(1e-6, gt=0, lt=1, description="row weights below floor·max are lifted to it")


def fisher_row_weights(unit: FitUnit, stats: Any, floor: float, log: Any = None) -> torch.Tensor:
    """√I over the unit's stacked rows (float64), from each module's captured `fisher_row`."""
    rows = []
    for name, (n, _) in zip(unit.names, unit.shapes):
        f = (stats or {}).get(name, {}).get("fisher_row")
        if f is None:
            raise OffcompError(f"group {unit.label!r}: no 'fisher_row' statistics for {name}; run `offcomp capture`")
        if tuple(f.shape) != (n,):
            raise OffcompError(
                f"group {unit.label!r}: fisher_row of {name} has shape {tuple(f.shape)}, expected ({n},); "
                "the statistics were captured on another model"
            )
        rows.append(f.detach().to(torch.float64))
    importance = torch.cat(rows)
    if not torch.isfinite(importance).all() or (importance < 0).any():
        raise OffcompError(f"group {unit.label!r}: fisher_row holds inf/NaN/negative values; re-run capture")
    top = importance.max().item()
    if top <= 0:
        (log or (lambda m: None))(f"{unit.label}: Fisher importance is all zero; FWSVD reduces to plain SVD")
        return torch.ones_like(importance)
    return importance.clamp_min(top * floor).sqrt()


@register
class FWSVD(LowRankMethod):
    name = "fwsvd"
    Config = FWSVDConfig
    kinds = ("linear",)
    needs_stats = ("fisher_row",)

    def scaling(self, unit: FitUnit, cfg: FWSVDConfig, ctx: FitContext) -> tuple[torch.Tensor, None]:
        return fisher_row_weights(unit, ctx.stats, cfg.floor, ctx.log).to(ctx.device), None
