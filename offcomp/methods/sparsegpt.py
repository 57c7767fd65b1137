"""`sparsegpt`: one-shot pruning with weight reconstruction (Frantar & Alistarh, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot", ICML 2023).

Objective. What a pruned linear layer should preserve is its output on real inputs:
‖(W − Ŵ) Xᵀ‖²_F = Σ_rows (w − ŵ) H (w − ŵ)ᵀ with H = XᵀX, the captured statistic "xtx". Magnitude
and Wanda only *choose* which weights to drop; SparseGPT also moves the kept weights of each row so
that they absorb what the dropped ones did.

Optimal Brain Surgeon for one row: dropping weight j and re-fitting the others optimally costs
w_j² / [H⁻¹]_jj and shifts the row by −(w_j / [H⁻¹]_jj)·[H⁻¹]_{j,:}. Doing that exactly for a mask
that differs from row to row needs a different inverse per row. The paper's way out: visit the
columns in one fixed order and, once column j is settled (kept or dropped), only let the columns to
its right compensate. Every row then sees the same sequence of inverses — of H restricted to
columns j, j+1, … — and everything needed from that sequence sits in one matrix: the upper Cholesky
factor U of H⁻¹ (H⁻¹ = UᵀU). U_jj² is the [H⁻¹]_jj of step j and U_{j,k>j} / U_jj the direction in
which the error of column j moves the later columns.

Per matrix (in float64):
  1. Inputs that never fire on the calibration tokens (H_jj = 0) do nothing to the output there:
     their OBS error counts as zero, so their weights are the first (free) ones pruned, and H_jj = 1
     keeps H invertible (an isolated column: dropping it moves no other weight). Then
     H += damp · mean(diag H) · I (the paper's 1 % dampening; more is tried if Cholesky fails).
  2. U = upper Cholesky factor of H⁻¹.
  3. Columns are processed in blocks of `block_size`. The mask is chosen by the OBS error
     w_ij² / U_jj² on the weights *as updated so far* (adaptive mask selection):
       unstructured: at the start of each block, the block's share of the pruned count (exact, in
         proportion to its width), the lowest errors anywhere in the block, so sparsity can differ
         between rows and columns;
       N:M: at the first column of each run of M, the N lowest errors of every row in that run.
  4. Within a block, column by column: dropped entries become zero, the scaled error
     e = (w_j − ŵ_j) / U_jj updates the block's later columns (w_k −= e·U_jk); after the block, one
     matrix product carries all of its errors to every later column (the lazy batch update).
The pruned entries are exactly zero; the kept ones hold the reconstructed values.

The statistics come from the dense model (one capture), not from the already-pruned earlier layers
as in the paper's sequential pass. A joint group prunes each of its matrices on its own, each
with its share of the group's pruned count (in proportion to its size).

Budget, layers, storage and counting are `prune`'s (`offcomp.methods.prune.MaskedMethod`): `ratio`/`cr` fix the
kept count K exactly, the layer is a `MaskedLinear`, stored parameters = K, and the sparse index
bytes are reported beside it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from pydantic import Field, field_validator

from ..errors import OffcompError
from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, MethodConfig, register
from .prune import MaskedMethod, check_pattern, keep_exactly, pattern_nm


class SparseGPTConfig(MethodConfig):
    pattern: str | None = Field(None, description='"N:M": N zeros in every M consecutive inputs')
    # Dampening added to H, as a fraction of its mean diagonal (the paper's 1 %).
    damp: float = Field(0.01, ge=0, le=1, description="Hessian dampening, relative to its mean diagonal")
    # Columns per block: the unit of adaptive mask selection and of the lazy batch update.
    block_size: int = Field(128, ge=1, le=65536, description="columns per block of mask selection and update")

    _pattern = field_validator("pattern", mode="before")(check_pattern)


def proportional(sizes: list[int], k: int) -> list[int]:
    """Split k into integer shares proportional to `sizes` (largest remainders, then the earlier
    entry, get the leftovers), so the shares sum to k exactly."""
    total = sum(sizes)
    base = [k * s // total for s in sizes]
    rem = sorted(range(len(sizes)), key=lambda i: (-(k * sizes[i] % total), i))
    for i in rem[: k - sum(base)]:
        base[i] += 1
    return base


def inverse_hessian_factor(H: torch.Tensor, damp: float, label: str, log: Any) -> torch.Tensor:
    """U, upper triangular with UᵀU = (H + damp·mean(diag H)·I)⁻¹; the dampening grows tenfold
    (logged) while H is numerically not positive definite."""
    scale = H.diagonal().mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    tries = [damp] + [d for d in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) if d > damp]
    for i, d in enumerate(tries):
        L, info = torch.linalg.cholesky_ex(H + d * scale * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                if i:
                    log(f"{label}: H is not positive definite with damp {damp:g}; used {d:g}·mean(diag)")
                return U
    raise OffcompError(f"{label}: the captured XᵀX stays singular even with damp 1; re-run `offcomp capture` "
                       "with more calibration tokens")


@torch.no_grad()
def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, n_prune: int, *, pattern: tuple[int, int] | None = None,
                    damp: float = 0.01, block_size: int = 128, label: str = "sparsegpt",
                    log: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Ŵ, keep mask) of one matrix W (out × in) pruned against H = XᵀX (in × in), in float64.

    Unstructured: exactly `n_prune` entries become zero. N:M (`pattern` = (N, M)): N in every M
    consecutive columns of each row (`n_prune` is then ignored; in must be a multiple of M)."""
    log = log or (lambda msg: None)
    W = W.detach().to(torch.float64).clone()
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    rows, cols = W.shape
    if not torch.isfinite(H).all():
        raise OffcompError(f"{label}: the captured XᵀX holds inf/NaN; re-run `offcomp capture`")
    H = (H + H.T) / 2
    dead = H.diagonal() <= 0
    H[dead, dead] = 1.0
    U = inverse_hessian_factor(H, damp, label, log)

    if pattern is not None:
        n_zero, m = pattern
        block_size = max(m, block_size // m * m)  # runs of M never straddle two blocks
    starts = list(range(0, cols, block_size))
    widths = [min(block_size, cols - s) for s in starts]
    shares = proportional([rows * w for w in widths], n_prune) if pattern is None else [0] * len(starts)
    drop = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1, width, share in zip(starts, widths, shares):
        i2 = i1 + width
        Wb, Ub = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        # OBS error of dropping each entry: w² / [H⁻¹]_jj, zero for inputs never seen
        d2 = torch.where(dead[i1:i2], torch.inf, Ub.diagonal().square())
        Db = drop[:, i1:i2]
        if pattern is None and share:
            err = (Wb.square() / d2).flatten()
            Db.copy_(keep_exactly(-err, share).view(rows, width))  # the `share` smallest errors
        E = torch.zeros_like(Wb)
        for c in range(width):
            if pattern is not None and c % m == 0:
                err = Wb[:, c:c + m].square() / d2[c:c + m]
                low = torch.sort(err, dim=1, stable=True).indices[:, :n_zero]
                Db[:, c:c + m].scatter_(1, low, True)
            w = Wb[:, c]
            e = torch.where(Db[:, c], w, torch.zeros_like(w)) / Ub[c, c]
            Wb[:, c + 1:] -= e[:, None] * Ub[c, c + 1:][None, :]
            Wb[:, c] = torch.where(Db[:, c], torch.zeros_like(w), w)
            E[:, c] = e
        W[:, i1:i2] = Wb
        if i2 < cols:
            W[:, i2:] -= E @ U[i1:i2, i2:]
    keep = ~drop
    W *= keep
    return W, keep


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """‖(W − Ŵ)Xᵀ‖_F / ‖W Xᵀ‖_F from H = XᵀX (undamped): the relative output error on calibration."""
    H = H.to(device=W.device, dtype=torch.float64)
    W = W.to(torch.float64)
    D = W - W_hat.to(torch.float64)
    num, den = ((D @ H) * D).sum().item(), ((W @ H) * W).sum().item()
    return (max(num, 0.0) / den) ** 0.5 if den > 0 else 0.0


def matrix_hessian(stats: dict[str, dict[str, torch.Tensor]] | None, name: str, size: int, label: str) -> torch.Tensor:
    t = (stats or {}).get(name, {}).get("xtx")
    if t is None:
        raise OffcompError(f"group {label!r}: sparsegpt needs the XᵀX of {name}; run `offcomp capture` and pass "
                           "--stats DIR (or --calib-data)")
    if tuple(t.shape) != (size, size):
        raise OffcompError(f"group {label!r}: xtx of {name} has shape {tuple(t.shape)}, expected {(size, size)}; "
                           "the statistics were captured on another model")
    return t


@register
class SparseGPT(MaskedMethod):
    name = "sparsegpt"
    Config = SparseGPTConfig
    kinds = ("linear",)
    needs_stats = ("xtx",)

    def fit(
        self, unit: FitUnit, cfg: SparseGPTConfig, hyper: dict[str, Any], originals: list[nn.Module],
        ctx: FitContext
    ) -> list[CompressedModule]:
        pattern = pattern_nm(cfg.pattern) if cfg.pattern else None
        prunes = proportional([n * m for n, m in unit.shapes], unit.original_params - int(hyper["keep"]))
        weights, masks = [], []
        for name, (_, m), orig, n_prune in zip(unit.names, unit.shapes, originals, prunes):
            H = matrix_hessian(ctx.stats, name, m, unit.label)
            W = orig.weight.detach().to(ctx.device)
            W_hat, keep = sparsegpt_prune(W, H, n_prune, pattern=pattern, damp=cfg.damp,
                                          block_size=cfg.block_size, label=f"{unit.label} {name}", log=ctx.log)
            ctx.log(f"{name}: relative output error on calibration {output_error(W, W_hat, H):.4f}")
            weights.append(W_hat)
            masks.append(keep)
        return self.masked_layers(unit, cfg, hyper, originals, masks, weights, ctx)
