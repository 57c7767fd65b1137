"""Perplexity of causal and masked language models, with the whole protocol in the result.

Two protocols, because a PPL number means nothing without the exact recipe behind it:

causal (GPTQ / SparseGPT / HF perplexity guide)
    The rows are joined with ``"\\n\\n"`` (`offcomp.data.causal_text`) and tokenized once. The
    stream starts with BOS only if the tokenizer adds one by default (Llama/Mistral style), which is
    exactly what ``tokenizer(text)`` does in the HF guide and in GPTQ; no EOS/SEP is added. For
    GPT-2/SmolLM2 tokenizers nothing is added. Reference, SmolLM2-135M-Instruct (GGUF Q4_1, fp32)
    on the first 16 x 1024 tokens of wiki.test.raw: 22.88 as implemented here; a BOS prepended
    to every window gives 22.94 (<|im_start|>) or 23.15 (<|endoftext|>); tokenizing the raw file
    verbatim instead of the joined rows (llama.cpp style) gives 22.75.
    The stream is cut into full windows of `seq_len`; the ragged tail is dropped. With
    ``stride == seq_len`` (default) the windows do not overlap and every token but each window's
    first is scored. With ``stride < seq_len`` this is the HF
    sliding-window protocol: window k starts at ``k * stride``, and after the first window only its
    last `stride` tokens are scored, so each scored token sees ``seq_len - stride`` tokens of
    context from before. PPL = exp(token-mean NLL over every scored token).
    Beside token PPL, which depends on the tokenizer, the same NLL sum is normalised by the text
    the scored tokens stand for (`token_text_spans`: each token owns the text up to the next
    token's start, so each byte and word is counted once): word PPL = exp(NLL / words), byte PPL =
    exp(NLL / bytes), bits per byte = NLL / (bytes · ln 2), comparable across tokenizers and with
    lm-eval's wikitext metrics (see `offcomp.eval.harness.rolling_loglikelihood` for how its
    windows map onto ours).

masked (Banaei et al., EACL 2023)
    Line by line: blank rows and WikiText headings (`` = Title = ``) are dropped, each line is
    tokenized with its [CLS]/[SEP] and truncated to ``min(seq_len, 512)`` tokens, and lines with
    fewer than 20 word-piece tokens (specials excluded) are dropped. 15 % of a line's tokens are
    chosen as whole words (fast tokenizer `word_ids`), the way HF's `DataCollatorForWholeWordMask`
    does it, and replaced BERT-style 80/10/10 ([MASK] / random token / unchanged), as BERT
    pre-training and HF's MLM collators do (the paper's recipe builds on them). The random choices of line i come from a
    NumPy generator seeded with ``(seed, i)``, so masks depend only on text, tokenizer and seed:
    every model sees the same masks (checked via ``inputs_sha256``), and trimming `max_tokens`
    does not reshuffle the lines kept. PPL = exp(mean loss over the chosen tokens).
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from contextlib import nullcontext
from typing import Any, Literal

import numpy as np
import torch
from torch.nn import functional as F

from offcomp.data import TextSource, causal_text
from offcomp.errors import OffcompError
from offcomp.progress import ProgressFn

Kind = Literal["causal", "masked"]

MLM_PROBABILITY = 0.15
MLM_MAX_LEN = 512
MLM_MIN_TOKENS = 20
MLM_REPLACE = "bert-80-10-10"
_HEADING = re.compile(r"^\s*(=\s+)+\S.*?(\s+=)+\s*$")
_WORD = re.compile(r"\S+")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or a CLI spelling (fp32, bf16, fp16, float32, ...)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise OffcompError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    if dtype.lower() not in _DTYPES:
        raise OffcompError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype.lower()]


def lm_kind(model: torch.nn.Module) -> Kind:
    """Which protocol a model can be scored with, from its head class; OffcompError if none."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    name = type(model).__name__
    if name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if name in set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()) or name.endswith("ForMaskedLM"):
        return "masked"
    raise OffcompError(
        f"{name} has no language-modelling head, so it has no perplexity: load it as a "
        "*ForCausalLM or *ForMaskedLM (an encoder such as all-MiniLM-L6-v2 is evaluated on GLUE instead)"
    )


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    source: TextSource,
    *,
    kind: Kind | None = None,
    seq_len: int = 1024,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Score `model` on `source` and return a JSON-able dict: ppl, nll, counts and the protocol.

    `kind` defaults to what the model's head supports. `dtype` is the compute precision: if the
    weights are float32 and a 16-bit dtype is asked for, the forward runs under autocast, which
    leaves the caller's model untouched (and works on models flagged as quantized, e.g. GGUF
    loads). The model is moved to `device` if it is elsewhere, and put in eval mode for the run
    (its training flag is restored after).
    For masked models `seq_len` caps the line length (at most 512, the protocol's limit) and
    `stride` does not apply. `max_tokens` keeps only the first tokens (whole windows / whole lines).
    """
    detected = lm_kind(model)
    kind = kind or detected
    if kind not in ("causal", "masked"):
        raise OffcompError(f"unknown kind {kind!r}: use causal or masked")
    if kind != detected:
        raise OffcompError(f"{type(model).__name__} is a {detected} LM and cannot be scored as {kind}")
    dtype = resolve_dtype(dtype)
    device = torch.device(device)
    _check_ints(seq_len=seq_len, batch_size=batch_size, stride=stride, max_tokens=max_tokens)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if kind == "causal":
        stride = seq_len if stride is None else stride
        if stride > seq_len:
            raise OffcompError(f"stride {stride} > seq_len {seq_len}: use a stride of at most seq_len")
        if max_pos is not None and seq_len > max_pos:
            raise OffcompError(f"seq_len {seq_len} exceeds the model's {max_pos} positions: lower --seq-len")
    elif stride is not None:
        raise OffcompError("stride applies to causal models only: drop --stride for a masked LM")

    if next(model.parameters()).device != device:
        model.to(device)
    weight_dtype = next(model.parameters()).dtype
    if weight_dtype == dtype:
        precision, ctx = "native", nullcontext
    elif weight_dtype == torch.float32:
        precision = "autocast"

        def ctx() -> Any:
            return torch.autocast(device_type=device.type, dtype=dtype)

    else:
        raise OffcompError(f"model weights are {weight_dtype}; evaluate with --dtype {_name(weight_dtype)}")

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode(), ctx():
            if kind == "causal":
                stats = _causal(model, tokenizer, source, seq_len, stride, max_tokens, batch_size, device,
                                progress)
            else:
                max_len = min(seq_len, MLM_MAX_LEN) if max_pos is None else min(seq_len, MLM_MAX_LEN, max_pos)
                stats = _masked(model, tokenizer, source, max_len, max_tokens, batch_size, device, seed,
                                progress)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start

    nll, ppl, non_finite = _summarise(stats)
    forward_s = stats.pop("forward_s")
    per_text: dict[str, Any] = {}
    if kind == "causal":  # token PPL depends on the tokenizer; these do not (same text, same scored tokens)
        per_text = _per_text(nll, stats["n_tokens"], stats["n_bytes"], stats["n_words"])
    protocol: dict[str, Any] = {
        "kind": kind,
        "seq_len": seq_len,
        "stride": stride,
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "dtype": _name(dtype),
        "precision": precision,
        "device": str(device),
        "seed": seed,
    }
    protocol.update(stats.pop("protocol"))
    return {
        "ppl": ppl,
        "nll": nll,
        **per_text,
        **stats,
        **({"non_finite": non_finite} if non_finite else {}),
        "protocol": protocol,
        "data": source.describe(),
        "model": type(model).__name__,
        "elapsed_s": round(elapsed, 3),
        "forward_s": round(forward_s, 6),
        # the model's speed: input tokens per second of forward passes (+ loss), not tokenising the text
        "tokens_per_s": round(stats["n_input_tokens"] / max(forward_s, 1e-9), 1),
    }


def _summarise(stats: dict[str, Any]) -> tuple[float | None, float | None, list[str]]:
    """(NLL, PPL, reasons) from the summed finite losses. A window (causal) or line (masked) with a
    NaN/Inf loss is counted and left out of the sum; then the NLL over all tokens is undefined, so
    `nll` and `ppl` are None, the NLL of the finite windows is kept in `nll_finite`, and the reason
    says how many windows were lost. A finite NLL whose exp overflows gives `ppl` None as well."""
    bad, units = stats.pop("n_nonfinite"), stats.pop("unit")
    scored = stats["n_tokens"] - stats.pop("n_nonfinite_tokens")
    kept = stats.pop("nll_sum") / scored if scored else None
    stats[f"n_nonfinite_{units}"] = bad
    if bad:
        stats["nll_finite"] = kept
        total = stats[f"n_{units}"]
        return None, None, [f"{bad} of {total} {units} have a non-finite loss (NaN/Inf logits): perplexity undefined"]
    if kept is None:
        return None, None, ["no token was scored"]
    try:
        return kept, math.exp(kept), []
    except OverflowError:
        return kept, None, [f"exp(NLL {kept:.6g}) overflows a float: perplexity too large to represent"]


def _per_text(nll: float | None, n_tokens: int, n_bytes: int | None, n_words: int | None) -> dict[str, Any]:
    """Word PPL, byte PPL and bits per byte from the NLL over the scored tokens and the bytes/words
    of text they account for; None where undefined (non-finite NLL, no offsets) or too large."""
    if nll is None or not n_bytes or not n_words:
        return {"word_perplexity": None, "byte_perplexity": None, "bits_per_byte": None}
    nll_sum = nll * n_tokens
    out: dict[str, Any] = {"bits_per_byte": nll_sum / (n_bytes * math.log(2))}
    for key, count in (("word_perplexity", n_words), ("byte_perplexity", n_bytes)):
        try:
            out[key] = math.exp(nll_sum / count)
        except OverflowError:
            out[key] = None
    return out


def _check_ints(**values: int | None) -> None:
    minimum = {"seq_len": 2, "batch_size": 1, "stride": 1, "max_tokens": 1}
    for key, value in values.items():
        if value is not None and (not isinstance(value, int) or value < minimum[key]):
            raise OffcompError(f"{key} must be an integer >= {minimum[key]}, got {value!r}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _adds_bos(tokenizer: Any) -> bool:
    """True if the tokenizer's default encoding starts with BOS (Llama-style), as HF guide/GPTQ get it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a").input_ids
    return len(ids) > 0 and ids[0] == bos


def _digest(*arrays: torch.Tensor | np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.int64)).tobytes())
        h.update(b"|")
    return h.hexdigest()


