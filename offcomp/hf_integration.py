"""transformers plug-in: compressed checkpoints load through `from_pretrained` as a quantization method.

A compressed checkpoint's config.json carries `quantization_config: {"quant_method": "offcomp",
"units": [...]}`: for every replaced unit its method, options, solved hyper-parameters, module names,
shapes and kinds, which is all the method registry needs to rebuild empty replacement layers. With
offcomp imported (importing it registers the method below), `AutoModelFor….from_pretrained(DIR)`
builds the base skeleton on the meta device, swaps the replacement layers in *before* any weight is
read (no dense matrix is ever materialised), then transformers loads the factors, honouring `dtype`
and `device_map`. `save_pretrained` writes the same layout back.

Without offcomp, transformers 5 only *warns* about an unknown quantization method and would load the
dense architecture with every replaced matrix randomly initialised. To make that a stop instead, the
weights file holds, for every replaced module that has no `weight` tensor of its own, an empty
`<module>.weight` of shape (0,): vanilla transformers meets a size mismatch for the dense weight and
raises; with offcomp registered these sentinels are expected and ignored.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn as nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .layers import CompressedModule

QUANT_METHOD = "offcomp"
# Version of the checkpoint layout (quantization_config + tensor names); offcomp.json's format_version.
FORMAT_VERSION = 2
# Keys of a unit record that rebuilding needs (the rest of a manifest unit is reporting).
UNIT_KEYS = ("label", "method", "names", "shapes", "kinds", "joint", "budget", "options", "hyper")


class OffcompConfig(QuantizationConfigMixin):
    """What `from_pretrained` needs to rebuild the compressed modules of a checkpoint.

    units: unit records (UNIT_KEYS) with module names as in the saved model; base_prefix: the saved
    model's base-model attribute (`model`, `bert`) or None, so the names can be mapped onto a skeleton
    with another task head."""

    def __init__(self, units: list[dict[str, Any]], base_prefix: str | None = None,
                 format_version: int = FORMAT_VERSION, quant_method: str = QUANT_METHOD, **kwargs: Any) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"OffcompConfig got quant_method {quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.base_prefix = base_prefix
        self.units = [{k: u[k] for k in UNIT_KEYS} for u in units]
        if kwargs:
            raise ValueError(f"offcomp quantization_config has unknown keys {sorted(kwargs)}; upgrade offcomp")


def prefixed(model: nn.Module) -> str | None:
    """The base-model attribute of a model with a task head (`model`, `bert`), or None if bare."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and hasattr(model, prefix) and getattr(model, prefix) is not model else None


def renamer(src_prefix: str | None, dst_prefix: str | None):
    """Map module/tensor names between a model saved with one head and a skeleton with another
    (e.g. BertModel `encoder.layer.0...` → BertForSequenceClassification `bert.encoder.layer.0...`)."""
    if src_prefix == dst_prefix:
        return lambda name: name

    def rename(name: str) -> str:
        core = name
        if src_prefix:
            if not name.startswith(src_prefix + "."):
                return name  # the saved model's own head (lm_head, cls.*): the new skeleton lacks it
            core = name[len(src_prefix) + 1:]
        return f"{dst_prefix}.{core}" if dst_prefix else core

    return rename


def compressed_modules(model: nn.Module) -> dict[str, CompressedModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedModule)}


def shared_aliases(model: nn.Module) -> dict[str, str]:
    """{alias: first name} for tensors of compressed modules reachable under several names (a joint
    group's shared factor). transformers loads and saves one name and ties the others to it."""
    ours = {id(p) for m in compressed_modules(model).values() for p in m.parameters()}
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # every name once, model order
        if id(p) not in ours:
            continue
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def sentinel_names(model: nn.Module, state_keys: set[str]) -> list[str]:
    """`<module>.weight` of every replaced module that stores no `weight` of its own."""
    return sorted(f"{n}.weight" for n in compressed_modules(model) if f"{n}.weight" not in state_keys)


