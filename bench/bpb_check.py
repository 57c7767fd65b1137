"""Do lm-eval's bits per byte and `offcomp eval-ppl`'s agree on the same text? (issue 12)

The text: the first --docs WikiText-2 test articles (split as lm-eval's `wikitext` task splits
them, detokenized by lm-eval's own detokenizer), joined with "\\n" into one string and cut at a
token boundary so that eval-ppl's windows cover it without a ragged tail. Scored three ways:

1. lm-eval `loglikelihood_rolling` (its perplexity-task protocol), windows of --max-length M;
2. eval-ppl with --seq-len M+1 --stride M: the same windows (exactly, on a BOS-first stream; see
   tests/test_eval_lm.py), here one token later because SmolLM2's tokenizer adds no BOS, and
   without the first token, which has no context;
3. eval-ppl's default protocol, non-overlapping windows of M (each window's first token unscored).

    .venv/bin/python bench/bpb_check.py --model smollm2-135m --docs 3 --max-length 1024
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

from offcomp.data import TextSource, rows_sha256
from offcomp.eval.harness import rolling_loglikelihood
from offcomp.eval.lm_tasks import wikitext_documents
from offcomp.eval.ppl import perplexity, token_text_spans
from offcomp.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    M = args.max_length

    bundle = load_model(args.model)
    model, tok = bundle.model, bundle.tokenizer
    docs = wikitext_documents(Path(args.data).read_text(encoding="utf-8"))[: args.docs]
    text = "\n".join(wikitext_detokenizer({"page": d}) for d in docs)
    _, nbytes, _ = token_text_spans(tok, text)
    k = (len(nbytes) - 1) // M
    text = text.encode("utf-8")[: int(nbytes[: k * M + 1].sum())].decode("utf-8")
    n_bytes, n_words = len(text.encode("utf-8")), len(text.split())
    src = TextSource(name=f"wikitext-2 test, first {args.docs} articles (detokenized)", split="test", rows=[text],
                     sha256=rows_sha256([text]))

    rows = []
    t = time.perf_counter()
    (ll,) = rolling_loglikelihood(model, tok, [text], max_length=M)
    rows.append({"protocol": f"lm-eval loglikelihood_rolling, max_length {M}", "scored_tokens": k * M + 1,
                 "scored_bytes": n_bytes, "bits_per_byte": -ll / math.log(2) / n_bytes,
                 "word_perplexity": math.exp(-ll / n_words), "seconds": time.perf_counter() - t})
    for seq_len, stride in ((M + 1, M), (M, M)):
        t = time.perf_counter()
        r = perplexity(model, tok, src, seq_len=seq_len, stride=stride)
        rows.append({"protocol": f"eval-ppl --seq-len {seq_len} --stride {stride}", "scored_tokens": r["n_tokens"],
                     "scored_bytes": r["n_bytes"], "bits_per_byte": r["bits_per_byte"],
                     "word_perplexity": r["word_perplexity"], "token_ppl": r["ppl"],
                     "seconds": time.perf_counter() - t})
    head = {"model": bundle.protocol(), "text_tokens": k * M + 1, "text_bytes": n_bytes, "text_words": n_words,
            "text_sha256": src.sha256, "lm_eval_word_count": len(re.split(r"\s+", text))}
    print(json.dumps(head))
    print("| protocol | scored tokens | scored bytes | bits/byte | word PPL |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['protocol']} | {r['scored_tokens']:,} | {r['scored_bytes']:,} | {r['bits_per_byte']:.4f} "
              f"| {r['word_perplexity']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
