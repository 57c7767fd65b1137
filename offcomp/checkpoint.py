"""Compressed checkpoints: a self-contained directory a user can ship.

    model.safetensors   every tensor of the compressed model (factors in place of replaced weights;
                        tensors shared inside a joint group are stored once)
    offcomp.json        format version, base model + hash, expanded plan, per-unit method/config/
                        hyper-parameters/shapes/parameter counts, timings, versions, and the size +
                        sha256 of every other file (`files`) and of itself (`self_sha256`)
    config.json         the architecture's config plus `quantization_config: {quant_method: "offcomp",
                        units: [...]}`, so with offcomp imported any `AutoModelFor….from_pretrained(DIR)`
                        rebuilds the model (offcomp/hf_integration.py)
    README.md           model card (offcomp/model_card.py), rebuilt by evaluations: not sealed
    tokenizer files

Loading is `from_pretrained` through the offcomp quantizer: skeleton on the meta device, empty
replacement layers through the method registry, then the tensors. No pickle, no imports from strings.
Every recorded file is checked first (sizes always, hashes unless `verify=False`), and the
manifest's structure is validated, so a damaged checkpoint is one clear error, never a wrong number.
"""

from __future__ import annotations

import errno
import glob
import hashlib
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
from safetensors.torch import _remove_duplicate_names, save_file

from .errors import OffcompError
from .hf_integration import FORMAT_VERSION, QUANT_METHOD, UNIT_KEYS, attach, prefixed
from .integrity import hash_files, read_json, seal, verify_document, verify_files
from .plan import Budget
from .records import dumps
from .registry import FitUnit, get_method
from .swap import densify_, install, module_view

MANIFEST = "offcomp.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # sharded checkpoints (the sequential pipeline): index + shards
RESULTS = "results.jsonl"  # appended next to the checkpoint by evaluations; not part of it
CARD = "README.md"  # the model card, rebuilt when evaluations append: derived, not sealed
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


def _manifest_header(model: nn.Module, manifest: dict[str, Any]) -> dict[str, Any]:
    attach(model, manifest.get("report", {}).get("units", []))
    return {
        "format": "offcomp", "format_version": FORMAT_VERSION, "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": type(model).__name__, "model_type": model.config.model_type,
        "base_prefix": prefixed(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), **manifest,
    }


def _finish_dir(tmp: Path, out: Path, model: nn.Module, tokenizer: Any, manifest: dict[str, Any]) -> None:
    """Tokenizer, byte counts, the sealed manifest and the model card, once the weights are in `tmp`."""
    from .model_card import write_model_card

    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    manifest["bytes"] = checkpoint_bytes(model, tmp, manifest.get("report", {}))
    sealed = seal({**manifest, "files": hash_files(tmp, skip={MANIFEST, CARD})})
    (tmp / MANIFEST).write_text(dumps(sealed, indent=2))
    write_model_card(tmp, title=out.name)


