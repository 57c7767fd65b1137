"""`tucker`: Tucker decomposition of a weight tensorised by attention heads (tensorly, HOOI).

Tensorisation. With `split: out` (q/k/v) the output rows of W (n × m) are `heads × head_dim`
(the layout `view(…, heads, head_dim)` uses), so W becomes T (heads, head_dim, m). With `split: in`
(o_proj, whose *input* is the concatenated heads) T[h, d, o] = W[o, h·head_dim + d], i.e. Wᵀ
reshaped to (heads, head_dim, n). The method only sees shapes, so `head_dim` is a required option
(the model's hidden_size / num_attention_heads: 64 for smollm2-135m). FFN matrices are tensorised
the same way, `head_dim` then being just the block size of the split dimension (e.g. mlp.up of
smollm2 with head_dim 64 → (24, 64, 576)); nothing head-specific is assumed beyond the reshape.

Joint groups stack the head mode: (Σ heads, head_dim, other); every layer keeps its own rows of
the head factor U1 and all share the core, U2 (head_dim) and U3 (other dimension). With
`split: out` that works for any matrices with the same input size (e.g. q, k and v of all layers
together); `split: in` needs one shape. Stored = Σheads·r1 + head_dim·r2 + other·r3 + r1·r2·r3.

Ranks. `rank: [r1, r2, r3]` in the plan, or solved from `cr`/`ratio` by a balanced rule:
rᵢ ∝ Iᵢ^p (p = `rank_power`, default 0.5), at least 1, with the largest scale that fits the target;
then single ranks are raised, the one furthest below its share first, while the target still holds
(this fills the budget to within one increment, for parity with svd). p = 1 (every mode keeps the
same fraction of its size) starves the small modes: on smollm2-135m's 30 k_proj jointly at cr 10,
(90, 64, 576), p = 1 gives ranks [35, 25, 225] and relative error 0.849, p = 0.5 gives
[49, 41, 125] and 0.820 (p = 0.25: 0.820, p = 0: 0.829; joint svd: 0.838). A mode rank above the
product of the other two cannot be used by a Tucker core, so the rule caps it there; a rank given
explicitly that breaks that, or exceeds its mode's size, is an error rather than being clipped.

Fit: tensorly's HOOI (`tucker`, SVD init, pytorch backend set only inside a thread-local
`tl.backend_context`, so the global tensorly backend is untouched), with a Gram-matrix SVD for the
wide unfoldings (`gram_svd`). Optional refinement with the
AE loss over the rows of W, as in the kronecker method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..errors import OffcompError
from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, Method, register
from .ae_train import RefineConfig, data_stats, refine_rows
from .util import ComputeDtype, torch_dtype

MODES = ("heads", "head_dim", "other")


class TuckerConfig(RefineConfig):
    head_dim: int | None = Field(None, ge=1, description="size of one head (hidden_size / num_attention_heads)")
    split: Literal["out", "in"] = Field("out", description="which dimension holds the heads: out (q/k/v), in (o)")
    rank_power: float = Field(0.5, ge=0, le=1, description="budget rule: ranks ∝ mode size ** rank_power")
    compute_dtype: ComputeDtype = "float64"
    n_iter_max: int = Field(100, ge=1, description="HOOI iterations at most")
    tol: float = Field(1e-4, gt=0, description="HOOI stops when the relative error changes less than this")


@dataclass(frozen=True)
class Geometry:
    heads: tuple[int, ...]  # per matrix of the unit
    head_dim: int
    other: int  # the dimension that is not split (in_features for split=out)

    @property
    def sizes(self) -> tuple[int, int, int]:
        return sum(self.heads), self.head_dim, self.other


def geometry(unit: FitUnit, cfg: TuckerConfig, hyper: dict[str, Any] | None = None) -> Geometry:
    """Tensor shape of the unit. head_dim: the hyper-parameters recorded by `solve` (so a checkpoint
    rebuilds exactly what was fitted), else the option, else the model's value if the core provides
    it on the unit (`FitUnit.head_dim`, proposed), else an error."""
    D = (hyper or {}).get("head_dim") or cfg.head_dim or getattr(unit, "head_dim", None)
    if D is None:
        raise OffcompError(
            f"group {unit.label!r}: tucker needs the option head_dim (the model's hidden_size / "
            "num_attention_heads, 64 for smollm2-135m), e.g. `options: {head_dim: 64}` or `-o head_dim=64`"
        )
    heads, others = [], set()
    for name, (n, m) in zip(unit.names, unit.shapes):
        split_dim, other = (n, m) if cfg.split == "out" else (m, n)
        if split_dim % D:
            side = "out_features" if cfg.split == "out" else "in_features"
            raise OffcompError(f"group {unit.label!r}: {name} has {side} {split_dim}, not a multiple of "
                               f"head_dim {D}; set head_dim or split (out|in)")
        heads.append(split_dim // D)
        others.add(other)
    if len(others) > 1:
        side = "in_features" if cfg.split == "out" else "out_features"
        raise OffcompError(f"group {unit.label!r}: joint tucker (split={cfg.split}) needs one {side}; split the group")
    if cfg.split == "in" and len(set(unit.shapes)) > 1:
        raise OffcompError(f"group {unit.label!r}: joint tucker with split=in needs matrices of one shape")
    return Geometry(tuple(heads), D, others.pop())


def stored_count(sizes: tuple[int, int, int], ranks: list[int]) -> int:
    (I1, I2, I3), (r1, r2, r3) = sizes, ranks
    return I1 * r1 + I2 * r2 + I3 * r3 + r1 * r2 * r3


def _other_product(ranks: list[int], i: int) -> int:
    return ranks[(i + 1) % 3] * ranks[(i + 2) % 3]


def check_ranks(ranks: Any, sizes: tuple[int, int, int], label: str) -> list[int]:
    if not isinstance(ranks, list) or len(ranks) != 3:
        raise OffcompError(f"group {label!r}: tucker takes three ranks [heads, head_dim, other], got {ranks!r}")
    for i, (r, size) in enumerate(zip(ranks, sizes)):
        if r > size:
            raise OffcompError(f"group {label!r}: tucker rank {r} for mode {MODES[i]} exceeds its size {size}; "
                               f"tensor is {list(sizes)}")
        if r > _other_product(ranks, i):
            raise OffcompError(f"group {label!r}: tucker rank {r} for mode {MODES[i]} exceeds the product "
                               f"{_other_product(ranks, i)} of the other two ranks (it could not be used); lower it")
    return ranks


def balanced_ranks(sizes: tuple[int, int, int], target: int, power: float = 0.5) -> list[int] | None:
    """The largest ranks rᵢ ∝ Iᵢ^power with stored <= target (see the module docstring), None if
    even [1, 1, 1] does not fit."""
    weights = [size**power for size in sizes]
    top = max(size / w for size, w in zip(sizes, weights))  # scale at which every mode is full

    def at(t: float) -> list[int]:
        r = [min(size, max(1, round(t * top * w))) for size, w in zip(sizes, weights)]
        for _ in range(3):  # cap each mode at the product of the others (monotone in t)
            r = [min(r[i], _other_product(r, i)) for i in range(3)]
        return r

    if stored_count(sizes, at(0.0)) > target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stored_count(sizes, at(mid)) <= target else (lo, mid)
    r = at(lo)
    while True:
        fits = []
        for i in range(3):
            up = r[:i] + [r[i] + 1] + r[i + 1:]
            if up[i] <= sizes[i] and up[i] <= _other_product(up, i) and stored_count(sizes, up) <= target:
                fits.append(i)
        if not fits:
            return r
        i = min(fits, key=lambda j: (r[j] / weights[j], j))
        r[i] += 1


def gram_svd(matrix: torch.Tensor, n_eigenvecs: int | None = None, **kwargs: Any):
    """The SVD tensorly's HOOI calls on every mode unfolding. Unfoldings are very wide
    (smollm2 q/k/v jointly: 576 × 28800), where a thin SVD costs 10-40× more than the
    eigendecomposition of the small Gram matrix M Mᵀ; HOOI only keeps the left vectors, which that
    gives directly (V, used by tensorly for sign fixing only, is M-projected). Near-square
    unfoldings take the plain SVD. (tensorly's own `symeig_svd` picks the *larger* Gram.)"""
    rows, cols = matrix.shape
    k = min(n_eigenvecs or rows, rows, cols)
    if cols < 2 * rows:
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]
    lam, Q = torch.linalg.eigh(matrix @ matrix.T)  # ascending
    lam, Q = lam.flip(0)[:k], Q.flip(1)[:, :k]
    S = lam.clamp_min(0).sqrt()
    return Q, S, (Q.T @ matrix) / S.clamp_min(torch.finfo(S.dtype).tiny)[:, None]


