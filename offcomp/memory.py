"""Peak memory of `offcomp compress`, predicted from a model's shape (see README, "Memory model").

Fitting runs in fp32 with fp64 statistics whatever the stored dtype, so for a LLaMA-style decoder
(hidden d, FFN width I, n layers, vocabulary V, calibration tokens T = N windows × L tokens):

    sequential  R + H + A + max(E, B + F + S)
    global      R + n·B + E + E_head + n·S + F + A

    R       the Python process with torch and transformers imported, and the tokenizer
    E       input embedding, V·d·4, in memory only while the windows are embedded; the embedding
            and the head are written to the output from the checkpoint, one tensor at a time
    B       one block in fp32, (4d² (GQA: 2d² + 2d·d_kv) + 3d·I)·4, plus its fitted replacement
            (at most the same again) while it is written
    F       the largest fit's working set: the weight, its whitened copy and the SVD factors of the
            largest matrix (I × d) in fp64, ≈ 4·8·I·d
    S       one block's statistics: an fp64 Gram per distinct input, (3d² + I²)·8 (q/k/v, o, gate/up
            share... see below), plus the transient copies of the largest one when it is finished
            (2·I²·8): q/k/v read one input, gate/up one, o and down their own
    H       hidden states, T·d·4 (×3 with modular training: dense, compressed and target streams)
    A       one window's activations through one block, L·(3I + 6d)·4 + heads·L²·4

The global pipeline holds every block and every block's statistics at once (its capture runs the
whole model), which is what the sequential pipeline removes: its peak does not grow with n.
`predict` returns each term and the total in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# measured: the same `offcomp compress` command (Wanda, 8 x 256 tokens of wiki.valid.raw) on a 2-layer,
# 64-wide LLaMA, whose weights are negligible: 812 MB sequential, 821 MB global (CPU torch 2.13)
RUNTIME_BYTES = 850_000_000


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_params(self) -> int:
        d, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * d * d + 2 * d * kv + 3 * d * self.intermediate

    def params(self) -> int:
        emb = self.vocab * self.hidden
        return self.layers * self.block_params() + emb * (1 if self.tied else 2)


def llama_shape(config: Any) -> Shape:
    """The shape of a LLaMA-family config (llama, mistral, qwen2, ...)."""
    heads = config.num_attention_heads
    return Shape(config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size, heads,
                 getattr(config, "num_key_value_heads", None) or heads, bool(getattr(config, "tie_word_embeddings",
                                                                                     False)))


def predict(shape: Shape, pipeline: str, *, tokens: int, seq_len: int, modular: bool = False,
            gram: bool = True, runtime: int = RUNTIME_BYTES) -> dict[str, int]:
    """Predicted peak resident bytes of `compress` by `pipeline` ("sequential" or "global"), term by
    term. `gram`: the statistics include XᵀX (svd-llm, whitened allocation; the global pipeline's
    capture always takes it); without it they are vectors (Σx², mean |x|) and negligible."""
    statistics = gram
    d, inter, n = shape.hidden, shape.intermediate, shape.layers
    embed = shape.vocab * d * 4
    block = shape.block_params() * 4
    fit = 4 * 8 * inter * d
    stats = ((3 * d * d + inter * inter) * 8 + 2 * inter * inter * 8) if statistics else 0
    hidden = tokens * d * 4 * (3 if modular else 1)
    act = seq_len * (3 * inter + 6 * d) * 4 + shape.heads * seq_len * seq_len * 4
    if pipeline == "sequential":
        # the embedding is in memory only while the windows are embedded, before any block
        per_block = 2 * block + fit + stats
        terms = {"runtime": runtime, "hidden_states": hidden, "activations": act,
                 **({"embedding": embed} if embed > per_block else {"block": 2 * block, "fit": fit,
                                                                     "statistics": stats})}
    elif pipeline == "global":
        all_stats = n * (3 * d * d + inter * inter) * 8 + 2 * inter * inter * 8 if statistics else 0
        terms = {"runtime": runtime, "model": n * block + embed * (1 if shape.tied else 2), "fit": fit,
                 "statistics": all_stats, "activations": act}
    else:
        raise ValueError(f"unknown pipeline {pipeline!r}")
    return {**terms, "total": sum(terms.values())}
