"""Training machinery shared by the autoencoder methods (`ae`, `ae-embed`): the mini-batch loop
with validation-based early stopping, PCA initialisation, per-row loss weights and budget search."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import OffcompError
from ..registry import FitContext, FitUnit

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, int], torch.Tensor]


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
def pca_init(encoder: nn.Linear, decoder: nn.Linear, X: torch.Tensor) -> None:
    """Start a linear AE at PCA: z = V(x − μ), x̂ = Vᵀz + μ with V the top-d right singular vectors
    of the centred rows, i.e. the best rank-d affine reconstruction in Frobenius norm."""
    mu = X.mean(dim=0)
    Xc = (X - mu).double()
    _, vecs = torch.linalg.eigh(Xc.T @ Xc)  # m × m: cheaper than an SVD of the tall n × m matrix
    V = vecs.flip(1)[:, : encoder.out_features].T.float()
    if V.shape[0] < encoder.out_features:  # latent wider than the data's rank: pad with zeros
        V = torch.cat([V, V.new_zeros(encoder.out_features - V.shape[0], V.shape[1])])
    encoder.weight.copy_(V)
    encoder.bias.copy_(-(V @ mu))
    decoder.weight.copy_(V.T)
    decoder.bias.copy_(mu)


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
        ctx.progress(f"{label}: training", epoch + 1, spec.epochs)
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
