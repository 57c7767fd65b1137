"""The hooks behind `offcomp capture`: calibration batches, and one pass over them that accumulates
input Gram matrices (forward hooks) and Fisher information (hooks on the weights' gradients), and
streams block inputs/outputs. No files, no cache: see `offcomp.capture` for those."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .errors import OffcompError
from .progress import ProgressFn, no_progress
from .swap import is_transposed

BLOCK_FORMAT = """\
blocks/shard-NNNNN.safetensors, one per calibration batch, in order (NNNNN = batch index):
  input_ids            (B, L) int64   the batch as fed to the model (masked: after masking)
  labels               (B, L) int64   masked-LM labels, -100 where not masked (encoders only)
  layers.<i>.attn.in   (B, L, d)      input of the attention block  = input of attn.q (after the pre-norm)
  layers.<i>.attn.out  (B, L, d)      output of the attention block = output of attn.o (before residual/norm)
  layers.<i>.mlp.in    (B, L, d)      input of the FFN block  = input of mlp.up (and mlp.gate)
  layers.<i>.mlp.out   (B, L, d)      output of the FFN block = output of mlp.down (before residual/norm)
Every row is a full window without padding: positions 0..L-1, causal attention for decoders, full
attention for encoders. Read one layer at a time with safetensors.safe_open(...).get_tensor(key)."""
BLOCK_HOOKS = (("attn.q", "attn.in", "input"), ("attn.o", "attn.out", "output"),
                ("mlp.up", "mlp.in", "input"), ("mlp.down", "mlp.out", "output"))


class Stats(dict):
    """module name → {statistic → tensor}, plus the capture's `meta` (capture.json)."""

    meta: dict[str, Any]


# ---------------------------------------------------------------- calibration batches


