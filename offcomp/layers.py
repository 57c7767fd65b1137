"""Replacement modules shared by several methods. They hold factors, never fitting code.

Every replacement subclasses `CompressedModule`, so downstream code (fine-tuning, export) can find
compressed layers with `isinstance` and rebuild a dense weight with `to_dense()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CompressedModule(nn.Module):
    """Marker base for replacement layers. `kind` is "linear" or "embedding"."""

    kind: str = "linear"

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
