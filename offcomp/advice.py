"""Warnings about plans that are valid but known to wreck a model (measured, see the README)."""

from __future__ import annotations

from typing import Any

# On smollm2-135m, data-free truncation destroyed the model whenever it touched a large share of it:
# plain SVD of all 210 decoder linears at ratio 0.9 -> WikiText-2 PPL 8.1e6 (dense 25), of the FFN
# down projections (20 % of the model) at cr 10 -> 3.3e6, of the embedding (21 %) at cr 4 -> 7,003;
# the same SVD of the attention query maps alone (7 %) at cr 3 only tripled it. Hence: a decoder,
# data-free methods keeping <= 90 % of modules that hold >= 15 % of the model's parameters.
KEPT_AT_MOST = 0.9
SHARE_AT_LEAST = 0.15
# Pruning without data is milder: magnitude pruning of all 210 decoder linears to 50 % took it to
# 575 (23x; SparseGPT 45). Nothing was measured between 50 % and 90 % kept, so no claim there.
PRUNE_KEPT_AT_MOST = 0.5
# Structured pruning without data (magnitude scores) is far worse than unstructured: removing 10 % of the
# neurons of all 30 FFNs (59 % of the model) took it to 21,818 on the same 64 x 1024 test tokens
# (docs/records/advice; with Wanda scores from a capture, 27 on 16 x 1024).
STRUCTURED_KEPT_AT_MOST = 0.9
RECIPE = ("a data-aware recipe with --calib-data TEXT (e.g. wiki.valid.raw): offcomp compress --plan "
          "decoder-ratio-0.8-sparsegpt (smallest file) or decoder-ratio-0.8-svdllm-modular (fewer FLOPs); "
          "see README, Measured")


def data_free_warning(planned: list[Any], total_params: int, kind: str) -> str | None:
    """One line when a decoder plan truncates much of the model without data; else None.

    `planned`: `offcomp.api.plan_units` output; `kind`: the model bundle's kind ("causal", ...)."""
    if kind != "causal" or not total_params:
        return None
    free = [p for p in planned if not p.method.stats_needed(p.cfg)]
    structured = [p for p in free if p.method.name == "prune-structured"]
    pruned = [p for p in free if p.method.name.startswith("prune") and p not in structured]
    truncated = [p for p in free if not p.method.name.startswith("prune")]
    for group, kept_at_most, measured in (
            (truncated, KEPT_AT_MOST, "this takes perplexity from 25 to 1e4-1e8"),
            (structured, STRUCTURED_KEPT_AT_MOST,
             "removing 10 % of the FFN neurons by magnitude takes perplexity from 25 to 21,818"),
            (pruned, PRUNE_KEPT_AT_MOST, "magnitude pruning to 50 % takes perplexity from 25 to 575")):
        original = sum(p.unit.original_params for p in group)
        stored = sum(p.stored_params for p in group)
        if not original or stored / original > kept_at_most or original / total_params < SHARE_AT_LEAST:
            continue
        methods = ", ".join(sorted({p.method.name for p in group}))
        return (f"{methods} keeps {stored / original:.0%} of {original / total_params:.0%} of this decoder's "
                f"parameters without calibration data: measured on smollm2-135m, {measured}; use {RECIPE}")
    return None
