"""`kronecker`: W ≈ Σ_{k=1..r} A_k ⊗ B_k, fitted optimally (Van Loan–Pitsianis), optionally refined.

Geometry. W (n × m) is zero-padded to (n1·n2 × m1·m2); A_k is n1 × m1, B_k is n2 × m2 and
(A ⊗ B)[a·n2 + c, b·m2 + d] = A[a, b]·B[c, d]. The default factor pairs have the least padding and
make the per-term cost smallest (see `factor_pair`): near-square √n × √m for one matrix, a larger
shared A for a joint group. The plan can set them with `out_factors: [n1, n2]` and
`in_factors: [m1, m2]`. (With (1, n) and (m, 1) the method would be exactly a truncated SVD.)

Fit. The rearrangement R(W) (n1·m1 × n2·m2), whose row (a, b) is the flattened block W[a, b] of
size n2 × m2, turns every Kronecker product into a rank-1 matrix: R(A ⊗ B) = vec(A) vec(B)ᵀ. So the
truncated SVD of R(W) gives the Frobenius-optimal sum of r Kronecker products (of the padded W).
The reference code of Banaei et al. trained A_k, B_k from a random init with the AE loss; starting
from the optimum is better and free, and `refine_epochs` > 0 can still polish it with that loss
(0.9091·mean(1 − cos) + 0.0909·RMSE over rows, Adam, StepLR(10, 0.8)), keeping the best epoch
(validation score when the caller provides one, else the AE loss itself), so refining never ends
worse than the init by its own yardstick.

Joint groups (same shape, L layers). All layers share the A_k and keep their own B_{l,k}:
W_l ≈ Σ_k A_k ⊗ B_{l,k}. The rearranged matrices side by side, [R(W_1) … R(W_L)], are then exactly
Σ_k vec(A_k) [vec(B_{1,k})ᵀ … vec(B_{L,k})ᵀ], so one truncated SVD of that n1·m1 × L·n2·m2 matrix
is again optimal for the whole group. It mirrors the svd method (shared right factor, per-layer
left factors). Stored = r·(n1·m1 + L·n2·m2), biases excluded. On smollm2-135m's 30 k_proj at cr 10
the L-aware default factors (A 32×64, B 6×9, r = 90) give relative error 0.877, the near-square
ones (A 12×24, B 16×24, r = 28) 0.918; for the 30 mlp.down 0.909 vs 0.935.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..errors import OffcompError
from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, Method, check_rank, max_rank, register
from .ae_train import RefineConfig, data_stats, refine_rows
from .util import ComputeDtype, torch_dtype


class KroneckerConfig(RefineConfig):
    out_factors: tuple[int, int] | None = Field(None, description="(n1, n2) with n1·n2 >= out_features")
    in_factors: tuple[int, int] | None = Field(None, description="(m1, m2) with m1·m2 >= in_features")
    compute_dtype: ComputeDtype = "float64"


# ---------------------------------------------------------------------------------------------
# geometry


def factor_pair(n: int, layers: int = 1) -> tuple[int, int]:
    """(n1, n2) with n1·n2 >= n for the shared A (n1) and per-layer B (n2): least padding first,
    then n1 closest to t = L^(1/4)·√n, with n1 kept within [t/2, 2t].

    Why t: stored = r·(n1·m1 + L·n2·m2) is smallest for a given r, i.e. the budget buys the most
    Kronecker terms, when the shared and per-layer parts cost the same, n1·m1 = L·n2·m2 (the
    rearranged matrix is square); with n1/m1 = n2/m2 (A and B shaped like W) that is
    n1 = L^(1/4)·√n, m1 = L^(1/4)·√m. A single matrix (L = 1) gets the usual near-square √n × √n.
    The window keeps a prime n at e.g. 17×34 (1 row of padding) instead of the degenerate 1×n: with
    (n1, n2) = (1, n) and (m1, m2) = (m, 1) the method would just be a truncated SVD."""
    t = layers**0.25 * math.sqrt(n)
    best: tuple[int, float, int, int] | None = None
    for n1 in range(max(1, math.ceil(t / 2)), min(n, math.floor(2 * t)) + 1):
        n2 = -(-n // n1)
        key = (n1 * n2 - n, abs(math.log(n1 / t)), n1, n2)
        if best is None or key < best:
            best = key
    if best is None:  # n < t/2: only possible for tiny n with many layers
        return n, 1
    return best[2], best[3]


def _factors(given: tuple[int, int] | None, dim: int, layers: int, what: str, label: str) -> tuple[int, int]:
    if given is None:
        return factor_pair(dim, layers)
    a, b = given
    if a < 1 or b < 1 or a * b < dim:
        raise OffcompError(
            f"group {label!r}: kronecker {what}_factors {list(given)} must be positive with a product >= {dim}; "
            f"e.g. {list(factor_pair(dim, layers))}"
        )
    return a, b


def geometry(unit: FitUnit, cfg: KroneckerConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    if len({tuple(s) for s in unit.shapes}) != 1:
        raise OffcompError(f"group {unit.label!r}: joint kronecker needs matrices of one shape; split the group")
    n, m = unit.shapes[0]
    L = len(unit.shapes)
    return _factors(cfg.out_factors, n, L, "out", unit.label), _factors(cfg.in_factors, m, L, "in", unit.label)


def per_rank_cost(unit: FitUnit, nf: tuple[int, int], mf: tuple[int, int]) -> int:
    return nf[0] * mf[0] + len(unit.shapes) * nf[1] * mf[1]


def rearrange(W: torch.Tensor, nf: tuple[int, int], mf: tuple[int, int]) -> torch.Tensor:
    """[R(W_1) … R(W_L)] for a stack W (L, n, m): rows (a, b) index A, columns (l, c, d) index B_l."""
    L, n, m = W.shape
    (n1, n2), (m1, m2) = nf, mf
    Wp = F.pad(W, (0, m1 * m2 - m, 0, n1 * n2 - n))
    return Wp.reshape(L, n1, n2, m1, m2).permute(1, 3, 0, 2, 4).reshape(n1 * m1, L * n2 * m2)


def top_svd(R: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading r singular triplets of R. Large, nearly square R (a joint group's side-by-side
    rearrangement, e.g. 6144 × 4320 for smollm2's 30 mlp.down) go through the eigendecomposition
    of the smaller Gram matrix, several times faster than a full SVD on CPU; in float64 the
    leading triplets are accurate to far below the weights' own precision."""
    small = min(R.shape)
    if small < GRAM_ABOVE or R.dtype != torch.float64:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    wide = R.shape[0] <= R.shape[1]
    lam, Q = torch.linalg.eigh(R @ R.T if wide else R.T @ R)  # ascending
    lam, Q = lam.flip(0)[:r], Q.flip(1)[:, :r]
    S = lam.clamp_min(0).sqrt()
    other = (R.T @ Q if wide else R @ Q) / S.clamp_min(torch.finfo(R.dtype).tiny)
    return (Q, S, other.T) if wide else (other, S, Q.T)


