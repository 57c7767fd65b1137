"""`ae-embed`: autoencoder compression of token embeddings with the orientation loss (Bałazy et
al., "Direction is what you need: Improving Word Embedding Compression in Large Language Models",
2021).

A separate method rather than an option of `ae`, because everything differs but the training
loop: the architecture (linear, or one hidden ELU layer; no tanh, no stored norms), the loss and
all the optimiser defaults. It only accepts embeddings; only the input embedding is replaced. When
the input embedding is tied to the LM head, the core unties them before fitting (the head keeps
the original weights, as in the paper; `CompressReport.untied_embeddings` records it and the copy
counts against the savings).

Loss, with Δ = ê − e per element and α annealed linearly from 1.0 (epoch 0) to 0.1 (epoch 19, i.e.
over the first 20 epochs; then constant):

    (0.9975 / 5) · mean(1 − cos(êᵢ, eᵢ)) + 0.0025 · mean((|Δ| + 1e-10)^α)

The power is taken per element (an L_α "distance" that, as α falls, cares about getting many
coordinates nearly right rather than a few large errors; the 1e-10 keeps the gradient finite at
Δ = 0). Adam lr 1e-3, StepLR(4, 0.5), batch 32. The linear AE starts at PCA (`init`, an addition:
the paper trained from random init), and the PCA start is itself a selection candidate.

Stored = codes (n × d) + decoder (d·m + m, or d·h + h + h·m + m with a hidden layer h); `rank`
sets d, cr/ratio solve for the largest d.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..errors import OffcompError
from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, Method, MethodConfig, register
from .ae_layers import build_decoded, fill_decoded
from .ae_train import (
    LossFn,
    encode_all,
    largest,
    pca_init,
    row_weights,
    seeded_autoencoder,
    train_unit_autoencoder,
)
from .lowrank import stacked_weight


class AEEmbedConfig(MethodConfig):
    hidden: int | None = Field(None, gt=0, description="one hidden ELU layer of this size (default: linear AE)")
    init: Literal["auto", "random", "pca"] = Field(
        "auto", description="auto: pca for the linear AE (start at the best rank-d affine fit), random otherwise")
    epochs: int = Field(20, gt=0, description="training epochs over the embedding rows")
    batch_size: int = Field(32, gt=0, description="embedding rows per training step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    lr_step: int = Field(4, gt=0, description="StepLR step (epochs)")
    lr_gamma: float = Field(0.5, gt=0, le=1, description="StepLR decay factor")
    cos_weight: float = Field(0.9975 / 5, ge=0, description="weight of the orientation (cosine) loss term")
    l_weight: float = Field(0.0025, ge=0, description="weight of the mean((|Δ| + 1e-10)^α) term")
    alpha_start: float = Field(1.0, gt=0, description="exponent α of the L term at the start")
    alpha_end: float = Field(0.1, gt=0, description="exponent α of the L term after annealing")
    anneal_epochs: int = Field(20, gt=0, description="α goes alpha_start → alpha_end over these epochs")
    bf16: bool = Field(False, description="bf16 autocast for training (only fast with AVX512-BF16/AMX)")
    validate_every: int = Field(4, gt=0, description="epochs between checks (validation or training loss)")
    patience: int | None = Field(None, gt=0, description="stop after this many checks without improvement")
    row_weights: str | None = Field(None, description="statistic key giving per-token loss weights")

    @model_validator(mode="after")
    def _pca_needs_linear(self) -> AEEmbedConfig:
        if self.init == "pca" and self.hidden is not None:
            raise ValueError("init=pca needs the linear AE (no hidden option)")
        return self


def alpha_at(epoch: int, start: float, end: float, anneal_epochs: int) -> float:
    """Linear from `start` at epoch 0 to `end` at epoch anneal_epochs − 1, then `end`."""
    if anneal_epochs <= 1:
        return end
    t = min(epoch / (anneal_epochs - 1), 1.0)
    return start + (end - start) * t


def orientation_loss(cfg: AEEmbedConfig) -> LossFn:
    def loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None, epoch: int) -> torch.Tensor:
        alpha = alpha_at(epoch, cfg.alpha_start, cfg.alpha_end, cfg.anneal_epochs)
        dis = 1 - F.cosine_similarity(pred, target, dim=1)
        la = ((pred - target).abs() + 1e-10).pow(alpha).mean(dim=1)
        if w is not None:
            dis, la = dis * w, la * w
        return cfg.cos_weight * dis.mean() + cfg.l_weight * la.mean()

    return loss


def _mlp(a: int, h: int | None, b: int) -> nn.Module:
    return nn.Linear(a, b) if h is None else nn.Sequential(nn.Linear(a, h), nn.ELU(), nn.Linear(h, b))


def embed_stored(n: int, m: int, d: int, h: int | None) -> int:
    dec = d * m + m if h is None else d * h + h + h * m + m
    return n * d + dec


@register
class AEEmbed(Method):
    name = "ae-embed"
    Config = AEEmbedConfig
    joint_shapes = "columns"
    kinds = ("embedding",)

    def stats_needed(self, cfg: AEEmbedConfig) -> tuple[str, ...]:
        return (cfg.row_weights,) if cfg.row_weights else ()

    def solve(self, unit: FitUnit, cfg: AEEmbedConfig) -> dict[str, Any]:
        n, m = sum(s[0] for s in unit.shapes), unit.shapes[0][1]
        b, orig = unit.budget, unit.original_params
        if b.kind == "rank":
            if not isinstance(b.value, int):
                raise OffcompError(f"group {unit.label!r}: ae-embed takes one integer rank (the latent size d)")
            d = b.value
        else:
            d = largest(lambda v: embed_stored(n, m, v, cfg.hidden), b.target_params(orig))
            if d < 1:
                raise OffcompError(f"group {unit.label!r}: {b} leaves less than latent size 1 for ae-embed; "
                                   "raise the budget")
        stored = embed_stored(n, m, d, cfg.hidden)
        if stored >= orig:
            raise OffcompError(f"group {unit.label!r}: ae-embed with latent {d} stores {stored} >= {orig} original "
                               "parameters (saves nothing); lower the rank or raise cr")
        return {"latent": d}

    def stored_params(self, unit: FitUnit, cfg: AEEmbedConfig, hyper: dict[str, Any]) -> int:
        n, m = sum(s[0] for s in unit.shapes), unit.shapes[0][1]
        return embed_stored(n, m, hyper["latent"], cfg.hidden)

    def build(self, unit: FitUnit, cfg: AEEmbedConfig, hyper: dict[str, Any],
              originals: list[nn.Module]) -> list[CompressedModule]:
        m, d = unit.shapes[0][1], hyper["latent"]
        return build_decoded(unit, d, lambda: _mlp(d, cfg.hidden, m), originals, norms=False)

    def fit(self, unit: FitUnit, cfg: AEEmbedConfig, hyper: dict[str, Any], originals: list[nn.Module],
            ctx: FitContext) -> list[CompressedModule]:
        m, d = unit.shapes[0][1], hyper["latent"]
        X = stacked_weight(originals, ctx.device, torch.float32)
        weights = row_weights(unit, cfg.row_weights, ctx)
        encoder, decoder = seeded_autoencoder(ctx.seed, ctx.device, lambda: _mlp(m, cfg.hidden, d),
                                              lambda: _mlp(d, cfg.hidden, m))
        pca = cfg.hidden is None and cfg.init != "random"
        if pca:
            pca_init(encoder, decoder, X)

        def layers() -> list[CompressedModule]:
            built = self.build(unit, cfg, hyper, originals)
            return fill_decoded(built, originals, unit, encode_all(encoder, X), decoder, None)

        train_unit_autoencoder(X, encoder, decoder, lambda out, idx: out, orientation_loss(cfg), cfg, unit, ctx,
                               layers, weights=weights, select_epoch=max(cfg.epochs, cfg.anneal_epochs),
                               score_initial=pca)
        return layers()
