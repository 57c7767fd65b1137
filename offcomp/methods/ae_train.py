"""Training machinery shared by the trained methods (`ae`, `ae-embed`, and the refinement of
`kronecker` / `tucker`): the mini-batch loop with validation-based early stopping, PCA
initialisation, the AE loss, budget search, and the data-aware losses.

Data-aware training (options shared by those methods): the reconstruction error of a weight row
can be measured where it matters, on the layer's inputs, rather than on the weights.
- `loss_space: whitened` compares rows after multiplying by S with S Sᵀ = XᵀX (the captured Gram
  of the layer's input, as SVD-LLM whitens): ‖(ŵᵢ − wᵢ) S‖ = ‖(ŵᵢ − wᵢ) Xᵀ‖, the error of output
  channel i on the calibration tokens. S is scaled to ‖S‖²_F = m, so isotropic inputs give back
  the plain loss.
- `row_weights: fisher_row` weights each row's loss by its Fisher importance (as FWSVD weights
  rows), normalised to mean 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..errors import OffcompError
from ..registry import FitContext, FitUnit, MethodConfig

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor]


class DataLossConfig(MethodConfig):
    """Options of every method that trains against weight rows (see the module docstring)."""

    loss_space: Literal["weights", "whitened"] = Field(
        "weights", description="whitened: measure row errors on the inputs, ‖(ŵ − w)S‖ with SSᵀ = XᵀX (needs xtx)")
    row_weights: str | None = Field(None, description="statistic giving per-row loss weights, e.g. fisher_row")


class RefineConfig(DataLossConfig):
    """Options of the AE-loss refinement that `kronecker` and `tucker` may run after their optimal init."""

    refine_epochs: int = Field(0, ge=0, description="epochs of AE-loss refinement after the optimal init")
    refine_lr: float = Field(1e-4, gt=0, description="Adam learning rate of the refinement")
    refine_batch: int = Field(16, ge=1, description="weight rows per refinement step")
    validate_every: int = Field(1, ge=1, description="epochs between ctx.validate scores (early stopping)")

    @model_validator(mode="after")
    def _data_loss_needs_refinement(self) -> RefineConfig:
        if (self.loss_space != "weights" or self.row_weights) and not self.refine_epochs:
            raise ValueError("loss_space/row_weights shape the refinement loss: set refine_epochs > 0")
        return self


def data_stats(cfg: DataLossConfig) -> tuple[str, ...]:
    """The calibration statistics the data-aware options read."""
    return (("xtx",) if cfg.loss_space == "whitened" else ()) + ((cfg.row_weights,) if cfg.row_weights else ())


def cos_rmse_loss(cos_weight: float = 0.9091, rmse_weight: float = 0.0909) -> LossFn:
    """The AE paper's loss over weight rows: cos_weight · mean(1 − cos(ŵᵢ, wᵢ)) + rmse_weight · RMSE(Ŵ, W),
    optionally row-weighted."""

    def loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None, epoch: int) -> torch.Tensor:
        dis = 1 - F.cosine_similarity(pred, target, dim=1, eps=1e-8)
        se = (pred - target).pow(2).mean(dim=1)
        if w is not None:
            dis, se = dis * w, se * w
        return cos_weight * dis.mean() + rmse_weight * (se.mean() + 1e-12).sqrt()

    return loss


def whitening_matrix(unit: FitUnit, ctx: FitContext) -> torch.Tensor:
    """S (m × m, float32) with S Sᵀ ∝ XᵀX summed over the unit's distinct inputs, scaled to ‖S‖²_F = m."""
    from .svd_llm import unit_whitening

    if "embedding" in unit.kinds:
        raise OffcompError(f"group {unit.label!r}: loss_space=whitened needs layer inputs, which embeddings do not "
                           "have; use loss_space: weights")
    m = unit.shapes[0][1]
    S = unit_whitening(unit, ctx.stats, 0.0, ctx.log).apply(torch.eye(m, dtype=torch.float64))
    S = S * math.sqrt(m / float(S.pow(2).sum()))
    return S.to(device=ctx.device, dtype=torch.float32)