GRAM_ABOVE = 1024


# ---------------------------------------------------------------------------------------------
# the replacement layer


class KroneckerLinear(CompressedModule):
    """y = x Wᵀ + b with W = crop(Σ_k A_k ⊗ B_k); A (r, n1, m1), B (r, n2, m2).

    Per call it picks the cheaper of two paths by a multiply-add count: the structured product
    Y = Σ_k A_k X B_kᵀ on x reshaped to (…, m1, m2) (in either contraction order), or building the
    dense matrix once (r·n1n2m1m2) and one ordinary matmul. Large r and long inputs favour dense.
    In a joint group A is one Parameter object shared by every layer of the group.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        out_factors: tuple[int, int],
        in_factors: tuple[int, int],
        bias: bool,
        A: nn.Parameter | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.out_factors, self.in_factors = tuple(out_factors), tuple(in_factors)
        (n1, n2), (m1, m2) = self.out_factors, self.in_factors
        kw = {"dtype": dtype, "device": device}
        self.A = A if A is not None else nn.Parameter(torch.zeros(rank, n1, m1, **kw))
        self.B = nn.Parameter(torch.zeros(rank, n2, m2, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def costs(self, tokens: int) -> tuple[int, int, int]:
        """Multiply-adds of (B first, A first, dense incl. building it) for `tokens` input rows."""
        (n1, n2), (m1, m2), r = self.out_factors, self.in_factors, self.rank
        b_first = tokens * r * m1 * n2 * (m2 + n1)
        a_first = tokens * r * n1 * m2 * (m1 + n2)
        dense = r * n1 * n2 * m1 * m2 + tokens * self.out_features * self.in_features
        return b_first, a_first, dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens = x.numel() // self.in_features
        b_first, a_first, dense = self.costs(tokens)
        if dense <= min(b_first, a_first):
            return F.linear(x, self.to_dense(), self.bias)
        (n1, n2), (m1, m2) = self.out_factors, self.in_factors
        X = F.pad(x, (0, m1 * m2 - self.in_features)).reshape(tokens, m1, m2)
        if b_first <= a_first:
            t = torch.einsum("tbd,rcd->trbc", X, self.B)  # (T, r, m1, n2)
            y = torch.einsum("rab,trbc->tac", self.A, t)  # (T, n1, n2)
        else:
            t = torch.einsum("rab,tbd->trad", self.A, X)  # (T, r, n1, m2)
            y = torch.einsum("trad,rcd->tac", t, self.B)  # (T, n1, n2)
        y = y.reshape(tokens, n1 * n2)[:, : self.out_features].reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def to_dense(self) -> torch.Tensor:
        (n1, n2), (m1, m2) = self.out_factors, self.in_factors
        W = torch.einsum("rab,rcd->acbd", self.A, self.B).reshape(n1 * n2, m1 * m2)
        return W[: self.out_features, : self.in_features]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"A={self.out_factors[0]}x{self.in_factors[0]}, B={self.out_factors[1]}x{self.in_factors[1]}, "
                f"bias={self.bias is not None}")


# ---------------------------------------------------------------------------------------------
# the method


@register
class Kronecker(Method):
    name = "kronecker"
    Config = KroneckerConfig
    joint_shapes = "same"
    kinds = ("linear",)

    def stats_needed(self, cfg: KroneckerConfig) -> tuple[str, ...]:
        return data_stats(cfg)

    def solve(self, unit: FitUnit, cfg: KroneckerConfig) -> dict[str, Any]:
        nf, mf = geometry(unit, cfg)
        per_rank = per_rank_cost(unit, nf, mf)
        b = unit.budget
        if b.kind == "rank":
            if not isinstance(b.value, int):
                raise OffcompError(f"group {unit.label!r}: kronecker takes one integer rank, not a list")
            top = min(nf[0] * mf[0], len(unit.shapes) * nf[1] * mf[1])
            if b.value > top:
                raise OffcompError(f"group {unit.label!r}: kronecker rank {b.value} exceeds the rank {top} "
                                   f"of the rearranged matrix; use rank <= {top}")
            rank = b.value
        else:
            rank = max_rank(b.target_params(unit.original_params), per_rank, unit.label, b)
        check_rank(rank, per_rank, unit.original_params, unit.label)
        return {"rank": rank, "out_factors": list(nf), "in_factors": list(mf)}

    def stored_params(self, unit: FitUnit, cfg: KroneckerConfig, hyper: dict[str, Any]) -> int:
        return hyper["rank"] * per_rank_cost(unit, hyper["out_factors"], hyper["in_factors"])

    def build(
        self, unit: FitUnit, cfg: KroneckerConfig, hyper: dict[str, Any], originals: list[nn.Module]
    ) -> list[CompressedModule]:
        ref = originals[0].weight
        kw = {"dtype": ref.dtype, "device": ref.device}
        r, nf, mf = hyper["rank"], tuple(hyper["out_factors"]), tuple(hyper["in_factors"])
        A = nn.Parameter(torch.zeros(r, nf[0], mf[0], **kw)) if unit.joint else None
        return [KroneckerLinear(m, n, r, nf, mf, getattr(o, "bias", None) is not None, A=A, **kw)
                for (n, m), o in zip(unit.shapes, originals)]

    def fit(
        self, unit: FitUnit, cfg: KroneckerConfig, hyper: dict[str, Any], originals: list[nn.Module],
        ctx: FitContext,
    ) -> list[CompressedModule]:
        r, nf, mf = hyper["rank"], tuple(hyper["out_factors"]), tuple(hyper["in_factors"])
        W = torch.stack([o.weight.detach().to(ctx.device, torch_dtype(cfg.compute_dtype)) for o in originals])
        L, n, m = W.shape
        ctx.progress(f"kronecker {unit.label}: SVD of the rearranged weights", 0, 1)
        U, S, Vh = top_svd(rearrange(W, nf, mf), r)
        # Joint: the shared A stays orthonormal and the per-layer B carry Σ (as in svd); separate:
        # √Σ on both sides so fine-tuning sees balanced factors.
        left, right = (U, S[:, None] * Vh) if unit.joint else (U * S.sqrt(), S.sqrt()[:, None] * Vh)
        A = left.T.reshape(r, nf[0], mf[0]).contiguous()
        B = right.reshape(r, L, nf[1], mf[1]).transpose(0, 1).contiguous()  # (L, r, n2, m2)
        ctx.progress(f"kronecker {unit.label}: SVD of the rearranged weights", 1, 1)
        layers = self.build(unit, cfg, hyper, originals)
        if cfg.refine_epochs:
            A, B = A.float(), B.float()

            def rows(idx: torch.Tensor) -> torch.Tensor:
                lay, row = idx // n, idx % n
                a, c = row // nf[1], row % nf[1]
                out = torch.einsum("rbx,bry->bxy", A[:, a, :], B[lay, :, c, :])
                return out.reshape(len(idx), -1)[:, :m]

            def modules() -> dict[str, nn.Module]:
                return dict(zip(unit.names, _fill(self.build(unit, cfg, hyper, originals), originals, A, B)))

            refine_rows([A, B], rows, W.reshape(L * n, m).float(), cfg, unit, ctx, modules=modules)
        return _fill(layers, originals, A, B)


@torch.no_grad()
def _fill(layers: list[CompressedModule], originals: list[nn.Module], A: torch.Tensor,
          B: torch.Tensor) -> list[CompressedModule]:
    """Copy factors in (cast to the model's dtype; A once if shared) and keep the original biases."""
    for i, (layer, orig) in enumerate(zip(layers, originals)):
        if i == 0 or layer.A is not layers[0].A:
            layer.A.copy_(A)
        layer.B.copy_(B[i])
        if getattr(orig, "bias", None) is not None:
            layer.bias.copy_(orig.bias)
    return layers
