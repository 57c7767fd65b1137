"""Resumable `compress`: every finished unit and modular-trained layer is kept as soon as it exists.

    .NAME.partial/          beside the output directory NAME, while NAME is being made
        resume.json                 key (sha256 of everything that decides the result) and its material
        lock                        held (flock) by the process writing here; the kernel frees it on exit
        unit-00003-<sha16>.safetensors     fitted tensors of unit 3, its UnitRecord in the metadata
        layer-00005-<sha16>.safetensors    trained compressed parameters of layer 5, the training
                                           generator's state after it, its records in the metadata

Re-running the same command after a kill (same key: plan, base model hash, statistics key,
calibration, seed, offcomp and torch versions, device) loads these instead of fitting again. Units
are seeded `seed + i` each and layer training continues from the saved generator state, so the
result is bit-identical to an uninterrupted run. A different key discards the directory; a file
whose content no longer matches the hash in its name is refitted, never trusted. The directory is
removed once NAME is in place. Tensors go through safetensors only (no pickle).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import save_state
from .errors import OffcompError
from .models import file_sha256

KEY_FILE = "resume.json"
RECORD = "offcomp.record"


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def resume_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


class PartialStore:
    """The `.NAME.partial` directory of one output, locked by this process while it is open."""

    def __init__(self, out: str | Path, material: dict[str, Any]) -> None:
        self.path = partial_dir(out)
        self.key = resume_key(material)
        # parents of --out that this run creates: removed again if it ends with nothing to show
        self._created = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.path / "lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise OffcompError(f"another offcomp process is writing {out} (it holds {self.path}/lock); "
                               "wait for it to finish or choose another --out") from None
        self.resumed_units = self.resumed_layers = 0
        if self._stored_key() != self.key:  # another command's work (or none): start afresh
            for f in self.path.iterdir():
                if f.name != "lock":
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
            self._write(self.path / KEY_FILE, json.dumps({"key": self.key, "material": material}, indent=2,
                                                         default=str).encode())

    def _stored_key(self) -> str | None:
        try:
            return json.loads((self.path / KEY_FILE).read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            return None

    @staticmethod
    def _write(dest: Path, data: bytes) -> None:
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def _put(self, stem: str, write: Any) -> None:
        """Write a safetensors file through `write(path)` and name it by its hash, atomically."""
        for old in self.path.glob(f"{stem}-*.safetensors"):
            old.unlink()
        tmp = self.path / f".{stem}.tmp"
        write(tmp)
        os.replace(tmp, self.path / f"{stem}-{file_sha256(tmp)[:16]}.safetensors")

    def _get(self, stem: str) -> Path | None:
        """The file of `stem` if it is intact (its content hash matches its name), else None."""
        for f in self.path.glob(f"{stem}-*.safetensors"):
            if file_sha256(f)[:16] == f.name.removesuffix(".safetensors").rsplit("-", 1)[1]:
                return f
        return None

    # ------------------------------------------------------------------ units of api.compress_
    def save_unit(self, i: int, layers: list[nn.Module], record: dict[str, Any]) -> None:
        # a tensor shared inside a joint group is saved once
        self._put(f"unit-{i:05d}", lambda p: save_state(nn.ModuleList(layers), p, {RECORD: json.dumps(record)}))

    def load_unit(self, i: int, layers: list[nn.Module], names: list[str]) -> dict[str, Any] | None:
        """Fill freshly built `layers` with unit i's saved tensors; returns its record, or None."""
        f = self._get(f"unit-{i:05d}")
        if f is None:
            return None
        with safe_open(str(f), "pt") as sf:
            record = json.loads((sf.metadata() or {}).get(RECORD, "null") or "null")
        if not record or record.get("names") != names:
            return None
        holder = nn.ModuleList(layers)
        state = load_file(str(f))
        alias: dict[int, list[str]] = {}
        for k, v in holder.state_dict(keep_vars=True).items():
            alias.setdefault(id(v), []).append(k)
        with torch.no_grad():
            for group in alias.values():
                have = [k for k in group if k in state]
                if len(have) != 1:
                    return None  # the saved structure is not this unit's: fit it again
                target = holder.state_dict(keep_vars=True)[group[0]]
                if target.shape != state[have[0]].shape:
                    return None
                target.copy_(state[have[0]])
        if len(state) != len(alias):
            return None
        self.resumed_units += 1
        return record

    # ------------------------------------------------------------------ layers of modular training
    def save_layer(self, i: int, params: dict[str, torch.Tensor], records: list[dict[str, Any]],
                   gen: torch.Generator) -> None:
        tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in params.items()}
        tensors["generator_state"] = gen.get_state()
        self._put(f"layer-{i:05d}", lambda p: save_file(tensors, str(p), metadata={RECORD: json.dumps(records)}))

    def load_layer(self, i: int, params: dict[str, torch.Tensor],
                   gen: torch.Generator) -> list[dict[str, Any]] | None:
        """Copy layer i's trained parameters into `params` and restore the generator; its records."""
        f = self._get(f"layer-{i:05d}")
        if f is None:
            return None
        with safe_open(str(f), "pt") as sf:
            records = json.loads((sf.metadata() or {}).get(RECORD, "null") or "null")
        state = load_file(str(f))
        if records is None or {f"param.{k}" for k in params} | {"generator_state"} != set(state) or any(
                state[f"param.{k}"].shape != v.shape for k, v in params.items()):
            return None
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(state[f"param.{k}"])
        gen.set_state(state["generator_state"])
        self.resumed_layers += 1
        return records

    def close(self, remove: bool) -> None:
        """Release the lock; `remove` (the output is in place) deletes the directory first, as does
        a run stopped before any work was kept (e.g. a plan refused): nothing is left behind."""
        if remove or not any(self.path.glob("*.safetensors")):
            shutil.rmtree(self.path, ignore_errors=True)
            for d in self._created:  # deepest first; a non-empty one (the output is in it) stays
                try:
                    d.rmdir()
                except OSError:
                    break
        os.close(self._lock)
