"""Downstream metrics computed locally: GLUE (scikit-learn / scipy) and SQuAD v1.1 (official rules).

The hub-hosted `evaluate` metrics need a download, so these re-implement them. GLUE scores are
fractions in [0, 1] (correlations in [-1, 1]), as scikit-learn returns them; SQuAD EM/F1 are
percentages in [0, 100], as the official `evaluate-v1.1.py` prints them. The SQuAD answer
normalisation is copied rule for rule from that script, because EM/F1 are only comparable with
published numbers when the normalisation is identical.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

# --------------------------------------------------------------------------------------------- GLUE


def accuracy(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Fraction of exact label matches."""
    p, y = _pair(preds, labels)
    return float((p == y).mean())


def binary_f1(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    p, y = _pair(preds, labels)
    return float(f1_score(y, p, pos_label=1, average="binary", zero_division=0.0))


def matthews(preds: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Matthews correlation (CoLA). 0.0 when a side is constant, as scikit-learn defines it."""
    p, y = _pair(preds, labels)
    return float(matthews_corrcoef(y, p))


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN (not an error) when an input is constant, so a collapsed model
    shows up as NaN in the record instead of crashing a long run at its last step."""
    a, b = _pair(x, y, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(pearsonr(a, b).statistic)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when an input is constant."""
    a, b = _pair(x, y, dtype=np.float64)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# Which metrics GLUE reports per task (the first one is the task's headline score).
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearman"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def glue_metrics(task: str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metrics for one task from raw model outputs.

    `predictions` are logits (n × classes) for classification tasks, or scores (n or n × 1) for
    STS-B; `labels` are class ids or gold scores. MNLI is one call per dev set (matched, mismatched).
    """
    if task not in GLUE_METRICS:
        raise KeyError(f"unknown GLUE task {task!r}")
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if task == "stsb":
        scores = predictions.reshape(-1)
        return {"pearson": pearson(scores, labels), "spearman": spearman(scores, labels)}
    preds = predictions.argmax(-1) if predictions.ndim == 2 else predictions
    funcs = {"accuracy": accuracy, "f1": binary_f1, "matthews": matthews}
    return {name: funcs[name](preds, labels) for name in GLUE_METRICS[task]}


def _pair(a, b, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=dtype).reshape(-1), np.asarray(b, dtype=dtype).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"predictions and labels differ in length: {x.shape[0]} vs {y.shape[0]}")
    if x.size == 0:
        raise ValueError("no predictions to score")
    return x, y


# -------------------------------------------------------------------------------------- SQuAD v1.1


def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1 normalisation: lower case, drop punctuation, drop the articles
    a/an/the, collapse whitespace (in that order, as `evaluate-v1.1.py` does)."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_f1(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of the normalised strings (bag of tokens, as in the official script)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], references: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """Official EM and F1 (percent): each question scores its best match over all gold answers.

    Every reference id must have a prediction; a missing one counts as wrong, exactly as the
    official script does (it also warns), so a dropped question can never inflate the score.
    """
    if not references:
        raise ValueError("no SQuAD references to score")
    em = f1 = 0.0
    missing = 0
    for qid, golds in references.items():
        golds = list(golds)
        if qid not in predictions:
            missing += 1
            continue
        pred = predictions[qid]
        em += max(squad_exact_match(pred, g) for g in golds)
        f1 += max(squad_f1(pred, g) for g in golds)
    n = len(references)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "n_questions": n, "n_missing": missing}
