"""Speed benchmark (run by hand, not a test):

1. SVD compression time of all decoder linear layers of smollm2-135m (separate, ratio 0.8);
2. eval-ppl throughput (tokens/s) against a bare forward pass of the same model on the same tokens;
3. LowRankLinear forward time against dense nn.Linear at 20/40/60 % parameter reduction.

    .venv/bin/python bench/speed.py [--tokens 8192] [--dtype fp32|bf16] [--out runs/bench/speed.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn

import offcomp
from offcomp.data import causal_text, load_text
from offcomp.eval.ppl import perplexity
from offcomp.layers import LowRankLinear
from offcomp.models import load_model
from offcomp.pipeline import parse_dtype

DATA = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"


def best_of(fn, repeat: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_compress(model_name: str) -> dict:
    bundle = load_model(model_name)
    plan = offcomp.parse_plan({"groups": [{"modules": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate",
                                                       "mlp.up", "mlp.down"], "ratio": 0.8}]})
    t = time.perf_counter()
    report = offcomp.compress_(bundle.model, plan)
    return {"what": "svd all decoder linears, separate, ratio 0.8, fp64 SVD", "units": len(report.units),
            "seconds": round(time.perf_counter() - t, 2), "params_before": report.params_before,
            "params_after": report.params_after}


def bench_eval(model_name: str, tokens: int, dtype: str, seq_len: int = 1024) -> dict:
    dt = parse_dtype(dtype)
    bundle = load_model(model_name, dtype=dt)
    source = load_text(str(DATA) if DATA.is_file() else "embedded", split="test")
    t = time.perf_counter()
    res = perplexity(bundle.model, bundle.tokenizer, source, kind="causal", seq_len=seq_len, max_tokens=tokens,
                     dtype=dt)
    t_eval = time.perf_counter() - t
    n = res["n_input_tokens"]
    # the same windows the evaluator scored, for a bare forward pass without any loss computation
    ids = torch.tensor(bundle.tokenizer(causal_text(source), add_special_tokens=False).input_ids)
    windows = ids[: (n // seq_len) * seq_len].view(-1, seq_len)

    @torch.inference_mode()
    def bare() -> None:
        for w in windows:
            bundle.model(input_ids=w[None])

    t_bare = best_of(bare, repeat=1)
    return {"dtype": dtype, "tokens": n, "ppl": res["ppl"], "eval_ppl_tokens_per_s": round(n / t_eval, 1),
            "bare_forward_tokens_per_s": round(n / t_bare, 1), "eval_over_bare_time": round(t_eval / t_bare, 3)}


def bench_layer(n_out: int, n_in: int, tokens: int, dtype: str) -> list[dict]:
    dt = parse_dtype(dtype)
    x = torch.randn(tokens, n_in, dtype=dt)
    dense = nn.Linear(n_in, n_out, bias=False).to(dt)
    t_dense = best_of(lambda: dense(x))
    rows = []
    for reduction in (0.2, 0.4, 0.6):
        rank = int((1 - reduction) * n_out * n_in / (n_out + n_in))
        lr = LowRankLinear(n_in, n_out, rank, bias=False, dtype=dt)
        with torch.no_grad():
            lr.U.normal_()
            lr.V.normal_()
        t_lr = best_of(lambda lr=lr: lr(x))
        rows.append({"shape": f"{n_out}x{n_in}", "tokens": tokens, "dtype": dtype, "reduction": reduction,
                     "rank": rank, "dense_ms": round(t_dense * 1e3, 3), "lowrank_ms": round(t_lr * 1e3, 3),
                     "speedup": round(t_dense / t_lr, 2)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--out", default="runs/bench/speed.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {
        "machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "compress": bench_compress(args.model),
        "eval": [bench_eval(args.model, args.tokens, d) for d in dict.fromkeys([args.dtype, "bf16"])],
        "layer": [r for shape in ((1536, 576), (576, 1536), (4096, 4096)) for d in ("fp32", "bf16")
                  for r in bench_layer(*shape, tokens=2048, dtype=d)],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
