"""Shared machinery of the low-rank family (svd, fwsvd, asvd, svd-llm): budget arithmetic and
building `LowRankLinear` / `LowRankEmbedding` layers, with one shared right factor in a joint group.

Joint groups stack their matrices along the output rows, [W₁; W₂; …] (Σnᵢ × m) ≈ [U₁; U₂; …] V:
every layer keeps its own left factor Uᵢ and all share V, so stored = r·(Σnᵢ + m).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..layers import CompressedModule, LowRankEmbedding, LowRankLinear
from ..registry import FitUnit, check_rank, max_rank


def per_rank_cost(unit: FitUnit) -> int:
    m = unit.shapes[0][1]
    return sum(n for n, _ in unit.shapes) + m


def solve_rank(unit: FitUnit) -> dict[str, Any]:
    b = unit.budget
    per_rank = per_rank_cost(unit)
    if b.kind == "rank":
        if not isinstance(b.value, int):
            raise_rank_list(unit)
        return {"rank": check_rank(b.value, per_rank, unit.original_params, unit.label)}
    rank = max_rank(b.target_params(unit.original_params), per_rank, unit.label, b)
    return {"rank": check_rank(rank, per_rank, unit.original_params, unit.label)}


def raise_rank_list(unit: FitUnit) -> None:
    from ..errors import OffcompError

    raise OffcompError(f"group {unit.label!r}: this method takes one integer rank, not a list")


def stored_lowrank(unit: FitUnit, hyper: dict[str, Any]) -> int:
    return hyper["rank"] * per_rank_cost(unit)


def build_lowrank(unit: FitUnit, rank: int, originals: list[nn.Module]) -> list[CompressedModule]:
    ref = originals[0].weight
    kw = {"dtype": ref.dtype, "device": ref.device}
    V = nn.Parameter(torch.zeros(rank, unit.shapes[0][1], **kw)) if unit.joint else None
    out: list[CompressedModule] = []
    for (n, m), kind, orig in zip(unit.shapes, unit.kinds, originals):
        if kind == "embedding":
            out.append(LowRankEmbedding(n, m, rank, getattr(orig, "padding_idx", None), V=V, **kw))
        else:
            out.append(LowRankLinear(m, n, rank, getattr(orig, "bias", None) is not None, V=V, **kw))
    return out


def assign_factors(
    layers: list[CompressedModule], originals: list[nn.Module], Us: list[torch.Tensor], Vs: list[torch.Tensor]
) -> list[CompressedModule]:
    """Copy fitted factors in (cast to the model's dtype) and keep the original biases."""
    shared = len(Vs) == 1 and len(layers) > 1
    for i, (layer, orig, U) in enumerate(zip(layers, originals, Us)):
        layer.U.data.copy_(U)
        if not shared or i == 0:
            layer.V.data.copy_(Vs[0] if shared else Vs[i])
        if getattr(orig, "bias", None) is not None:
            layer.bias.data.copy_(orig.bias.data)
    return layers


def stacked_weight(originals: list[nn.Module], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([o.weight.detach().to(device=device, dtype=dtype) for o in originals], dim=0)


def split_rows(U: torch.Tensor, unit: FitUnit) -> list[torch.Tensor]:
    return list(torch.split(U, [n for n, _ in unit.shapes], dim=0))


def truncated_svd(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r approximation (Eckart–Young) via a thin SVD: U_r, S_r, Vh_r."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


def split_singular(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, joint: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left/right factors from an SVD. Separate: √Σ on both sides, so fine-tuning sees balanced
    factors. Joint: Σ goes into the per-layer left factors and the shared V stays orthonormal."""
    if joint:
        return U * S, Vh
    root = S.sqrt()
    return U * root, root[:, None] * Vh
