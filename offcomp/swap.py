"""The one place that walks a model: list compressible modules and swap replacements in."""

from __future__ import annotations

import torch.nn as nn

from .adapters import Adapter
from .plan import ModuleInfo


def role_table(adapter: Adapter) -> dict[str, str]:
    """Role → module-name suffix, including the whole-model roles `embed` and `lm_head`."""
    roles = dict(adapter.roles)
    roles["embed"] = adapter.embed
    if adapter.lm_head:
        roles["lm_head"] = adapter.lm_head
    return roles


def module_table(model: nn.Module, adapter: Adapter) -> list[ModuleInfo]:
    """Every nn.Linear / nn.Embedding with its weight shape, block index and role."""
    rx = adapter.layer_regex()
    by_suffix = {v: k for k, v in role_table(adapter).items()}
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            kind = "linear"
        elif isinstance(mod, nn.Embedding):
            kind = "embedding"
        else:
            continue
        m = rx.match(name)
        layer, rel = (int(m.group(1)), m.group(2)) if m else (None, name)
        role = by_suffix.get(rel) or next(
            (r for s, r in by_suffix.items() if m is None and (name == s or name.endswith("." + s))), None
        )
        out.append(ModuleInfo(name, kind, tuple(mod.weight.shape), layer, role))
    return out


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` is and return what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
