"""Per-architecture knowledge, as data. The structure itself is discovered (offcomp.swap.discover).

offcomp finds a model's repeated block list, its weight-bearing modules, its embedding and head, and
which modules read one input, from the model itself; any Hugging Face transformer with one block
list works, and a module's role defaults to its path inside a block (`self_attn.q_proj`,
`attn.c_attn`, `ffn.lin1`). This file only adds what cannot be discovered:

- `ALIASES`: friendly role names per family (`attn.q`, `mlp.up`, ...), so one plan fits BERT and
  LLaMA alike. A model type in no table still works with paths, name suffixes and regexes.
- `FUSED`: how fused projections (GPT-2 `c_attn`, Phi-3 `qkv_proj`, GPT-NeoX/Bloom/Falcon
  `query_key_value`, ...) split into row slices (q/k/v, gate/up), contiguous or interleaved per
  head: the slices are roles a plan can address, and structured methods refuse the fused matrix.
- `UNSUPPORTED_CONFIG`: structures offcomp refuses with one line instead of compressing wrongly.
- `FORWARD_QUIRKS`: attributes a module's own forward applies besides its weight (Gemma's scaled
  embedding); a replacement module must reproduce them (offcomp.swap.install).

Model-type checks appear nowhere else in offcomp.
"""

from __future__ import annotations

_LLAMA = {
    "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj",
}
_BERT = {
    "attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense", "mlp.up": "intermediate.dense", "mlp.down": "output.dense",
}
_FALCON = {"attn.qkv": "self_attention.query_key_value", "attn.o": "self_attention.dense",
           "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}

# model_type → friendly role → module path inside one block.
ALIASES: dict[str, dict[str, str]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    **{t: _BERT for t in ("bert", "roberta", "electra")},
    "deberta-v2": {**_BERT, "attn.q": "attention.self.query_proj", "attn.k": "attention.self.key_proj",
                   "attn.v": "attention.self.value_proj"},
    "distilbert": {"attn.q": "attention.q_lin", "attn.k": "attention.k_lin", "attn.v": "attention.v_lin",
                   "attn.o": "attention.out_lin", "mlp.up": "ffn.lin1", "mlp.down": "ffn.lin2"},
    "opt": {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.out_proj", "mlp.up": "fc1", "mlp.down": "fc2"},
    "phi3": {"attn.qkv": "self_attn.qkv_proj", "attn.o": "self_attn.o_proj", "mlp.gate_up": "mlp.gate_up_proj",
             "mlp.down": "mlp.down_proj"},
    "gpt2": {"attn.qkv": "attn.c_attn", "attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"},
    "gpt_neox": {"attn.qkv": "attention.query_key_value", "attn.o": "attention.dense",
                 "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"},
    "falcon": _FALCON,
    "bloom": _FALCON,
    "modernbert": {"attn.qkv": "attn.Wqkv", "attn.o": "attn.Wo", "mlp.up_gate": "mlp.Wi", "mlp.down": "mlp.Wo"},
}

# Fused projections: model_type → path inside a block → (slice names, layout). The layout is the
# order of the fused matrix's rows, read from each model's own split of the fused output:
# - "blocks": consecutive row blocks, q (heads · head_dim rows) then two equal k/v blocks (grouped-
#   query attention included), or two halves (gate/up) — GPT-2, Phi-3, ModernBERT, Falcon multi-query;
# - "per_head": per attention head, its q, k and v rows (head_dim each): `view(..., heads, 3, head_dim)`
#   (Bloom, Falcon without multi-query) or `view(..., heads, 3 * head_dim)` (GPT-NeoX);
# - "per_group": per key/value head, the query heads that share it, then its k and v rows:
#   `view(..., kv_heads, heads / kv_heads + 2, head_dim)` (Falcon new_decoder_architecture).
# A layout that depends on the config is a list of (config flag, layout), the first true flag wins;
# flag None: otherwise. offcomp.swap turns a layout into each slice's row indices.
_FALCON_QKV = (("new_decoder_architecture", "per_group"), ("multi_query", "blocks"), (None, "per_head"))
Layout = str | tuple[tuple[str | None, str], ...]
FUSED: dict[str, dict[str, tuple[tuple[str, ...], Layout]]] = {
    "gpt2": {"attn.c_attn": (("q", "k", "v"), "blocks")},
    "phi3": {"self_attn.qkv_proj": (("q", "k", "v"), "blocks"), "mlp.gate_up_proj": (("gate", "up"), "blocks")},
    "modernbert": {"attn.Wqkv": (("q", "k", "v"), "blocks"), "mlp.Wi": (("up", "gate"), "blocks")},
    "gpt_neox": {"attention.query_key_value": (("q", "k", "v"), "per_head")},
    "bloom": {"self_attention.query_key_value": (("q", "k", "v"), "per_head")},
    "falcon": {"self_attention.query_key_value": (("q", "k", "v"), _FALCON_QKV)},
}

# Config attributes that mark a structure offcomp cannot compress faithfully (a value > 1 or True).
UNSUPPORTED_CONFIG: dict[str, str] = {
    "is_encoder_decoder": "encoder-decoder models (two block lists, cross-attention) are not supported",
    "num_local_experts": "mixture-of-experts models (a router picks experts per token) are not supported",
    "num_experts": "mixture-of-experts models (a router picks experts per token) are not supported",
    "n_routed_experts": "mixture-of-experts models (a router picks experts per token) are not supported",
    "moe_num_experts": "mixture-of-experts models (a router picks experts per token) are not supported",
}

# Attributes that a module's forward multiplies its output by (Gemma: `embed_scale` = √hidden, on
# `…ScaledWordEmbedding`, as PEFT's `_get_embed_scale` reads it). Carried over to replacements.
FORWARD_QUIRKS: tuple[str, ...] = ("embed_scale",)


def aliases_for(model_type: str) -> dict[str, str]:
    return dict(ALIASES.get(model_type, {}))


def fused_for(model_type: str, config: object = None) -> dict[str, tuple[tuple[str, ...], str]]:
    """Fused projections of a model type: path → (slice names, layout), the layout resolved
    against `config` where it depends on it."""
    out = {}
    for path, (parts, layout) in FUSED.get(model_type, {}).items():
        if not isinstance(layout, str):
            layout = next(lay for flag, lay in layout if flag is None or getattr(config, flag, False))
        out[path] = (parts, layout)
    return out
