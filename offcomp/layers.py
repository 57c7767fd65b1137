"""Replacement modules shared by several methods. They hold factors, never fitting code.

Every replacement subclasses `CompressedModule`, so downstream code (fine-tuning, export) can find
compressed layers with `isinstance` and rebuild a dense weight with `to_dense()`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class CompressedModule(nn.Module):
    """Marker base for replacement layers. `kind` is "linear" or "embedding"."""

    kind: str = "linear"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Code written for the dense module reads `.weight` (transformers' `_init_weights` of
            # GPT-2 reaches into `mlp.c_proj.weight` after every load): give it a detached dense
            # copy, never a tensor of the model (writing into it changes nothing).
            if name != "weight" or self.__dict__.get("_densifying"):
                raise  # (a to_dense that reads self.weight, before it is registered, must not loop)
            self.__dict__["_densifying"] = True
            try:
                return self.to_dense().detach()
            finally:
                del self.__dict__["_densifying"]

    def to_dense(self) -> torch.Tensor:
        """The weight this module stands for, shaped like the original (out, in) / (num, dim)."""
        raise NotImplementedError

    def dense_module(self) -> nn.Module:
        """An ordinary nn.Linear / nn.Embedding computing the same function (for export)."""
        w = self.to_dense().detach()
        if self.kind == "embedding":
            emb = nn.Embedding(w.shape[0], w.shape[1], padding_idx=getattr(self, "padding_idx", None))
            emb.weight = nn.Parameter(w.clone())
            return emb
        bias = getattr(self, "bias", None)
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.clone())
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().clone())
        return lin


class LowRankLinear(CompressedModule):
    """y = x Vᵀ Uᵀ + b with U (out × r) and V (r × in).

    Applies the two thin matrices in turn, (in + out)·r multiply-adds per token instead of in·out.
    In a joint group V is one shared Parameter object referenced by every layer of the group.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        V: nn.Parameter | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.U = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.V = V if V is not None else nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.U @ self.V

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class LowRankEmbedding(CompressedModule):
    """Embedding table E ≈ U V: look up a rank-r code (U, num × r), then project it (V, r × dim)."""

    kind = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        V: nn.Parameter | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.U = nn.Parameter(torch.zeros(num_embeddings, rank, dtype=dtype, device=device))
        self.V = V if V is not None else nn.Parameter(torch.zeros(rank, embedding_dim, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.U, self.padding_idx) @ self.V

    def to_dense(self) -> torch.Tensor:
        return self.U @ self.V

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


Rows = range | tuple[int, ...]  # a slice's rows in a fused matrix: contiguous, or interleaved per head


def take_rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The rows of `t` (along dim 0) a slice holds: a view for a contiguous range, a copy otherwise."""
    if isinstance(rows, range) and rows.step == 1:
        return t[rows.start:rows.stop]
    return t[torch.as_tensor(rows, dtype=torch.long, device=t.device)]


class FusedSlices(CompressedModule):
    """A fused projection (q/k/v or gate/up rows in one matrix) held as one module per row slice,
    so each slice can be compressed on its own (a plan role like `attn.qkv:k`). The output is the
    fused matrix's: the slices' outputs concatenated, then put back in the fused row order when the
    slices interleave (GPT-NeoX/Bloom/Falcon: [q k v] per head). Slices nobody compressed stay plain
    nn.Linear parts holding their rows."""

    def __init__(self, parts: dict[str, nn.Module], rows: dict[str, Rows] | None = None) -> None:
        super().__init__()
        self.order = list(parts)
        self.parts = nn.ModuleDict(parts)
        # Fused row i is row inverse[i] of the concatenated slice outputs; None when they are in order.
        # A plain CPU tensor, not a buffer: the container is rebuilt from the model's structure on
        # load, on the meta skeleton, where a buffer would hold no value (transformers leaves
        # non-persistent buffers of a meta skeleton uninitialised).
        self.inverse: torch.Tensor | None = None
        self._on: dict[torch.device, torch.Tensor] = {}
        if rows is not None:
            cat = [i for k in self.order for i in rows[k]]
            if sorted(cat) != list(range(len(cat))):
                raise ValueError(f"fused slices {self.order} do not cover each of {len(cat)} rows exactly once")
            if cat != list(range(len(cat))):
                # explicitly on the CPU: under transformers' `with torch.device("meta")` factories make meta
                self.inverse = torch.empty(len(cat), dtype=torch.long, device="cpu")
                self.inverse[torch.tensor(cat, device="cpu")] = torch.arange(len(cat), device="cpu")

    @classmethod
    def split(cls, weight: torch.Tensor, bias: torch.Tensor | None, rows: dict[str, Rows]) -> FusedSlices:
        parts: dict[str, nn.Module] = {}
        for k, r in rows.items():
            lin = nn.Linear(weight.shape[1], len(r), bias=bias is not None, device=weight.device, dtype=weight.dtype)
            lin.weight = nn.Parameter(take_rows(weight.detach(), r).clone())
            if bias is not None:
                lin.bias = nn.Parameter(take_rows(bias.detach(), r).clone())
            parts[k] = lin
        return cls(parts, rows)

    def _fused_order(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if self.inverse is None:
            return t
        if t.device not in self._on:
            self._on[t.device] = self.inverse.to(t.device)
        return t.index_select(dim, self._on[t.device])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused_order(torch.cat([self.parts[k](x) for k in self.order], dim=-1), -1)

    def to_dense(self) -> torch.Tensor:
        return self._fused_order(torch.cat([p.to_dense() if isinstance(p, CompressedModule) else p.weight
                                            for p in (self.parts[k] for k in self.order)]), 0)

    def dense_module(self) -> nn.Module:
        w = self.to_dense().detach()
        parts = [self.parts[k] for k in self.order]
        biases = [getattr(p, "bias", None) for p in parts]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=any(b is not None for b in biases), device=w.device,
                        dtype=w.dtype)
        lin.weight = nn.Parameter(w.clone())
        if lin.bias is not None:
            lin.bias = nn.Parameter(self._fused_order(torch.cat([b.detach() if b is not None else w.new_zeros(_rows(p))
                                                                 for b, p in zip(biases, parts)]), 0))
        return lin


def _rows(part: nn.Module) -> int:
    return (part.to_dense() if isinstance(part, CompressedModule) else part.weight).shape[0]