def data_loss(base: LossFn, unit: FitUnit, cfg: DataLossConfig, ctx: FitContext) -> tuple[LossFn, torch.Tensor | None]:
    """`base` measured as the data-aware options ask, and the per-row weights (or None)."""
    weights = row_weights(unit, cfg.row_weights, ctx)
    if cfg.loss_space == "weights":
        return base, weights
    S = whitening_matrix(unit, ctx)

    def loss(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None, epoch: int) -> torch.Tensor:
        return base(pred @ S, target @ S, w, epoch)

    return loss, weights


@dataclass
class TrainSpec:
    epochs: int
    batch_size: int
    lr: float
    lr_step: int
    lr_gamma: float
    validate_every: int
    patience: int | None
    bf16: bool


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    scored_on: str  # "validation" | "train-loss"
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (epoch, mean batch loss, score)


def encode_all(encoder: nn.Module, X: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encoder(X[i:i + chunk]) for i in range(0, len(X), chunk)])


@torch.no_grad()
def pca_init(encoder: nn.Linear, decoder: nn.Linear, X: torch.Tensor, S: torch.Tensor | None = None) -> None:
    """Start a linear AE at PCA: z = V(x − μ), x̂ = Vᵀz + μ with V the top-d right singular vectors
    of the centred rows, i.e. the best rank-d affine reconstruction in Frobenius norm. With a
    whitening S the PCA is of the rows x S (the best fit of the whitened loss), mapped back by S⁻¹."""
    Y = X if S is None else X @ S
    mu = Y.mean(dim=0)
    Yc = (Y - mu).double()
    _, vecs = torch.linalg.eigh(Yc.T @ Yc)  # m × m: cheaper than an SVD of the tall n × m matrix
    V = vecs.flip(1)[:, : encoder.out_features].T.float()
    if V.shape[0] < encoder.out_features:  # latent wider than the data's rank: pad with zeros
        V = torch.cat([V, V.new_zeros(encoder.out_features - V.shape[0], V.shape[1])])
    if S is None:
        encoder.weight.copy_(V)
        encoder.bias.copy_(-(V @ mu))
        decoder.weight.copy_(V.T)
        decoder.bias.copy_(mu)
        return
    # z = (x S − μ) Vᵀ, x̂ = (z V + μ) S⁻¹: the encoder reads x through S, the decoder writes through S⁻¹
    S_inv = torch.linalg.inv(S.double()).float()
    encoder.weight.copy_(V @ S.T)
    encoder.bias.copy_(-(V @ mu))
    decoder.weight.copy_((V @ S_inv).T)
    decoder.bias.copy_(mu @ S_inv)


def full_loss(encoder: nn.Module, decoder: nn.Module, reconstruct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              loss_fn: LossFn, X: torch.Tensor, weights: torch.Tensor | None, epoch: int,
              chunk: int = 8192) -> float:
    """Loss over all rows at once (exact, not a running batch mean), for selection without a validator."""
    with torch.no_grad():
        idx = torch.arange(len(X), device=X.device)
        pred = torch.cat([reconstruct(decoder(encoder(X[i:i + chunk])), idx[i:i + chunk])
                          for i in range(0, len(X), chunk)])
        return float(loss_fn(pred, X, weights, epoch))