def token_text_spans(tokenizer: Any, text: str) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """Token ids of `text` plus, per token, the UTF-8 bytes and the words it accounts for.

    Token i owns the text from its start offset to the next token's start (the last one: to the
    end), so the spans tile the text and every byte belongs to exactly one token, whitespace a
    tokenizer trims from its offsets included. A word (a maximal run of non-whitespace, as
    ``str.split()`` counts) belongs to the token holding its first character. None for tokenizers
    without offsets (slow tokenizers): then only token perplexity is reported.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc.input_ids)
    starts = np.array([s for s, _ in enc.offset_mapping] + [len(text)], dtype=np.int64)
    starts[0] = 0  # text before the first token (e.g. trimmed leading spaces) is the first token's
    if n and np.any(np.diff(starts) < 0):
        return None  # offsets that do not walk the text forwards: no honest byte attribution
    char_bytes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    char_bytes = 1 + (char_bytes >= 0x80) + (char_bytes >= 0x800) + (char_bytes >= 0x10000)
    byte_at = np.concatenate([[0], np.cumsum(char_bytes, dtype=np.int64)])
    token_bytes = np.diff(byte_at[starts])
    word_starts = np.array([m.start() for m in _WORD.finditer(text)], dtype=np.int64)
    token_words = np.diff(np.searchsorted(word_starts, starts, side="left"))
    return list(enc.input_ids), token_bytes, token_words


def _causal(model, tokenizer, source, seq_len, stride, max_tokens, batch_size, device, progress):
    text = causal_text(source)
    spans = token_text_spans(tokenizer, text)
    if spans is None:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    else:
        ids = torch.tensor(spans[0], dtype=torch.long)
    bos = _adds_bos(tokenizer)
    if bos:
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    # per stream position: bytes / words of text that token accounts for (BOS: none)
    pad = [0] if bos else []
    token_bytes = None if spans is None else np.concatenate([pad, spans[1]]).astype(np.int64)
    token_words = None if spans is None else np.concatenate([pad, spans[2]]).astype(np.int64)
    n_avail = ids.numel()
    total = n_avail if max_tokens is None else min(n_avail, max_tokens)
    if total < seq_len:
        raise OffcompError(
            f"only {total} tokens to score but seq_len is {seq_len}: lower --seq-len or raise --max-tokens"
        )
    n_windows = (total - seq_len) // stride + 1
    starts = [k * stride for k in range(n_windows)]
    # Window 0 scores predictions 0..seq_len-2; later windows only those whose target is among the
    # window's last `stride` tokens, i.e. prediction positions >= seq_len - stride - 1.
    skip_later = seq_len - stride - 1 if stride < seq_len else 0
    nll_sum, n_scored, n_bad, bad_tokens, n_bytes, n_words, forward_s = 0.0, 0, 0, 0, 0, 0, 0.0
    for b0 in range(0, n_windows, batch_size):
        batch_starts = starts[b0 : b0 + batch_size]
        x = torch.stack([ids[s : s + seq_len] for s in batch_starts]).to(device)
        t = time.perf_counter()
        logits = model(input_ids=x).logits
        for row, s in enumerate(batch_starts):
            first = 0 if s == 0 else skip_later
            nll = F.cross_entropy(logits[row, first:-1].float(), x[row, first + 1 :], reduction="none")
            window = nll.double().sum().item()
            n_scored += nll.numel()
            if not math.isfinite(window):
                n_bad, bad_tokens = n_bad + 1, bad_tokens + nll.numel()
                continue
            nll_sum += window
            if token_bytes is not None:  # the targets scored: stream positions s+first+1 .. s+seq_len-1
                n_bytes += int(token_bytes[s + first + 1 : s + seq_len].sum())
                n_words += int(token_words[s + first + 1 : s + seq_len].sum())
        forward_s += time.perf_counter() - t
        if progress is not None:
            progress("perplexity", min(b0 + batch_size, n_windows), n_windows)
    end = starts[-1] + seq_len
    return {
        "nll_sum": nll_sum,
        "n_tokens": n_scored,
        "n_nonfinite": n_bad,
        "n_nonfinite_tokens": bad_tokens,
        "unit": "windows",
        "n_bytes": n_bytes if token_bytes is not None else None,
        "n_words": n_words if token_words is not None else None,
        "n_windows": n_windows,
        "n_input_tokens": n_windows * seq_len,
        "n_text_tokens": n_avail,
        "forward_s": forward_s,
        "inputs_sha256": _digest(ids[:end]),
        "protocol": {"join": "\\n\\n", "bos": bos, "tail": "dropped"},
    }


def mlm_examples(
    tokenizer: Any, source: TextSource, *, max_len: int = MLM_MAX_LEN, max_tokens: int | None = None, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The masked-LM protocol's (input_ids, labels) per kept line; labels are -100 where unscored.

    Public so that callers (and tests) can inspect exactly which tokens a run scores.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise OffcompError("masked-LM perplexity needs a fast tokenizer (for whole-word masking via word_ids)")
    if tokenizer.mask_token_id is None:
        raise OffcompError("the tokenizer has no [MASK] token, so it cannot drive a masked-LM evaluation")
    vocab = len(tokenizer)
    out, used = [], 0
    for index, row in enumerate(source.rows):
        if not row.strip() or _HEADING.match(row):
            continue
        enc = tokenizer(row.strip(), truncation=True, max_length=max_len)
        word_ids = enc.word_ids()
        if sum(w is not None for w in word_ids) < MLM_MIN_TOKENS:
            continue
        if max_tokens is not None and used + len(enc.input_ids) > max_tokens:
            break
        used += len(enc.input_ids)
        out.append(_mask_line(np.asarray(enc.input_ids, dtype=np.int64), word_ids, tokenizer.mask_token_id,
                              vocab, np.random.default_rng([seed, index])))
    if not out:
        raise OffcompError(
            f"no line of {source.name} ({source.split}) has >= {MLM_MIN_TOKENS} tokens within --max-tokens: "
            "use more text or a larger --max-tokens"
        )
    return out


def _mask_line(ids: np.ndarray, word_ids: list[int | None], mask_id: int, vocab: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Whole-word 15 % selection (HF DataCollatorForWholeWordMask) then 80/10/10 replacement."""
    words: dict[int, list[int]] = {}
    for pos, w in enumerate(word_ids):
        if w is not None:
            words.setdefault(w, []).append(pos)
    groups = list(words.values())
    budget = max(1, round(sum(len(g) for g in groups) * MLM_PROBABILITY))
    chosen: list[int] = []
    for gi in rng.permutation(len(groups)):
        if len(chosen) + len(groups[gi]) <= budget:
            chosen.extend(groups[gi])
    chosen.sort()
    labels = np.full_like(ids, -100)
    labels[chosen] = ids[chosen]
    inputs = ids.copy()
    draw = rng.random(len(chosen))
    random_tokens = rng.integers(0, vocab, size=len(chosen))
    for pos, r, tok in zip(chosen, draw, random_tokens, strict=True):
        if r < 0.8:
            inputs[pos] = mask_id
        elif r < 0.9:
            inputs[pos] = tok
    return inputs, labels


