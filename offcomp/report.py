"""`offcomp report`: the recorded runs under a directory, as one comparison table per evaluation.

A table holds the runs that can be compared number for number: same evaluation (task, metric,
data and split) *and* same protocol (base model weights, data hash, tokens scored, sequence
length, dtype, training recipe, calibration). Runs that differ in any of these go to a separate
table whose note says why, never into the same column. Rows are method × grouping × budget, the
dense baseline first, the best run of each budget marked.

Pure Python on the JSON records (no torch), so `offcomp report` is instant; the renderers live in
`report_render.py`, the figures in `report_plot.py`, the terminal table in `terminal.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import OffcompError

# metric name -> True when lower is better; a metric not listed gets no "best" mark (no guessing)
LOWER_IS_BETTER = {"ppl": True, "word_ppl": True, "word_perplexity": True, "bits_per_byte": True, "bpb": True,
                   "nll": True, "loss": True}
HIGHER_IS_BETTER = ("accuracy", "acc", "acc_norm", "f1", "exact_match", "em", "matthews", "mcc", "pearson",
                    "spearman")

# The columns of a comparison table: key, header (file formats), kind.
COLUMNS: list[tuple[str, str, str]] = [
    ("method", "method", "text"),
    ("grouping", "grouping", "text"),
    ("budget", "budget", "text"),
    ("params", "stored params", "int"),
    ("bytes", "bytes", "int"),
    ("kept_modules", "kept (compressed modules)", "ratio"),
    ("kept_model", "kept (whole model)", "ratio"),
    ("value", "metric", "float"),
    # a task head the checkpoint already had, scored before fine-tuning (a classifier compressed
    # after fine-tuning: what compression lost before recovery); shown only when a row has one
    ("value_before", "before fine-tuning", "float"),
    ("delta", "Δ vs dense", "delta"),
    ("x_dense", "× dense", "ratio"),
    ("compress_s", "compress s", "seconds"),
    ("eval_s", "eval s", "seconds"),
    ("plan", "plan", "text"),
    ("path", "path", "text"),
]
# protocol field -> how a note names it
PROTOCOL_NAMES = {"base": "base model", "data_sha256": "data (sha256)", "n_tokens": "tokens scored",
                  "seq_len": "sequence length", "stride": "stride", "dtype": "dtype", "kind": "PPL protocol",
                  "recipe": "training recipe", "calibration": "calibration protocol"}


def direction(metric: str) -> bool | None:
    """True if lower is better, False if higher is better, None if unknown."""
    name = metric.lower().rsplit("/", 1)[-1]
    if name in LOWER_IS_BETTER or name.endswith("loss"):
        return True
    if name in HIGHER_IS_BETTER:
        return False
    return None


# ------------------------------------------------------------------------------------------ records


def _modules(modules: list[str]) -> str:
    """attn.q, attn.k, mlp.up -> attn.{k,q} mlp.up (roles grouped by prefix, sorted)."""
    by: dict[str, list[str]] = {}
    other: list[str] = []
    for m in modules:
        head, dot, tail = m.partition(".")
        if dot and not m.startswith("re:") and "." not in tail:
            by.setdefault(head, []).append(tail)
        else:
            other.append(m)
    parts = [f"{h}.{t[0]}" if len(t) == 1 else f"{h}.{{{','.join(sorted(t))}}}" for h, t in sorted(by.items())]
    return " ".join(parts + other)


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, int | float) else str(v)


def compression_summary(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a compressed checkpoint is, for a result row: method label, grouping, budget, the
    compressed modules' parameters, calibration protocol and compression time. None for dense."""
    if not manifest:
        return None
    plan = manifest.get("plan") or {}
    rep = manifest.get("report") or {}
    groups = plan.get("groups") or []
    labels: list[str] = []
    for g in groups:
        opts = ",".join(f"{k}={_num(v)}" for k, v in sorted((g.get("options") or {}).items()))
        label = f"{g.get('method', '?')}" + (f"({opts})" if opts else "")
        if label not in labels:
            labels.append(label)
    if not labels:  # a manifest without its plan: the units still name their methods
        labels = sorted({u.get("method", "?") for u in rep.get("units", [])})
    method = " + ".join(labels)
    if plan.get("allocate"):
        # units the allocation kept dense (not compressed at all): a different recipe from one that
        # could only give every unit factors, so the label says how many
        dense = (manifest.get("allocation") or {}).get("dense_units")
        method += f" +alloc({plan['allocate'].get('criterion', '?')}"  # spaces: a label the table can wrap
        method += f", {dense} dense)" if dense else ")"
    if plan.get("modular") or manifest.get("modular"):
        mode = (plan.get("modular") or {}).get("mode") or ((manifest.get("modular") or {}).get("config") or {}).get(
            "mode", "?")
        method += f" +modular({mode})"
    pipe = manifest.get("pipeline") or {}
    if pipe.get("pipeline") == "sequential" and manifest.get("calibration"):
        method += f" seq({pipe.get('loop', '?')})"  # statistics taken block by block: another recipe
    grouping = "; ".join(
        _modules(g.get("modules") or []) + (", joint" if g.get("joint") else ", separate")
        + ("" if str(g.get("layers", "all")) == "all" else f", layers {g['layers']}") for g in groups) or "-"
    if plan.get("allocate"):
        budget = f"ratio {_num(plan['allocate'].get('ratio'))}"
    else:
        budgets = []
        for g in groups:
            b = next((f"{k} {_num(g[k])}" for k in ("ratio", "cr", "rank") if g.get(k) is not None), "-")
            if b not in budgets:
                budgets.append(b)
        budget = ", ".join(budgets) or "-"
    units = rep.get("units") or []
    original = rep.get("compressed_original_params", sum(u.get("original_params", 0) for u in units))
    stored = rep.get("compressed_stored_params", sum(u.get("stored_params", 0) for u in units))
    seconds = rep.get("seconds")
    if seconds is not None and isinstance(manifest.get("modular"), dict):
        seconds += manifest["modular"].get("seconds") or 0.0
    return {"method": method, "grouping": grouping, "budget": budget, "original_params": original,
            "stored_params": stored, "calibration": calibration_protocol(manifest), "seconds": seconds,
            "plan_source": manifest.get("plan_source")}


