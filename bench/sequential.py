"""Sequential vs global pipeline (run by hand, not a test): peak memory, wall time, quality.

    .venv/bin/python bench/sequential.py smollm2 --out runs/bench/sequential
    .venv/bin/python bench/sequential.py random --out runs/bench/sequential-random
    .venv/bin/python bench/sequential.py gpu --out runs/bench/sequential-gpu     (a CUDA machine: bench/gpu_check.sh)

`smollm2`: svd-llm at ratio 0.8 on every decoder linear of smollm2-135m, calibrated on 64 x 1024
tokens of wiki.valid.raw, three ways: the global pipeline (whole model + `offcomp capture`), the
sequential pipeline with open-loop statistics (dense hidden states: must give the global factors)
and with closed-loop statistics (the compressed prefix's hidden states). Each compress runs in a
fresh process under `/usr/bin/time -v` (peak RSS, wall time) with an empty capture cache; then
WikiText-2 test perplexity on the first `--eval-tokens` tokens, and `offcomp report` makes the table.

`random`: random LLaMA configs stored as bf16 shards (the largest >= 1B parameters), compressed by
both pipelines (Wanda pruning at 50 %, every linear, 8 x 256 calibration tokens); measured peak RSS
next to `offcomp.memory`'s prediction. Summary: OUT/summary.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WIKI = (ROOT.parent / "shared/data/wikitext-2-raw").resolve()
# the measurement is memory: Wanda pruning fits in seconds where an SVD of every 5632 x 2048 matrix
# would take hours on 2 cores, and it needs calibration statistics like every data-aware method
METHOD = ["--method", "prune", "--ratio", "0.5", "--option", "score=wanda"]
RANDOM = {  # name → LLaMA config overrides (vocabulary of the smollm2 tokenizer they are saved with)
    "llama-110m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12),
    "llama-400m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16),
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16),
}


def offcomp(args: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """Run `offcomp ARGS` in a fresh process under /usr/bin/time -v: peak RSS, wall seconds, rc."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", "from offcomp.cli import app; app()", *args]
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    text = log.read_text()
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    # wall time depends on what else runs; user CPU time is the work itself
    return {"rc": rc, "wall_s": round(wall, 1), "user_s": float(user.group(1)) if user else None,
            "peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None,
            "command": "offcomp " + " ".join(args), "log": str(log)}


def fresh_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, OFFCOMP_CACHE=str(cache), PYTHONPATH=str(ROOT), COLUMNS="120")
    return env