# ---------------------------------------------------------------------------------------------
# the replacement layer


class TuckerLinear(CompressedModule):
    """A linear layer whose weight is the Tucker tensor core ×₁ U1 ×₂ U2 ×₃ U3 (heads, head_dim,
    other), read as W = T.reshape(heads·head_dim, other) (split=out) or its transpose (split=in).

    The forward contracts the factors with the input one at a time, or builds the dense weight and
    does one matmul when that costs fewer multiply-adds. In a joint group core, U2 and U3 are
    Parameter objects shared by the group; U1 (this layer's heads) is its own.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        heads: int,
        head_dim: int,
        ranks: list[int],
        split: str,
        bias: bool,
        shared: tuple[nn.Parameter, nn.Parameter, nn.Parameter] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.heads, self.head_dim, self.ranks, self.split = heads, head_dim, list(ranks), split
        self.other = in_features if split == "out" else out_features
        r1, r2, r3 = ranks
        kw = {"dtype": dtype, "device": device}
        self.U1 = nn.Parameter(torch.zeros(heads, r1, **kw))
        if shared is None:
            shared = (nn.Parameter(torch.zeros(r1, r2, r3, **kw)), nn.Parameter(torch.zeros(head_dim, r2, **kw)),
                      nn.Parameter(torch.zeros(self.other, r3, **kw)))
        self.core, self.U2, self.U3 = shared
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    def _build_costs(self) -> tuple[int, int]:
        """Multiply-adds of building the dense weight starting from U1 (this layer's few heads) or
        from U3 (the long mode); the first is usually far cheaper in a joint group."""
        (r1, r2, r3), H, D, M = self.ranks, self.heads, self.head_dim, self.other
        return H * r1 * r2 * r3 + H * D * r2 * r3 + H * D * r3 * M, r1 * r2 * r3 * M + r1 * r2 * D * M + H * r1 * D * M

    def costs(self, tokens: int) -> tuple[int, int]:
        """Multiply-adds of (factored, dense incl. building it) for `tokens` input rows."""
        (r1, r2, r3), H, D, M = self.ranks, self.heads, self.head_dim, self.other
        factored = tokens * (M * r3 + r1 * r2 * r3 + r1 * r2 * D + H * r1 * D)
        return factored, min(self._build_costs()) + tokens * H * D * M

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        tokens = x.numel() // self.in_features
        factored, dense = self.costs(tokens)
        if dense <= factored:
            return F.linear(x, self.to_dense(), self.bias)
        (r1, r2, r3), H, D = self.ranks, self.heads, self.head_dim
        if self.split == "out":
            z = x.reshape(tokens, self.other) @ self.U3  # (T, r3)
            t = (z @ self.core.reshape(r1 * r2, r3).T).reshape(tokens, r1, r2) @ self.U2.T  # (T, r1, D)
            y = torch.einsum("hp,tpd->thd", self.U1, t)
        else:
            t = torch.einsum("hp,thd->tpd", self.U1, x.reshape(tokens, H, D)) @ self.U2  # (T, r1, r2)
            y = (t.reshape(tokens, r1 * r2) @ self.core.reshape(r1 * r2, r3)) @ self.U3.T  # (T, other)
        y = y.reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def to_dense(self) -> torch.Tensor:
        u1_first, u3_first = self._build_costs()
        if u1_first <= u3_first:
            G = torch.einsum("hp,pqs->hqs", self.U1, self.core)
            G = torch.einsum("dq,hqs->hds", self.U2, G)  # (H, D, r3)
            W = G.reshape(self.heads * self.head_dim, -1) @ self.U3.T
        else:
            G = torch.einsum("pqs,os->pqo", self.core, self.U3)
            G = torch.einsum("dq,pqo->pdo", self.U2, G)  # (r1, D, other)
            W = (self.U1 @ G.reshape(self.ranks[0], -1)).reshape(self.heads * self.head_dim, self.other)
        return W if self.split == "out" else W.T

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, heads={self.heads}, head_dim={self.head_dim}, "
                f"ranks={self.ranks}, split={self.split}, bias={self.bias is not None}")


# ---------------------------------------------------------------------------------------------
# the method


@register
class Tucker(Method):
    name = "tucker"
    Config = TuckerConfig
    joint_shapes = "any"  # checked in `geometry`, which knows the split
    kinds = ("linear",)

    def stats_needed(self, cfg: TuckerConfig) -> tuple[str, ...]:
        return data_stats(cfg)

    def solve(self, unit: FitUnit, cfg: TuckerConfig) -> dict[str, Any]:
        geo = geometry(unit, cfg)
        sizes = geo.sizes
        b = unit.budget
        if b.kind == "rank":
            ranks = check_ranks(b.value, sizes, unit.label)
        else:
            found = balanced_ranks(sizes, b.target_params(unit.original_params), cfg.rank_power)
            if found is None:
                raise OffcompError(f"group {unit.label!r}: {b} leaves less than tucker ranks [1, 1, 1] "
                                   f"for the tensor {list(sizes)}; raise the budget")
            ranks = found
        stored = stored_count(sizes, ranks)
        if stored >= unit.original_params:
            raise OffcompError(f"group {unit.label!r}: tucker ranks {ranks} store {stored} >= "
                               f"{unit.original_params} original parameters (saves nothing); lower them")
        return {"ranks": ranks, "head_dim": geo.head_dim}

    def stored_params(self, unit: FitUnit, cfg: TuckerConfig, hyper: dict[str, Any]) -> int:
        return stored_count(geometry(unit, cfg, hyper).sizes, hyper["ranks"])

    def build(
        self, unit: FitUnit, cfg: TuckerConfig, hyper: dict[str, Any], originals: list[nn.Module]
    ) -> list[CompressedModule]:
        geo, ranks = geometry(unit, cfg, hyper), hyper["ranks"]
        ref = originals[0].weight
        kw = {"dtype": ref.dtype, "device": ref.device}
        shared = None
        if unit.joint:
            r1, r2, r3 = ranks
            shared = (nn.Parameter(torch.zeros(r1, r2, r3, **kw)), nn.Parameter(torch.zeros(geo.head_dim, r2, **kw)),
                      nn.Parameter(torch.zeros(geo.other, r3, **kw)))
        return [TuckerLinear(m, n, h, geo.head_dim, ranks, cfg.split, getattr(o, "bias", None) is not None,
                             shared=shared, **kw)
                for (n, m), h, o in zip(unit.shapes, geo.heads, originals)]

    def fit(
        self, unit: FitUnit, cfg: TuckerConfig, hyper: dict[str, Any], originals: list[nn.Module],
        ctx: FitContext,
    ) -> list[CompressedModule]:
        import tensorly as tl
        from tensorly.decomposition import tucker

        geo, ranks = geometry(unit, cfg, hyper), hyper["ranks"]
        D, M = geo.head_dim, geo.other
        dt = torch_dtype(cfg.compute_dtype)
        mats = [o.weight.detach().to(ctx.device, dt) for o in originals]
        mats = mats if cfg.split == "out" else [w.T for w in mats]  # (heads·D, other) each
        T = torch.cat([w.reshape(-1, D, M) for w in mats])
        ctx.progress(f"tucker {unit.label}: HOOI", 0, 1)
        with tl.backend_context("pytorch", local_threadsafe=True):
            core, (U1, U2, U3) = tucker(T, rank=list(ranks), init="svd", svd=gram_svd, n_iter_max=cfg.n_iter_max,
                                        tol=cfg.tol, random_state=ctx.seed)
        ctx.progress(f"tucker {unit.label}: HOOI", 1, 1)
        factors = [core, U1, U2, U3]
        layers = self.build(unit, cfg, hyper, originals)
        if cfg.refine_epochs:
            factors = [f.float().contiguous() for f in factors]
            refine_rows(factors, _row_fn(factors, geo, cfg.split), _row_target(originals, ctx.device), cfg, unit, ctx,
                        modules=lambda: dict(zip(unit.names, _fill(self.build(unit, cfg, hyper, originals),
                                                                   originals, factors, geo))))
        return _fill(layers, originals, factors, geo)


def _row_target(originals: list[nn.Module], device: torch.device) -> torch.Tensor:
    """The rows of the original weights, stacked in the order `_row_fn` numbers them."""
    return torch.cat([o.weight.detach().to(device, torch.float32) for o in originals])


def _row_fn(factors: list[torch.Tensor], geo: Geometry, split: str):
    """rows(idx) → reconstructed rows of the stacked original weights, without building them all."""
    core, U1, U2, U3 = factors
    D, M = geo.head_dim, geo.other
    if split == "out":
        # stacked rows of all W_l are the (head, d) fibres of T: row g is head g // D, position g % D
        def rows(idx: torch.Tensor) -> torch.Tensor:
            coef = torch.einsum("bp,bq,pqs->bs", U1[idx // D], U2[idx % D], core)
            return coef @ U3.T

        return rows
    H = geo.heads[0]

    def rows_in(idx: torch.Tensor) -> torch.Tensor:
        # row o of layer l: Ŵ_l[o, h·D + d] = Σ U1_l[h,p] U2[d,q] core[p,q,s] U3[o,s]
        lay, o = idx // M, idx % M
        c = torch.einsum("bs,pqs->bpq", U3[o], core)
        return torch.einsum("bhp,bpq,dq->bhd", U1.reshape(-1, H, U1.shape[1])[lay], c, U2).reshape(len(idx), H * D)

    return rows_in


@torch.no_grad()
def _fill(layers: list[CompressedModule], originals: list[nn.Module], factors: list[torch.Tensor],
          geo: Geometry) -> list[CompressedModule]:
    """Copy the factors in (cast to the model's dtype; shared ones once) and keep the original biases."""
    core, U1, U2, U3 = factors
    for i, (layer, orig, U1_l) in enumerate(zip(layers, originals, torch.split(U1, list(geo.heads)))):
        layer.U1.copy_(U1_l)
        if i == 0 or layer.core is not layers[0].core:
            layer.core.copy_(core)
            layer.U2.copy_(U2)
            layer.U3.copy_(U3)
        if getattr(orig, "bias", None) is not None:
            layer.bias.copy_(orig.bias)
    return layers
