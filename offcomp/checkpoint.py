"""Compressed checkpoints: a self-contained directory a user can ship.

    model.safetensors   every tensor of the compressed model (factors in place of replaced weights;
                        tensors shared inside a joint group are stored once)
    offcomp.json        format version, base model + hash, expanded plan, per-unit method/config/
                        hyper-parameters/shapes/parameter counts, timings, versions, and the size +
                        sha256 of every other file (`files`) and of itself (`self_sha256`)
    config.json, tokenizer files

Loading builds the skeleton from the config, rebuilds empty replacement layers through the method
registry, swaps them in, then loads the tensors. No pickle, no imports taken from strings.
Every recorded file is checked first (sizes always, hashes unless `verify=False`), and the
manifest's structure is validated, so a damaged checkpoint is one clear error, never a wrong number.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import _remove_duplicate_names, load_file, save_file

from .errors import OffcompError
from .integrity import hash_files, read_json, seal, verify_document, verify_files
from .plan import Budget
from .records import dumps
from .registry import FitUnit, get_method
from .swap import densify_, install, module_view

FORMAT_VERSION = 1
MANIFEST = "offcomp.json"
WEIGHTS = "model.safetensors"
RESULTS = "results.jsonl"  # appended next to the checkpoint by evaluations; not part of it
# safetensors metadata marking weights that only load through offcomp.json (factors in place of
# weights): a directory that holds them but lost its manifest is refused, never loaded as dense.
WEIGHTS_MARK = {"format": "pt", "offcomp_format": str(FORMAT_VERSION)}
REMAKE = "re-run `offcomp compress` to re-create it"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)  # JSON types as written: "1" is not a format version


class _Budget(_Strict):
    kind: str
    value: Any  # a number, or per-mode ranks (tucker)


class _Unit(_Strict):
    """The fields of a manifest unit that loading uses (others are kept, not checked)."""

    label: str
    method: str
    names: list[str]
    shapes: list[list[int]]
    kinds: list[str]
    joint: bool
    budget: _Budget
    options: dict[str, Any]
    hyper: dict[str, Any]


class _Report(_Strict):
    units: list[_Unit]
    params_before: int
    params_after: int


class _Manifest(_Strict):
    format_version: int
    head: str = "base"
    base_prefix: str | None = None
    report: _Report


def versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"offcomp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def prepare_out_dir(out: str | Path, overwrite: bool = False, sources: tuple[str | Path | None, ...] = (),
                    option: str = "--out") -> Path:
    """Check the destination before any work is done, so a long run never ends in a refusal."""
    from .paths import check_output

    return check_output(out, kind="dir", option=option, sources=sources, exists_ok=overwrite, replaces=overwrite)


def atomic_dir(out: Path, write: Any, overwrite: bool = False) -> Path:
    """Write into a temporary sibling and rename it into place: a crash leaves nothing half-written.

    With `overwrite` the new directory takes the old one's place in one step (Linux renameat2
    RENAME_EXCHANGE; elsewhere the old one is renamed aside first and put back by the next run if
    the process dies in between) and the old one is deleted only afterwards, so at every moment
    `out` is either the complete old or the complete new output."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists() and overwrite:
            if not _exchange(tmp, out):  # no atomic swap here: old aside, new in, old removed
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old output
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system or kernel without it
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove temporary siblings of `out` (`.NAME.tmp-PID`) left by processes that no longer run,
    and put back an old output (`.NAME.old-PID`) that a dead process had renamed aside; a live
    process's directories are never touched. Returns what was removed or restored."""
    done = []
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(p, out)  # died between moving the old output aside and the new one in
        else:
            shutil.rmtree(p, ignore_errors=True)
        done.append(p)
    return done


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
        save_state(model, tmp / WEIGHTS, WEIGHTS_MARK)
        sealed = seal({**manifest, "files": hash_files(tmp, skip={MANIFEST})})
        (tmp / MANIFEST).write_text(dumps(sealed, indent=2))

    return atomic_dir(out, write, overwrite)


