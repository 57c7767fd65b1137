"""Evaluation: perplexity here (`offcomp.eval.ppl`); task metrics live in sibling modules."""

from offcomp.eval.ppl import lm_kind, perplexity, resolve_dtype

__all__ = ["lm_kind", "perplexity", "resolve_dtype"]
