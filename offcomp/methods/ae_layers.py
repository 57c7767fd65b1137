"""Replacement layers of the autoencoder methods (`ae`, `ae-embed`): a weight stored as per-row
latent codes + a decoder (+ optional per-row norms), decoded on demand. No fitting code here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import CompressedModule
from ..registry import FitUnit
from .lowrank import split_rows


class DecodedWeight(CompressedModule):
    """A weight stored as per-row codes + a decoder (+ optional per-row norms).

    The decoder is an ordinary submodule; in a joint group the very same object is registered in
    every layer, so its tensors are one set of Parameters (saved once, trained once). In train mode
    (or whenever autograd needs the graph) the weight is decoded on every call; otherwise it is
    decoded once and cached until a parameter changes (in-place update, load, `.to()`) or `train()`
    is called — eval-mode inference then costs what a dense layer costs.
    """

    def __init__(self, rows: int, cols: int, latent: int, decoder: nn.Module, norms: bool,
                 dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        super().__init__()
        self.rows, self.cols, self.latent = rows, cols, latent
        self.latents = nn.Parameter(torch.zeros(rows, latent, dtype=dtype, device=device))
        self.decoder = decoder
        self.norms = nn.Parameter(torch.zeros(rows, dtype=dtype, device=device)) if norms else None
        self._cache: torch.Tensor | None = None
        self._cache_key: tuple[Any, ...] | None = None

    def decode(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded rows (all, or those in `idx`), rescaled to the stored norms when there are any."""
        z = self.latents if idx is None else self.latents[idx]
        w = self.decoder(z)
        if self.norms is not None:
            norms = self.norms if idx is None else self.norms[idx]
            w = F.normalize(w, dim=-1) * norms[:, None]
        return w

    def _may_cache(self) -> bool:
        if self.training:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def cached_weight(self) -> torch.Tensor:
        # data_ptr catches `.to()`/loads that swap storage, _version catches in-place updates.
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        if self._cache is None or key != self._cache_key:
            # A normal tensor even under inference_mode, so a later frozen-layer training step
            # (grad enabled, these parameters frozen) can still save it for backward.
            with torch.inference_mode(False), torch.no_grad():
                self._cache = self.decode()
            self._cache_key = key
        return self._cache

    def train(self, mode: bool = True) -> DecodedWeight:
        self._cache, self._cache_key = None, None
        return super().train(mode)

    def to_dense(self) -> torch.Tensor:
        return self.decode()


class AELinear(DecodedWeight):
    """y = x Ŵᵀ + b with Ŵ decoded from per-output-row codes."""

    def __init__(self, in_features: int, out_features: int, latent: int, decoder: nn.Module, bias: bool,
                 norms: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(out_features, in_features, latent, decoder, norms, dtype, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.cached_weight() if self._may_cache() else self.decode()
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, latent={self.latent}, "
                f"norms={self.norms is not None}, bias={self.bias is not None}")


class AEEmbedding(DecodedWeight):
    """Embedding table decoded from per-token codes. In training only the looked-up rows are
    decoded (a vocabulary is large, a batch touches few tokens); the padding row then gets
    gradients like any other (its code is fitted to the original, usually zero, row)."""

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, latent: int, decoder: nn.Module,
                 padding_idx: int | None = None, norms: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, latent, decoder, norms, dtype, device)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self._may_cache():
            return F.embedding(ids, self.cached_weight(), self.padding_idx)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        return F.embedding(inverse, self.decode(uniq))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, latent={self.latent}, norms={self.norms is not None}"


def build_decoded(unit: FitUnit, latent: int, make_decoder: Callable[[], nn.Module], originals: list[nn.Module],
                  norms: bool) -> list[CompressedModule]:
    """One layer per unit name; a joint unit gets ONE decoder object shared by all its layers."""
    ref = originals[0].weight
    kw = {"dtype": ref.dtype, "device": ref.device}
    shared = make_decoder().to(**kw) if unit.joint else None
    out: list[CompressedModule] = []
    for (n, m), kind, orig in zip(unit.shapes, unit.kinds, originals):
        dec = shared if shared is not None else make_decoder().to(**kw)
        if kind == "embedding":
            out.append(AEEmbedding(n, m, latent, dec, getattr(orig, "padding_idx", None), norms, **kw))
        else:
            out.append(AELinear(m, n, latent, dec, getattr(orig, "bias", None) is not None, norms, **kw))
    return out


@torch.no_grad()
def fill_decoded(layers: list[CompressedModule], originals: list[nn.Module], unit: FitUnit, latents: torch.Tensor,
                 decoder: nn.Module, norms: torch.Tensor | None) -> list[CompressedModule]:
    """Copy trained codes/decoder/norms (cast to the model's dtype) and the original biases in."""
    for i, (layer, orig, z) in enumerate(zip(layers, originals, split_rows(latents, unit))):
        layer.latents.copy_(z)
        if i == 0 or not unit.joint:
            layer.decoder.load_state_dict(decoder.state_dict())
        if norms is not None:
            layer.norms.copy_(split_rows(norms, unit)[i])
        if getattr(orig, "bias", None) is not None:
            layer.bias.copy_(orig.bias)
        layer.train(orig.training)
    return layers
