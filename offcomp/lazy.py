"""Lazy weights: a model skeleton whose tensors are read from its safetensors files only when needed.

The sequential pipeline never holds the whole model: the skeleton is built with its parameters on
the meta device (buffers computed at construction, such as rotary frequencies, stay real), the parts
outside the block list (embeddings, final norm, head) are read once, and each block's tensors are
read when the block is processed and dropped back to meta afterwards. One `model.safetensors` and
sharded checkpoints (`model.safetensors.index.json` + `model-0000k-of-0000n.safetensors`) both work;
stored bf16/fp16 tensors are cast to the working dtype one tensor at a time.

Tensor names are matched as transformers matches them: the model's own name, or the name without /
with its base-model prefix (a `LlamaModel` saved bare, loaded under `LlamaForCausalLM`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .errors import OffcompError
from .hf_integration import prefixed

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class LazyCheckpoint:
    """Where each tensor of a safetensors checkpoint lives, and reading tensors by name on demand.

    `reads` counts the tensors read so far (tests use it to prove that nothing is read early)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise OffcompError(f"{index} is not a valid shard index ({e}); re-download the model") from None
            self.files = {k: self.directory / v for k, v in weight_map.items()}
        elif (self.directory / SINGLE).is_file():
            self.files = {}
            try:
                with safe_open(str(self.directory / SINGLE), "pt") as f:
                    self.files = {k: self.directory / SINGLE for k in f.keys()}
            except (SafetensorError, OSError) as e:
                raise OffcompError(f"{self.directory / SINGLE} is not a readable safetensors file "
                                   f"({str(e)[:100]})") from None
        else:
            raise OffcompError(f"{self.directory} has no {SINGLE} or {INDEX}; the sequential pipeline reads "
                               "safetensors checkpoints only (use --pipeline global for other formats)")
        missing = sorted({str(p.name) for p in self.files.values() if not p.is_file()})
        if missing:
            raise OffcompError(f"{self.directory}: shard {missing[0]} named in {INDEX} is missing")
        self.reads = 0

    def key_for(self, name: str, prefix: str | None) -> str | None:
        """The stored key of the model's tensor `name` (the model's base prefix added or removed)."""
        candidates = [name]
        if prefix:
            if name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1:])
            else:
                candidates.append(f"{prefix}.{name}")
        return next((c for c in candidates if c in self.files), None)

    def stored_names(self, model: nn.Module) -> Callable[[str], str]:
        """The name each of `model`'s tensors is stored under here (its own where it is not stored):
        what the weights hash names them by (`offcomp.models.state_dict_sha256`, `lazy_sha256`)."""
        base = prefixed(model)
        return lambda k: self.key_for(k, base) or k

    def read(self, keys: list[str], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors `keys`, on `device`, floating ones cast to `dtype` (one tensor at a time)."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            with safe_open(str(path), "pt", device="cpu") as f:
                for k in names:
                    t = f.get_tensor(k)
                    out[k] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                    self.reads += 1
        return out


def empty_model(config: Any, head_class: Any, trust_remote_code: bool = False) -> nn.Module:
    """The model of `config` with every parameter on the meta device and real buffers."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = head_class.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    model.tie_weights()  # as from_pretrained does: a tied head is the embedding's very tensor
    return model.eval()


@torch.no_grad()
def materialise(model: nn.Module, module: nn.Module, prefix: str, source: LazyCheckpoint,
                device: torch.device, dtype: torch.dtype = torch.float32, *, recurse: bool = True,
                skip: frozenset[str] = frozenset()) -> int:
    """Read the meta tensors of `module` (named `prefix` in `model`) from `source`; returns how many.
    `recurse=False`: the module's own tensors only; `skip`: tensor names left alone (a tied head).
    A tensor shared under several names (BERT's decoder bias is `cls.predictions.bias`) is read by
    whichever name the checkpoint stores and given to every holder. A tensor the checkpoint lacks
    under every name is an error: it would otherwise stay uninitialised."""
    todo: list[tuple[torch.Tensor, str]] = []
    for sub_name, sub in module.named_modules() if recurse else [("", module)]:
        for attr, t in [*sub._parameters.items(), *sub._buffers.items()]:
            if t is None or t.device.type != "meta" or (sub_name and f"{sub_name}.{attr}" in skip) \
                    or (not sub_name and attr in skip):
                continue
            todo.append((t, ".".join(x for x in (prefix, sub_name, attr) if x)))
    if not todo:
        return 0
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = {}  # every (module, attribute) of a tensor
    names: dict[int, list[str]] = {}
    for mname, sub in model.named_modules(remove_duplicate=False):
        for table, is_param in ((sub._parameters, True), (sub._buffers, False)):
            for attr, t in table.items():
                if t is not None and t.device.type == "meta":
                    holders.setdefault(id(t), []).append((sub, attr, is_param))
                    names.setdefault(id(t), []).append(f"{mname}.{attr}" if mname else attr)
    keys, base = [], prefixed(model)
    for t, full in todo:
        key = next((k for n in [full, *names.get(id(t), [])] if (k := source.key_for(n, base)) is not None), None)
        if key is None:
            raise OffcompError(f"{source.directory} has no tensor for {full}; the checkpoint does not match its "
                               "config (incomplete download?)")
        keys.append(key)
    tensors = source.read(list(dict.fromkeys(keys)), device, dtype)
    done: set[int] = set()
    for (t, _), key in zip(todo, keys):
        if id(t) in done:
            continue
        done.add(id(t))
        value = tensors[key]
        param = nn.Parameter(value, requires_grad=False)  # one Parameter for every holder: ties survive
        for sub, attr, is_param in holders.get(id(t), []):
            if is_param:
                sub._parameters[attr] = param
            else:
                sub._buffers[attr] = value
    return len(done)


def release(module: nn.Module, recurse: bool = True) -> None:
    """Drop a processed module's tensors (parameters and persistent buffers back to meta)."""
    for sub in module.modules() if recurse else [module]:
        for attr, t in list(sub._parameters.items()):
            if t is not None and t.device.type != "meta":
                sub._parameters[attr] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
        for attr, t in list(sub._buffers.items()):
            if t is not None and attr not in sub._non_persistent_buffers_set and t.device.type != "meta":
                sub._buffers[attr] = torch.empty_like(t, device="meta")


def tie_after_load(model: nn.Module) -> None:
    """Re-tie the LM head to the embedding after the embedding was read (ties break on assignment)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_word_embeddings", False) and hasattr(model, "get_output_embeddings"):
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and emb is not None:
            head.weight = emb.weight


def lazy_sha256(model: nn.Module, source: LazyCheckpoint) -> str:
    """`offcomp.models.state_dict_sha256` of the model `from_pretrained` would build (fp32), computed
    one tensor at a time from the files: the same identity as the global pipeline's, without ever
    holding the model. A tied tensor is read under the name it is stored by."""
    import hashlib

    from .models import hash_tensor

    base = prefixed(model)
    state = model.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = {}
    for k, t in state.items():
        names_of.setdefault(id(t), []).append(k)
    h = hashlib.sha256()
    stored_name = source.stored_names(model)
    for name, k in sorted((stored_name(k), k) for k in state):
        t = state[k]
        key = next((c for n in [k, *names_of[id(t)]] if (c := source.key_for(n, base)) is not None), None)
        if key is None:
            if t.device.type == "meta":
                raise OffcompError(f"{source.directory} has no tensor for {k}; the checkpoint does not match its "
                                   "config")
            continue  # a buffer the model computes itself: not part of the weights (as in the global hash)
        hash_tensor(h, name, source.read([key], torch.device("cpu"), torch.float32)[key])
    return h.hexdigest()


def unexpected_keys(model: nn.Module, source: LazyCheckpoint) -> list[str]:
    """Stored tensors that belong to modules the architecture has but match none of its tensors (a
    checkpoint of another layout: transformers would leave the real tensors random).

    A stored copy of a non-persistent buffer is not one of them: older transformers versions saved
    buffers such as BERT's `embeddings.position_ids` that today's modules compute themselves, and
    transformers skips them when loading (minilm-l6's checkpoint holds one)."""
    base = prefixed(model)
    used = {source.key_for(k, base) for k in model.state_dict()}
    computed = {f"{name}.{b}" if name else b for name, mod in model.named_modules()
                for b in mod._non_persistent_buffers_set}
    modules = dict(model.named_modules())
    out = []
    for key in source.files:
        if key in used or key in computed or (base and f"{base}.{key}" in computed):
            continue
        owner = key.rpartition(".")[0]
        if owner in modules or (base and f"{base}.{owner}" in modules):
            out.append(key)
    return sorted(out)


def load_lazy(name: str, *, trust_remote_code: bool = False) -> tuple[Any, LazyCheckpoint]:
    """A `ModelBundle` whose model is a meta skeleton, and the checkpoint its tensors come from.
    Only local safetensors directories (or embedded names) read lazily."""
    from transformers import AutoConfig, AutoTokenizer

    from .models import (
        HEADS,
        ModelBundle,
        default_head,
        head_kind,
        refuse_orphan_factors,
        refuse_unkept_head,
        resolve,
    )

    src = resolve(name)
    if not Path(src).is_dir():
        raise OffcompError(f"{name}: lazy loading reads a local directory; download it first "
                           "(huggingface-cli download) or use --pipeline global")
    refuse_orphan_factors(src)
    source = LazyCheckpoint(src)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise OffcompError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    refuse_unkept_head(config, name)
    head = default_head(config)
    model = empty_model(config, HEADS[head], trust_remote_code)
    bad = unexpected_keys(model, source)
    if bad:
        raise OffcompError(f"{name} holds {len(bad)} tensor(s) the architecture does not have (first: {bad[0]}); "
                           "the checkpoint is not a plain model of its config")
    sha = lazy_sha256(model, source)
    return ModelBundle(model, tokenizer, name, src, sha, head_kind(head, config), head), source
