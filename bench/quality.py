"""Quality benchmark (run by hand, not a test): compress, then WikiText-2 test perplexity.

Every (method, budget) pair is one `offcomp compress` run (validation-selected where the method
trains, on wiki.valid.raw, never the test split) followed by one `offcomp eval-ppl` on the first
`--eval-tokens` test tokens. Rows are written to OUT/bench.jsonl as they finish (a re-run skips
the rows already there) and the whole table to OUT/table.md; OUT/report.md is `offcomp report OUT
--format md` over the runs' own records (each compressed directory's results.jsonl).

Presets (`--suite`):
  paper       issue 3: one module type jointly across all layers (the paper's regime), cr 3/10/25,
              svd / ae / kronecker / tucker / prune, 32 x 1024 test tokens.
  data-aware  issues 4 and 14: every decoder linear, separately, ratio 0.9-0.6, data-free vs
              data-aware low-rank vs SparseGPT at the same kept-value ratio, 64 x 1024 calibration
              tokens from wiki.valid.raw, 64 x 1024 test tokens. A sparse matrix also stores its
              bitmap (1 bit per original weight): a ratio 1/16 lower matches the low-rank rows'
              bytes in bf16 (e.g. `--methods sparsegpt --values 0.7375` beside ratio 0.8).
  pruning     issue 14: every decoder linear, separately, 50 % unstructured and 2:4; magnitude vs
              Wanda (per-row comparison, as in its paper) vs SparseGPT, Wanda and SparseGPT on the
              same 64 x 1024 calibration windows of wiki.valid.raw (one capture), 64 x 1024 test tokens.

Calibration statistics (captured once from wiki.valid.raw and cached) go only to the methods that
use them. A method is `name` or `name:key=value,key=value` (its options), e.g. `ae:scale=fit`; `+alloc` at
the end spreads the ratio over groups by measured sensitivity (`allocate`), e.g. `svd-llm+alloc`;
`+modular` then trains each compressed block towards the dense one (offcomp.modular), with options,
e.g. `svd-llm+alloc+modular:mode=sequential,lr=1e-4`. The pipeline is `offcomp compress`'s `auto`
(sequential, closed-loop statistics, whenever the plan reads calibration data and can run block by
block); `+open` keeps the sequential pipeline's statistics on the dense stream (`--calib-loop open`)
and `+global` captures whole-model statistics once (`--pipeline global`), e.g. `sparsegpt+global`.
Option values are read as JSON where they parse (numbers, true/false), else as text (`pattern=2:4`
stays the string "2:4").

    .venv/bin/python bench/quality.py --suite paper --out runs/bench/quality-paper
    .venv/bin/python bench/quality.py --suite data-aware --out runs/bench/quality-data-aware
    .venv/bin/python bench/quality.py --suite pruning --out runs/bench/quality-pruning
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from offcomp.models import load_model
from offcomp.pipeline import compress_model, evaluate_ppl, quick_plan
from offcomp.records import dumps
from offcomp.registry import get_method
from offcomp.report import fmt_cell, report_tables
from offcomp.report_render import render

WIKI = (Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw").resolve()
SUITES: dict[str, dict[str, Any]] = {
    "paper": {"modules": ["attn.q"], "joint": True, "budget": "cr", "values": [3, 10, 25],
              "methods": ["svd", "ae", "ae:scale=fit", "kronecker", "tucker", "prune", "prune:score=wanda,compare=row"],
              "eval_tokens": 32768, "calib": 16, "validate": True},
    "data-aware": {"modules": None, "joint": False, "budget": "ratio", "values": [0.9, 0.8, 0.7, 0.6],
                   "methods": ["svd", "fwsvd", "asvd", "svd-llm", "ae:loss_space=whitened,arch=linear,scale=fit",
                               "svd-llm+alloc", "svd-llm+alloc+modular:mode=sequential,lr=1e-4", "sparsegpt"],
                   "eval_tokens": 65536,
                   "calib": 64, "validate": False},
    "pruning": {"modules": None, "joint": False, "budget": "ratio", "values": [0.5],
                "methods": ["prune", "prune:score=wanda,compare=row", "sparsegpt",
                            "prune:pattern=2:4", "prune:score=wanda,pattern=2:4", "sparsegpt:pattern=2:4"],
                "eval_tokens": 65536, "calib": 64, "validate": False},
}
KEPT = re.compile(r"kept epoch (\d+) \(validation ([0-9.eE+-]+)\)")  # ae_train's selection log line
COLUMNS = ["method", "budget", "modules", "group_params", "stored_params", "achieved_cr", "params_after",
           "valid_ppl", "test_ppl", "compress_s", "eval_s", "weights_bytes"]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _options(text: str) -> dict[str, Any]:
    return {k: _value(v) for k, v in (kv.split("=", 1) for kv in text.split(",") if kv)}


def parse_method(spec: str) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """`name[:k=v,...][+alloc][+modular[:k=v,...]]` → (method, options, extras with their options).
    Values are parsed as YAML scalars."""
    name, *more = spec.split("+")
    name, _, opts = name.partition(":")
    extras = {e.partition(":")[0]: _options(e.partition(":")[2]) for e in more}
    return name, _options(opts), extras


def run_one(args: argparse.Namespace, cfg: dict[str, Any], spec: str, value: float, model_type: str) -> dict:
    method, options, extras = parse_method(spec)
    alloc = "alloc" in extras
    budget = {cfg["budget"]: value}
    modular = ({"epochs": args.modular_epochs, "samples": args.modular_samples, **extras["modular"]}
               if "modular" in extras else None)
    plan = quick_plan(model_type, method, modules=cfg["modules"], joint=cfg["joint"], options=options,
                      allocate={"ratio": value, "criterion": args.alloc_criterion} if alloc else None,
                      modular=modular,
                      **({} if alloc else budget))
    tag = f"{re.sub(r'[^A-Za-z0-9._+-]+', '-', spec.replace('=', ''))}-{cfg['budget']}{value}"
    out = Path(args.out) / tag
    calib = None
    meth = get_method(method)
    if cfg["calib"] and (meth.stats_needed(meth.parse_config(options, method)) or extras):
        calib = {"data": str(WIKI / "wiki.valid.raw"), "split": "validation", "samples": cfg["calib"],
                 "seq_len": 1024, "seed": args.seed}
    # per-unit validation of trained methods: the paper's regime has few (joint) units; over 210
    # separate units the checks would cost hours, so there trained methods select on their loss
    valid = {"data": str(WIKI / "wiki.valid.raw"), "max_tokens": args.valid_tokens} if cfg["validate"] else None
    man = compress_model(args.model, plan, out, seed=args.seed, calib=calib, valid=valid, overwrite=True,
                         plan_source=f"bench/quality.py {spec} {cfg['budget']}={value}",
                         pipeline="global" if "global" in extras else "auto",
                         calib_loop="open" if "open" in extras else None)
    rec = evaluate_ppl(str(out), str(WIKI / "wiki.test.raw"), max_tokens=cfg["eval_tokens"], dtype=args.dtype,
                       seed=args.seed)
    rep = man["report"]
    stored, orig = rep["compressed_stored_params"], rep["compressed_original_params"]
    kept = [m for line in man.get("fit_log", []) for m in KEPT.findall(line)]
    hypers = [u.get("hyper", {}) for u in rep["units"]]
    index_bytes = sum(h.get("index_bytes", 0) for h in hypers) if all("index_bytes" in h for h in hypers) else None
    return {
        "method": spec, "budget": f"{cfg['budget']} {value}", "modules": ",".join(cfg["modules"] or ["all"])
        + (" joint" if cfg["joint"] else ""), "group_params": orig, "stored_params": stored,
        "achieved_cr": round(orig / stored, 3), "params_after": rep["params_after"],
        "valid_ppl": float(kept[-1][1]) if kept else None,
        "kept_epoch": int(kept[-1][0]) if kept else None, "test_ppl": rec["ppl"],
        "compress_s": round(rep["seconds"], 1),
        "eval_s": round(rec["seconds"], 1), "weights_bytes": rec.get("weights_bytes"),
        "sparse_index_bytes": index_bytes, "dir": str(out), "protocol": {
            "model": rec["model"], "data": rec.get("data"), "seq_len": rec.get("seq_len"),
            "n_tokens": rec.get("n_tokens"), "dtype": args.dtype, "seed": args.seed,
            "params_before": rep["params_before"], "calibration": man.get("calibration"),
            "validation": man.get("validation"), "allocation": (man.get("allocation") or {}).get("criterion"),
            "pipeline": man.get("pipeline")},
    }


def dense_row(args: argparse.Namespace, cfg: dict[str, Any]) -> dict:
    rec = evaluate_ppl(args.model, str(WIKI / "wiki.test.raw"), max_tokens=cfg["eval_tokens"], dtype=args.dtype,
                       seed=args.seed, results=Path(args.out) / "dense" / "results.jsonl")
    return {"method": "dense", "budget": "-", "modules": "-", "group_params": None, "stored_params": None,
            "achieved_cr": None, "params_after": rec["params_after"], "valid_ppl": None, "test_ppl": rec["ppl"],
            "compress_s": None, "eval_s": round(rec["seconds"], 1), "weights_bytes": rec.get("weights_bytes"),
            "dir": None,
            "protocol": {"model": rec["model"], "data": rec.get("data"), "seq_len": rec.get("seq_len"),
                         "n_tokens": rec.get("n_tokens"), "dtype": args.dtype, "seed": args.seed}}


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), default="paper")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modules", nargs="+", help="roles/patterns (default: the suite's)")
    ap.add_argument("--methods", nargs="+", help="methods (default: the suite's)")
    ap.add_argument("--values", nargs="+", type=float, help="cr or ratio values (default: the suite's)")
    ap.add_argument("--eval-tokens", type=int, help="test tokens (default: the suite's)")
    ap.add_argument("--calib-samples", type=int, help="calibration sequences of 1024 (default: the suite's)")
    ap.add_argument("--valid-tokens", type=int, default=4096, help="validation tokens for early stopping")
    ap.add_argument("--alloc-criterion", default="fisher")
    ap.add_argument("--modular-epochs", type=int, default=2, help="epochs of `+modular` block training")
    ap.add_argument("--modular-samples", type=int, default=16, help="calibration sequences of `+modular`")
    ap.add_argument("--dtype", default="fp32", help="evaluation dtype (fp32 is faster than bf16 on CPUs without AMX)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = dict(SUITES[args.suite])
    for key, val in (("modules", args.modules), ("methods", args.methods), ("values", args.values),
                     ("eval_tokens", args.eval_tokens), ("calib", args.calib_samples)):
        if val is not None:
            cfg[key] = val
    cfg["values"] = [int(v) if float(v).is_integer() and cfg["budget"] == "cr" else v for v in cfg["values"]]
    args.out = args.out or f"runs/bench/quality-{args.suite}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # bench.jsonl, not results.jsonl: `offcomp report OUT` reads every results.jsonl as run records
    done_path, legacy = out / "bench.jsonl", out / "results.jsonl"
    if legacy.exists() and not done_path.exists():
        legacy.rename(done_path)
    rows = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.exists() else []
    done = {(r["method"], r["budget"]) for r in rows}
    model_type = load_model(args.model).model.config.model_type
    # the dense reference last: the compressed rows are what a partial run (on a busy machine) must have
    todo = [(m, v) for v in cfg["values"] for m in cfg["methods"]] + [("dense", None)]
    for spec, value in todo:
        key = (spec, "-" if value is None else f"{cfg['budget']} {value}")
        if key in done:
            continue
        t = time.perf_counter()
        row = dense_row(args, cfg) if value is None else run_one(args, cfg, spec, value, model_type)
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        with open(done_path, "a") as f:
            f.write(dumps(row) + "\n")
        print(f"{spec:>18} {key[1]:>10}  test PPL {row['test_ppl']:.4g}  ({row['wall_s']} s)", flush=True)
    md = table(rows)
    (out / "table.md").write_text(md + "\n")
    (out / "report.md").write_text(render(report_tables(out), "md"))
    print(md)


if __name__ == "__main__":
    main()