def smollm2(args: argparse.Namespace) -> None:
    from offcomp.models import smollm2_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    converted = smollm2_dir()  # converted once; each run's cache links to it (no capture is shared)
    calib = ["--calib-data", str(WIKI / "wiki.valid.raw"), "--calib-samples", str(args.samples),
             "--calib-seq-len", str(args.seq_len)]
    runs = {"global": ["--pipeline", "global"], "sequential-open": ["--pipeline", "sequential", "--calib-loop", "open"],
            "sequential-closed": ["--pipeline", "sequential", "--calib-loop", "closed"]}
    summary: dict[str, Any] = {"uptime_before": os.getloadavg(), "runs": {}}
    for name, extra in runs.items():
        cache = Path(tempfile.mkdtemp(prefix="offcomp-bench-cache-"))
        (cache / "smollm2-135m").symlink_to(converted)
        summary["runs"][name] = offcomp(
            ["compress", "-m", "smollm2-135m", "--method", "svd-llm", "--ratio", "0.8", *calib,
             "--out", str(out / name), "--overwrite", *extra], fresh_env(cache), out / f"{name}.log")
        summary["runs"][name]["load_after"] = os.getloadavg()
        shutil.rmtree(cache, ignore_errors=True)
        print(name, summary["runs"][name], flush=True)
    env = fresh_env(Path(os.environ.get("OFFCOMP_CACHE", Path.home() / ".cache/offcomp")))
    ppl = ["--data", str(WIKI / "wiki.test.raw"), "--max-tokens", str(args.eval_tokens), "--seq-len", "1024"]
    (out / "dense").mkdir(exist_ok=True)
    (out / "dense" / "results.jsonl").unlink(missing_ok=True)
    offcomp(["eval-ppl", "smollm2-135m", *ppl, "--results", str(out / "dense" / "results.jsonl")], env,
            out / "dense.log")
    for name in runs:
        (out / name / "results.jsonl").unlink(missing_ok=True)
        offcomp(["eval-ppl", str(out / name), *ppl], env, out / f"eval-{name}.log")
        rec = json.loads((out / name / "results.jsonl").read_text().splitlines()[-1])
        summary["runs"][name]["test_ppl"] = rec["ppl"]
    dense = json.loads((out / "dense" / "results.jsonl").read_text().splitlines()[-1])
    summary["dense_ppl"] = dense["ppl"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| pipeline | peak RSS (GB) | wall (s) | user CPU (s) | test PPL |", "|---|---:|---:|---:|---:|"]
    for name, r in summary["runs"].items():
        lines.append(f"| {name} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['wall_s']:.0f} | {r['user_s']:.0f} | "
                     f"{r['test_ppl']:.2f} |")
    lines.append(f"| dense | | | | {summary['dense_ppl']:.2f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def make_random(name: str, where: Path, tokenizer_dir: Path) -> Path:
    """A random LLaMA of RANDOM[name], saved as bf16 shards of at most 500 MB with a real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = where / name
    if (d / "model.safetensors.index.json").is_file():
        return d
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                               num_key_value_heads=RANDOM[name]["num_attention_heads"], dtype="bfloat16",
                               **RANDOM[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(d, max_shard_size="500MB")
    tok.save_pretrained(d)
    return d


def random_models(args: argparse.Namespace) -> None:
    from offcomp.memory import llama_shape, predict
    from offcomp.models import smollm2_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() \
        else {}
    calib = ["--calib-data", str(WIKI / "wiki.valid.raw"), "--calib-samples", str(args.samples),
             "--calib-seq-len", str(args.seq_len)]
    from transformers import AutoConfig

    for name in args.sizes.split(","):
        d = make_random(name, out / "models", smollm2_dir())
        shape = llama_shape(AutoConfig.from_pretrained(d))
        row = summary.setdefault(name, {"params": shape.params()})
        for pipeline in args.pipelines.split(","):
            if pipeline in row and not args.force:
                continue
            cache = Path(tempfile.mkdtemp(prefix="offcomp-bench-cache-"))
            res = offcomp(["compress", "-m", str(d), *METHOD, *calib, "--pipeline", pipeline,
                           "--out", str(out / f"{name}-{pipeline}"), "--overwrite"], fresh_env(cache),
                          out / f"{name}-{pipeline}.log")
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out / f"{name}-{pipeline}", ignore_errors=True)  # only the measurement is kept
            # Wanda reads Σx² only: the sequential pipeline collects just that; the global one's
            # capture takes every input's full Gram matrix, as it always does
            res["predicted"] = predict(shape, pipeline, tokens=args.samples * args.seq_len, seq_len=args.seq_len,
                                       gram=pipeline == "global")
            res["predicted_bytes"] = res["predicted"]["total"]
            res["load_after"] = os.getloadavg()
            row[pipeline] = res
            print(name, pipeline, res, flush=True)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| model | parameters | pipeline | peak RSS measured (GB) | predicted (GB) | wall (s) | user CPU (s) |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name, row in summary.items():
        shape = llama_shape(AutoConfig.from_pretrained(out / "models" / name))
        for pipeline in ("sequential", "global"):
            r = row.get(pipeline)
            if r and r.get("peak_rss_bytes"):  # the prediction of the current memory model
                r["predicted_bytes"] = predict(shape, pipeline, tokens=args.samples * args.seq_len,
                                               seq_len=args.seq_len, gram=pipeline == "global")["total"]
                lines.append(f"| {name} | {row['params'] / 1e9:.3f} B | {pipeline} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                             f"{r['predicted_bytes'] / 1e9:.2f} | {r['wall_s']:.0f} | {r.get('user_s') or 0:.0f} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def gpu(args: argparse.Namespace) -> None:
    """The sequential pipeline on one CUDA GPU: smollm2-135m (svd-llm 0.8, 64 x 1024 tokens) and the
    1.1B random LLaMA (Wanda 50 %): wall time, peak RSS and peak GPU memory (the manifest's)."""
    from offcomp.models import smollm2_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    big = make_random("llama-1.1b", out / "models", smollm2_dir())
    wiki = ["--calib-data", str(WIKI / "wiki.valid.raw")]
    jobs = {"smollm2-135m": ["-m", "smollm2-135m", "--method", "svd-llm", "--ratio", "0.8", *wiki,
                             "--calib-samples", "64", "--calib-seq-len", "1024"],
            "llama-1.1b": ["-m", str(big), *METHOD, *wiki, "--calib-samples", "64", "--calib-seq-len", "1024"]}
    summary = {}
    for name, job in jobs.items():
        res = offcomp(["compress", *job, "--pipeline", "sequential", "--device", "cuda", "--out", str(out / name),
                       "--overwrite"], fresh_env(Path(os.environ.get("OFFCOMP_CACHE", Path.home() / ".cache/offcomp"))),
                      out / f"{name}.log")
        manifest = json.loads((out / name / "offcomp.json").read_text()) if res["rc"] == 0 else {}
        res["peak_cuda_bytes"] = (manifest.get("pipeline") or {}).get("peak_cuda_bytes")
        summary[name] = res
        print(name, res, flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["smollm2", "random", "gpu"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--sizes", default=",".join(RANDOM))
    ap.add_argument("--force", action="store_true", help="re-measure rows already in summary.json")
    ap.add_argument("--pipelines", default="sequential,global", help="random: which pipelines to measure")
    args = ap.parse_args()
    if args.what == "gpu":
        gpu(args)
    elif args.what == "smollm2":
        args.samples, args.seq_len = args.samples or 64, args.seq_len or 1024
        smollm2(args)
    else:
        args.samples, args.seq_len = args.samples or 8, args.seq_len or 256
        random_models(args)


if __name__ == "__main__":
    main()