def save_compressed(model: nn.Module, tokenizer: Any, out: str | Path, manifest: dict[str, Any],
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a compressed model as a checkpoint `from_pretrained` loads (see hf_integration).

    `dtype` casts the model's floating tensors in place before writing (None: keep the model's own),
    so the model in memory is afterwards exactly what a reload gives."""
    out = prepare_out_dir(out, overwrite)
    if dtype is not None:
        model.to(dtype=dtype)
    manifest = _manifest_header(model, manifest)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)  # the quantizer writes the factors and the offcomp mark
        _sort_metadata(tmp / WEIGHTS)
        _finish_dir(tmp, out, model, tokenizer, manifest)

    return atomic_dir(out, write, overwrite)


class ShardWriter:
    """A compressed checkpoint written block by block (the sequential pipeline): each block goes to
    its own safetensors shard as soon as it is final, in the layout the quantizer's
    `save_pretrained` writes (shared factors once, empty `.weight` sentinels, offcomp's mark), so
    the whole model is never in memory. `finish` adds the rest of the model and the index."""

    def __init__(self, directory: Path, dtype: torch.dtype | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.files: dict[str, Path] = {}  # stem → file, in model order

    def write_rest(self, model: nn.Module, source: Any, blocks: str, shard_bytes: int = 64 << 20) -> None:
        """What lies outside the block list (embeddings, norms, head), copied from the lazy
        checkpoint `source` one tensor at a time in the output dtype (nothing there was compressed),
        in shards of at most `shard_bytes` (a larger tensor alone: serialising copies a shard once
        more in memory); a head tied to the embedding is stored once."""
        base = prefixed(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = getattr(model.config, "tie_word_embeddings", False) and head is not None
        skip = {n + ".weight" for n, m in model.named_modules() if tied and m is head}
        batch: dict[str, torch.Tensor] = {}
        size, k = 0, 0
        for name in model.state_dict():
            if name.startswith(blocks + ".") or name in skip:
                continue
            key = source.key_for(name, base)
            if key is None:
                continue  # a buffer the model computes itself
            t = source.read([key], torch.device("cpu"), self.dtype or torch.float32)[key]
            if batch and size + t.numel() * t.element_size() > shard_bytes:
                self._save(f"rest-{k:03d}", batch)
                batch, size, k = {}, 0, k + 1
            batch[name] = t.contiguous()
            size += t.numel() * t.element_size()
        if batch:
            self._save(f"rest-{k:03d}", batch)

    def _save(self, stem: str, state: dict[str, torch.Tensor]) -> Path:
        path = self.directory / f"{stem}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp), metadata=WEIGHTS_MARK)
        _sort_metadata(tmp)
        os.replace(tmp, path)
        self.files[stem] = path
        return path

    def write(self, stem: str, module: nn.Module, prefix: str, exclude: str | None = None) -> Path:
        """Save `module` (named `prefix` in the model) as shard `stem`; `exclude`: a name prefix
        (the block list, when saving what is outside it)."""
        from .hf_integration import compressed_modules, shared_aliases

        if self.dtype is not None:
            module.to(dtype=self.dtype)
        full = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        drop = set(shared_aliases(module))
        for k, t in module.state_dict(keep_vars=True).items():
            if exclude and full(k).startswith(exclude + "."):
                continue
            if k in drop or id(t) in seen:  # a shared factor or a tied weight: stored once
                continue
            seen.add(id(t))
            state[full(k)] = t.detach().to("cpu").contiguous()
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        for name in compressed_modules(module):
            if (exclude and full(name).startswith(exclude + ".")) or f"{full(name)}.weight" in state:
                continue
            state[f"{full(name)}.weight"] = torch.zeros(0, dtype=dtype)
        return self._save(stem, state)


def save_sharded(model: nn.Module, tokenizer: Any, out: str | Path, manifest: dict[str, Any], writer: ShardWriter,
                 overwrite: bool = False, source: Any = None) -> Path:
    """Finish a checkpoint whose blocks `writer` has written: the rest of the model as the last
    shard(s) (from the lazy checkpoint `source` when given, else from memory),
    `model.safetensors.index.json`, config.json with the quantization_config, tokenizer and the
    sealed manifest, all swapped into place at once."""
    from .swap import discover

    out = prepare_out_dir(out, overwrite)
    blocks = discover(model).blocks
    if source is not None:
        writer.write_rest(model, source, blocks)
    else:
        writer.write("rest", model, "", exclude=blocks)
    if writer.dtype is not None:
        model.to(dtype=writer.dtype)  # what is still in memory (meta blocks cost nothing)
    manifest = _manifest_header(model, manifest)

    def write(tmp: Path) -> None:
        from safetensors import safe_open

        files = list(writer.files.values())
        weight_map: dict[str, str] = {}
        total = 0
        for k, f in enumerate(files):
            name = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
            with safe_open(str(f), "pt") as sf:
                for key in sf.keys():
                    weight_map[key] = name
                    sl = sf.get_slice(key)
                    total += _numel(sl.get_shape()) * _DTYPE_BYTES.get(sl.get_dtype(), 4)
            shutil.copyfile(f, tmp / name)
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map":
                                             dict(sorted(weight_map.items()))}, indent=2))
        model.config.architectures = [type(model).__name__]
        model.config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        _finish_dir(tmp, out, model, tokenizer, manifest)

    return atomic_dir(out, write, overwrite)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def weight_files(directory: Path) -> list[str]:
    """The weight files of a checkpoint directory: model.safetensors, or the index and its shards."""
    if (directory / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise OffcompError(f"{directory / INDEX} is not a valid shard index; {REMAKE}") from None
        return [INDEX, *shards]
    return [WEIGHTS]


def checkpoint_bytes(model: nn.Module, directory: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Bytes on disk beside the parameter counts: the weights file, the tensors that replace the
    compressed weights (per unit too, written into `report`'s units), and what those weights took
    dense in the same dtype. Shared tensors are counted once; biases are left out, as in
    `stored_params`."""
    from .hf_integration import compressed_modules

    mods = compressed_modules(model)
    seen: set[int] = set()
    total = 0
    for unit in report.get("units", []):
        unit_bytes = 0
        for name in unit["names"]:
            mod = mods.get(name)
            if mod is None:
                continue
            for tname, t in [*mod.named_parameters(), *mod.named_buffers()]:
                if tname == "bias" or tname in mod._non_persistent_buffers_set or id(t) in seen:
                    continue
                seen.add(id(t))
                unit_bytes += t.numel() * t.element_size()
        unit["stored_bytes"] = unit_bytes
        total += unit_bytes
    elsize = next(model.parameters()).element_size()
    weights = [directory / f for f in weight_files(directory) if f != INDEX]
    return {"dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "weights_file": sum(f.stat().st_size for f in weights) if all(f.is_file() for f in weights) else None,
            "compressed_modules": total,
            "compressed_modules_dense": sum(u["original_params"] for u in report.get("units", [])) * elsize,
            "dense_model_estimate": report.get("params_before", 0) * elsize}


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
    if isinstance(version, int) and version < FORMAT_VERSION:
        raise OffcompError(f"{path} uses offcomp checkpoint format {version} (this offcomp reads format "
                           f"{FORMAT_VERSION}); {REMAKE}")
    try:
        _Manifest.model_validate(manifest)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise OffcompError(f"{f} is malformed ({where}: {err['msg']}); {REMAKE}") from None
    if verify:
        verify_document(manifest, f, REMAKE)
    return manifest


def rebuild_units(model: nn.Module, units: list[dict[str, Any]], where: Path | None = None) -> list[bool]:
    """Swap empty replacement layers in for every unit (names as in `model`); per unit, whether it was
    rebuilt (False: the model lacks its modules, e.g. an LM-head unit under a classification head).
    The layers take the device and dtype of what they replace: on a meta skeleton nothing is allocated."""
    built = []
    for u in units:
        try:
            originals = [module_view(model, n) for n in u["names"]]
        except AttributeError:
            built.append(False)
            continue
        method = get_method(u["method"])
        cfg = method.parse_config(u["options"], u["label"])
        unit = FitUnit(u["label"], list(u["names"]), [tuple(s) for s in u["shapes"]], u["kinds"], u["joint"],
                       Budget(u["budget"]["kind"], u["budget"]["value"]))
        try:
            layers = method.build(unit, cfg, u["hyper"], originals)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # hyper-parameters that do not fit
            raise OffcompError(f"{where or 'manifest'}: unit {u['label']!r} cannot be rebuilt "
                               f"({type(e).__name__}: {str(e)[:100]}); {REMAKE}") from None
        for name, layer in zip(u["names"], layers):
            install(model, name, layer)
        built.append(True)
    return built


def load_compressed(path: str | Path, *, head: str = "auto", num_labels: int | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True):
    """Rebuild the exact compressed model (optionally under another task head).

    Every file the manifest records is checked first: its size always, its sha256 unless
    `verify=False` (the weights' hash is the bundle's identity, so it is computed only once)."""
    from transformers import AutoConfig, AutoTokenizer

    from .models import HEADS, ModelBundle, file_sha256, head_kind, label_mismatch

    path = Path(path)
    manifest = read_manifest(path, verify)
    files = manifest.get("files")
    if files is not None and (not isinstance(files, dict) or not (WEIGHTS in files or INDEX in files)):
        raise OffcompError(f"{path / MANIFEST} is malformed (files: no entry for {WEIGHTS}); {REMAKE}")
    hashes = verify_files(path, files, verify=verify, fix=REMAKE, manifest=MANIFEST) if files is not None else {}
    if not (path / WEIGHTS).is_file() and not (path / INDEX).is_file():
        raise OffcompError(f"{path / WEIGHTS} is missing; {REMAKE}")
    names = weight_files(path)
    missing_files = [n for n in names if not (path / n).is_file()]
    if missing_files:
        raise OffcompError(f"{path / missing_files[0]} is missing; {REMAKE}")
    shas = [hashes.get(n) or ((files or {}).get(n, {}).get("sha256") if not verify else None)
            or file_sha256(path / n) for n in names]
    # the weights' identity: the file's hash, or for shards a hash of every weight file's hash
    sha = shas[0] if len(names) == 1 else hashlib.sha256(
        "".join(f"{n}:{h}\n" for n, h in zip(names, shas)).encode()).hexdigest()
    saved_head = manifest["head"] if "head" in manifest else "base"
    head = saved_head if head == "auto" else head
    if head not in HEADS:
        raise OffcompError(f"{path / MANIFEST}: unknown head {head!r}; {REMAKE}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise OffcompError(f"{path}/config.json cannot be read ({str(e).splitlines()[0][:120]}); {REMAKE}") from None
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != QUANT_METHOD:
        raise OffcompError(f"{path}/config.json has no offcomp quantization_config; {REMAKE}")
    _check_same_units(path, manifest, qc)
    kwargs: dict[str, Any] = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        model, info = HEADS[head].from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    except OffcompError:
        raise
    except SafetensorError as e:
        raise OffcompError(f"{path / WEIGHTS} is not a readable safetensors file ({str(e)[:120]}); {REMAKE}") from None
    except (RuntimeError, ValueError, OSError) as e:
        if "ignore_mismatched_sizes" in str(e) and (other_task := label_mismatch(config, num_labels, str(path))):
            raise other_task from None
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln or "offcomp" in ln), lines[0] if lines else "")
        raise OffcompError(f"{path}/{WEIGHTS} does not match its manifest ({detail[:160]}); {REMAKE}") from None
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if head == saved_head and (missing or unexpected):
        bad = (missing or unexpected)[0]
        raise OffcompError(f"{path}/{WEIGHTS} does not match its manifest (first mismatch: {bad}); re-run compress")
    base = prefixed(model)
    if base and any(k.startswith(base + ".") for k in missing):
        raise OffcompError(f"{path}: base weights missing for head {head!r} (first: {missing[0]})")
    model.eval().to(device=device)
    skipped = model.hf_quantizer.skipped_units
    tokenizer = _load_tokenizer(path, AutoTokenizer, required=files is None or any(
        n.startswith("tokenizer") for n in files))
    manifest["loaded"] = {"head": head, "skipped_units": skipped, "new_keys": missing,
                          "verified": "sha256" if verify and files is not None else
                          ("size" if files is not None else "none (manifest records no file hashes)")}
    return ModelBundle(model, tokenizer, str(path), str(path.resolve()), sha, head_kind(head, config), head, manifest)


def _check_same_units(path: Path, manifest: dict[str, Any], qc: dict[str, Any]) -> None:
    """config.json's quantization_config rebuilds the model, offcomp.json records (and vouches for)
    it: the two must describe the same units."""
    recorded = [{k: u.get(k) for k in UNIT_KEYS} for u in manifest["report"]["units"]]
    rebuilt = [{k: u.get(k) for k in UNIT_KEYS} for u in qc.get("units") or []]
    if json.loads(json.dumps(recorded)) != json.loads(json.dumps(rebuilt)):
        raise OffcompError(f"{path}/{WEIGHTS} does not match its manifest (config.json's quantization_config "
                           f"describes other units than {MANIFEST}); {REMAKE}")


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
    model.hf_quantizer.remove_quantization_config(model)  # a plain checkpoint now
    model.config._is_quantized = False

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if bundle.tokenizer is not None:
            bundle.tokenizer.save_pretrained(tmp)
        (tmp / "offcomp-export.json").write_text(json.dumps(
            {"exported_from": str(src), "compressed_sha256": bundle.sha256, "versions": versions(),
             "base": bundle.manifest.get("base") if bundle.manifest else None}, indent=2))

    return atomic_dir(out, write, overwrite)
