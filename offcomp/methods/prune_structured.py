"""`prune-structured`: remove whole FFN neurons (or whole attention heads) and really shrink the matrices.

A block is a chain *producers → consumer*: the producers (mlp.gate and mlp.up; BERT's mlp.up; or
attn.q, attn.k, attn.v) write an intermediate activation that only the consumer (mlp.down; attn.o)
reads. Removing channel g means dropping row g of every producer and column g of the consumer; the
intermediate activation is then narrower everywhere, which works because LlamaMLP / BertIntermediate
→ BertOutput only chain the linears, and the attention modules of transformers 5.x reshape with
`view(..., -1, head_dim)` so fewer heads flow through without touching model code.

Plans. One joint group per kind of block, producers listed before the consumer:

    - modules: [mlp.gate, mlp.up, mlp.down]   # BERT: [mlp.up, mlp.down]
      joint: true
      method: prune-structured
      cr: 2

The method splits the unit's names into blocks by layer (the name up to its last numeric part,
e.g. `model.layers.3`); in each block the *last* module in plan order is the consumer. Shapes are
checked (every producer reads what the consumer writes, and they agree on the channel count), but
BERT attention is square, so the order of `modules:` is what identifies the consumer there.

Channel groups. FFN (`head_dim` unset): a group is one neuron (one row of each producer, one
column of the consumer). Attention (`head_dim: 64`): a group is one key/value head together with
the query heads that read it (GQA), so `num_key_value_groups` stays valid; with N = k rows / head_dim
groups, each module gives rows/N (producers) or columns/N (consumer) per group.

Budget: the fraction of the group's parameters kept. Stored = Σ_layers kept_groups·cost, with cost
= Σ_producers rows_per_group·in + cols_per_group·out (the real smaller matrices; biases and the
small integer index buffers are not counted). `allocation`:
  - "uniform": the same number of groups in every layer (the largest that fits the budget);
    `rank: k` keeps k groups per layer, `rank: [k0, k1, ...]` one count per layer.
  - "global": one ranking across layers (layer-adaptive; every layer keeps at least one group);
    the per-layer counts are only known after fitting and `fit` writes them into `hyper["keep"]`
    (the recorded hyper-parameters), which `build` needs at load time.

Scores (`score`):
  - "magnitude": product of the Frobenius norms of the group's rows/columns in every module (for a
    gated FFN ‖gate_g‖·‖up_g‖·‖down_g‖, the scale of the neuron's contribution).
  - "wanda": ‖W_c[:, g] · ‖h_g‖‖_F, the consumer's columns weighted by the norm of the activation
    that flows through them (from stats of the consumer: "act_sq" or the diagonal of "xtx", see
    `prune`): exactly the energy the group adds to the block output over the calibration tokens,
    cross terms aside.
Measured on smollm2-135m (all 30 FFNs, ratio 0.9, WikiText-2 test 16×1024 tokens, dense 22.9):
magnitude 16245, wanda 27.0. The weight norms miss the few "massive activation" neurons (in
layer 0 the magnitude choice dropped 46 % of the down_proj input energy), so use wanda when a
capture is available.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from ..errors import OffcompError
from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, Method, MethodConfig, register
from .prune import input_sq_norms


class PruneStructuredConfig(MethodConfig):
    score: Literal["magnitude", "wanda"] = Field("magnitude",
        description="magnitude or Wanda (activation-aware) channel score")
    allocation: Literal["uniform", "global"] = Field("uniform",
        description="same share removed per layer, or ranked across layers")
    head_dim: int | None = Field(None, gt=0, description="unset: FFN neurons; set: attention heads of this size")


class _SubsetLinear(CompressedModule):
    """A linear layer holding `kept` rows (`kept_dim` 0) or columns (1) of the original weight, at the
    original positions `index`; in_features / out_features stay the original sizes."""

    kept_dim: ClassVar[int]

    def __init__(self, in_features: int, out_features: int, kept: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # original sizes
        shape = [out_features, in_features]
        shape[self.kept_dim] = kept
        self.weight = nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(shape[0], dtype=dtype, device=device)) if bias else None
        self.register_buffer("index", torch.zeros(kept, dtype=torch.int64, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def to_dense(self) -> torch.Tensor:
        w = self.weight.new_zeros(self.out_features, self.in_features)
        return w.index_copy(self.kept_dim, self.index, self.weight)


class RowSubsetLinear(_SubsetLinear):
    """A producer with only the kept rows: its output is the narrowed activation (len(index) channels)."""

    kept_dim = 0

    def dense_module(self) -> nn.Module:
        """Full-width nn.Linear (removed rows and their biases zero); export replaces the whole block."""
        if self.bias is None:
            return super().dense_module()
        w = self.to_dense().detach()
        lin = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.clone())
        lin.bias = nn.Parameter(self.bias.detach().new_zeros(self.out_features).index_copy(0, self.index,
                                                                                          self.bias.detach()))
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.weight.shape[0]} of {self.out_features}, bias={self.bias is not None}"


class ColumnSubsetLinear(_SubsetLinear):
    """The consumer with only the kept columns: reads the narrowed activation, writes the full output."""

    kept_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[1]:
            # Shapes cannot tell [mlp.down, mlp.up] from [mlp.up, mlp.down]; a misordered plan shows here.
            raise OffcompError(
                f"a pruned consumer got {x.shape[-1]} input features, expected {self.weight.shape[1]}: the plan "
                "listed a producer last; list producers first and the consumer last (e.g. [mlp.gate, mlp.up, "
                "mlp.down]; on gated FFNs include mlp.gate)"
            )
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]} of {self.in_features}, out={self.out_features}, bias={self.bias is not None}"


@dataclass(frozen=True)
class Block:
    """One producers → consumer chain: positions in the unit (consumer last) and its channel groups."""

    prefix: str
    pos: list[int]
    groups: int  # N channel groups
    per_group: list[int]  # rows (producers) / columns (consumer) per group, per module
    cost: int  # stored parameters per kept group


_LAYER = re.compile(r"^(.*\.\d+)\.")


def blocks_of(unit: FitUnit, cfg: PruneStructuredConfig) -> list[Block]:
    """Split the unit into per-layer blocks and check that each is a producers → consumer chain."""
    if not unit.joint:
        raise OffcompError(
            f"group {unit.label!r}: prune-structured removes neurons across a block's matrices together; "
            "give joint: true and list producers then consumer (e.g. modules: [mlp.gate, mlp.up, mlp.down])"
        )
    by_prefix: dict[str, list[int]] = {}
    for i, name in enumerate(unit.names):
        m = _LAYER.match(name)
        by_prefix.setdefault(m.group(1) if m else "", []).append(i)
    blocks = []
    for prefix, pos in by_prefix.items():
        where = f"group {unit.label!r}, block {prefix or '(top level)'}"
        if len(pos) < 2:
            raise OffcompError(
                f"{where}: only {unit.names[pos[0]]} matched; a block needs its producers and its consumer "
                "(e.g. mlp.gate, mlp.up, mlp.down)"
            )
        *prod, cons = pos
        out_c, in_c = unit.shapes[cons]
        for p in prod:
            rows, cols = unit.shapes[p]
            if cols != out_c:
                raise OffcompError(
                    f"{where}: {unit.names[p]} reads {cols} features but the consumer {unit.names[cons]} writes "
                    f"{out_c}; list the producers first and the consumer last (e.g. [mlp.gate, mlp.up, mlp.down]) "
                    "and keep FFN and attention in separate groups"
                )
        widths = [unit.shapes[p][0] for p in prod] + [in_c]
        if cfg.head_dim is None:
            if len(set(widths)) != 1:
                raise OffcompError(
                    f"{where}: producers write {widths[:-1]} channels and the consumer reads {in_c}; FFN pruning "
                    "needs them equal (for attention heads set the option head_dim)"
                )
            n = in_c
        else:
            smallest = min(widths[:-1])
            if smallest % cfg.head_dim:
                raise OffcompError(f"{where}: head_dim {cfg.head_dim} does not divide {smallest} rows")
            n = smallest // cfg.head_dim
            if any(w % n for w in widths):
                raise OffcompError(f"{where}: widths {widths} do not split into {n} key/value head groups")
        per_group = [w // n for w in widths]
        cost = sum(g * unit.shapes[p][1] for g, p in zip(per_group[:-1], prod)) + per_group[-1] * out_c
        blocks.append(Block(prefix, pos, n, per_group, cost))
    return blocks


def _check_counts(unit: FitUnit, blocks: list[Block], keep: list[int]) -> list[int]:
    for b, k in zip(blocks, keep):
        if not 1 <= k <= b.groups:
            raise OffcompError(
                f"group {unit.label!r}: block {b.prefix} would keep {k} of its {b.groups} channel groups; "
                f"give between 1 and {b.groups}"
            )
    if sum(k * b.cost for b, k in zip(blocks, keep)) >= unit.original_params:
        raise OffcompError(f"group {unit.label!r}: {unit.budget} keeps every channel group (saves nothing)")
    return keep


@register
class PruneStructured(Method):
    name = "prune-structured"
    Config = PruneStructuredConfig
    joint_shapes = "any"
    kinds = ("linear",)
    # Removes channels (neurons, heads) of separate projections: a fused QKV / gate-up matrix hides
    # which rows belong together, so plan_units refuses fused projections (offcomp.adapters.FUSED).
    needs_channels = True

    def stats_needed(self, cfg: PruneStructuredConfig) -> tuple[str, ...]:
        return ("act_sq",) if cfg.score == "wanda" else ()

    def solve(self, unit: FitUnit, cfg: PruneStructuredConfig) -> dict[str, Any]:
        blocks = blocks_of(unit, cfg)
        b = unit.budget
        base = {"channel": "neuron" if cfg.head_dim is None else "kv-head group", "groups": [x.groups for x in blocks]}
        if b.kind == "rank":
            if cfg.allocation == "global":
                raise OffcompError(f"group {unit.label!r}: a rank fixes the per-layer counts; use allocation: uniform")
            keep = list(b.value) if isinstance(b.value, list) else [b.value] * len(blocks)
            if len(keep) != len(blocks):
                raise OffcompError(f"group {unit.label!r}: rank list has {len(keep)} entries for {len(blocks)} layers")
            return {**base, "keep": _check_counts(unit, blocks, keep)}
        target = b.target_params(unit.original_params)
        if cfg.allocation == "uniform":
            k = target // sum(x.cost for x in blocks)
            if k < 1:
                raise OffcompError(f"group {unit.label!r}: {b} leaves less than one channel per layer; raise it")
            return {**base, "keep": _check_counts(unit, blocks, [k] * len(blocks))}
        if len({x.cost for x in blocks}) != 1:
            raise OffcompError(f"group {unit.label!r}: allocation global needs layers of one shape; use uniform")
        total = target // blocks[0].cost
        if total < len(blocks):
            raise OffcompError(f"group {unit.label!r}: {b} leaves less than one channel per layer; raise the budget")
        return {**base, "keep": None, "total": int(total)}

    def stored_params(self, unit: FitUnit, cfg: PruneStructuredConfig, hyper: dict[str, Any]) -> int:
        blocks = blocks_of(unit, cfg)
        if hyper.get("keep") is None:
            return hyper["total"] * blocks[0].cost
        return sum(k * x.cost for k, x in zip(hyper["keep"], blocks))

    def build(
        self, unit: FitUnit, cfg: PruneStructuredConfig, hyper: dict[str, Any], originals: list[nn.Module]
    ) -> list[CompressedModule]:
        if hyper.get("keep") is None:
            raise OffcompError(f"group {unit.label!r}: per-layer counts missing from the manifest; re-run compress")
        layers: list[CompressedModule | None] = [None] * len(unit.names)
        for blk, k in zip(blocks_of(unit, cfg), hyper["keep"]):
            cons = blk.pos[-1]
            for j, p in enumerate(blk.pos):
                orig, (rows, cols) = originals[p], unit.shapes[p]
                kw = {"dtype": orig.weight.dtype, "device": orig.weight.device}
                has_bias = getattr(orig, "bias", None) is not None
                cls = ColumnSubsetLinear if p == cons else RowSubsetLinear
                layers[p] = cls(cols, rows, k * blk.per_group[j], has_bias, **kw)
        return layers  # type: ignore[return-value]

    def fit(
        self, unit: FitUnit, cfg: PruneStructuredConfig, hyper: dict[str, Any], originals: list[nn.Module],
        ctx: FitContext,
    ) -> list[CompressedModule]:
        blocks = blocks_of(unit, cfg)
        scores = [self._scores(unit, cfg, blk, originals, ctx) for blk in blocks]
        if hyper.get("keep") is None:
            hyper["keep"] = _global_counts(scores, int(hyper["total"]))
        layers = self.build(unit, cfg, hyper, originals)
        for blk, s, k in zip(blocks, scores, hyper["keep"]):
            kept = torch.sort(torch.sort(s, descending=True, stable=True).indices[:k]).values
            for j, p in enumerate(blk.pos):
                orig, layer, g = originals[p], layers[p], blk.per_group[j]
                idx = (kept[:, None] * g + torch.arange(g)[None, :]).flatten().to(orig.weight.device)
                layer.index.copy_(idx)
                dim = layer.kept_dim
                layer.weight.data.copy_(orig.weight.detach().index_select(dim, idx))
                if layer.bias is not None:
                    layer.bias.data.copy_(orig.bias.detach() if dim == 1 else orig.bias.detach()[idx])
            ctx.log(f"{blk.prefix}: kept {k}/{blk.groups} channel groups")
        return layers

    def _scores(self, unit: FitUnit, cfg: PruneStructuredConfig, blk: Block, originals: list[nn.Module],
                ctx: FitContext) -> torch.Tensor:
        """One score per channel group of the block (fp64, on the CPU)."""
        n, cons = blk.groups, blk.pos[-1]
        wc = originals[cons].weight.detach().to(torch.float64)
        if cfg.score == "wanda":
            act = input_sq_norms(ctx.stats, unit.names[cons], wc.shape[1], unit.label).to(wc.device)
            return (wc.pow(2).sum(0) * act).view(n, -1).sum(1).sqrt().cpu()
        score = wc.pow(2).sum(0).view(n, -1).sum(1).sqrt()
        for p in blk.pos[:-1]:
            w = originals[p].weight.detach().to(torch.float64)
            score = score * w.pow(2).view(n, -1).sum(1).sqrt()
        return score.cpu()


def _global_counts(scores: list[torch.Tensor], total: int) -> list[int]:
    """Per-layer counts from one ranking across layers; each layer's best group is kept first."""
    counts = [1] * len(scores)
    rest = torch.cat([torch.sort(s, descending=True, stable=True).values[1:] for s in scores])
    owner = torch.cat([torch.full((s.numel() - 1,), i) for i, s in enumerate(scores)])
    top = torch.sort(rest, descending=True, stable=True).indices[: total - len(scores)]
    for i, c in zip(*torch.unique(owner[top], return_counts=True)):
        counts[int(i)] += int(c)
    return counts
