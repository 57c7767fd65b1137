"""What fine-tuning leaves behind: Trainer checkpoints to resume from, and the fine-tuned model.

Checkpoints (`--out/checkpoint-N`, every `checkpoint_steps` optimizer steps, the last one kept) are
written by the HF Trainer; `finetune-checkpoints.json` beside them holds the key of the run that
made them (model hash, task, data, hyper-parameters, world size). Re-running the same command
resumes from the last complete checkpoint (one with its `trainer_state.json`, written last) with
optimizer, scheduler, RNG and data position restored; checkpoints of another run are refused,
never silently continued. They are deleted once the run's record is written.

`save_model` keeps the fine-tuned model as a checkpoint of the kind it came from: a compressed
model stays an offcomp checkpoint (its manifest's units renamed for the task head) that
`offcomp.load` rebuilds; a base model becomes a plain Hugging Face directory.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import torch.nn as nn

from offcomp.errors import OffcompError
from offcomp.layers import CompressedModule
from offcomp.records import dumps
from offcomp.resume import resume_key

KEY_FILE = "finetune-checkpoints.json"
MODEL_DIR = "model"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(out: Path) -> list[Path]:
    found = [p for p in out.iterdir() if _CKPT.match(p.name) and p.is_dir()] if out.is_dir() else []
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))  # type: ignore[union-attr]


def resume_point(out: Path, material: dict[str, Any]) -> str | None:
    """The last complete Trainer checkpoint that this same run left in `out`, or None."""
    import json

    done = [p for p in _checkpoints(out) if (p / "trainer_state.json").is_file()]
    if not done:
        return None
    try:
        stored = json.loads((out / KEY_FILE).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        stored = None
    if stored != resume_key(material):
        raise OffcompError(f"{out} holds Trainer checkpoints ({done[-1].name}) of another run (other model, data "
                           "or hyper-parameters); choose another --out, or delete them to start afresh")
    return str(done[-1])


def mark_checkpoints(out: Path, material: dict[str, Any]) -> None:
    """Record which run the checkpoints about to be written belong to (rank 0 only); checkpoints
    cut short by a kill (no trainer_state.json) are removed."""
    import os

    out.mkdir(parents=True, exist_ok=True)
    for p in _checkpoints(out):
        if not (p / "trainer_state.json").is_file():
            shutil.rmtree(p, ignore_errors=True)
    tmp = out / (KEY_FILE + ".tmp")
    tmp.write_text(dumps({"key": resume_key(material), "material": material}, indent=2))
    os.replace(tmp, out / KEY_FILE)


def drop_checkpoints(out: Path) -> None:
    """The run is recorded: its checkpoints are no longer needed (rank 0 only)."""
    for p in _checkpoints(out):
        shutil.rmtree(p, ignore_errors=True)
    (out / KEY_FILE).unlink(missing_ok=True)


def train(trainer: Any, out: Path, material: dict[str, Any]) -> tuple[Any, str | None]:
    """`trainer.train()`, resumed from this run's last checkpoint in `out` if there is one."""
    resume = resume_point(out, material)
    if trainer.args.save_strategy != "no" and trainer.is_world_process_zero():
        mark_checkpoints(out, material)
    return trainer.train(resume_from_checkpoint=resume), resume


def finish(trainer: Any, out: Path, record: dict[str, Any], record_name: str, save: bool, loaded: Any,
           head: str) -> None:
    """Keep the model (if asked), write the record, then drop the checkpoints: a kill at any point
    leaves either the checkpoints to resume from or the finished run."""
    from offcomp.eval.glue import write_record

    if save:
        dest = out / MODEL_DIR
        record["saved_model"] = str(dest)
        if trainer.is_world_process_zero():
            save_finetuned(loaded.model, loaded.tokenizer, loaded.manifest, head, dest,
                           {"type": record["type"], "task": record["task"], "metrics": record["metrics"],
                            "hyperparameters": record["hyperparameters"], "data": record["data"],
                            "from": record["model"]})
    write_record(trainer, out / record_name, record)
    if trainer.is_world_process_zero():
        drop_checkpoints(out)


# offcomp.checkpoint.save_compressed writes these itself; a saved manifest's own copy would win
_REWRITTEN = {"format", "format_version", "versions", "created", "architecture", "model_type", "base_prefix", "dtype",
              "files", "self_sha256", "loaded"}


def save_finetuned(model: nn.Module, tokenizer: Any, manifest: dict[str, Any] | None, head: str, dest: Path,
                   finetuned: dict[str, Any]) -> Path:
    """Save the fine-tuned `model` (with its task head) to `dest`, replacing what is there atomically."""
    from offcomp.checkpoint import atomic_dir, save_compressed
    from offcomp.hf_integration import prefixed, renamer
    from offcomp.models import head_kind

    if manifest is None:
        if any(isinstance(m, CompressedModule) for m in model.modules()):
            raise OffcompError("--save-model needs the manifest of a compressed model: fine-tune a compressed "
                               "directory (offcomp compress --out DIR), not an in-memory model")

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / "offcomp-finetuned.json").write_text(dumps(finetuned, indent=2))

        return atomic_dir(dest, write, overwrite=True)
    rename = renamer(manifest.get("base_prefix"), prefixed(model))
    report = copy.deepcopy(manifest["report"])
    # units are named as in the fine-tuned model; those its head lacks (an LM head) are gone
    report["units"] = [{**u, "names": [rename(n) for n in u["names"]]} for u in report["units"]
                       if all(_has(model, rename(n)) for n in u["names"])]
    kept = {k: v for k, v in manifest.items() if k not in _REWRITTEN}
    return save_compressed(model, tokenizer, dest, {**kept, "report": report, "head": head,
                                                    "kind": head_kind(head, model.config), "finetuned": finetuned},
                           overwrite=True)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
