"""SQuAD v1.1 extractive QA fine-tuning and scoring, on Hugging Face `Trainer`.

The pipeline is the standard one (BERT / HF `run_qa.py`), so numbers are comparable with the
papers: a question + context window of at most 384 tokens, overlapping windows 128 tokens apart
(`doc_stride`) for long contexts, the character offsets of each token to map logits back to text,
the best of the top-20 start × top-20 end candidates no longer than 30 tokens, and the official
EM/F1 (`offcomp.eval.metrics`).

Offline only the dev set exists, so `split_dev=K` fine-tunes on the first K dev articles and
scores the remaining ones; the record says so (`data.protocol = "split-dev"`) because such a
number is not the official dev score.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from offcomp.errors import OffcompError
from offcomp.eval import finetuned
from offcomp.eval.glue import (
    FinetuneArgs,
    environment,
    freeze_compressed_modules,
    make_trainer,
    model_fields,
    param_counts,
    prepare_output_dir,
    resolve_model,
    scored_files,
    set_seed,
    train_summary,
)
from offcomp.eval.metrics import squad_scores
from offcomp.models import file_sha256
from offcomp.progress import ProgressFn

# BERT's SQuAD v1.1 recipe (Devlin et al. 2019): 3 epochs, lr 5e-5, batch 32, 384 tokens.
SQUAD_DEFAULTS = FinetuneArgs(max_length=384, learning_rate=5e-5, epochs=3.0, batch_size=32, grad_accum=1)
HF_SQUAD = "rajpurkar/squad"


@dataclass
class SquadData:
    """Flat examples ({id, title, context, question, answers: {text, answer_start}}) + provenance."""

    train: list[dict]
    eval: list[dict]
    source: dict[str, Any]


def read_squad_json(path: str | Path) -> list[dict]:
    """Flatten an official SQuAD json file into one dict per question, in file order."""
    path = Path(path)
    if not path.is_file():
        raise OffcompError(f"SQuAD file {path} not found")
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OffcompError(f"{path} is not a SQuAD json file (top-level 'data' list expected): {e}") from None
    out = []
    for art in articles:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                answers = qa.get("answers", [])
                out.append({"id": qa["id"], "title": art.get("title", ""), "context": para["context"],
                            "question": qa["question"],
                            "answers": {"text": [a["text"] for a in answers],
                                        "answer_start": [a["answer_start"] for a in answers]}})
    if not out:
        raise OffcompError(f"{path} holds no questions")
    return out


def _titles(examples: list[dict]) -> list[str]:
    return list(dict.fromkeys(e["title"] for e in examples))


def load_squad(train_file: str | Path | None = None, dev_file: str | Path | None = None,
               split_dev: int | None = None) -> SquadData:
    """Train/eval examples: both files, the dev file split by article, or the `datasets` copy."""
    if split_dev is not None and train_file is not None:
        raise OffcompError("--split-dev trains on dev articles: do not pass --train-file with it")
    if split_dev is None and (train_file is None) != (dev_file is None):
        raise OffcompError("pass both --train-file and --dev-file, or --dev-file with --split-dev K")
    source: dict[str, Any] = {}
    if dev_file is not None:
        dev = read_squad_json(dev_file)
        source = {"source": "json", "dev_file": str(Path(dev_file).resolve()),
                  "sha256": {Path(dev_file).name: file_sha256(dev_file)}}
        train = None
        if train_file is not None:
            train = read_squad_json(train_file)
            source["train_file"] = str(Path(train_file).resolve())
            source["sha256"][Path(train_file).name] = file_sha256(train_file)
    else:
        train, dev, source = _load_squad_hub(need_train=split_dev is None)
    if split_dev is None:
        return SquadData(train, dev, {**source, "protocol": "standard"})
    titles = _titles(dev)
    if not 1 <= split_dev < len(titles):
        raise OffcompError(f"--split-dev must be in 1..{len(titles) - 1} (the dev set has {len(titles)} articles)")
    first = set(titles[:split_dev])
    source.update(protocol="split-dev", train_articles=titles[:split_dev], eval_articles=titles[split_dev:])
    return SquadData([e for e in dev if e["title"] in first], [e for e in dev if e["title"] not in first], source)


def _load_squad_hub(need_train: bool) -> tuple[list[dict] | None, list[dict], dict[str, Any]]:
    import datasets

    try:
        dd = datasets.load_dataset(HF_SQUAD)
    except Exception as e:  # noqa: BLE001 - any hub/network failure has the same fix
        raise OffcompError(f"could not load {HF_SQUAD} with `datasets` ({type(e).__name__}); offline, pass "
                           "--dev-file (and --train-file, or --split-dev K)") from e

    def rows(ds) -> list[dict]:
        return [{k: r[k] for k in ("id", "title", "context", "question")}
                | {"answers": {"text": list(r["answers"]["text"]),
                               "answer_start": list(r["answers"]["answer_start"])}} for r in ds]

    fps = {k: getattr(v, "_fingerprint", None) for k, v in dd.items()}
    train = rows(dd["train"]) if need_train else None
    return train, rows(dd["validation"]), {"source": "datasets", "name": HF_SQUAD, "fingerprints": fps}


# ------------------------------------------------------------------------------------ preprocessing


def _encode(tokenizer, examples: list[dict], max_length: int, doc_stride: int):
    if not getattr(tokenizer, "is_fast", False):
        raise OffcompError("SQuAD preprocessing needs a fast tokenizer (offsets mapping); this one is not")
    if doc_stride >= max_length // 2:
        raise OffcompError(f"doc stride {doc_stride} must be well below max length {max_length}")
    # Leading whitespace in some questions would waste window tokens (as in HF run_qa).
    return tokenizer([e["question"].lstrip() for e in examples], [e["context"] for e in examples],
                     truncation="only_second", max_length=max_length, stride=doc_stride,
                     return_overflowing_tokens=True, return_offsets_mapping=True)


def _inputs(enc, i: int) -> dict[str, list[int]]:
    return {k: enc[k][i] for k in enc.keys() if k not in ("offset_mapping", "overflow_to_sample_mapping")}


def prepare_train_features(tokenizer, examples: list[dict], max_length: int = 384,
                           doc_stride: int = 128) -> list[dict]:
    """One feature per window, labelled with the answer's token span, or with the CLS position
    when the (first) answer is not wholly inside the window."""
    enc = _encode(tokenizer, examples, max_length, doc_stride)
    feats = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        ex = examples[enc["overflow_to_sample_mapping"][i]]
        ids = enc["input_ids"][i]
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        seq = enc.sequence_ids(i)
        start = end = cls
        if ex["answers"]["answer_start"]:
            a0 = ex["answers"]["answer_start"][0]
            a1 = a0 + len(ex["answers"]["text"][0])
            ctx = [t for t, s in enumerate(seq) if s == 1]
            if ctx and offsets[ctx[0]][0] <= a0 and offsets[ctx[-1]][1] >= a1:
                start = next(t for t in ctx if offsets[t][1] > a0)
                end = next(t for t in reversed(ctx) if offsets[t][0] < a1)
        feats.append({**_inputs(enc, i), "start_positions": start, "end_positions": end})
    return feats


def prepare_eval_features(tokenizer, examples: list[dict], max_length: int = 384,
                          doc_stride: int = 128) -> tuple[list[dict], list[int], list[list]]:
    """Model inputs per window, plus each window's example index and the character offsets of its
    context tokens (None for question/special tokens, so no answer can be drawn from them)."""
    enc = _encode(tokenizer, examples, max_length, doc_stride)
    feats, example_idx, offsets = [], [], []
    for i, offs in enumerate(enc["offset_mapping"]):
        seq = enc.sequence_ids(i)
        feats.append(_inputs(enc, i))
        example_idx.append(enc["overflow_to_sample_mapping"][i])
        offsets.append([tuple(o) if s == 1 else None for o, s in zip(offs, seq)])
    return feats, example_idx, offsets


def postprocess_predictions(examples: list[dict], example_idx: list[int], offsets: list[list],
                            start_logits: np.ndarray, end_logits: np.ndarray, n_best: int = 20,
                            max_answer_length: int = 30) -> dict[str, str]:
    """Best answer text per question: over all its windows, the top `n_best` starts × ends that form
    a valid context span of at most `max_answer_length` tokens, ranked by start + end logit.
    Logit rows may be longer than a window (batch padding); those positions are never chosen."""
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for f, e in enumerate(example_idx):
        by_example[e].append(f)
    preds = {}
    for e, ex in enumerate(examples):
        best, best_score = "", -np.inf
        for f in by_example.get(e, []):
            offs, sl, el = offsets[f], start_logits[f], end_logits[f]
            for s in np.argsort(sl)[::-1][:n_best]:
                for t in np.argsort(el)[::-1][:n_best]:
                    if s >= len(offs) or t >= len(offs) or offs[s] is None or offs[t] is None:
                        continue
                    if t < s or t - s + 1 > max_answer_length:
                        continue
                    score = sl[s] + el[t]
                    if score > best_score:
                        best_score, best = score, ex["context"][offs[s][0]:offs[t][1]]
        preds[ex["id"]] = best
    return preds


class _PadRight:
    """Right-pads whatever the tokenizer's padding side: the span labels and the offsets are token
    positions counted from the left, so left padding would shift them."""

    def __init__(self, pad_id: int | None) -> None:
        self.pad_id = pad_id or 0

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in feats)
        batch = {}
        for k in feats[0]:
            if k in ("start_positions", "end_positions"):
                batch[k] = torch.tensor([f[k] for f in feats])
            else:
                fill = self.pad_id if k == "input_ids" else 0
                batch[k] = torch.tensor([f[k] + [fill] * (n - len(f[k])) for f in feats])
        return batch


# ---------------------------------------------------------------------------------------------- run


def _split_name(source: dict[str, Any]) -> str:
    if source["protocol"] == "split-dev":
        k = len(source["train_articles"])
        return f"dev[articles {k}:{k + len(source['eval_articles'])}] (trained on dev[:{k}])"
    return "dev"


def run_squad(
    model: str | nn.Module,
    *,
    tokenizer: Any = None,
    train_file: str | Path | None = None,
    dev_file: str | Path | None = None,
    split_dev: int | None = None,
    output_dir: str | Path,
    args: FinetuneArgs = SQUAD_DEFAULTS,
    doc_stride: int = 128,
    n_best: int = 20,
    max_answer_length: int = 30,
    freeze_compressed: bool = False,
    pre_metrics: dict | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
    verify: bool = True,
    save_model: bool = False,
) -> dict:
    """Fine-tune `model` for SQuAD v1.1, score official EM/F1 and write `squad.json` (rank 0).

    A re-run after an interruption resumes from the Trainer checkpoints in `output_dir`;
    `save_model` keeps the fine-tuned model in `output_dir/model` (see eval/finetuned.py).

    `model` is a name/path (loaded with a fresh QA head) or a built QA model plus `tokenizer`.
    `args.max_train_samples` / `max_eval_samples` keep the first N questions (quick runs).
    """
    t_start = time.perf_counter()
    out = prepare_output_dir(output_dir, model)
    if n_best < 1 or max_answer_length < 1:
        raise OffcompError("n_best and max_answer_length must be >= 1")
    data = load_squad(train_file, dev_file, split_dev)
    train_ex = data.train[: args.max_train_samples]
    eval_ex = data.eval[: args.max_eval_samples]
    set_seed(args.seed)
    loaded = resolve_model(model, tokenizer, head="question-answering", device=device, dtype=dtype, verify=verify)
    tok = loaded.tokenizer
    frozen = freeze_compressed_modules(loaded.model) if freeze_compressed else 0
    params = param_counts(loaded.model)

    train_set = prepare_train_features(tok, train_ex, args.max_length, doc_stride)
    eval_set, example_idx, offsets = prepare_eval_features(tok, eval_ex, args.max_length, doc_stride)
    trainer = make_trainer(loaded.model, tok, train_set, out, args, device, progress,
                           collator=_PadRight(tok.pad_token_id))
    hyper = {**dataclasses.asdict(args), "doc_stride": doc_stride, "n_best": n_best,
             "max_answer_length": max_answer_length, "freeze_compressed": freeze_compressed}
    t0 = time.perf_counter()
    train_out, resumed = finetuned.train(trainer, out, {"task": "squad_v1.1", "model": loaded.info.get("sha256"),
                                                        "data": data.source, "hyperparameters": hyper,
                                                        "world_size": trainer.args.world_size})
    train_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    pred = trainer.predict(eval_set, metric_key_prefix="eval")
    start_logits, end_logits = pred.predictions[:2]
    answers = postprocess_predictions(eval_ex, example_idx, offsets, start_logits, end_logits,
                                      n_best, max_answer_length)
    metrics = squad_scores(answers, {e["id"]: e["answers"]["text"] for e in eval_ex})
    eval_time = time.perf_counter() - t0

    record = {
        "type": "squad",
        "task": "squad_v1.1",
        "metric_names": ["exact_match", "f1"],
        "metrics": metrics,
        "pre_metrics": dict(pre_metrics or {}),
        **model_fields(loaded, params["total"], scored_files(data.source)),
        "data": {"name": "squad_v1.1", "split": _split_name(data.source), **data.source,
                 "n_train_questions": len(train_ex), "n_train_features": len(train_set),
                 "n_eval_questions": len(eval_ex), "n_eval_features": len(eval_set),
                 "max_train_samples": args.max_train_samples, "max_eval_samples": args.max_eval_samples},
        "hyperparameters": hyper,
        "params": {**params, "frozen_compressed": frozen},
        **train_summary(trainer, train_out),
        "resumed_from": resumed and Path(resumed).name,
        "seconds": time.perf_counter() - t_start,
        "wall_time_s": {"train": train_time, "eval": eval_time},
        **environment(device, dtype),
    }
    finetuned.finish(trainer, out, record, "squad.json", save_model, loaded, "question-answering")
    return record
