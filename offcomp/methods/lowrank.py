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
from ..registry import FitContext, FitUnit, Method, check_rank, max_rank
from .util import torch_dtype


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


# ---- data-aware low-rank (fwsvd, asvd, svd-llm): weight the matrix, truncate, undo the weighting ----
#
# All three solve  min ‖A (W − Ŵ) B‖_F  over rank-r Ŵ, with a row weighting A = diag(a) (FWSVD: a = √Fisher
# row importance) or a right scaling B (ASVD: diag(mean|x|^α); SVD-LLM: B = S with S Sᵀ = XᵀX, so that
# ‖(W − Ŵ) S‖_F = ‖(W − Ŵ) Xᵀ‖_F, the output error on the calibration tokens). For invertible A and B the
# optimum is Ŵ = A⁻¹ [A W B]_r B⁻¹ (Eckart–Young in the weighted space), folded into the two factors.


class RightScaling:
    """An invertible right factor B: "diag" (a vector), "tri" (lower-triangular Cholesky factor) or
    "full" (any square matrix with its inverse). `apply(W) = W B`, `undo(R) = R B⁻¹`."""

    def __init__(self, kind: str, S: torch.Tensor, S_inv: torch.Tensor | None = None, how: str = "") -> None:
        self.kind, self.S, self.S_inv, self.how = kind, S, S_inv, how

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        S = self.S.to(device=W.device, dtype=W.dtype)
        return W * S if self.kind == "diag" else W @ S

    def undo(self, R: torch.Tensor) -> torch.Tensor:
        S = self.S.to(device=R.device, dtype=R.dtype)
        if self.kind == "diag":
            return R / S
        if self.kind == "tri":  # R S⁻¹ by a triangular solve: never forms the inverse
            return torch.linalg.solve_triangular(S, R, upper=False, left=False)
        return R @ self.S_inv.to(device=R.device, dtype=R.dtype)  # type: ignore[union-attr]


_JITTERS = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)


def gram_whitening(C: torch.Tensor, label: str, log: Any = None, damp: float = 0.0) -> RightScaling:
    """S with S Sᵀ = XᵀX (+ damp·mean(diag)·I), the whitening of SVD-LLM, computed in float64.

    Calibration Grams are often singular (dead channels, fewer tokens than inputs) or ill-conditioned
    (activation outliers): Cholesky is retried with a growing jitter ε·mean(diag)·I, and if that
    still fails the symmetric eigendecomposition with clamped eigenvalues is used. Each fallback is
    logged; the result is always finite and invertible."""
    from ..errors import OffcompError

    log = log or (lambda msg: None)
    C = C.detach().to(torch.float64)
    if not torch.isfinite(C).all():
        raise OffcompError(f"{label}: the captured XᵀX holds inf/NaN; re-run `offcomp capture` (fp32 model)")
    C = (C + C.T) / 2
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    scale = C.diagonal().mean().item()
    if not scale > 0:
        log(f"{label}: XᵀX is zero (input never active); whitening falls back to the identity")
        return RightScaling("diag", torch.ones(C.shape[0], dtype=C.dtype, device=C.device), how="identity")
    if damp > 0:
        C = C + damp * scale * eye
    for eps in (0.0, *_JITTERS):
        L, info = torch.linalg.cholesky_ex(C + eps * scale * eye if eps else C)
        if info.item() == 0 and torch.isfinite(L).all() and L.diagonal().min() > 0:
            if eps:
                log(f"{label}: XᵀX is not positive definite; Cholesky with jitter {eps:g}·mean(diag)")
            return RightScaling("tri", L, how=f"cholesky+{eps:g}" if eps else "cholesky")
    evals, Q = torch.linalg.eigh(C)
    ev = evals.clamp_min(max(evals.max().item(), 0.0) * 1e-8 or 1.0)
    log(f"{label}: Cholesky failed even with jitter; eigh whitening with eigenvalues clamped at 1e-8·max")
    return RightScaling("full", Q * ev.sqrt(), (Q / ev.sqrt()).T, how="eigh")


