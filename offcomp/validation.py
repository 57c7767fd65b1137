"""Validation signal for early stopping: perplexity on held-out text with candidate modules
swapped into the model temporarily.

Methods that train (the autoencoders) keep the checkpoint that scores best here. This must never
be the test split (the reference AE code selected epochs on test PPL, which leaks); pass e.g.
WikiText-2's `wiki.valid.raw` and a few thousand tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .data import TextSource, causal_text, rows_sha256
from .errors import OffcompError
from .hygiene import refuse_evaluation_text
from .swap import install, replace_module

Validator = Callable[[dict[str, nn.Module]], float]
_TEST_FILE = re.compile(r"(^|[._-])test([._-]|$)", re.IGNORECASE)


def trim_source(source: TextSource, tokenizer: Any, max_tokens: int) -> TextSource:
    """The shortest prefix of rows whose causal text has more than `max_tokens` tokens (or all).

    `perplexity` tokenizes the whole source on every call; a validator is called many times, so it
    gets only the rows it will score. The first `max_tokens` tokens are those of the full text
    (one extra row is kept so that no token at the cut is merged differently)."""
    n_tok, keep = 0, len(source.rows)
    for i, row in enumerate(source.rows):
        n_tok += len(tokenizer(row, add_special_tokens=False).input_ids) + 1
        if n_tok > max_tokens:
            keep = min(i + 2, len(source.rows))
            break
    rows = source.rows[:keep]
    return TextSource(f"{source.name}[:{keep} rows]", source.split, rows, rows_sha256(rows))


def make_validator(
    model: nn.Module,
    tokenizer: Any,
    source: TextSource,
    *,
    kind: str | None = None,
    seq_len: int = 1024,
    max_tokens: int | None = 4096,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    batch_size: int = 1,
    seed: int = 0,
) -> Validator:
    """A `FitContext.validate` function: PPL of `model` on `source` with the given modules swapped in.

    The candidates (dotted name → module) replace the model's modules for one perplexity run and
    the previous modules are put back afterwards, even if the run fails. Lower is better. The model
    is shared with the caller, so earlier units already compressed stay in place while later ones are
    validated: the greedy, unit-by-unit selection `compress_` performs.
    """
    from .eval.ppl import lm_kind, perplexity

    kind = kind or lm_kind(model)
    if source.split == "test" or _TEST_FILE.search(Path(source.name).name):
        raise OffcompError(f"validation text {source.name} ({source.split}) looks like a test split, which would "
                           "leak into model selection; use the validation split, e.g. wiki.valid.raw")
    refuse_evaluation_text(source, "model selection")
    if kind == "causal" and max_tokens is not None:
        source = trim_source(source, tokenizer, max_tokens)
        if len(tokenizer(causal_text(source), add_special_tokens=False).input_ids) < seq_len:
            raise OffcompError(f"validation text {source.name} has fewer than seq_len={seq_len} tokens; "
                               "use more text or a smaller validation seq_len")

    def validate(candidates: dict[str, nn.Module]) -> float:
        previous: dict[str, nn.Module] = {}
        try:
            for name, module in candidates.items():
                previous[name] = install(model, name, module)
            res = perplexity(model, tokenizer, source, kind=kind, seq_len=seq_len, max_tokens=max_tokens,
                             batch_size=batch_size, device=device, dtype=dtype, seed=seed)
            # a non-finite or overflowing PPL (None) ranks below every finite candidate
            return float("inf") if res["ppl"] is None else float(res["ppl"])
        finally:
            for name, module in previous.items():
                replace_module(model, name, module)

    return validate