def calibration_protocol(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The calibration data and windows a checkpoint was fitted on (None: data-free)."""
    cal, mod = manifest.get("calibration"), manifest.get("modular")
    if not cal and not mod:
        return None
    out: dict[str, Any] = {}
    if cal:
        data, spec = cal.get("data") or {}, cal.get("spec") or {}
        out.update(data=data.get("name"), split=data.get("split"), sha256=data.get("sha256"),
                   samples=spec.get("samples"), seq_len=spec.get("seq_len"), seed=spec.get("seed"))
    if isinstance(mod, dict) and mod.get("data"):
        cfg = mod.get("config") or {}
        out["modular"] = {**mod["data"], "samples": cfg.get("samples")}
    return out


def _bytes(rec: dict[str, Any], manifest: dict[str, Any] | None, ckpt: Path | None) -> int | None:
    """Bytes on disk when the record or manifest carries them, else the checkpoint's safetensors."""
    for src in (rec, manifest or {}, (manifest or {}).get("report") or {}):
        for key in ("weights_bytes", "bytes_on_disk", "bytes"):
            v = src.get(key)
            if isinstance(v, dict):
                v = v.get("total")
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    if ckpt is not None and manifest is not None:
        files = list(ckpt.glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files)
    return None


def _manifest_for(rec: dict[str, Any], results_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The offcomp.json of the evaluated checkpoint: next to the model's source, else next to
    results.jsonl when its base weights match the record's."""
    model = rec.get("model") if isinstance(rec.get("model"), dict) else {}
    if not model.get("compressed"):
        return None, None
    want = (model.get("base") or {}).get("sha256")
    for d in (Path(str(model.get("source") or "")), results_dir):
        f = d / "offcomp.json"
        if str(d) and f.is_file():
            try:
                man = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if not want or (man.get("base") or {}).get("sha256") == want:
                return man, d
    return None, None


def _metrics(rec: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(task, metric, value) for each metric of a record, in the record's order."""
    kind = rec.get("type", "?")
    if kind == "ppl":
        return [("ppl", "ppl", rec.get("ppl"))]
    task = str(rec.get("task", kind))
    metrics = rec.get("metrics") or {}
    names = rec.get("metric_names") or [k for k, v in metrics.items() if isinstance(v, int | float)
                                        and not isinstance(v, bool) and not k.endswith("loss")
                                        and not k.startswith("n_")]
    return [(task, str(k), metrics.get(k)) for k in names] or [(task, "-", None)]


def _metric(rec: dict[str, Any]) -> tuple[str, str, Any]:
    """(task, metric, value) of a record; several metrics are joined (`a / b`)."""
    ms = _metrics(rec)
    if len(ms) == 1:
        return ms[0]
    return ms[0][0], " / ".join(m for _, m, _ in ms), " / ".join(fmt_cell(v) for _, _, v in ms)


def _protocol(rec: dict[str, Any], base: str | None) -> dict[str, Any]:
    data = rec.get("data") if isinstance(rec.get("data"), dict) else {}
    proto = rec.get("protocol") or {}
    p: dict[str, Any] = {"base": base, "data_sha256": data.get("sha256")}
    if rec.get("type") == "ppl":
        p.update(kind=proto.get("kind"), seq_len=proto.get("seq_len"), stride=proto.get("stride"),
                 dtype=proto.get("dtype"), n_tokens=rec.get("n_tokens"))
    else:
        p.update(dtype=(rec.get("environment") or {}).get("dtype"),
                 recipe=json.dumps(rec.get("hyperparameters") or rec.get("settings") or {}, sort_keys=True),
                 n_tokens=json.dumps(data.get("n_scored") or data.get("n_pairs")))
    return p


def _round(seconds: Any) -> float | None:
    return round(seconds, 1) if isinstance(seconds, int | float) else None


def _row(rec: dict[str, Any], results_file: Path) -> list[dict[str, Any]]:
    model = rec.get("model")
    model = model if isinstance(model, dict) else {"name": str(model)}
    compressed = bool(model.get("compressed"))
    base = (model.get("base") or {}) if compressed else model
    manifest, ckpt = _manifest_for(rec, results_file.parent)
    comp = rec.get("compression") or compression_summary(manifest)
    before, after = rec.get("params_before"), rec.get("params_after")
    data = rec.get("data") if isinstance(rec.get("data"), dict) else {"name": str(rec.get("data", "-"))}
    seconds = rec.get("seconds")
    fallback = (",".join(rec.get("methods") or []) or "?") if compressed else "dense"
    common = {
        "model": base.get("name") or model.get("name"), "compressed": compressed,
        "method": (comp or {}).get("method") or fallback,
        "grouping": (comp or {}).get("grouping", "-") if compressed else "-",
        "budget": (comp or {}).get("budget", "?") if compressed else "-",
        "plan": rec.get("plan_source") or (comp or {}).get("plan_source") or "-",
        "params_before": before, "params_after": after, "params": after,
        "bytes": _bytes(rec, manifest, ckpt),
        "kept_modules": (round(comp["stored_params"] / comp["original_params"], 4)
                         if comp and comp.get("original_params") else (None if compressed else 1.0)),
        "kept_model": round(after / before, 4) if before and after else None,
        "data": f"{data.get('name', '-')}:{data.get('split', '-')}",
        # the evaluation's identity: its content hash where recorded (the same file reached by two
        # path spellings, ../shared/... and /work/shared/..., is one evaluation), else its name
        "data_key": (f"sha256 {json.dumps(data['sha256'], sort_keys=True)}:{data.get('split', '-')}"
                     if data.get("sha256") else None),
        "calibration": (comp or {}).get("calibration"),
        "compress_s": _round((comp or {}).get("seconds") or rec.get("compress_seconds")),  # with modular training
        "eval_s": _round(seconds), "seconds": _round(seconds),
        "created": rec.get("created"), "path": str(results_file.parent),
        "protocol": _protocol(rec, base.get("sha256") or base.get("name") or model.get("name")),
        "record_type": rec.get("type", "?"),
    }
    pre = rec.get("pre_metrics") if isinstance(rec.get("pre_metrics"), dict) else {}
    return [{**common, "task": task, "metric": metric, "value": value, "value_before": _number(pre.get(metric))}
            for task, metric, value in _metrics(rec)]


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def collect(root: str | Path, warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (record, metric) from every results.jsonl under `root`, plus compressed
    checkpoints not yet evaluated (task "-"). Damaged lines (not JSON, not an object, fields of the
    wrong type) are skipped and counted in `warnings`, one message per file (a crash mid-write must
    not hide every other run); a damaged manifest likewise."""
    root = Path(root)
    if not root.exists():
        raise OffcompError(f"{root} does not exist; point report at a directory of runs (e.g. runs/)")
    rows: list[dict[str, Any]] = []
    evaluated: set[Path] = set()
    for f in sorted(root.rglob("results.jsonl")):
        damaged: list[int] = []
        lines = f.read_text(errors="replace").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                rows.extend(_row(rec, f) if isinstance(rec, dict) else [])
            except (ValueError, TypeError, AttributeError, KeyError, ZeroDivisionError):
                rec = None  # not JSON, or a record with fields of the wrong type
            if not isinstance(rec, dict):
                damaged.append(n)
        if damaged and warnings is not None:  # one line per file, however many lines are damaged
            warnings.append(f"{f}:{damaged[0]}: skipped {len(damaged)} damaged line(s) of {len(lines)}, the first here")
        evaluated.add(f.parent)
    for m in sorted(root.rglob("offcomp.json")):
        if m.parent in evaluated:
            continue
        try:
            rows.append(_checkpoint_row(json.loads(m.read_text()), m))
        except (ValueError, TypeError, AttributeError, KeyError, ZeroDivisionError):
            if warnings is not None:
                warnings.append(f"{m}: damaged manifest, skipped")
    return rows


def _checkpoint_row(man: dict[str, Any], m: Path) -> dict[str, Any]:
    """The row of a compressed checkpoint that has no results yet (raises on a damaged manifest)."""
    rep, comp = man.get("report") or {}, compression_summary(man) or {}
    before, after = rep.get("params_before"), rep.get("params_after")
    return {
        "model": (man.get("base") or {}).get("name"), "compressed": True, "method": comp.get("method"),
        "grouping": comp.get("grouping"), "budget": comp.get("budget"), "plan": man.get("plan_source") or "-",
        "params_before": before, "params_after": after, "params": after, "bytes": _bytes({}, man, m.parent),
        "kept_modules": round(comp["stored_params"] / comp["original_params"], 4)
        if comp.get("original_params") else None,
        "kept_model": round(after / before, 4) if before and after else None,
        "task": "-", "metric": "-", "value": None, "data": "-", "calibration": comp.get("calibration"),
        "compress_s": _round(comp.get("seconds")), "eval_s": None, "seconds": None, "created": None,
        "path": str(m.parent), "protocol": {}, "record_type": "checkpoint",
    }


# ------------------------------------------------------------------------------------------- tables


@dataclass
class ReportTable:
    """One comparison table: rows share the evaluation and the protocol."""

    title: str
    metric: str
    lower_is_better: bool | None
    protocol: dict[str, Any]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    evaluation: str = ""

    @property
    def columns(self) -> list[tuple[str, str, str]]:
        """The columns, the metric's header named after it; "before fine-tuning" only when a row has it."""
        before = any(r.get("value_before") is not None for r in self.rows)
        return [(k, {"value": self.metric, "value_before": f"{self.metric} {h}"}.get(k, h), kind)
                for k, h, kind in COLUMNS if k != "value_before" or before]


def _calib_key(c: dict[str, Any] | None) -> str | None:
    """Which calibration protocol, for grouping: a text with a content hash is that hash, whatever
    path it was read from (the modular training's text, when it is the same path, likewise)."""
    if c is None:
        return None
    c = dict(c)
    if c.get("sha256"):
        c["data"] = None
        mod = c.get("modular")
        # modular training reads the calibration text (compress passes it the same --calib-data);
        # newer manifests also record its hash
        if isinstance(mod, dict) and mod.get("sha256", c["sha256"]) == c["sha256"]:
            c["modular"] = {**mod, "data": None, "sha256": None}
    return json.dumps(c, sort_keys=True)


def _describe(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if key == "calibration":
        c = json.loads(value) if isinstance(value, str) else value
        if c is None:
            return "none"
        parts = [f"{c.get('data')}:{c.get('split')}", f"{c.get('samples')}×{c.get('seq_len')}",
                 f"seed {c.get('seed')}"]
        if c.get("sha256"):
            parts.append(f"sha256 {str(c['sha256'])[:8]}")
        mod = c.get("modular")
        if isinstance(mod, dict):  # part of the key: without it two different protocols read the same
            parts.append(f"+ modular training on {mod.get('data')}:{mod.get('split')} "
                         f"{mod.get('samples') or 'all'}×{mod.get('seq_len')}")
        return " ".join(parts)
    if key in ("base", "data_sha256") and isinstance(value, str) and len(value) == 64:
        return value[:8]
    if key == "data_sha256" and isinstance(value, dict):  # one hash per file (GLUE: train.tsv, dev.tsv)
        return ", ".join(f"{name} {_describe(key, h)}" for name, h in value.items())
    return str(value)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in PROTOCOL_NAMES if a.get(k) != b.get(k)]
    return "; ".join(f"{PROTOCOL_NAMES[k]} {_describe(k, a.get(k))} vs {_describe(k, b.get(k))}" for k in keys)


def _sort_rows(rows: list[dict[str, Any]]) -> None:
    """Dense first, then budgets from the largest kept fraction down, methods by name within one."""
    kept: dict[str, float] = {}
    for r in rows:
        b = str(r.get("budget"))
        kept[b] = max(kept.get(b, 0.0), r.get("kept_model") or 0.0)
    rows.sort(key=lambda r: (r["compressed"], -kept[str(r.get("budget"))], str(r.get("budget")),
                             str(r.get("method")), str(r.get("grouping")), str(r.get("created"))))


def _finish(table: ReportTable) -> ReportTable:
    """Order rows (dense first, then by kept ratio), Δ vs the dense baseline, best per budget."""
    _sort_rows(table.rows)
    dense = [r for r in table.rows if not r["compressed"] and isinstance(r.get("value"), int | float)]
    ref = dense[0]["value"] if dense else None
    if len(dense) > 1 and len({r["value"] for r in dense}) > 1:
        table.notes.append(f"{len(dense)} dense runs disagree ({', '.join(fmt_cell(r['value']) for r in dense)}); "
                           "Δ is against the first")
    if ref is None:
        table.notes.append("no dense baseline under this protocol: evaluate the base model with the same options")
    by_budget: dict[str, list[dict[str, Any]]] = {}
    for r in table.rows:
        v = r.get("value")
        numeric = isinstance(v, int | float) and not isinstance(v, bool)
        r["delta"] = v - ref if numeric and ref is not None else None
        r["x_dense"] = round(v / ref, 4) if numeric and ref else None
        r["best"] = False
        if r["compressed"] and numeric:
            by_budget.setdefault(str(r.get("budget")), []).append(r)
    if table.lower_is_better is not None:
        for rows in by_budget.values():
            if len(rows) > 1:
                pick = min if table.lower_is_better else max
                best = pick(r["value"] for r in rows)
                for r in rows:
                    r["best"] = r["value"] == best
    return table


def _title(ev: tuple, proto: dict[str, Any], model: str) -> str:
    task, metric, data, _ = ev
    return f"{task if task != metric else metric.upper()} · {data} · {model}"


def build_tables(rows: list[dict[str, Any]]) -> list[ReportTable]:
    """Group rows into comparison tables (see the module docstring); checkpoints that have no
    result yet come last, in their own table."""
    evals: dict[tuple, list[dict[str, Any]]] = {}
    pending = [r for r in rows if r["record_type"] == "checkpoint"]
    for r in rows:
        if r["record_type"] != "checkpoint":
            evals.setdefault((r["task"], r["metric"], r.get("data_key") or r["data"], r["record_type"]), []).append(r)
    tables: list[ReportTable] = []
    for key, ev_rows in evals.items():
        ev = (key[0], key[1], ev_rows[0]["data"], key[3])  # titled by the first run's data name
        by_proto: dict[str, list[dict[str, Any]]] = {}
        for r in ev_rows:
            by_proto.setdefault(json.dumps(r["protocol"], sort_keys=True, default=str), []).append(r)
        # the protocol with the most runs is the reference; others are set apart with the reason
        protos = sorted(by_proto.values(), key=lambda rs: -len(rs))
        main = protos[0][0]["protocol"]
        direction_ = direction(ev[1])
        for i, prows in enumerate(protos):
            proto = prows[0]["protocol"]
            keys = [_calib_key(r["calibration"]) for r in prows]
            counts: dict[str, int] = {}
            shown: dict[str, str] = {}  # key -> the first run's calibration as recorded (names kept)
            for r, k in zip(prows, keys):
                if k is not None:
                    counts[k] = counts.get(k, 0) + 1
                    shown.setdefault(k, json.dumps(r["calibration"], sort_keys=True))
            calibs = sorted(counts, key=lambda k: (-counts[k], k))  # the most used calibration first
            shared = [r for r in prows if r["calibration"] is None]  # dense and data-free: valid in every split
            for j, ck in enumerate(calibs or [None]):
                trows = [dict(r) for r in shared] + [dict(r) for r, k in zip(prows, keys) if k == ck and ck is not None]
                t = ReportTable(title=_title(ev, proto, str(prows[0]["model"])), metric=ev[1],
                                lower_is_better=direction_, protocol={**proto, "calibration": shown.get(ck)},
                                rows=trows,
                                evaluation=f"{ev[0]}:{ev[1]}:{ev[2]}")
                if i > 0:
                    t.notes.append(f"separate table: not comparable with the first {ev[1]} table "
                                   f"({_diff(proto, main)})")
                if j > 0:
                    t.notes.append("separate table: calibration protocol differs "
                                   f"({_describe('calibration', shown[ck])} vs "
                                   f"{_describe('calibration', shown[calibs[0]])}); "
                                   "dense and data-free rows repeated")
                tables.append(_finish(t))
    if pending:
        t = ReportTable(title="compressed checkpoints without results", metric="-", lower_is_better=None,
                        protocol={}, rows=[dict(r) for r in pending], evaluation="-")
        t.notes.append("evaluate them (e.g. `offcomp eval-ppl DIR`) to compare")
        tables.append(_finish(t))
    return tables


def protocol_line(table: ReportTable) -> str:
    """The shared protocol of a table in one line (for captions)."""
    p = table.protocol
    parts = [f"base weights sha256 {_describe('base', p.get('base'))}"]
    if p.get("data_sha256"):
        parts.append(f"data sha256 {_describe('data_sha256', p['data_sha256'])}")
    for k in ("n_tokens", "seq_len", "stride", "dtype"):
        if p.get(k) not in (None, "null"):
            v = p[k]
            parts.append(f"{PROTOCOL_NAMES[k]} {v:,}" if isinstance(v, int) else f"{PROTOCOL_NAMES[k]} {v}")
    if p.get("calibration"):
        parts.append(f"calibration {_describe('calibration', p['calibration'])}")
    return "; ".join(parts)


def fmt_cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def fmt_value(key: str, kind: str, v: Any) -> str:
    """A cell as the tables show it (the file formats keep raw numbers where they can)."""
    if v is None:
        return "-"
    if kind == "ratio" and isinstance(v, int | float):
        return f"{v:.3f}" if key != "x_dense" else (f"{v:.3g}×" if v < 1e5 else f"{v:.2e}×")
    if kind == "delta" and isinstance(v, int | float):
        return ("+" if v > 0 else "") + fmt_cell(float(v))
    if kind == "seconds" and isinstance(v, int | float):
        return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"
    if kind == "float" and isinstance(v, int | float) and not isinstance(v, bool):
        return fmt_cell(float(v))
    return fmt_cell(v)


def report_tables(root: str | Path, warnings: list[str] | None = None,
                  metrics: list[str] | None = None) -> list[ReportTable]:
    """What `offcomp report ROOT` shows: the comparison tables of every run under `root`; with
    `metrics`, only the tables of those metrics (e.g. MRPC's F1 without its accuracy)."""
    rows = collect(root, warnings)
    if metrics:
        known = {r["metric"] for r in rows if r["record_type"] != "checkpoint"}
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise OffcompError(f"no run under {root} has the metric {unknown[0]!r}; its runs have: "
                               f"{', '.join(sorted(known)) or 'none'}")
        rows = [r for r in rows if r["metric"] in metrics]
    return build_tables(rows)
