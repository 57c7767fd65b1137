"""Zero-shot sentence similarity (STS-B): how a compressed sentence encoder is judged without any
fine-tuning.

Each sentence is embedded the way sentence-transformers embeds it (token states pooled over the
attention mask, then L2-normalised when the model's `modules.json` lists a Normalize module), the
pair is scored by cosine similarity, and the scores are correlated with the gold 0–5 labels
(Spearman, as the sentence-embedding literature reports; Pearson too). Note that cosine similarity
is invariant to normalisation, so `normalize` only matters for the stored embeddings' norms; it is
applied anyway so the embeddings are exactly the ones the model would ship.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from offcomp.errors import OffcompError
from offcomp.eval.glue import (
    TASKS,
    _task_dir,
    environment,
    model_fields,
    param_counts,
    prepare_output_dir,
    read_glue_tsv,
    resolve_model,
    scored_files,
    write_record,
)
from offcomp.eval.metrics import pearson, spearman
from offcomp.models import file_sha256
from offcomp.progress import ProgressFn

POOLINGS = ("mean", "cls", "max")
_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
_SPLITS = {"dev": ("dev.tsv", "validation"), "train": ("train.tsv", "train")}  # GLUE test labels are hidden


def sentence_transformers_config(model_dir: str | Path | None) -> dict[str, Any] | None:
    """Pooling mode, normalisation and max length from a sentence-transformers model directory
    (`modules.json`, the Pooling module's `config.json`, `sentence_bert_config.json`); None when
    the directory has no `modules.json`."""
    if model_dir is None:
        return None
    d = Path(model_dir)
    if not (d / "modules.json").is_file():
        return None
    modules = json.loads((d / "modules.json").read_text())
    types = [m.get("type", "") for m in modules]
    cfg: dict[str, Any] = {"dir": str(d), "normalize": any(t.endswith(".Normalize") for t in types),
                           "pooling": "mean", "max_length": None}
    for m in modules:
        if m.get("type", "").endswith(".Pooling") and (d / m.get("path", "") / "config.json").is_file():
            pc = json.loads((d / m["path"] / "config.json").read_text())
            on = [k for k, v in pc.items() if k.startswith("pooling_mode_") and v is True]
            if len(on) != 1 or on[0] not in _ST_POOLING:
                raise OffcompError(f"{d}: unsupported pooling config {on}; pass pooling= explicitly")
            cfg["pooling"] = _ST_POOLING[on[0]]
    if (d / "sentence_bert_config.json").is_file():
        cfg["max_length"] = json.loads((d / "sentence_bert_config.json").read_text()).get("max_seq_length")
    return cfg


def _st_config_for(info: dict[str, Any]) -> dict[str, Any] | None:
    """The model's own directory first; for a compressed checkpoint, its base model's."""
    candidates = [info.get("source")]
    base = info.get("base") or {}
    if isinstance(base, dict):
        candidates += [base.get("source"), base.get("path")]
        if base.get("name"):
            from offcomp.models import resolve

            try:
                candidates.append(resolve(base["name"]))
            except OffcompError:
                pass
    for c in candidates:
        if c and Path(c).is_dir():
            cfg = sentence_transformers_config(c)
            if cfg is not None:
                return cfg
    return None


def load_sts(data_dir: str | Path | None, split: str = "dev") -> tuple[dict[str, list], dict[str, Any]]:
    """STS-B sentence pairs with gold scores: the GLUE tsv (`data_dir`) or `datasets` glue/stsb."""
    if split not in _SPLITS:
        raise OffcompError(f"STS-B split must be one of {', '.join(_SPLITS)} (test labels are hidden)")
    spec = TASKS["stsb"]
    fname, hf_split = _SPLITS[split]
    if data_dir is not None:
        path = _task_dir(spec, Path(data_dir)) / fname
        pairs, skipped = read_glue_tsv(spec, path)
        return pairs, {"source": "tsv", "file": str(path.resolve()), "sha256": file_sha256(path),
                       "skipped_rows": skipped, "split": split}
    import datasets

    try:
        ds = datasets.load_dataset("nyu-mll/glue", "stsb", split=hf_split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure has the same fix
        raise OffcompError(f"could not load glue/stsb with `datasets` ({type(e).__name__}); "
                           "offline, pass --data-dir with the GLUE tsv files") from e
    pairs = {"a": list(ds["sentence1"]), "b": list(ds["sentence2"]), "label": list(ds["label"])}
    return pairs, {"source": "datasets", "name": "nyu-mll/glue", "config": "stsb", "split": hf_split,
                   "fingerprint": getattr(ds, "_fingerprint", None)}


@torch.inference_mode()
def embed(model: nn.Module, tokenizer: Any, sentences: list[str], *, pooling: str = "mean",
          normalize: bool = False, max_length: int = 256, batch_size: int = 64, device: str = "cpu",
          progress: ProgressFn | None = None) -> torch.Tensor:
    """Sentence embeddings (n × hidden, float32), batched by length to minimise padding."""
    if pooling not in POOLINGS:
        raise OffcompError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if tokenizer.pad_token is None:  # decoder tokenizers; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out: list[torch.Tensor | None] = [None] * len(sentences)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        res = model(**enc, output_hidden_states=True)
        h = getattr(res, "last_hidden_state", None)
        h = (h if h is not None else res.hidden_states[-1]).float()
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        if pooling == "mean":
            v = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif pooling == "cls":
            v = h[:, 0]
        else:
            v = h.masked_fill(mask == 0, -1e9).max(1).values
        if normalize:
            v = F.normalize(v, p=2, dim=-1)
        for i, row in zip(idx, v.cpu()):
            out[i] = row
        if progress is not None:
            progress("embed", min(b0 + batch_size, len(order)), len(order))
    return torch.stack(out)  # type: ignore[arg-type]


def run_sts(
    model: str | nn.Module,
    *,
    tokenizer: Any = None,
    data_dir: str | Path | None = None,
    split: str = "dev",
    output_dir: str | Path | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
    max_eval_samples: int | None = None,
    pre_metrics: dict | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
    verify: bool = True,
) -> dict:
    """Zero-shot STS-B: cosine similarity of pooled embeddings vs gold scores (Spearman, Pearson).

    `pooling`, `normalize` and `max_length` default to the model's sentence-transformers config
    (for a compressed checkpoint, its base model's), else mean / no normalisation / 256. Writes
    `sts-stsb.json` to `output_dir` when one is given (rank 0 only).
    """
    t_start = time.perf_counter()
    out = prepare_output_dir(output_dir, model) if output_dir is not None else None
    if batch_size < 1 or (max_eval_samples is not None and max_eval_samples < 1):
        raise OffcompError("batch size and max_eval_samples must be >= 1")
    pairs, source = load_sts(data_dir, split)
    n = len(pairs["label"]) if max_eval_samples is None else min(max_eval_samples, len(pairs["label"]))
    loaded = resolve_model(model, tokenizer, head="base", device=device, dtype=dtype, verify=verify)
    st = _st_config_for(loaded.info)
    settings = {
        "pooling": pooling or (st["pooling"] if st else "mean"),
        "normalize": normalize if normalize is not None else bool(st and st["normalize"]),
        "max_length": max_length or (st and st["max_length"]) or 256,
        "batch_size": batch_size,
        "similarity": "cosine",
        "sentence_transformers_config": st["dir"] if st else None,
    }
    sentences = list(dict.fromkeys(pairs["a"][:n] + pairs["b"][:n]))  # each unique sentence once
    vecs = embed(loaded.model, loaded.tokenizer, sentences, pooling=settings["pooling"],
                 normalize=settings["normalize"], max_length=settings["max_length"], batch_size=batch_size,
                 device=device, progress=progress)
    row = {s: i for i, s in enumerate(sentences)}
    a = vecs[[row[s] for s in pairs["a"][:n]]]
    b = vecs[[row[s] for s in pairs["b"][:n]]]
    sims = F.cosine_similarity(a, b, dim=-1).numpy()
    gold = pairs["label"][:n]
    record = {
        "type": "sts",
        "task": "stsb",
        "metric_names": ["spearman", "pearson"],
        "metrics": {"spearman": spearman(sims, gold), "pearson": pearson(sims, gold), "n_pairs": n},
        "pre_metrics": dict(pre_metrics or {}),
        **model_fields(loaded, param_counts(loaded.model)["total"], scored_files(source)),
        "data": {"name": "glue/stsb", **source, "n_pairs": n, "max_eval_samples": max_eval_samples},
        "settings": settings,
        "seconds": time.perf_counter() - t_start,
        **environment(device, dtype),
    }
    if out is not None:
        write_record(None, out / "sts-stsb.json", record)
    return record
