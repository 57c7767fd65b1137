"""Modular training: after compression, train each compressed block in isolation to reproduce the
dense block's outputs (after "Modular Training for Transformer Compression").

The compressed model's attention and FFN blocks are narrowed replacements (their linears are
low-rank, autoencoded, ...), already initialised by their method (SVD, activation-aware SVD, ...)
rather than randomly. Each block is then trained on its own, layer after layer: the *dense*
(teacher) model is run over calibration windows, and every block of layer l sees the inputs the
dense block saw and learns to give the outputs it gave:

    loss = ‖C(x) − D(x)‖² / E‖D(x)‖²  +  mixup · ‖C(x̃) − D(x̃)‖² / E‖D(x)‖²,  x̃ = λ xᵢ + (1 − λ) xᵢ₊₁

where x̃ mixes neighbouring calibration sequences (λ ~ U(0, 1)) and D(x̃) is computed by the dense
block on the fly: the mixup term asks C to match D between the calibration points too, which
regularises a small calibration set. Blocks never see each other's errors (the teacher's hidden
states are propagated), so layers are independent and memory stays flat: one layer's block
inputs/outputs at a time (N × L × d floats per tensor).

`mode: sequential` trains one whole layer at a time instead, on the *compressed* model's own
hidden states, towards the dense layer's output (error measured against the size of what the dense
layer adds to the residual stream): each layer then also learns to undo the drift that the
compressed layers before it left in the stream, which block-wise training on dense inputs never
sees. On smollm2-135m at ratio 0.8 (SVD-LLM + Fisher allocation, 16 × 1024 tokens, 2 epochs, lr
1e-4) this takes test PPL from 62.2 to 45.8 (README); memory stays one layer's windows.

A block is the smallest module holding all of a layer's attention roles (LLaMA: `self_attn`;
BERT: `attention`) or FFN roles (LLaMA: `mlp`); when that is the layer itself (BERT's FFN is not
a module of its own) the whole layer is one block. Only the parameters of compressed modules
train; parameters shared across layers (a joint group's common factor) stay frozen, because
training them in layer l would move layers already trained. A held-out share of the sequences
scores each epoch and the best state is kept (the state before training is a candidate too).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn as nn

from .errors import OffcompError
from .layers import CompressedModule
from .plan import ModularConfig
from .progress import ProgressFn, no_progress, with_info
from .sequential import BlockCall, _first, _split, layer_inputs
from .swap import discover, layer_list


def _layer_list(model: nn.Module) -> list[nn.Module]:
    return layer_list(model)


def block_paths(layer: nn.Module, roles: dict[str, str]) -> list[str]:
    """Dotted paths (inside a layer) of its attention and FFN blocks (from the friendly roles
    `attn.*` / `mlp.*`); [""] when a block is the layer, or when the family has no such roles."""
    present = {n for n, _ in layer.named_modules()}
    paths = []
    for prefix in ("attn.", "mlp."):
        names = [p.split(".") for r, p in roles.items() if r.startswith(prefix) and p in present]
        if not names:
            continue
        common: list[str] = []
        for parts in zip(*names):
            if len(set(parts)) > 1:
                break
            common.append(parts[0])
        paths.append(".".join(common[: min(len(n) for n in names) - 1]))
    return [""] if "" in paths or not paths else paths


def _trainable(block: nn.Module, shared: set[int]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in block.modules():
        if isinstance(m, CompressedModule):
            for p in m.parameters():
                if id(p) not in shared and p.is_floating_point():
                    seen[id(p)] = p
    return list(seen.values())


def _capture_blocks(layer: nn.Module, paths: list[str], hidden: list[torch.Tensor], call: BlockCall):
    """Run the teacher layer over every window: its outputs, and each block's inputs, outputs and call."""
    io: dict[str, dict[str, Any]] = {p: {"x": [], "y": []} for p in paths}
    handles = []
    for p in paths:
        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any, p: str = p) -> None:
            x, rest, kw, by_kw = _split(args, kwargs)
            io[p]["x"].append(x.detach())
            io[p]["y"].append(_first(out).detach())
            io[p].setdefault("call", BlockCall(rest, kw, by_kw))

        handles.append(layer.get_submodule(p).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            outs = [call(layer, x) for x in hidden]
    finally:
        for h in handles:
            h.remove()
    return outs, io


def _nmse(pred: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).mean() / scale


def train_block(teacher: nn.Module, student: nn.Module, io: dict[str, Any], params: list[nn.Parameter],
                cfg: ModularConfig, gen: torch.Generator, label: str, progress: ProgressFn) -> dict[str, Any]:
    """Train `params` (inside `student`) so that the student block reproduces the teacher block."""
    xs, ys, call = io["x"], io["y"], io["call"]
    txs = io.get("teacher_x", xs)  # the teacher's own inputs, when the student sees different ones
    n = len(xs)
    n_hold = min(n - 1, round(n * cfg.holdout)) if n > 1 else 0
    train, hold = list(range(n - n_hold)), list(range(n - n_hold, n)) or list(range(n))
    # a layer's output is mostly its input (the residual stream): errors are measured against the
    # size of what the layer adds, not of the stream itself
    ref = io.get("scale_ref")
    scale = float(torch.stack([(ys[i].float() - (0 if ref is None else ref[i].float())).pow(2).mean()
                               for i in train]).mean()) or 1.0
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    @torch.no_grad()
    def held_out() -> float:
        return float(sum(_nmse(call(student, xs[i]), ys[i], scale) for i in hold) / len(hold))

    t0 = time.perf_counter()
    best = first = held_out()
    best_state, best_epoch = [p.detach().clone() for p in params], 0
    opt = torch.optim.Adam(params, lr=cfg.lr)
    try:
        for epoch in range(1, cfg.epochs + 1):
            order = torch.randperm(len(train), generator=gen).tolist()
            for step, k in enumerate(order):
                i = train[k]
                loss = _nmse(call(student, xs[i]), ys[i], scale)
                if cfg.mixup > 0 and len(train) > 1:
                    j = train[(k + 1) % len(train)]
                    lam = float(torch.rand((), generator=gen))
                    xm = lam * xs[i] + (1 - lam) * xs[j]
                    with torch.no_grad():
                        ym = call(teacher, xm if txs is xs else lam * txs[i] + (1 - lam) * txs[j])
                    loss = loss + cfg.mixup * _nmse(call(student, xm), ym, scale)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                progress(f"modular {label}", (epoch - 1) * len(order) + step + 1, cfg.epochs * len(order),
                         {"loss": float(loss.detach())})
            score = held_out()
            if score < best:
                best, best_epoch = score, epoch
                best_state = [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
        for p in student.parameters():
            p.requires_grad_(flags[id(p)])
    return {"block": label, "params": sum(p.numel() for p in params), "nmse_before": first, "nmse_after": best,
            "best_epoch": best_epoch, "seconds": time.perf_counter() - t0}


def modular_train(
    teacher: nn.Module,
    student: nn.Module,
    windows: torch.Tensor,
    cfg: ModularConfig,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: ProgressFn | None = None,
    log: Any = None,
    resume: Any = None,
) -> dict[str, Any]:
    """Train every compressed block of `student` towards the matching block of the dense `teacher`
    on calibration `windows` (N × L token ids), layer by layer; returns a record for the manifest.

    `resume` (an `offcomp.resume.PartialStore`) keeps each trained layer with the generator state
    after it; layers an interrupted run already trained are loaded, not trained again."""
    progress = with_info(progress or no_progress)  # a three-argument callback still works
    log = log or (lambda msg: None)
    dev = torch.device(device)
    t_layers, s_layers = _layer_list(teacher), _layer_list(student)
    if len(t_layers) != len(s_layers):
        raise OffcompError("modular training needs the dense and the compressed model of one architecture")
    roles = discover(student).aliases
    owners: dict[int, set[int]] = {}
    for i, layer in enumerate(s_layers):
        for m in layer.modules():
            if isinstance(m, CompressedModule):
                for p in m.parameters():
                    owners.setdefault(id(p), set()).add(i)
    shared = {pid for pid, ls in owners.items() if len(ls) > 1}
    if shared:
        log(f"modular: {len(shared)} tensors shared across layers (joint groups) stay frozen")
    if not owners:
        raise OffcompError("modular training found no compressed modules; compress something first")
    t0 = time.perf_counter()
    teacher.eval()
    student.eval()  # no dropout: the block outputs are the regression targets
    gen = torch.Generator().manual_seed(seed)
    hidden, call = layer_inputs(teacher, t_layers[0], windows, dev)
    if cfg.mode == "sequential":
        s_hidden, _ = layer_inputs(student, s_layers[0], windows, dev)
        blocks = _train_sequential(t_layers, s_layers, hidden, s_hidden, call, shared, cfg, gen, progress, log,
                                   _Resume(resume, gen, shared))
    else:
        blocks = _train_blocks(t_layers, s_layers, hidden, call, roles, shared, cfg, gen, progress, log,
                               _Resume(resume, gen, shared))
    return {"config": cfg.model_dump(), "windows": list(windows.shape), "seed": seed, "blocks": blocks,
            "frozen_shared_tensors": len(shared), "seconds": time.perf_counter() - t0,
            "resumed_layers": resume.resumed_layers if resume is not None else 0}


class _Resume:
    """Per-layer save/load of trained parameters; a no-op without a store. Only a prefix of layers
    is ever loaded: the generator state chains from one layer's training to the next."""

    def __init__(self, store: Any, gen: torch.Generator, shared: set[int]) -> None:
        self.store, self.gen, self.shared, self.open = store, gen, shared, store is not None

    def _params(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        mine = {id(p) for p in _trainable(layer, self.shared)}
        return {n: p for n, p in layer.named_parameters() if id(p) in mine}

    def load(self, i: int, layer: nn.Module) -> list[dict[str, Any]] | None:
        records = self.store.load_layer(i, self._params(layer), self.gen) if self.open else None
        self.open = records is not None
        return records

    def save(self, i: int, layer: nn.Module, records: list[dict[str, Any]]) -> None:
        if self.store is not None:
            self.store.save_layer(i, self._params(layer), records, self.gen)


def train_layer_blocks(i: int, tl: nn.Module, sl: nn.Module, hidden: Any, call: BlockCall, roles: dict[str, str],
                       shared: set[int], cfg: ModularConfig, gen: torch.Generator, progress: ProgressFn, log: Any,
                       resume: _Resume) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Layer i in the paper's regime: each compressed block of `sl` learns, on the dense inputs
    `hidden`, the outputs of the same block of the dense layer `tl`. Returns the records and the
    dense layer's outputs (the next layer's dense inputs)."""
    paths = [p for p in block_paths(sl, roles) if _trainable(sl.get_submodule(p), shared)]
    outs, io = _capture_blocks(tl, paths, hidden, call)
    done = resume.load(i, sl)
    if done is not None:
        return done, outs
    records = []
    for p in paths:
        label = f"layers.{i}" + (f".{p}" if p else "")
        rec = train_block(tl.get_submodule(p), sl.get_submodule(p), io[p], _trainable(sl.get_submodule(p), shared),
                          cfg, gen, label, progress)
        log(f"modular {label}: normalised MSE {rec['nmse_before']:.4g} → {rec['nmse_after']:.4g} "
            f"(epoch {rec['best_epoch']})")
        records.append(rec)
    resume.save(i, sl, records)
    return records, outs


def train_layer_sequential(i: int, tl: nn.Module, sl: nn.Module, hidden: Any, s_hidden: Any, call: BlockCall,
                           shared: set[int], cfg: ModularConfig, gen: torch.Generator, progress: ProgressFn, log: Any,
                           resume: _Resume) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Layer i's compressed parameters (all its blocks at once) learn to map the compressed model's
    hidden states `s_hidden` to the dense layer's outputs on the dense states `hidden`. Returns the
    records and those dense outputs; the caller moves the student's stream through the trained layer."""
    with torch.no_grad():
        outs = [call(tl, x) for x in hidden]
    params = _trainable(sl, shared)
    done = resume.load(i, sl) if params else None
    if done is not None or not params:
        return done or [], outs
    io = {"x": s_hidden, "y": outs, "call": call, "teacher_x": hidden, "scale_ref": hidden}
    rec = train_block(tl, sl, io, params, cfg, gen, f"layers.{i}", progress)
    log(f"modular layers.{i}: normalised MSE {rec['nmse_before']:.4g} → {rec['nmse_after']:.4g} "
        f"(epoch {rec['best_epoch']})")
    resume.save(i, sl, [rec])
    return [rec], outs


def _train_blocks(t_layers: list[nn.Module], s_layers: list[nn.Module], hidden: list[torch.Tensor],
                  call: BlockCall, roles: dict[str, str], shared: set[int], cfg: ModularConfig,
                  gen: torch.Generator, progress: ProgressFn, log: Any, resume: _Resume) -> list[dict[str, Any]]:
    """The paper's regime: every block on the dense model's inputs, towards the dense block's outputs."""
    blocks = []
    for i, (tl, sl) in enumerate(zip(t_layers, s_layers)):
        records, hidden = train_layer_blocks(i, tl, sl, hidden, call, roles, shared, cfg, gen, progress, log, resume)
        blocks += records
    return blocks


def _train_sequential(t_layers: list[nn.Module], s_layers: list[nn.Module], hidden: list[torch.Tensor],
                      s_hidden: list[torch.Tensor], call: BlockCall, shared: set[int], cfg: ModularConfig,
                      gen: torch.Generator, progress: ProgressFn, log: Any, resume: _Resume) -> list[dict[str, Any]]:
    """Each layer's compressed parameters learn to map the compressed model's hidden states to the
    dense layer's outputs; the student's stream moves on through the trained layer, so the next
    layer learns to correct what is left."""
    records = []
    for i, (tl, sl) in enumerate(zip(t_layers, s_layers)):
        recs, outs = train_layer_sequential(i, tl, sl, hidden, s_hidden, call, shared, cfg, gen, progress, log,
                                            resume)
        records += recs
        with torch.no_grad():
            s_hidden = [call(sl, x) for x in s_hidden]
        hidden = outs
    return records


def teacher_copy(model: nn.Module) -> nn.Module:
    """The dense model kept as the teacher before compression swaps modules in place."""
    return copy.deepcopy(model).eval()