def calibration_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` random windows of `seq_len` tokens from a 1-D token stream (seeded, with replacement
    of start positions, as GPTQ/SVD-LLM sample their calibration sets)."""
    if ids.numel() < seq_len + 1:
        raise OffcompError(f"calibration text has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def mask_for_mlm(ids: torch.Tensor, mask_id: int, vocab_size: int, special: list[int], prob: float,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: `prob` of the non-special tokens (at least one per row) become targets, and of
    those 80 % are replaced by [MASK], 10 % by a random token, 10 % kept."""
    candidate = ~torch.isin(ids, torch.tensor(special, dtype=ids.dtype))
    chosen = (torch.rand(ids.shape, generator=g) < prob) & candidate
    for row in (~chosen.any(1)).nonzero().flatten().tolist():
        pos = candidate[row].nonzero().flatten()
        if pos.numel():
            chosen[row, pos[torch.randint(pos.numel(), (1,), generator=g)]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=g)
    rand_tok = torch.randint(vocab_size, ids.shape, generator=g)
    out = torch.where(chosen & (r < 0.8), torch.full_like(ids, mask_id), ids)
    out = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand_tok, out)
    return out, labels


def calibration_batches(tokenizer: Any, text: str, spec: Any, kind: str) -> list[dict[str, torch.Tensor]]:
    """Tokenize once, cut random windows, group into batches of `input_ids` (+ `labels`).

    Causal: the tokenizer's own stream (as in perplexity), labels = input_ids (the model shifts).
    Masked: windows of seq_len-2 word pieces wrapped in [CLS] … [SEP], then BERT-masked."""
    if kind == "causal":
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        wins = calibration_windows(ids, spec.samples, spec.seq_len, spec.seed)
    else:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        core = calibration_windows(ids, spec.samples, spec.seq_len - 2, spec.seed)
        cls = torch.full((spec.samples, 1), tokenizer.cls_token_id, dtype=torch.long)
        sep = torch.full((spec.samples, 1), tokenizer.sep_token_id, dtype=torch.long)
        wins = torch.cat([cls, core, sep], dim=1)
    batches = []
    g = torch.Generator().manual_seed(spec.seed + 1)
    for b in torch.split(wins, spec.batch_size):
        if kind == "masked":
            inp, labels = mask_for_mlm(b, tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids,
                                       spec.mask_prob, g)
            batches.append({"input_ids": inp, "labels": labels})
        else:
            batches.append({"input_ids": b, "labels": b} if kind == "causal" else {"input_ids": b})
    return batches


# ---------------------------------------------------------------- the hooks


@dataclass
class Captured:
    """Raw result of `collect_stats`: per-input and per-module tensors, and who reads which input."""

    inputs: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    input_of: dict[str, str] = field(default_factory=dict)
    n_tokens: int = 0

    def by_module(self) -> Stats:
        out = Stats()
        for name, key in self.input_of.items():
            out[name] = {**self.inputs.get(key, {}), **self.modules.get(name, {})}
        return out


def collect_stats(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    input_of: dict[str, str],
    *,
    gram: bool = True,
    fisher: bool = True,
    fisher_full: bool = False,
    block_modules: dict[int, dict[str, str]] | None = None,
    block_sink: Any = None,
    block_dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    progress: ProgressFn = no_progress,
) -> Captured:
    """Run `batches` through `model` once (forward, plus backward when Fisher is wanted) and
    accumulate statistics for the modules in `input_of` (module name → name of the module whose
    input it shares; itself when it reads its own). Block inputs/outputs of `block_modules`
    (layer → {role: module name}) go to `block_sink(batch_index, tensors)` batch by batch."""
    device = device or next(model.parameters()).device
    return_freed_memory()
    res = Captured(input_of=dict(input_of))
    handles: list[Any] = []
    grads_before = {id(p): p.requires_grad for p in model.parameters()}
    block_buf: dict[str, torch.Tensor] = {}
    try:
        if gram:
            for key in sorted(set(input_of.values())):
                handles.append(model.get_submodule(key).register_forward_hook(_gram_hook(res, key)))
        for layer, roles in (block_modules or {}).items():
            for role, slot, which in BLOCK_HOOKS:
                hook = _block_hook(block_buf, f"layers.{layer}.{slot}", which, block_dtype)
                handles.append(model.get_submodule(roles[role]).register_forward_hook(hook))
        want_grad = fisher or fisher_full
        if want_grad:
            for p in model.parameters():
                p.requires_grad_(False)
            for name in input_of:
                mod = model.get_submodule(name)
                w = mod.weight
                w.requires_grad_(True)
                transposed = is_transposed(mod)  # Conv1D: gradient stored in × out
                handles.append(w.register_post_accumulate_grad_hook(
                    _fisher_hook(res, name, fisher, fisher_full, transposed)))
        for i, batch in enumerate(batches):
            progress("capture", i, len(batches))
            inputs = {k: v.to(device) for k, v in batch.items()}
            if want_grad:
                loss = loss_backward(model, inputs)
                if not math.isfinite(loss):
                    raise OffcompError(f"calibration loss is {loss} on batch {i}; check the model and data")
            else:
                with torch.no_grad():
                    model(**{k: v for k, v in inputs.items() if k != "labels"})
            res.n_tokens += batch["input_ids"].numel()
            if block_sink is not None and block_modules:
                ids = {k: v.cpu().clone() for k, v in batch.items() if k == "input_ids" or v is not batch["input_ids"]}
                block_sink(i, {**ids, **block_buf})
                block_buf.clear()
        progress("capture", len(batches), len(batches))
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(grads_before[id(p)])
            p.grad = None
    for d in res.inputs.values():
        finish_input(d, res.n_tokens)
    return res


def return_freed_memory(threshold: int = 8 << 20) -> None:
    """Ask glibc to mmap allocations of `threshold` bytes and more, so that a batch's largest
    buffers go back to the OS when freed instead of staying in the heap as fragments. On
    smollm2-135m (Gram + Fisher, 6 × 1024 tokens, 2 threads): default glibc 6.7 s per sequence,
    peak RSS 3.9 GB; 1 MiB (every activation mmapped, so every one page-faults afresh: 3.5 s of
    system time per sequence) 7.8 s, 3.4 GB; 8 MiB 5.9 s, 3.9 GB. Process-wide and harmless
    elsewhere; a no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def loss_backward(model: nn.Module, inputs: dict[str, torch.Tensor], chunk: int = 256) -> float:
    """Backpropagate the batch's mean token loss; returns the loss.

    For a causal LM whose head is a plain linear layer, the head and the cross-entropy are done by
    hand in chunks of positions: dL/dlogits = softmax − onehot is formed chunk by chunk and only
    dL/dhidden is sent back, so the (tokens × vocab) logits, their log-softmax and their gradient are
    never all in memory (≈ 0.6 GB for 1024 tokens of a 49k vocabulary). Same loss, same gradients
    as `model(input_ids, labels=...)`. Anything else (masked LMs, soft-capped logits) uses the
    model's own loss."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    cfg = getattr(model, "config", None)
    plain = (isinstance(head, nn.Linear) and not head.weight.requires_grad  # Fisher of the head itself: full path
             and isinstance(base, nn.Module) and base is not model
             and not getattr(cfg, "final_logit_softcapping", None) and not getattr(cfg, "logit_scale", None)
             and getattr(cfg, "is_decoder", True) is not False and "labels" in inputs
             and type(model).__name__.endswith("ForCausalLM"))
    if not plain:
        loss = model(**inputs).loss
        loss.backward()
        return loss.item()
    hidden = base(input_ids=inputs["input_ids"]).last_hidden_state
    h = hidden.detach()[:, :-1]
    y = inputs["labels"][:, 1:]
    n = max(int((y != -100).sum()), 1)
    grad = torch.zeros_like(hidden)
    total = 0.0
    W = head.weight.detach()
    with torch.no_grad():
        for s in range(0, h.shape[1], chunk):
            hc, yc = h[:, s : s + chunk], y[:, s : s + chunk]
            logits = head(hc.reshape(-1, hc.shape[-1])).float().view(*yc.shape, -1)  # 2-D: a GEMM, not a batched one
            lse = logits.logsumexp(-1, keepdim=True)
            valid = yc != -100
            safe = yc.clamp_min(0).unsqueeze(-1)
            total += ((lse - logits.gather(-1, safe)).squeeze(-1) * valid).sum().item()
            p = (logits - lse).exp_()
            p.scatter_add_(-1, safe, -torch.ones_like(safe, dtype=p.dtype))
            p.mul_(valid.unsqueeze(-1) / n)
            grad[:, s : s + hc.shape[1]] = (p.to(W.dtype) @ W).to(grad.dtype)
    hidden.backward(grad)
    return total / n


def _gram_hook(res: Captured, key: str) -> Any:
    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        accumulate_input(res.inputs.setdefault(key, {}), args[0], GRAM)
    return hook


GRAM = frozenset({"xtx", "abs_mean"})  # what a whole-model capture takes of every input


def accumulate_input(d: dict[str, torch.Tensor], x: torch.Tensor, want: set[str] | frozenset[str]) -> None:
    """Add one batch of an input (…, n features) to the running sums behind the statistics `want`:
    "xtx" (the upper triangle of XᵀX, which also gives Σx²), "act_sq" alone (Σx²), "abs_mean" (Σ|x|).
    `finish_input` turns the sums into the statistics. Shared by the capture and the sequential engine."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    n = x.shape[1]
    if "xtx" in want:
        if "xtx" not in d:
            d["xtx"] = torch.zeros(n, n, dtype=torch.float64, device=x.device)
        # One batch's products in float32 (as SVD-LLM computes them), accumulated across batches in
        # float64: float64 products cost twice the forward pass itself on a CPU. Only the upper
        # triangle is summed (see `add_gram_upper`); `finish_input` mirrors it once at the end.
        add_gram_upper(d["xtx"], x)
    elif "act_sq" in want:
        d["sq_sum"] = d.get("sq_sum", 0) + x.square().sum(0).double()
    if "xtx" in want or "abs_mean" in want:
        if "abs_sum" not in d:
            d["abs_sum"] = torch.zeros(n, dtype=torch.float64, device=x.device)
        d["abs_sum"].add_(x.abs().sum(0))


def add_gram_upper(acc: torch.Tensor, x: torch.Tensor, blocks: int = 4) -> None:
    """acc += xᵀx on and above the diagonal, for x of shape (tokens, n).

    Row block i of the product is computed from column i onwards only, which skips 3/8 of the
    work at 4 blocks: on smollm2-135m the full products cost as much as the forward pass. (BLAS
    `syrk` would skip half, but scipy's BLAS threads fight torch's for the same cores.)"""
    n = x.shape[1]
    cut = [round(i * n / blocks) for i in range(blocks + 1)]
    for lo, hi in zip(cut[:-1], cut[1:]):
        if hi > lo:
            acc[lo:hi, lo:].add_(x[:, lo:hi].T @ x[:, lo:])


def finish_input(d: dict[str, torch.Tensor], n_tokens: int) -> None:
    """Turn an input's running sums (`accumulate_input`) into the saved statistics: the full
    symmetric XᵀX and its diagonal Σ_t x_tj² (Wanda's ‖x_j‖²), or Σx² alone, and mean |x| (ASVD)."""
    if "xtx" in d:
        upper = d["xtx"].triu()
        d["xtx"] = upper + upper.triu(1).T
        d["act_sq"] = d["xtx"].diagonal().clone()
    elif "sq_sum" in d:
        d["act_sq"] = d.pop("sq_sum")
    if "abs_sum" in d:
        d["abs_mean"] = d.pop("abs_sum") / max(n_tokens, 1)


def _fisher_hook(res: Captured, name: str, rows: bool, full: bool, transposed: bool = False) -> Any:
    def hook(p: torch.Tensor) -> None:
        g = p.grad.detach()
        g = g.T if transposed else g  # statistics are (out, in), like the weights methods see
        d = res.modules.setdefault(name, {})
        if rows:
            r = g.float().square().sum(1).double()  # fp32 rows (≤ a few 1000 terms), fp64 across batches
            d["fisher_row"] = d["fisher_row"] + r if "fisher_row" in d else r
        if full:
            sq = g.float().square()
            d["fisher"] = d["fisher"] + sq if "fisher" in d else sq
        p.grad = None  # one batch's gradient at a time: memory stays flat
    return hook


def _block_hook(buf: dict[str, torch.Tensor], key: str, which: str, dtype: torch.dtype) -> Any:
    def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        t = args[0] if which == "input" else out
        buf[key] = t.detach().to(device="cpu", dtype=dtype).contiguous()
    return hook
