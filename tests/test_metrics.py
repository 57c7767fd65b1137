"""Metric functions against values worked out by hand (and the official SQuAD rules)."""

import math

import numpy as np
import pytest

from offcomp.eval.metrics import (
    accuracy,
    binary_f1,
    glue_metrics,
    matthews,
    normalize_answer,
    pearson,
    spearman,
    squad_exact_match,
    squad_f1,
    squad_scores,
)

# preds vs labels: TP = 2 (0, 4), TN = 1 (2), FP = 1 (1), FN = 1 (3)
PREDS = [1, 1, 0, 0, 1]
LABELS = [1, 0, 0, 1, 1]


def test_accuracy_f1_matthews_by_hand():
    assert accuracy(PREDS, LABELS) == pytest.approx(3 / 5)
    # P = 2/3, R = 2/3 -> F1 = 2/3
    assert binary_f1(PREDS, LABELS) == pytest.approx(2 / 3)
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 − 1) / sqrt(3·3·2·2) = 1/6
    assert matthews(PREDS, LABELS) == pytest.approx(1 / 6)
    assert matthews([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # constant predictions
    assert binary_f1([0, 0, 0], [0, 1, 1]) == 0.0  # no positive prediction: 0, not an error


def test_f1_is_of_the_positive_class():
    # flipping both sides changes the positive class: TP = 1 (2), FP = 1 (3), FN = 1 (1) -> 1/2
    assert binary_f1([1 - p for p in PREDS], [1 - y for y in LABELS]) == pytest.approx(1 / 2)


def test_pearson_spearman_by_hand():
    # x = 1,2,3; y = 1,2,4: cov·n = 3, sx·√n = √2, sy·√n = √42/3  ->  r = 9/√84
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))
    # ties get average ranks: x ranks 1, 2.5, 2.5, 4; y ranks 1, 3, 2, 4 -> 4.5/√(4.5·5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # rank, not value
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))  # constant input: NaN, not a crash
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_glue_metrics_from_logits_and_scores():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.0, 1.0]])  # argmax = PREDS
    m = glue_metrics("mrpc", logits, np.array(LABELS))
    assert m == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    assert glue_metrics("cola", logits, np.array(LABELS)) == pytest.approx({"matthews": 1 / 6})
    assert set(glue_metrics("rte", logits, np.array(LABELS))) == {"accuracy"}
    s = glue_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 4.0]))
    assert s["pearson"] == pytest.approx(9 / math.sqrt(84)) and s["spearman"] == pytest.approx(1.0)
    with pytest.raises(KeyError):
        glue_metrics("squad", logits, np.array(LABELS))


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("an apple", "apple"),
        ("Theater of the absurd", "theater of absurd"),  # articles only as whole words
        ("a.m.", "am"),  # punctuation removed before articles, so "a." is not an article
        ("U.S.-based", "usbased"),
        ("the the", ""),
        ("  Denver\tBroncos\n", "denver broncos"),
    ],
)
def test_official_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_squad_em_f1_by_hand():
    assert squad_exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert squad_exact_match("Denver", "Denver Broncos") == 0.0
    # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1 -> F1 = 6/7
    assert squad_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # bag of tokens: cat×2 dog vs cat dog×2 share 2 tokens -> P = R = 2/3
    assert squad_f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert squad_f1("", "Denver") == 0.0
    # both normalise to "": EM counts it (as the official script does), F1 has no common token
    assert squad_exact_match("The", "a") == 1.0 and squad_f1("The", "a") == 0.0


def test_squad_scores_take_best_gold_and_count_missing():
    refs = {"q1": ["Denver Broncos", "Broncos"], "q2": ["Santa Clara"], "q3": ["gold"]}
    preds = {"q1": "broncos", "q2": "Santa Clara, California"}  # q3 missing
    s = squad_scores(preds, refs)
    # q1: EM 1 (2nd gold), F1 1. q2: EM 0, F1 P=2/3 R=1 -> 0.8. q3: 0.
    assert s["exact_match"] == pytest.approx(100 / 3)
    assert s["f1"] == pytest.approx(100 * 1.8 / 3)
    assert s["n_missing"] == 1 and s["n_questions"] == 3
