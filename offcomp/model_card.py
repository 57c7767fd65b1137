"""README.md of a compressed checkpoint in the Hugging Face model-card format.

Written from the checkpoint's own offcomp.json and results.jsonl, so it is rebuilt whole (and
atomically) whenever an evaluation appends a record: the card never says more than the files do.
The card is derived data: it is not part of the weights a manifest vouches for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"
RESULTS = "results.jsonl"
MANIFEST = "offcomp.json"
# Hub ids of the embedded models (offcomp's short names are not hub ids).
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
           "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
LOADER = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM", "base": "AutoModel",
          "sequence-classification": "AutoModelForSequenceClassification",
          "question-answering": "AutoModelForQuestionAnswering"}


def write_model_card(directory: str | Path, title: str | None = None) -> Path:
    """(Re)write DIR/README.md from DIR/offcomp.json and DIR/results.jsonl; returns its path.
    `title`: the checkpoint's name when DIR is still a temporary directory."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    text = render_card(manifest, read_records(directory / RESULTS), title or directory.resolve().name)
    out = directory / CARD
    tmp = directory / f".{CARD}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, out)
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a damaged line is the report's business; the card shows what can be read
        if isinstance(rec, dict):
            records.append(rec)
    return records


def render_card(manifest: dict[str, Any], records: list[dict[str, Any]], title: str) -> str:
    base = manifest.get("base") or {}
    base_name = base.get("name") or "unknown"
    header = {"base_model": HUB_IDS.get(base_name, base_name), "library_name": "transformers",
              "tags": ["offcomp", "compression"]}
    rep = manifest.get("report") or {}
    size = manifest.get("bytes") or {}
    loader = LOADER.get(manifest.get("head", "base"), "AutoModel")
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "", f"# {title}", "",
             f"`{base_name}` compressed offline by offcomp {manifest.get('versions', {}).get('offcomp', '?')} "
             f"({manifest.get('created', '?')}).", "",
             "## Load", "", "```python",
             "import offcomp  # registers quant_method \"offcomp\" with transformers",
             f"from transformers import {loader}", "",
             f"model = {loader}.from_pretrained(\"{title}\")", "```", "",
             "Without `import offcomp`, transformers refuses this checkpoint.", "",
             "## Size", "", "| | parameters | bytes on disk |", "|---|---:|---:|",
             f"| base model | {_n(rep.get('params_before'))} | {_n(size.get('dense_model_estimate'))} (dense, "
             f"{size.get('dtype', '?')}) |",
             f"| compressed model | {_n(rep.get('params_after'))} | {_n(size.get('weights_file'))} "
             f"(weights files) |",
             f"| replaced weights, before | {_n(rep.get('compressed_original_params'))} | "
             f"{_n(size.get('compressed_modules_dense'))} |",
             f"| replaced weights, after | {_n(rep.get('compressed_stored_params'))} | "
             f"{_n(size.get('compressed_modules'))} |", "",
             f"Parameters kept: {rep.get('ratio', 0):.4f} of the base model; weights stored as "
             f"{size.get('dtype', manifest.get('dtype', '?'))}.", ""]
    lines += _methods(rep.get("units", []))
    lines += ["## Plan", "", f"Source: `{manifest.get('plan_source') or 'inline'}`", "", "```yaml",
              yaml.safe_dump(manifest.get("plan") or {}, sort_keys=False).strip(), "```", ""]
    lines += _calibration(manifest)
    lines += _evaluations(records)
    return "\n".join(lines) + "\n"


def _methods(units: list[dict[str, Any]]) -> list[str]:
    by: dict[str, dict[str, int]] = {}
    for u in units:
        row = by.setdefault(u["method"], {"modules": 0, "original": 0, "stored": 0, "bytes": 0})
        row["modules"] += len(u["names"])
        row["original"] += u["original_params"]
        row["stored"] += u["stored_params"]
        row["bytes"] += u.get("stored_bytes", 0)
    lines = ["## Methods", "", "| method | modules | parameters before | parameters after | bytes after |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {m} | {r['modules']} | {_n(r['original'])} | {_n(r['stored'])} | {_n(r['bytes'])} |"
              for m, r in sorted(by.items())]
    return [*lines, ""]


def _calibration(manifest: dict[str, Any]) -> list[str]:
    cal = manifest.get("calibration")
    lines = ["## Calibration data", ""]
    if not cal:
        return [*lines, "None: every method of the plan is data-free.", ""]
    spec = cal.get("spec") or {}
    data = cal.get("data") or spec.get("data") or "?"
    lines.append(f"- data: `{json.dumps(data) if not isinstance(data, str) else data}`")
    for key in ("n_tokens", "loss"):
        if cal.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {cal[key]}")
    if spec:
        lines.append(f"- capture: `{json.dumps(spec, default=str)}`")
    for extra in ("allocation", "modular", "validation"):
        if manifest.get(extra):
            lines.append(f"- {extra}: recorded in offcomp.json")
    return [*lines, ""]


def _evaluations(records: list[dict[str, Any]]) -> list[str]:
    from .report import _metric, fmt_cell

    lines = ["## Evaluations", ""]
    if not records:
        return [*lines, "None recorded yet (`offcomp eval-ppl DIR`, … append to results.jsonl and update this card).",
                ""]
    lines += ["| evaluation | metric | value | data | recorded |", "|---|---|---:|---|---|"]
    for rec in records:
        task, metric, value = _metric(rec)
        data = rec.get("data") or {}
        where = f"{data.get('name', '-')}:{data.get('split', '-')}" if isinstance(data, dict) else str(data)
        lines.append(f"| {task} | {metric} | {fmt_cell(value)} | {where} | {rec.get('created', '-')} |")
    return [*lines, "", "Every record, with its full protocol, is in results.jsonl.", ""]


def _n(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "-"