def diag_scaling(s: torch.Tensor, label: str, log: Any = None, floor: float = 1e-6) -> RightScaling:
    """A diagonal scaling from non-negative per-channel statistics, with zero channels lifted to
    floor·max so that the inverse exists (ASVD)."""
    from ..errors import OffcompError

    s = s.detach().to(torch.float64)
    if not torch.isfinite(s).all() or (s < 0).any():
        raise OffcompError(f"{label}: the captured activation statistics hold inf/NaN/negative values; re-run capture")
    top = s.max().item()
    if top <= 0:
        (log or (lambda msg: None))(f"{label}: activation scale is all zero; using the identity")
        return RightScaling("diag", torch.ones_like(s), how="identity")
    return RightScaling("diag", s.clamp_min(top * floor), how="diag")


def weighted_factors(
    W: torch.Tensor, rank: int, joint: bool, row: torch.Tensor | None = None, right: RightScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left/right factors of A⁻¹ [A W B]_r B⁻¹ with A = diag(row) and B = right (either optional)."""
    A = W if row is None else row.to(W)[:, None] * W
    if right is not None:
        A = right.apply(A)
    L, R = split_singular(*truncated_svd(A, rank), joint)
    if row is not None:
        L = L / row.to(L)[:, None]
    if right is not None:
        R = right.undo(R)
    return L, R


def weighted_singular_values(
    W: torch.Tensor, row: torch.Tensor | None = None, right: RightScaling | None = None
) -> torch.Tensor:
    """Singular values of A W B: their squared tail is the weighted error of every truncation."""
    A = W if row is None else row.to(W)[:, None] * W
    return torch.linalg.svdvals(A if right is None else right.apply(A))


def unit_stats(stats: dict[str, dict[str, torch.Tensor]] | None, unit: FitUnit, key: str, size: int,
               dim: int = 1) -> list[torch.Tensor]:
    """The `key` statistic of every module of a unit, each distinct tensor once (q/k/v share one XᵀX
    object, so a joint group over them does not count the same input three times). `size` is the
    expected length of each tensor dimension (`dim` of them)."""
    from ..errors import OffcompError

    out: dict[int, torch.Tensor] = {}
    for name in unit.names:
        t = (stats or {}).get(name, {}).get(key)
        if t is None:
            raise OffcompError(f"group {unit.label!r}: no {key!r} statistics for {name}; run `offcomp capture`")
        if tuple(t.shape) != (size,) * dim:
            raise OffcompError(
                f"group {unit.label!r}: {key} of {name} has shape {tuple(t.shape)}, expected {(size,) * dim}; "
                "the statistics were captured on another model"
            )
        out[id(t)] = t
    return list(out.values())


class LowRankMethod(Method):
    """The low-rank family as one method shape: the rank comes from the budget, r·(Σnᵢ + m) is
    stored, and the factors are those of A⁻¹ [A W B]_r B⁻¹. A subclass only says how it weights
    (`scaling`): svd not at all, fwsvd by rows, asvd and svd-llm on the right."""

    joint_shapes = "columns"

    def solve(self, unit: FitUnit, cfg: Any) -> dict[str, Any]:
        return solve_rank(unit)

    def stored_params(self, unit: FitUnit, cfg: Any, hyper: dict[str, Any]) -> int:
        return stored_lowrank(unit, hyper)

    def build(
        self, unit: FitUnit, cfg: Any, hyper: dict[str, Any], originals: list[nn.Module]
    ) -> list[CompressedModule]:
        return build_lowrank(unit, hyper["rank"], originals)

    def scaling(self, unit: FitUnit, cfg: Any, ctx: FitContext) -> tuple[torch.Tensor | None, RightScaling | None]:
        """(row weights a, right scaling B) of min ‖diag(a) (W − Ŵ) B‖_F; None = identity."""
        return None, None

    def fit(
        self, unit: FitUnit, cfg: Any, hyper: dict[str, Any], originals: list[nn.Module], ctx: FitContext
    ) -> list[CompressedModule]:
        dtype = torch_dtype(getattr(cfg, "compute_dtype", "float64"))
        row, right = self.scaling(unit, cfg, ctx)
        W = stacked_weight(originals, ctx.device, dtype)
        L, R = weighted_factors(W, hyper["rank"], unit.joint, row=row, right=right)
        if not (torch.isfinite(L).all() and torch.isfinite(R).all()):  # cannot happen with finite statistics
            raise FloatingPointError(f"{unit.label}: {self.name} produced non-finite factors")
        return assign_factors(self.build(unit, cfg, hyper, originals), originals, split_rows(L, unit), [R])