def train_autoencoder(
    X: torch.Tensor,
    encoder: nn.Module,
    decoder: nn.Module,
    reconstruct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loss_fn: LossFn,
    spec: TrainSpec,
    *,
    weights: torch.Tensor | None,
    seed: int,
    score: Callable[[], float] | None,
    select_epoch: int,
    ctx: FitContext,
    label: str,
    score_initial: bool = False,
) -> TrainResult:
    """Adam + StepLR on shuffled mini-batches of rows; keeps the best state seen at the checks.

    Checks happen every `validate_every` epochs and after the last one. The score is `score()`
    (validation, e.g. PPL with the candidate layers swapped in) or, without it, the full training
    loss evaluated with the loss of epoch `select_epoch` (a fixed loss, so epochs are comparable
    even when the loss itself is annealed). The best encoder/decoder state is restored at the end.
    `reconstruct(decoder_output, row_index)` turns decoder outputs into rows (e.g. enforce norms).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = list(encoder.parameters()) + list(decoder.parameters())
    # Fused Adam: at batch 16 the optimiser step, not the matmuls, dominates (3x faster on CPU).
    opt = torch.optim.Adam(params, lr=spec.lr, fused=X.device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=spec.lr_step, gamma=spec.lr_gamma)
    n = len(X)
    best = TrainResult(0, float("inf"), "validation" if score is not None else "train-loss")
    best_state = None
    since_best = 0

    def check(epoch: int, mean_loss: float) -> bool:
        """Score the current state; keep it if best. Returns True when patience ran out."""
        nonlocal best_state, since_best
        encoder.eval()
        decoder.eval()
        s = score() if score is not None else full_loss(encoder, decoder, reconstruct, loss_fn, X, weights,
                                                          select_epoch)
        best.history.append((epoch, mean_loss, s))
        ctx.log(f"{label}: epoch {epoch} loss {mean_loss:.5f} {best.scored_on} {s:.5f}")
        if s < best.best_score:  # NaN never wins
            best.best_epoch, best.best_score, since_best = epoch, s, 0
            best_state = (copy.deepcopy(encoder.state_dict()), copy.deepcopy(decoder.state_dict()))
            return False
        since_best += 1
        return spec.patience is not None and since_best >= spec.patience

    if score_initial:
        check(0, float("nan"))
    for epoch in range(spec.epochs):
        encoder.train()
        decoder.train()
        perm = torch.randperm(n, generator=gen).to(X.device)
        total = 0.0
        for start in range(0, n, spec.batch_size):
            idx = perm[start:start + spec.batch_size]
            xb = X[idx]
            with torch.autocast(X.device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                out = decoder(encoder(xb))
            pred = reconstruct(out.float(), idx)
            loss = loss_fn(pred, xb, None if weights is None else weights[idx], epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        ctx.progress(f"{label}: training", epoch + 1, spec.epochs, {"loss": total / n})
        if (epoch + 1) % spec.validate_every and epoch + 1 != spec.epochs:
            ctx.log(f"{label}: epoch {epoch + 1} loss {total / n:.5f}")
            continue
        if check(epoch + 1, total / n):
            ctx.log(f"{label}: no improvement in {since_best} checks, stopping after epoch {epoch + 1}")
            break
    if best_state is None:
        raise OffcompError(f"group {label!r}: autoencoder training diverged (score is NaN); lower the lr option")
    encoder.load_state_dict(best_state[0])
    decoder.load_state_dict(best_state[1])
    encoder.eval()
    decoder.eval()
    ctx.log(f"{label}: kept epoch {best.best_epoch} ({best.scored_on} {best.best_score:.5f})")
    return best


def seeded_autoencoder(seed: int, device: torch.device, make_encoder: Callable[[], nn.Module],
                       make_decoder: Callable[[], nn.Module]) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder initialised from `seed` alone, on `device`. The global RNG is left as it
    was, so one unit's fit does not change what later draws see."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_encoder().to(device), make_decoder().to(device)


def train_unit_autoencoder(
    X: torch.Tensor,
    encoder: nn.Module,
    decoder: nn.Module,
    reconstruct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    loss_fn: LossFn,
    cfg: Any,
    unit: FitUnit,
    ctx: FitContext,
    layers: Callable[[], Sequence[nn.Module]],
    *,
    weights: torch.Tensor | None,
    select_epoch: int,
    score_initial: bool,
) -> TrainResult:
    """`train_autoencoder` for one unit of `ae` / `ae-embed`: the schedule from the method's config
    (epochs, batch_size, lr, lr_step, lr_gamma, validate_every, patience, bf16), scored by
    ctx.validate on the candidate replacement layers `layers()` when there is a validator."""
    score = (lambda: ctx.validate(dict(zip(unit.names, layers())))) if ctx.validate else None
    spec = TrainSpec(cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_step, cfg.lr_gamma, cfg.validate_every,
                     cfg.patience, cfg.bf16)
    return train_autoencoder(X, encoder, decoder, reconstruct, loss_fn, spec, weights=weights, seed=ctx.seed,
                             score=score, select_epoch=select_epoch, ctx=ctx, label=fit_label(unit),
                             score_initial=score_initial)


def row_weights(unit: FitUnit, key: str | None, ctx: FitContext) -> torch.Tensor | None:
    """Per-row loss weights from calibration statistics (`ctx.stats[name][key]`, one value per
    output row), normalised to mean 1 so that unweighted training is the all-ones case."""
    if key is None:
        return None
    out = []
    for name, (n, _) in zip(unit.names, unit.shapes):
        stats = (ctx.stats or {}).get(name, {})
        if key not in stats:
            raise OffcompError(f"group {unit.label!r}: option row_weights={key!r} needs statistic {key!r} for "
                               f"{name}; run `offcomp capture` and pass --stats DIR")
        w = stats[key].detach().flatten().float()
        if w.numel() != n or not torch.isfinite(w).all() or (w < 0).any():
            raise OffcompError(f"group {unit.label!r}: statistic {key!r} of {name} must be {n} finite values >= 0")
        out.append(w)
    w = torch.cat(out).to(ctx.device)
    if w.sum() <= 0:
        raise OffcompError(f"group {unit.label!r}: row weights {key!r} are all zero")
    return w / w.mean()


def fit_label(unit: FitUnit) -> str:
    """Label for logs and progress bars: the group, plus the module when matrices are fitted one by one."""
    return unit.label if unit.joint else f"{unit.label}:{unit.names[0]}"


def largest(cost: Callable[[int], int], target: int, lo: int = 1) -> int:
    """Largest integer v >= lo with cost(v) <= target (cost increasing), or lo - 1 if none."""
    if cost(lo) > target:
        return lo - 1
    hi = lo
    while cost(hi * 2) <= target:
        hi *= 2
    a, b = hi, hi * 2  # cost(a) fits, cost(b) does not
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (mid, b) if cost(mid) <= target else (a, mid)
    return a


def refine_rows(
    params: list[torch.Tensor],
    rows: Callable[[torch.Tensor], torch.Tensor],
    target: torch.Tensor,
    cfg: RefineConfig,
    unit: FitUnit,
    ctx: FitContext,
    *,
    modules: Callable[[], dict[str, nn.Module]] | None = None,
) -> float:
    """Adam on the AE loss (data-aware if `cfg` says so) over the rows of the stacked weights
    `target` (N × m, in the unit's module order).

    `rows(idx)` reconstructs rows idx from `params` (leaf tensors, updated in place). The state
    before the first step is a candidate too, and the best one is restored at the end: scored by
    ctx.validate(modules()) every `validate_every` epochs when both are given, else by the full
    training loss after every epoch. Returns the best score."""
    loss_fn, weights = data_loss(cos_rmse_loss(), unit, cfg, ctx)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.refine_lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.8)
    gen = torch.Generator().manual_seed(ctx.seed)
    use_val = ctx.validate is not None and modules is not None

    def w(idx: torch.Tensor) -> torch.Tensor | None:
        return None if weights is None else weights[idx]

    @torch.no_grad()
    def score() -> float:
        if use_val:
            return float(ctx.validate(modules()))  # type: ignore[misc]
        idx = torch.arange(target.shape[0], device=target.device)
        parts = [loss_fn(rows(i), target[i], w(i), 0) * len(i) for i in idx.split(4096)]
        return float(sum(parts) / target.shape[0])

    best, best_state = score(), [p.detach().clone() for p in params]
    ctx.log(f"{unit.label}: refine start, score {best:.6g}")
    for ep in range(1, cfg.refine_epochs + 1):
        perm = torch.randperm(target.shape[0], generator=gen).to(target.device)
        for idx in perm.split(cfg.refine_batch):
            loss = loss_fn(rows(idx), target[idx], w(idx), ep)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if not use_val or ep % cfg.validate_every == 0 or ep == cfg.refine_epochs:
            s = score()
            ctx.log(f"{unit.label}: refine epoch {ep}/{cfg.refine_epochs}, score {s:.6g}")
            if s < best:
                best, best_state = s, [p.detach().clone() for p in params]
        ctx.progress(f"refining {unit.label}", ep, cfg.refine_epochs)
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
            p.requires_grad_(False)
    return best
