"""`offcomp report`: one table of every recorded run under a directory."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .errors import OffcompError
from .records import dumps

COLUMNS = ["model", "plan", "methods", "params_before", "params_after", "ratio", "task", "metric", "value",
           "data", "seconds", "compress_s", "weights_bytes", "path"]


def _metric(rec: dict[str, Any]) -> tuple[str, str, Any]:
    """(task, metric name, value) of a result record of any type."""
    kind = rec.get("type", "?")
    if kind == "ppl":
        return "ppl", "ppl", rec.get("ppl")
    metrics = {k: v for k, v in (rec.get("metrics") or {}).items()
               if isinstance(v, int | float) and not k.endswith("loss") and not k.startswith("n_")}
    task = rec.get("task", kind)
    if len(metrics) == 1:
        (key, value), = metrics.items()
        return str(task), key, value
    if metrics:  # e.g. MRPC accuracy and F1, EM and F1: all of them, in the record's order
        return str(task), " / ".join(metrics), " / ".join(fmt_cell(v) for v in metrics.values())
    return str(task), "-", None


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Rows from every results.jsonl under `root`, plus compressed checkpoints not yet evaluated."""
    root = Path(root)
    if not root.exists():
        raise OffcompError(f"{root} does not exist; point report at a directory of runs (e.g. runs/)")
    rows: list[dict[str, Any]] = []
    evaluated: set[Path] = set()
    for f in sorted(root.rglob("results.jsonl")):
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            task, metric, value = _metric(rec)
            model = rec.get("model")
            model = model if isinstance(model, dict) else {"name": str(model)}
            before, after = rec.get("params_before"), rec.get("params_after")
            data = rec.get("data") or {}
            rows.append({
                "model": (model.get("base") or {}).get("name") or model.get("name"),
                "plan": rec.get("plan_source") or ("dense" if not model.get("compressed") else "-"),
                "methods": ",".join(rec.get("methods", [])) or "-",
                "params_before": before, "params_after": after,
                "ratio": round(after / before, 4) if before and after else None,
                "task": task, "metric": metric, "value": value,
                "data": f"{data.get('name', '-')}:{data.get('split', '-')}" if isinstance(data, dict) else str(data),
                "seconds": round(rec.get("seconds", 0.0), 1),
                "compress_s": None if rec.get("compress_seconds") is None else round(rec["compress_seconds"], 1),
                "weights_bytes": rec.get("weights_bytes"), "path": str(f.parent),
            })
        evaluated.add(f.parent)
    for m in sorted(root.rglob("offcomp.json")):
        if m.parent in evaluated:
            continue
        man = json.loads(m.read_text())
        rep = man.get("report", {})
        rows.append({
            "model": man.get("base", {}).get("name"), "plan": man.get("plan_source") or "-",
            "methods": ",".join(sorted({u["method"] for u in rep.get("units", [])})),
            "params_before": rep.get("params_before"), "params_after": rep.get("params_after"),
            "ratio": round(rep.get("ratio", 0), 4), "task": "-", "metric": "-", "value": None, "data": "-",
            "seconds": round(rep.get("seconds", 0.0), 1), "compress_s": round(rep.get("seconds", 0.0), 1),
            "weights_bytes": sum(f.stat().st_size for f in m.parent.glob("*.safetensors")) or None,
            "path": str(m.parent),
        })
    return rows


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    if fmt == "md":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(fmt_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
        return "\n".join(lines)
    raise OffcompError(f"unknown format {fmt!r}; use table, md, csv or json")


def fmt_cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