def _masked(model, tokenizer, source, max_len, max_tokens, batch_size, device, seed, progress):
    examples = mlm_examples(tokenizer, source, max_len=max_len, max_tokens=max_tokens, seed=seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Longest first: little padding per batch, and an out-of-memory shows up on the first batch.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    nll_sum, n_scored, n_bad, bad_tokens, forward_s = 0.0, 0, 0, 0, 0.0
    for b0 in range(0, len(order), batch_size):
        batch = [examples[i] for i in order[b0 : b0 + batch_size]]
        width = len(batch[0][0])
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        y = torch.full((len(batch), width), -100, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (inp, lab) in enumerate(batch):
            x[r, : len(inp)] = torch.from_numpy(inp)
            y[r, : len(lab)] = torch.from_numpy(lab)
            attn[r, : len(inp)] = 1
        x, y, attn = x.to(device), y.to(device), attn.to(device)
        t = time.perf_counter()
        logits = model(input_ids=x, attention_mask=attn).logits
        keep = y != -100
        nll = F.cross_entropy(logits[keep].float(), y[keep], reduction="none").double()
        per_line = torch.zeros(len(batch), dtype=torch.float64, device=nll.device)
        per_line.index_add_(0, keep.nonzero()[:, 0], nll)
        finite = torch.isfinite(per_line)
        n_bad += int((~finite).sum())
        bad_tokens += int(keep.sum(dim=1)[~finite].sum())
        nll_sum += per_line[finite].sum().item()
        n_scored += nll.numel()
        forward_s += time.perf_counter() - t
        if progress is not None:
            progress("perplexity", min(b0 + batch_size, len(order)), len(order))
    return {
        "nll_sum": nll_sum,
        "n_tokens": n_scored,
        "n_nonfinite": n_bad,
        "n_nonfinite_tokens": bad_tokens,
        "unit": "lines",
        "n_lines": len(examples),
        "n_input_tokens": sum(len(inp) for inp, _ in examples),
        "forward_s": forward_s,
        "inputs_sha256": _digest(*(a for ex in examples for a in ex)),
        "protocol": {
            "max_len": max_len,
            "min_tokens": MLM_MIN_TOKENS,
            "mlm_probability": MLM_PROBABILITY,
            "masking": "whole-word",
            "replace": MLM_REPLACE,
            "drop_headings": True,
        },
    }