class OffcompHfQuantizer(HfQuantizer):
    """Rebuilds offcomp's replacement layers on the meta skeleton; the factors then load as weights."""

    requires_calibration = True  # only pre-compressed checkpoints: compression itself is `offcomp compress`

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        version = self.quantization_config.format_version
        if version > FORMAT_VERSION:
            raise ValueError(f"this checkpoint was written by a newer offcomp (format {version}); upgrade offcomp")
        if version < FORMAT_VERSION:
            raise ValueError(f"this checkpoint uses offcomp format {version}, this offcomp reads format "
                             f"{FORMAT_VERSION}; re-run `offcomp compress`")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .checkpoint import rebuild_units

        qc = self.quantization_config
        rename = renamer(qc.base_prefix, prefixed(model))
        units = [{**u, "names": [rename(n) for n in u["names"]]} for u in qc.units]
        self.embed_scales = _embed_scales(model, [n for u in units for n in u["names"]])
        built = rebuild_units(model, units)
        self.skipped_units = [u["label"] for u, ok in zip(units, built) if not ok]
        # From here on the config describes this model: its names and prefix, without skipped units.
        qc.units = [u for u, ok in zip(units, built) if ok]
        qc.base_prefix = prefixed(model)
        model.all_tied_weights_keys.update(shared_aliases(model))
        sentinels = {f"{n}.weight" for u in units for n in u["names"]} | {
            f"{n}.weight" for n in compressed_modules(model)}
        ignore = {"(^|\\.)" + re.escape(k) + "$" for k in sentinels}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | ignore
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # Non-persistent buffers come out of the meta skeleton uninitialised; transformers re-fills
        # the architecture's own (Gemma's embed_scale), offcomp those it carried to replacements.
        for name, scale in self.embed_scales.items():
            model.get_submodule(name).embed_scale.fill_(scale)
        # transformers fills a missing tensor with uninitialised memory; for a factor that is a wrong
        # model that looks right, so a checkpoint lacking any factor is refused.
        tied = model.all_tied_weights_keys
        for mname, mod in compressed_modules(model).items():
            for tname, t in [*mod.named_parameters(), *mod.named_buffers()]:
                full = f"{mname}.{tname}"
                if full in tied or tname in mod._non_persistent_buffers_set:
                    continue
                if t.device.type != "meta" and not getattr(t, "_is_hf_initialized", False):
                    raise ValueError(f"offcomp checkpoint lacks {full} of a compressed module; the weights file "
                                     "does not match its quantization_config (re-run `offcomp compress`)")
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        state = model.state_dict()
        for alias in shared_aliases(model):
            state.pop(alias, None)
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        for key in sentinel_names(model, set(state)):
            state[key] = torch.zeros(0, dtype=dtype)
        return state, {"offcomp_format": str(FORMAT_VERSION)}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # The factors are ordinary floating parameters: Trainer fine-tunes them directly (no adapters).
        return True


def _embed_scales(model: nn.Module, names: list[str]) -> dict[str, float]:
    """The embed_scale (Gemma-style scaled embeddings) of every module about to be replaced, as a
    number: on the meta skeleton the buffer holds no value, the module's scalar copy does."""
    out = {}
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            continue
        scale = getattr(mod, "embed_scale", None)
        if scale is None:
            continue
        value = getattr(mod, "scalar_embed_scale", None)
        if value is None and not (isinstance(scale, torch.Tensor) and scale.device.type == "meta"):
            value = float(scale)
        if value is None:
            raise ValueError(f"offcomp cannot recover the embed_scale of {name} ({type(mod).__name__}) on a "
                             "meta skeleton")
        out[name] = float(value)
    return out


def attach(model: nn.Module, units: list[dict[str, Any]]) -> OffcompHfQuantizer:
    """Mark a model compressed in memory (by `compress_`) as transformers marks a loaded one, so that
    `model.save_pretrained` writes the offcomp layout and quantization_config."""
    cfg = OffcompConfig(units=units, base_prefix=prefixed(model))
    quantizer = OffcompHfQuantizer(cfg, pre_quantized=True)
    model.hf_quantizer = quantizer
    model.config.quantization_config = cfg
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return quantizer


def register() -> None:
    """Make `quant_method: "offcomp"` known to transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(OffcompConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(OffcompHfQuantizer)


register()  # importing this module is what makes transformers know "offcomp" (see hf_register)
