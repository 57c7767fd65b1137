"""`ae`: autoencoder compression of weight matrices (Banaei et al., "Revisiting Offline
Compression", EACL 2023). The layers live in `ae_layers.py` and the training loop in `ae_train.py`,
both shared with `ae-embed` (`ae_embedding.py`).

Every row wᵢ of W (n × m) is one training sample; in a joint group the rows of all the group's
matrices are stacked (they share the input size m). An encoder m → 8x → 4x → d maps a row to a
code zᵢ, a decoder d → 2x → 4x → m (LeakyReLU between layers, tanh at the end) maps it back, and the
result is rescaled to the stored norm ‖wᵢ‖ ("enforce norm"): the decoder only has to learn
directions. After training the encoder is thrown away; what is stored is

    latents (n × d) + decoder parameters (shared by the whole joint group) + row norms (n).

Budget: with the paper's coupling d = x the stored count is the quadratic
10x² + (n + 4m + 6)x + (m + n); `solve` takes the largest x that fits. With `fill_budget` (default)
what that leaves is spent too: first the decoder width x grows (steps of ~4m + 16x), then the
latent size d (steps of n + 2x), so no single step still fits and `ae` is comparable with `svd` at
the same `cr`/`ratio` (on the paper's joint groups both land within 1 % of the target; the strict
coupling can undershoot by a few percent). `rank` sets d directly, with x = d (the paper's
coupling) unless the `width` option gives x. With `width` and a cr/ratio budget, d is solved.

Departures from the reference code, on purpose:
- Early stopping selects on `ctx.validate` (validation PPL), never on the test split; without a
  validator it selects on the training reconstruction loss.
- In a joint group every layer keeps its own row norms (the reference reused layer 0's).
- `scale="fit"` (option) stores, in place of ‖wᵢ‖, the least-squares scale ⟨ûᵢ, wᵢ⟩ = cos·‖wᵢ‖ of
  the decoded direction ûᵢ: same storage, error (1 − cos²)‖wᵢ‖² instead of 2(1 − cos)‖wᵢ‖², which
  matters when directions are poor (high compression), where enforcing the full norm adds noise.
- `arch="linear"` is one linear map on each side (m → d → m): a deeper stack without activations is
  the same rank-d map with more stored parameters, so it can only be worse at equal budget.

Speed: the optimiser step dominates at the paper's batch 16, so Adam runs fused (3x faster on CPU).
On smollm2-135m at cr 10, 30 epochs on all 30 mlp.down (17280 rows × 1536) take ~4.5 CPU-minutes,
all 30 mlp.gate (46080 × 576) ~4; each validation check (4096 tokens) adds ~25 s. bf16 autocast
is an option but 2.6x slower on CPUs without native bf16 (AVX512-BF16/AMX).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..errors import OffcompError
from ..layers import CompressedModule
from ..registry import FitContext, FitUnit, Method, register
from .ae_layers import AEEmbedding, AELinear, build_decoded, fill_decoded
from .ae_train import (
    DataLossConfig,
    cos_rmse_loss,
    data_loss,
    data_stats,
    encode_all,
    largest,
    pca_init,
    seeded_autoencoder,
    train_unit_autoencoder,
    whitening_matrix,
)
from .lowrank import stacked_weight

__all__ = ["AE", "AEConfig", "AEEmbedding", "AELinear", "ae_stored", "cos_rmse_loss"]


class AEConfig(DataLossConfig):
    arch: Literal["mlp", "linear"] = Field("mlp", description="mlp: the paper's nonlinear AE; linear: m→d→m")
    width: int | None = Field(None, gt=0, description="decoder width x (default: solved from the budget, d = x)")
    fill_budget: bool = Field(True, description="widen x into the budget left after the d = x solution")
    init: Literal["auto", "random", "pca"] = Field(
        "auto", description="auto: pca for arch=linear (start at the best rank-d affine fit), random for mlp")
    scale: Literal["norm", "fit"] = Field(
        "norm", description="norm: rows rescaled to ‖wᵢ‖ (the paper); fit: to the least-squares ⟨ûᵢ, wᵢ⟩")
    epochs: int = Field(30, gt=0, description="training epochs over the weight rows")
    batch_size: int = Field(16, gt=0, description="weight rows per training step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    lr_step: int = Field(10, gt=0, description="StepLR step (epochs)")
    lr_gamma: float = Field(0.8, gt=0, le=1, description="StepLR decay factor")
    cos_weight: float = Field(0.9091, ge=0, description="weight of the cosine (direction) loss term")
    rmse_weight: float = Field(0.0909, ge=0, description="weight of the RMSE loss term")
    negative_slope: float = Field(0.01, ge=0, description="LeakyReLU slope")
    bf16: bool = Field(False, description="bf16 autocast for training on CPU (only fast with AVX512-BF16/AMX)")
    validate_every: int = Field(5, gt=0, description="epochs between checks (validation or training loss)")
    patience: int | None = Field(None, gt=0, description="stop after this many checks without improvement")

    @model_validator(mode="after")
    def _width_needs_mlp(self) -> AEConfig:
        if self.width is not None and self.arch != "mlp":
            raise ValueError("width applies to arch=mlp only (the linear AE has no hidden layers)")
        if self.init == "pca" and self.arch != "linear":
            raise ValueError("init=pca needs arch=linear")
        return self


def _linear_layers(sizes: list[int], act: Callable[[], nn.Module], last: nn.Module | None) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(act())
    if last is not None:
        mods.append(last)
    return nn.Sequential(*mods)


def make_encoder(m: int, d: int, x: int, cfg: AEConfig) -> nn.Module:
    if cfg.arch == "linear":
        return nn.Linear(m, d)
    return _linear_layers([m, 8 * x, 4 * x, d], lambda: nn.LeakyReLU(cfg.negative_slope),
                          nn.LeakyReLU(cfg.negative_slope))


def make_decoder(d: int, m: int, x: int, cfg: AEConfig) -> nn.Module:
    if cfg.arch == "linear":
        return nn.Linear(d, m)
    return _linear_layers([d, 2 * x, 4 * x, m], lambda: nn.LeakyReLU(cfg.negative_slope), nn.Tanh())


def decoder_params(d: int, x: int, m: int, arch: str) -> int:
    if arch == "linear":
        return d * m + m
    return (d * 2 * x + 2 * x) + (2 * x * 4 * x + 4 * x) + (4 * x * m + m)


@torch.no_grad()
def projection_scale(decoder: nn.Module, Z: torch.Tensor, X: torch.Tensor, S: torch.Tensor | None = None,
                     chunk: int = 8192) -> torch.Tensor:
    """Per-row least-squares scale of the decoded unit directions ûᵢ: sᵢ = ⟨ûᵢ, wᵢ⟩ (= cos·‖wᵢ‖), or,
    measured after the whitening S, ⟨ûᵢS, wᵢS⟩ / ‖ûᵢS‖²."""
    out = []
    for i in range(0, len(Z), chunk):
        u, w = F.normalize(decoder(Z[i:i + chunk]), dim=1), X[i:i + chunk]
        if S is not None:
            u, w = u @ S, w @ S
            out.append((u * w).sum(dim=1) / u.pow(2).sum(dim=1).clamp_min(1e-30))
        else:
            out.append((u * w).sum(dim=1))
    return torch.cat(out)


def ae_stored(n: int, m: int, d: int, x: int, arch: str) -> int:
    return n * d + decoder_params(d, x, m, arch) + n


@register
class AE(Method):
    name = "ae"
    Config = AEConfig
    joint_shapes = "columns"

    def stats_needed(self, cfg: AEConfig) -> tuple[str, ...]:
        return data_stats(cfg)

    def solve(self, unit: FitUnit, cfg: AEConfig) -> dict[str, Any]:
        n, m = sum(s[0] for s in unit.shapes), unit.shapes[0][1]
        b, orig = unit.budget, unit.original_params
        if b.kind == "rank":
            if not isinstance(b.value, int):
                raise OffcompError(f"group {unit.label!r}: ae takes one integer rank (the latent size d)")
            d = b.value
            x = cfg.width or (d if cfg.arch == "mlp" else 0)
        else:
            target = b.target_params(orig)
            if cfg.width is not None or cfg.arch == "linear":
                x = cfg.width or 0
                d = largest(lambda v: ae_stored(n, m, v, x, cfg.arch), target)
            else:
                x = d = largest(lambda v: ae_stored(n, m, v, v, cfg.arch), target)
                if d >= 1 and cfg.fill_budget:
                    x = largest(lambda v: ae_stored(n, m, d, v, cfg.arch), target, lo=d)
                    d = largest(lambda v: ae_stored(n, m, v, x, cfg.arch), target, lo=d)
            if d < 1:
                raise OffcompError(f"group {unit.label!r}: {b} leaves less than latent size 1 for ae "
                                   f"(decoder alone stores {ae_stored(n, m, 0, x, cfg.arch)}); raise the budget")
        stored = ae_stored(n, m, d, x, cfg.arch)
        if stored >= orig:
            raise OffcompError(f"group {unit.label!r}: ae with latent {d}, width {x} stores {stored} >= {orig} "
                               "original parameters (saves nothing); lower the rank/width or raise cr")
        return {"latent": d, "width": x}

    def stored_params(self, unit: FitUnit, cfg: AEConfig, hyper: dict[str, Any]) -> int:
        # A separate unit holds one matrix, a joint one shares its decoder: one formula for both.
        n, m = sum(s[0] for s in unit.shapes), unit.shapes[0][1]
        return ae_stored(n, m, hyper["latent"], hyper["width"], cfg.arch)

    def build(self, unit: FitUnit, cfg: AEConfig, hyper: dict[str, Any],
              originals: list[nn.Module]) -> list[CompressedModule]:
        m, d, x = unit.shapes[0][1], hyper["latent"], hyper["width"]
        return build_decoded(unit, d, lambda: make_decoder(d, m, x, cfg), originals, norms=True)

    def fit(self, unit: FitUnit, cfg: AEConfig, hyper: dict[str, Any], originals: list[nn.Module],
            ctx: FitContext) -> list[CompressedModule]:
        m, d, x = unit.shapes[0][1], hyper["latent"], hyper["width"]
        X = stacked_weight(originals, ctx.device, torch.float32)
        norms = X.norm(dim=1)
        loss, weights = data_loss(cos_rmse_loss(cfg.cos_weight, cfg.rmse_weight), unit, cfg, ctx)
        S = whitening_matrix(unit, ctx) if cfg.loss_space == "whitened" else None
        encoder, decoder = seeded_autoencoder(ctx.seed, ctx.device, lambda: make_encoder(m, d, x, cfg),
                                              lambda: make_decoder(d, m, x, cfg))
        pca = cfg.arch == "linear" and cfg.init != "random"
        if pca:
            pca_init(encoder, decoder, X, S)

        def reconstruct(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            u = F.normalize(out, dim=1)
            if S is not None and cfg.scale == "fit":
                # Whitened rows have other norms than ‖wᵢ‖: enforcing ‖wᵢ‖ would undo what the whitened
                # loss asks for, so training already uses the stored least-squares scale.
                uS, wS = u @ S, X[idx] @ S
                return u * ((uS * wS).sum(dim=1) / uS.pow(2).sum(dim=1).clamp_min(1e-30))[:, None]
            return u * norms[idx, None]

        def layers() -> list[CompressedModule]:
            built = self.build(unit, cfg, hyper, originals)
            Z = encode_all(encoder, X)
            scale = norms if cfg.scale == "norm" else projection_scale(decoder, Z, X, S)
            return fill_decoded(built, originals, unit, Z, decoder, scale)

        train_unit_autoencoder(X, encoder, decoder, reconstruct, loss, cfg, unit, ctx, layers, weights=weights,
                               select_epoch=cfg.epochs, score_initial=pca)
        return layers()
