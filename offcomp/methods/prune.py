"""`prune`: unstructured pruning to a stored-parameter budget, by weight magnitude or Wanda score.

Budget. A unit of P weights at `ratio` ρ (or `cr` c, ρ = 1/c) keeps exactly K = int(P·ρ) weights,
the largest by score; stored parameters = K (== mask.sum()), the same target every other method
aims at, so prune and svd are compared at the same stored count. `rank` means nothing here and is
an error.

Comparison groups (`compare`):
  - "unit" (default): one threshold over the whole unit. In a joint group that is one global
    threshold across all the group's matrices, so layers whose weights score higher keep more
    (layer-adaptive sparsity); a separate group thresholds each matrix on its own.
  - "row": every output row keeps its share of K (K·mᵢ/P, largest remainders get the leftover
    weights), as Wanda does: pruning then never empties one output unit while sparing another.

Semi-structured N:M (`pattern: "2:4"`): in every run of M consecutive weights along the input
dimension (a row's columns 0..M-1, M..2M-1, …) exactly N are zero, the N lowest-scoring; the
pattern sparse tensor cores accelerate. The pattern fixes the kept fraction at (M−N)/M, so the
budget must say the same (2:4: ratio 0.5 or cr 2; anything else is an error), every matrix's
input size must be a multiple of M, and `compare` does not apply. Quote it in YAML ("2:4"):
unquoted, YAML 1.1 reads 2:4 as the base-60 number 124.

Scores (`score`):
  - "magnitude": |W_ij|.
  - "wanda" (Sun et al., 2023): |W_ij|·‖X_j‖₂, with ‖X_j‖₂ the norm of input channel j over the
    calibration tokens. Read from `FitContext.stats[module name]`, which `offcomp capture` writes:
        "act_sq": (in,) per-input-channel Σ_t x_tj²   (preferred when present), or
        "xtx":    (in, in) Gram matrix XᵀX in fp64; its diagonal is the same Σ_t x_tj².
    Embeddings have no input activations, so wanda applies to linear layers only.

Storage. A layer stores only what the budget pays for: the K kept values (a parameter, row-major
order) and the mask as a bitmap packed 8 entries per byte (a uint8 buffer of ⌈n·m/8⌉ bytes), so
the file holds K values + n·m/8 bytes instead of n·m values (50 % kept in bf16: 1.125 bytes per
original weight instead of 2). The dense weight is rebuilt on the fly in `forward` (a scatter of
the values into the bitmap's positions); training updates the kept values only, so pruned entries
stay zero. A bitmap beats a CSR index (2-byte columns + row pointers) above 1/16 density; below
that CSR would be smaller, which this layout does not exploit.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..errors import OffcompError
from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, Method, MethodConfig, register


def check_pattern(v: Any) -> str | None:
    """A "N:M" string with 0 < N < M (shared by every pruning method's config)."""
    if v is None:
        return None
    if not isinstance(v, str):
        raise ValueError(f"pattern must be a quoted string such as \"2:4\", got {v!r} "
                         "(unquoted, YAML reads 2:4 as the base-60 number 124)")
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", v)
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise ValueError(f"pattern must be \"N:M\" with 0 < N < M (N zeros in every M weights), got {v!r}")
    return f"{int(m[1])}:{int(m[2])}"


def pattern_nm(pattern: str) -> tuple[int, int]:
    n, m = pattern.split(":")
    return int(n), int(m)


class PruneConfig(MethodConfig):
    score: Literal["magnitude", "wanda"] = Field("magnitude",
        description="magnitude |W| or Wanda |W|·‖x‖ (needs act_sq)")
    compare: Literal["unit", "row"] = Field("unit",
        description="rank weights across the whole unit or within each output row")
    pattern: str | None = Field(None,
        description='"N:M": N zeros in every M consecutive inputs (fixes the kept fraction)')

    _pattern = field_validator("pattern", mode="before")(check_pattern)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as a flat bitmap, 8 entries per byte (entry i is bit i % 8 of byte i // 8)."""
    flat = mask.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    return (flat << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The boolean (n, m) mask of a bitmap written by `pack_mask`."""
    n = shape[0] * shape[1]
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits[:, None] >> shifts) & 1).flatten()[:n].view(shape).bool()


class _SparseWeight(CompressedModule):
    """Kept values + packed bitmap of one (rows, cols) matrix; `weight` and `mask` are rebuilt views."""

    def _init_sparse(self, rows: int, cols: int, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        self._shape = (rows, cols)
        self.values = nn.Parameter(torch.zeros(0, dtype=dtype, device=device))
        self.register_buffer("bitmap", torch.zeros(-(-rows * cols // 8), dtype=torch.uint8, device=device))

    def _alloc(self, keep: int) -> None:
        """Size the values for `keep` kept weights (the unit's hyper says how many each layer holds)."""
        self.values = nn.Parameter(self.values.new_zeros(keep))

    def set_sparse(self, weight: torch.Tensor, mask: torch.Tensor) -> None:
        """Store `weight` at the positions `mask` keeps."""
        mask = mask.to(device=self.bitmap.device, dtype=torch.bool)
        self.bitmap = pack_mask(mask)
        self.values = nn.Parameter(weight.detach().to(self.values)[mask].contiguous())

    @property
    def mask(self) -> torch.Tensor:
        return unpack_mask(self.bitmap, self._shape)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (rows, cols) weight, zero where pruned; differentiable in the kept values."""
        flat = self.values.new_zeros(self._shape[0] * self._shape[1])
        return flat.masked_scatter(self.mask.flatten(), self.values).view(self._shape)

    def to_dense(self) -> torch.Tensor:
        return self.weight

    def stored_values(self) -> int:
        """Weights actually stored: what `stored_params` counts."""
        return self.values.numel()


class MaskedLinear(_SparseWeight):
    """y = x Wᵀ + b with W zero outside a fixed mask; stores only the kept values (see Storage)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, keep: int = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_sparse(out_features, in_features, dtype, device)
        self._alloc(keep)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kept={self.stored_values()}"


class MaskedEmbedding(_SparseWeight):
    """Embedding table E zero outside a fixed mask; stores only the kept values (see Storage)."""

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, keep: int = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_sparse(num_embeddings, embedding_dim, dtype, device)
        self._alloc(keep)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kept={self.stored_values()}"


def input_sq_norms(stats: dict[str, dict[str, torch.Tensor]] | None, name: str, in_features: int,
                   label: str) -> torch.Tensor:
    """Σ_t x_tj² per input channel of module `name` (fp64), from "act_sq" or the diagonal of "xtx"."""
    entry = (stats or {}).get(name)
    if not entry:
        raise OffcompError(
            f"group {label!r}: score 'wanda' needs calibration statistics for {name}; "
            "run `offcomp capture` and pass --stats DIR (or use score: magnitude)"
        )
    if "act_sq" in entry:
        v = entry["act_sq"]
    elif "xtx" in entry:
        v = torch.diagonal(entry["xtx"])
    else:
        raise OffcompError(
            f"group {label!r}: statistics for {name} hold {sorted(entry)} but wanda needs 'act_sq' or 'xtx'; "
            "re-run `offcomp capture`"
        )
    v = v.detach().to(torch.float64).flatten()
    if v.numel() != in_features or not torch.isfinite(v).all():
        raise OffcompError(
            f"group {label!r}: activation statistics for {name} have {v.numel()} entries (or non-finite values), "
            f"the module reads {in_features} features; re-run `offcomp capture` on this model"
        )
    return v.clamp_min(0)


def keep_exactly(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries; ties at the threshold go to the lowest indices, so
    the count is exact and the choice deterministic."""
    n = flat.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    thr = flat.kthvalue(n - k + 1).values  # the k-th largest
    keep = flat > thr
    need = k - int(keep.sum())
    if need > 0:
        ties = (flat == thr).nonzero().flatten()[:need]
        keep[ties] = True
    return keep


def row_quotas(shapes: list[tuple[int, int]], k: int) -> list[torch.Tensor]:
    """Split k kept weights over all rows of the unit in proportion to row length (largest
    remainders first, then the earlier row), so Σ quotas == k exactly."""
    total = sum(n * m for n, m in shapes)
    lengths = torch.cat([torch.full((n,), m, dtype=torch.int64) for n, m in shapes])
    num = lengths * k
    q, rem = num // total, num % total
    left = k - int(q.sum())
    if left:
        order = torch.sort(-rem, stable=True).indices[:left]
        q[order] += 1
    return list(torch.split(q, [n for n, _ in shapes]))


def row_masks(scores: list[torch.Tensor], quotas: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for s, q in zip(scores, quotas):
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        ranks_kept = torch.arange(s.shape[1], device=s.device)[None, :] < q.to(s.device)[:, None]
        out.append(torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, ranks_kept))
    return out


def nm_masks(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with exactly n zeros, the n lowest scores, in every m consecutive columns of each
    row (ties: the earlier column is pruned)."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    low = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, low, False)
    return keep.reshape(rows, cols)


def solve_keep(unit: FitUnit, pattern: str | None, method: str) -> dict[str, Any]:
    """The kept count of a pruning unit from its budget (and N:M pattern), with the index cost."""
    b = unit.budget
    if b.kind == "rank":
        raise OffcompError(
            f"group {unit.label!r}: {method} keeps single weights, a rank means nothing to it; "
            "give ratio: (fraction kept) or cr: (original/stored)"
        )
    total = unit.original_params
    if pattern is None:
        keep = b.target_params(total)
    else:
        n, m = pattern_nm(pattern)
        bad = [(name, s) for name, s in zip(unit.names, unit.shapes) if s[1] % m]
        if bad:
            raise OffcompError(
                f"group {unit.label!r}: pattern {pattern} needs input sizes that are multiples of {m}, "
                f"but {bad[0][0]} has {bad[0][1][1]} inputs; use another pattern or leave it out"
            )
        keep = total // m * (m - n)
        frac = b.value if b.kind == "ratio" else 1.0 / b.value
        if abs(frac - (m - n) / m) > 1e-3:
            raise OffcompError(
                f"group {unit.label!r}: pattern {pattern} keeps exactly {m - n}/{m} of the weights, but the budget "
                f"is {b}; give ratio: {(m - n) / m:.6g} (or cr: {m / (m - n):.6g})"
            )
    if keep < 1:
        raise OffcompError(f"group {unit.label!r}: {b} keeps no weight at all; raise the budget")
    if keep >= total:
        raise OffcompError(f"group {unit.label!r}: {b} keeps all {total} weights (saves nothing)")
    return {"keep": keep, "index": "bitmap", "index_bytes": bitmap_bytes(unit.shapes)}


def kept_counts(masks: list[torch.Tensor]) -> list[int]:
    """Weights each matrix keeps: `MaskedMethod.masked_layers` records them in the hyper-parameters
    as "kept" before building, because `build_masked` sizes the stored values by them (in a joint
    unit the split of the budget between matrices depends on the data)."""
    return [int(mk.sum()) for mk in masks]


def build_masked(unit: FitUnit, originals: list[nn.Module], hyper: dict[str, Any]) -> list[CompressedModule]:
    """Empty masked layers (the replacement of every pruning method), in the originals' dtype."""
    kept = hyper.get("kept", [hyper["keep"]] if len(unit.shapes) == 1 else None)
    if kept is None or len(kept) != len(unit.shapes):
        raise OffcompError(f"group {unit.label!r}: pruning hyper-parameters lack the per-matrix kept counts; "
                           "re-run `offcomp compress`")
    out: list[CompressedModule] = []
    for (n, m), kind, orig, k in zip(unit.shapes, unit.kinds, originals, kept):
        kw = {"keep": int(k), "dtype": orig.weight.dtype, "device": orig.weight.device}
        if kind == "embedding":
            out.append(MaskedEmbedding(n, m, getattr(orig, "padding_idx", None), **kw))
        else:
            out.append(MaskedLinear(m, n, getattr(orig, "bias", None) is not None, **kw))
    return out


def fill_masked(layers: list[CompressedModule], originals: list[nn.Module], masks: list[torch.Tensor],
                weights: list[torch.Tensor], names: list[str], log: Any) -> list[CompressedModule]:
    """Copy masks and (masked) weights into built layers, keep the original biases, log the counts."""
    for layer, orig, mask, w, name in zip(layers, originals, masks, weights, names):
        layer.set_sparse(w.to(device=orig.weight.device, dtype=orig.weight.dtype), mask.to(orig.weight.device))
        if getattr(orig, "bias", None) is not None:
            layer.bias.data.copy_(orig.bias.data)
        kept = layer.stored_values()
        log(f"{name}: kept {kept}/{mask.numel()} ({kept / mask.numel():.1%})")
    return layers


def bitmap_bytes(shapes: list[tuple[int, int]]) -> int:
    """Bytes of the packed masks of a unit: Σ ⌈n·m/8⌉."""
    return sum(-(-n * m // 8) for n, m in shapes)


class MaskedMethod(Method):
    """The unstructured pruning family as one method shape: the budget fixes the kept count K
    (`solve_keep`, with the config's N:M `pattern`), K values are stored, and the layers are
    `MaskedLinear` / `MaskedEmbedding` (`build_masked`). A subclass only says which weights it
    keeps and what values they hold: its `fit` ends in `masked_layers`."""

    joint_shapes = "any"

    def solve(self, unit: FitUnit, cfg: Any) -> dict[str, Any]:
        return solve_keep(unit, cfg.pattern, self.name)

    def stored_params(self, unit: FitUnit, cfg: Any, hyper: dict[str, Any]) -> int:
        return int(hyper["keep"])

    def build(
        self, unit: FitUnit, cfg: Any, hyper: dict[str, Any], originals: list[nn.Module]
    ) -> list[CompressedModule]:
        return build_masked(unit, originals, hyper)

    def masked_layers(
        self, unit: FitUnit, cfg: Any, hyper: dict[str, Any], originals: list[nn.Module],
        masks: list[torch.Tensor], weights: list[torch.Tensor], ctx: FitContext,
    ) -> list[CompressedModule]:
        """The fitted layers: `weights` kept where `masks` say. Records the per-matrix kept counts in
        `hyper` first, because `build` sizes the stored values by them (also when loading)."""
        hyper["kept"] = kept_counts(masks)
        return fill_masked(self.build(unit, cfg, hyper, originals), originals, masks, weights, unit.names, ctx.log)


@register
class Prune(MaskedMethod):
    name = "prune"
    Config = PruneConfig

    def stats_needed(self, cfg: PruneConfig) -> tuple[str, ...]:
        return ("act_sq",) if cfg.score == "wanda" else ()

    def solve(self, unit: FitUnit, cfg: PruneConfig) -> dict[str, Any]:
        if cfg.score == "wanda" and "embedding" in unit.kinds:
            raise OffcompError(
                f"group {unit.label!r}: score 'wanda' needs input activations, which embeddings do not have; "
                "use score: magnitude for embeddings"
            )
        return super().solve(unit, cfg)

    def fit(
        self, unit: FitUnit, cfg: PruneConfig, hyper: dict[str, Any], originals: list[nn.Module], ctx: FitContext
    ) -> list[CompressedModule]:
        dev = ctx.device
        scores = []
        for name, (_, m), orig in zip(unit.names, unit.shapes, originals):
            s = orig.weight.detach().to(device=dev, dtype=torch.float32).abs()
            if cfg.score == "wanda":
                s = s * input_sq_norms(ctx.stats, name, m, unit.label).sqrt().to(device=dev, dtype=s.dtype)[None, :]
            scores.append(s)
        keep = int(hyper["keep"])
        if cfg.pattern is not None:
            n, m = pattern_nm(cfg.pattern)
            masks = [nm_masks(s, n, m) for s in scores]
        elif cfg.compare == "row":
            masks = row_masks(scores, row_quotas(unit.shapes, keep))
        else:
            flat = keep_exactly(torch.cat([s.flatten() for s in scores]), keep)
            masks = [m.view(s.shape) for m, s in zip(torch.split(flat, [s.numel() for s in scores]), scores)]
        del scores
        return self.masked_layers(unit, cfg, hyper, originals, masks, [o.weight.detach() for o in originals], ctx)
