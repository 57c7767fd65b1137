"""Compressed checkpoints: a self-contained directory a user can ship.

    model.safetensors   every tensor of the compressed model (factors in place of replaced weights;
                        tensors shared inside a joint group are stored once)
    offcomp.json        format version, base model + hash, expanded plan, per-unit method/config/
                        hyper-parameters/shapes/parameter counts, timings, versions
    config.json, tokenizer files

Loading builds the skeleton from the config, rebuilds empty replacement layers through the method
registry, swaps them in, then loads the tensors. No pickle, no imports taken from strings.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_model

from .errors import OffcompError
from .plan import Budget
from .records import dumps
from .registry import FitUnit, get_method
from .swap import densify_, install, linear_view

FORMAT_VERSION = 1
MANIFEST = "offcomp.json"
WEIGHTS = "model.safetensors"


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"offcomp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Check the destination before any work is done, so a long run never ends in a refusal."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OffcompError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise OffcompError(f"{out} exists and is not a directory")
    return out


def atomic_dir(out: Path, write: Any, overwrite: bool = False) -> Path:
    """Write into a temporary sibling and rename it into place: a crash leaves nothing half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists() and overwrite:
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_compressed(model: nn.Module, tokenizer: Any, out: str | Path, manifest: dict[str, Any],
                    overwrite: bool = False) -> Path:
    out = prepare_out_dir(out, overwrite)
    model.config.architectures = [type(model).__name__]
    manifest = {
        "format": "offcomp", "format_version": FORMAT_VERSION, "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": type(model).__name__, "model_type": model.config.model_type,
        "base_prefix": _prefixed(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), **manifest,
    }

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # save_model drops duplicate names of shared tensors (tied embeddings, a joint group's V).
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(dumps(manifest, indent=2))

    return atomic_dir(out, write, overwrite)


def read_manifest(path: str | Path) -> dict[str, Any]:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise OffcompError(f"{path} is not an offcomp checkpoint (no {MANIFEST})")
    manifest = json.loads(f.read_text())
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise OffcompError(f"{path} was written by a newer offcomp (format {manifest['format_version']}); upgrade")
    return manifest


def _prefixed(model: nn.Module) -> str | None:
    """The base-model attribute of a model with a task head (`model`, `bert`), or None if bare."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and hasattr(model, prefix) and getattr(model, prefix) is not model else None


def _renamer(src_prefix: str | None, dst_prefix: str | None):
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


def rebuild_units(model: nn.Module, units: list[dict[str, Any]], rename: Any = lambda n: n) -> list[str]:
    """Swap empty replacement layers in for every unit of a manifest; returns skipped unit labels."""
    skipped = []
    for u in units:
        names = [rename(n) for n in u["names"]]
        try:
            originals = [linear_view(model.get_submodule(n)) for n in names]
        except AttributeError:
            skipped.append(u["label"])  # e.g. an LM head unit when loading with a task head
            continue
        method = get_method(u["method"])
        cfg = method.parse_config(u["options"], u["label"])
        unit = FitUnit(u["label"], names, [tuple(s) for s in u["shapes"]], u["kinds"], u["joint"],
                       Budget(u["budget"]["kind"], u["budget"]["value"]))
        for name, layer in zip(names, method.build(unit, cfg, u["hyper"], originals)):
            install(model, name, layer)
    return skipped


def load_compressed(path: str | Path, *, head: str = "auto", num_labels: int | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Rebuild the exact compressed model (optionally under another task head)."""
    from transformers import AutoConfig, AutoTokenizer

    from .models import HEADS, ModelBundle, file_sha256, head_kind

    path = Path(path)
    manifest = read_manifest(path)
    config = AutoConfig.from_pretrained(path)
    saved_head = manifest.get("head", "base")
    head = saved_head if head == "auto" else head
    if num_labels is not None:
        config.num_labels = num_labels
    model = HEADS[head].from_config(config)
    rename = _renamer(manifest.get("base_prefix"), _prefixed(model))
    skipped = rebuild_units(model, manifest["report"]["units"], rename)
    state = {rename(k): v for k, v in load_file(str(path / WEIGHTS)).items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch: the tensors do not fit the manifest's structure
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise OffcompError(f"{path}/{WEIGHTS} does not match its manifest ({detail[:160]})") from None
    # Names of a shared tensor are saved once; the others are filled through the shared object.
    alias: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        alias.setdefault(id(v), []).append(k)
    by_key = {k: ks for ks in alias.values() for k in ks}
    missing = [k for k in result.missing_keys if not any(a in state for a in by_key.get(k, [k]))]
    if head == saved_head and (missing or result.unexpected_keys):
        bad = (missing or result.unexpected_keys)[0]
        raise OffcompError(f"{path}/{WEIGHTS} does not match its manifest (first mismatch: {bad}); re-run compress")
    base = _prefixed(model)
    if base and any(k.startswith(base + ".") for k in missing):
        raise OffcompError(f"{path}: base weights missing for head {head!r} (first: {missing[0]})")
    model.eval().to(device=device, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a checkpoint saved from Python without a tokenizer
        tokenizer = None
    manifest["loaded"] = {"head": head, "skipped_units": skipped, "new_keys": missing}
    return ModelBundle(model, tokenizer, str(path), str(path.resolve()), file_sha256(path / WEIGHTS),
                       head_kind(head, config), head, manifest)


def export_dense(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write a plain Hugging Face checkpoint with every compressed module multiplied back out."""
    from .models import load_model

    read_manifest(src)
    out = prepare_out_dir(out, overwrite)
    bundle = load_model(str(src))
    model = bundle.model
    densify_(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if bundle.tokenizer is not None:
            bundle.tokenizer.save_pretrained(tmp)
        (tmp / "offcomp-export.json").write_text(json.dumps(
            {"exported_from": str(src), "compressed_sha256": bundle.sha256, "versions": versions(),
             "base": bundle.manifest.get("base") if bundle.manifest else None}, indent=2))

    return atomic_dir(out, write, overwrite)
