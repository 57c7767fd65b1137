"""Per-architecture knowledge, as data.

An adapter says where the transformer blocks live and what each *role* (`attn.q`, `mlp.up`, ...)
is called inside a block. Plans may name roles instead of architecture-specific module names, so
one plan works on BERT and LLaMA alike. Model-type checks appear nowhere else in offcomp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from .errors import OffcompError


@dataclass(frozen=True)
class Adapter:
    model_type: str
    # Dotted path of the block list, matched as a suffix so it works with any head
    # (`encoder.layer` matches both `encoder.layer.3` and `bert.encoder.layer.3`).
    layers: str
    roles: dict[str, str]
    embed: str
    lm_head: str | None
    # Roles that read the same input tensor: captured once, and usable as one joint group.
    shared_inputs: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    def layer_regex(self) -> re.Pattern[str]:
        return re.compile(r"^(?:.*\.)?" + re.escape(self.layers) + r"\.(\d+)\.(.+)$")


_LLAMA_ROLES = {
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
_LLAMA_SHARED = (("attn.q", "attn.k", "attn.v"), ("mlp.gate", "mlp.up"))


def _llama_like(model_type: str) -> Adapter:
    return Adapter(model_type, "layers", _LLAMA_ROLES, "embed_tokens", "lm_head", _LLAMA_SHARED)


_BERT = Adapter(
    "bert",
    "encoder.layer",
    {
        "attn.q": "attention.self.query",
        "attn.k": "attention.self.key",
        "attn.v": "attention.self.value",
        "attn.o": "attention.output.dense",
        "mlp.up": "intermediate.dense",
        "mlp.down": "output.dense",
    },
    "embeddings.word_embeddings",
    "cls.predictions.decoder",
    (("attn.q", "attn.k", "attn.v"),),
)

ADAPTERS: dict[str, Adapter] = {
    "bert": _BERT,
    "roberta": Adapter(**{**_BERT.__dict__, "model_type": "roberta", "lm_head": "lm_head.decoder"}),
    **{t: _llama_like(t) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
}


def adapter_for(model_or_type: nn.Module | str) -> Adapter:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    if model_type not in ADAPTERS:
        raise OffcompError(
            f"no adapter for model type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