def save_state(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save every tensor once, as safetensors' save_model does (duplicate names of a shared tensor,
    such as tied embeddings or a joint group's V, are dropped and recorded in the metadata as
    dropped → kept), but byte-for-byte reproducibly: safetensors writes its metadata in hash-map
    order, so the bytes (the file hash) of one model changed from save to save; the metadata keys
    are sorted here. The caller's dict is never modified."""
    state = model.state_dict()
    meta = dict(metadata or {"format": "pt"})
    for kept, dropped in _remove_duplicate_names(state).items():
        for name in dropped:
            meta.setdefault(name, kept)
            del state[name]
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    _sort_metadata(path)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted (same length: only order changes)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        canon = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                           ensure_ascii=False).encode()
        if len(canon) <= n:  # always, unless a serialiser difference; then the file is left as it is
            f.seek(8)
            f.write(canon + b" " * (n - len(canon)))


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a checkpoint, checked: valid JSON, the fields loading needs with their types,
    and (when `verify`) its own recorded hash."""
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise OffcompError(f"{path} is not an offcomp checkpoint (no {MANIFEST})")
    manifest = read_json(f, "offcomp manifest", REMAKE)
    version = manifest.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise OffcompError(f"{path} was written by a newer offcomp (format {version}); upgrade")
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise OffcompError(f"{f} is malformed ({where}: {err['msg']}); {REMAKE}") from None
    if verify:
        verify_document(manifest, f, REMAKE)
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


def rebuild_units(model: nn.Module, units: list[dict[str, Any]], rename: Any = lambda n: n,
                  where: Path | None = None) -> list[str]:
    """Swap empty replacement layers in for every unit of a manifest; returns skipped unit labels."""
    skipped = []
    for u in units:
        names = [rename(n) for n in u["names"]]
        try:
            originals = [module_view(model, n) for n in names]
        except AttributeError:
            skipped.append(u["label"])  # e.g. an LM head unit when loading with a task head
            continue
        method = get_method(u["method"])
        cfg = method.parse_config(u["options"], u["label"])
        unit = FitUnit(u["label"], names, [tuple(s) for s in u["shapes"]], u["kinds"], u["joint"],
                       Budget(u["budget"]["kind"], u["budget"]["value"]))
        try:
            layers = method.build(unit, cfg, u["hyper"], originals)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # hyper-parameters that do not fit
            raise OffcompError(f"{where or 'manifest'}: unit {u['label']!r} cannot be rebuilt "
                               f"({type(e).__name__}: {str(e)[:100]}); {REMAKE}") from None
        for name, layer in zip(names, layers):
            install(model, name, layer)
    return skipped


def _with_shared_names(file: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under every name they had: `save_model` keeps one name of a shared
    tensor (e.g. an MLM decoder tied to the input embedding may be kept as the decoder) and records
    the dropped names in the metadata, so loading under another head still finds the base's name."""
    from safetensors import safe_open

    state = load_file(str(file))
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    for dropped, kept in meta.items():
        if kept in state and dropped not in state:
            state[dropped] = state[kept]
    return state


def load_compressed(path: str | Path, *, head: str = "auto", num_labels: int | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True):
    """Rebuild the exact compressed model (optionally under another task head).

    Every file the manifest records is checked first: its size always, its sha256 unless
    `verify=False` (the weights' hash is the bundle's identity, so it is computed only once)."""
    from transformers import AutoConfig, AutoTokenizer

    from .models import HEADS, ModelBundle, file_sha256, head_kind

    path = Path(path)
    manifest = read_manifest(path, verify)
    files = manifest.get("files")
    if files is not None and (not isinstance(files, dict) or WEIGHTS not in files):
        raise OffcompError(f"{path / MANIFEST} is malformed (files: no entry for {WEIGHTS}); {REMAKE}")
    hashes = verify_files(path, files, verify=verify, fix=REMAKE, manifest=MANIFEST) if files is not None else {}
    if not (path / WEIGHTS).is_file():
        raise OffcompError(f"{path / WEIGHTS} is missing; {REMAKE}")
    recorded = (files or {}).get(WEIGHTS, {}).get("sha256")
    sha = hashes.get(WEIGHTS) or (recorded if not verify else None) or file_sha256(path / WEIGHTS)
    saved_head = manifest["head"] if "head" in manifest else "base"
    head = saved_head if head == "auto" else head
    if head not in HEADS:
        raise OffcompError(f"{path / MANIFEST}: unknown head {head!r}; {REMAKE}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise OffcompError(f"{path}/config.json cannot be read ({str(e).splitlines()[0][:120]}); {REMAKE}") from None
    if num_labels is not None:
        config.num_labels = num_labels
    model = HEADS[head].from_config(config)
    rename = _renamer(manifest.get("base_prefix"), _prefixed(model))
    skipped = rebuild_units(model, manifest["report"]["units"], rename, where=path / MANIFEST)
    try:
        state = {rename(k): v for k, v in _with_shared_names(path / WEIGHTS).items()}
    except (SafetensorError, OSError) as e:
        raise OffcompError(f"{path / WEIGHTS} is not a readable safetensors file ({str(e)[:120]}); {REMAKE}") from None
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
    tokenizer = _load_tokenizer(path, AutoTokenizer, required=files is None or any(
        n.startswith("tokenizer") for n in files))
    manifest["loaded"] = {"head": head, "skipped_units": skipped, "new_keys": missing,
                          "verified": "sha256" if verify and files is not None else
                          ("size" if files is not None else "none (manifest records no file hashes)")}
    return ModelBundle(model, tokenizer, str(path), str(path.resolve()), sha, head_kind(head, config), head, manifest)


def _load_tokenizer(path: Path, auto: Any, required: bool) -> Any:
    """The checkpoint's tokenizer; None only for a checkpoint saved (from Python) without one."""
    if not required and not (path / "tokenizer_config.json").is_file():
        return None
    try:
        return auto.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception on a damaged tokenizer.json
        raise OffcompError(f"{path}: the tokenizer cannot be loaded ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:100] if str(e) else ''}); {REMAKE}") from None


def export_dense(src: str | Path, out: str | Path, overwrite: bool = False, verify: bool = True) -> Path:
    """Write a plain Hugging Face checkpoint with every compressed module multiplied back out."""
    from .models import load_model

    out = prepare_out_dir(out, overwrite, sources=(src,), option="export destination")
    read_manifest(src, verify)
    bundle = load_model(str(src), verify=verify)
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
