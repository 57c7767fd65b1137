"""SQuAD v1.1: json flattening, --split-dev, window/offset preprocessing, n-best postprocessing
and a fine-tuning run on a tiny random BERT."""

import json

import numpy as np
import pytest
import torch

from offcomp.errors import OffcompError
from offcomp.eval.squad import (
    SQUAD_DEFAULTS,
    load_squad,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_squad_json,
    run_squad,
)
from tests.finetune_torchrun import CONTEXTS, QAS, squad_json, tiny_qa, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples():
    return [{"id": str(i), "title": t, "context": c, "question": q,
             "answers": {"text": [a], "answer_start": [c.index(a)]}}
            for i, ((t, c), (q, a)) in enumerate(zip(CONTEXTS, QAS))]


def _long_example():
    """A context far longer than one window, with the answer near the end."""
    filler = " ".join(f"Sentence number {k} says nothing useful at all." for k in range(12))
    ctx = filler + " The treasure is buried under the old oak tree."
    return {"id": "long", "title": "T", "context": ctx, "question": "Where is the treasure buried?",
            "answers": {"text": ["under the old oak tree"], "answer_start": [ctx.index("under the old oak tree")]}}


def test_read_and_split_dev(tmp_path):
    path = squad_json(tmp_path / "dev.json", copies=2)
    ex = read_squad_json(path)
    assert len(ex) == 10 and ex[0]["answers"]["text"] == ["Denver Broncos"] * 2
    d = load_squad(dev_file=path, split_dev=2)
    assert d.source["protocol"] == "split-dev"
    assert d.source["train_articles"] == ["Denver", "Rhine"] and d.source["eval_articles"] == ["Force"]
    assert {e["title"] for e in d.train} == {"Denver", "Rhine"} and len(d.eval) == 2
    for bad in (0, 3):
        with pytest.raises(OffcompError, match="split-dev must be in 1..2"):
            load_squad(dev_file=path, split_dev=bad)
    with pytest.raises(OffcompError, match="do not pass --train-file"):
        load_squad(train_file=path, dev_file=path, split_dev=1)
    with pytest.raises(OffcompError, match="pass both"):
        load_squad(dev_file=path)
    (tmp_path / "bad.json").write_text(json.dumps({"articles": []}))
    with pytest.raises(OffcompError, match="not a SQuAD json"):
        read_squad_json(tmp_path / "bad.json")
    assert load_squad(train_file=path, dev_file=path).source["protocol"] == "standard"


def test_train_labels_point_at_the_answer():
    tok = tokenizer()
    examples = [*_examples(), _long_example()]
    feats = prepare_train_features(tok, examples, max_length=48, doc_stride=16)
    _, example_idx, offsets = prepare_eval_features(tok, examples, max_length=48, doc_stride=16)
    assert len(feats) == len(example_idx) > len(examples)  # the long context overflows into windows
    hits = {}
    for f, e, offs in zip(feats, example_idx, offsets):
        ex = examples[e]
        s, t = f["start_positions"], f["end_positions"]
        if s == 0:  # CLS: the answer is not wholly inside this window
            assert t == 0
            continue
        assert offs[s] is not None and offs[t] is not None  # context tokens only
        assert ex["context"][offs[s][0]:offs[t][1]] == ex["answers"]["text"][0]
        hits[e] = hits.get(e, 0) + 1
    assert set(hits) == set(range(len(examples)))  # every answer is labelled in some window
    long_windows = [i for i, e in enumerate(example_idx) if e == len(examples) - 1]
    assert feats[long_windows[0]]["start_positions"] == 0  # first window misses the late answer


def test_postprocess_oracle_and_constraints():
    tok = tokenizer()
    examples = [*_examples(), _long_example()]
    feats = prepare_train_features(tok, examples, max_length=48, doc_stride=16)
    _, example_idx, offsets = prepare_eval_features(tok, examples, max_length=48, doc_stride=16)
    width = max(len(f["input_ids"]) for f in feats) + 5  # rows padded as after a batch gather
    start = np.full((len(feats), width), -100.0)
    end = np.full((len(feats), width), -100.0)
    for i, f in enumerate(feats):
        start[i, : len(f["input_ids"])] = 0.0
        end[i, : len(f["input_ids"])] = 0.0
        if f["start_positions"]:
            start[i, f["start_positions"]] = end[i, f["end_positions"]] = 10.0
        start[i, 1] = end[i, 1] = 50.0  # a question token: never an answer
    preds = postprocess_predictions(examples, example_idx, offsets, start, end)
    assert preds == {e["id"]: e["answers"]["text"][0] for e in examples}

    # A span longer than max_answer_length is refused; end before start is refused.
    i = next(k for k, f in enumerate(feats) if example_idx[k] == 0)
    s0, t0 = feats[i]["start_positions"], feats[i]["end_positions"]
    assert t0 > s0
    one = postprocess_predictions(examples[:1], [0], [offsets[i]], start[i:i + 1], end[i:i + 1],
                                  max_answer_length=1)
    assert one["0"] != examples[0]["answers"]["text"][0]
    s, e = start[i:i + 1].copy(), end[i:i + 1].copy()
    s[0, t0], e[0, s0] = 100.0, 100.0  # the only candidates (n_best=1): start after end
    assert postprocess_predictions(examples[:1], [0], [offsets[i]], s, e, n_best=1) == {"0": ""}
    # n_best=3 also sees the oracle start s0 (10) and end t0 (lowered to 5); index 1 is a question
    # token. Valid pairs: (s0, s0) = 110 beats (t0, t0) = 105 and (s0, t0) = 15.
    e[0, t0] = 5.0
    assert postprocess_predictions(examples[:1], [0], [offsets[i]], s, e, n_best=3)["0"] == "Denver"


def test_run_squad_split_dev(tmp_path):
    import dataclasses

    dev = squad_json(tmp_path / "dev.json", copies=2)
    args = dataclasses.replace(SQUAD_DEFAULTS, batch_size=4, epochs=1, max_length=64, logging_steps=1)
    model = tiny_qa()
    before = model.qa_outputs.weight.detach().clone()
    rec = run_squad(model, tokenizer=tokenizer(), dev_file=dev, split_dev=2, output_dir=tmp_path / "o",
                    args=args, doc_stride=16)
    assert json.loads((tmp_path / "o" / "squad.json").read_text())["metrics"] == rec["metrics"]
    assert rec["data"]["protocol"] == "split-dev" and rec["data"]["eval_articles"] == ["Force"]
    assert rec["data"]["n_train_questions"] == 8 and rec["data"]["n_eval_questions"] == 2
    assert rec["metrics"]["n_questions"] == 2 and rec["metrics"]["n_missing"] == 0
    assert 0.0 <= rec["metrics"]["exact_match"] <= rec["metrics"]["f1"] <= 100.0
    assert rec["train"]["steps"] == 2 and rec["hyperparameters"]["doc_stride"] == 16
    assert not torch.equal(before, model.qa_outputs.weight)


def test_hub_path_rows(monkeypatch):
    import datasets

    row = {"id": ["q1"], "title": ["T"], "context": ["Paris is big."], "question": ["What is big?"],
           "answers": [{"text": ["Paris"], "answer_start": [0]}]}

    def fake_load(name):
        assert name == "rajpurkar/squad"
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(row) for s in ("train", "validation")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = load_squad()
    assert d.train == d.eval == [{"id": "q1", "title": "T", "context": "Paris is big.", "question": "What is big?",
                                  "answers": {"text": ["Paris"], "answer_start": [0]}}]
    assert d.source["source"] == "datasets" and d.source["protocol"] == "standard"


def test_hub_offline_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OffcompError, match="--dev-file"):
        load_squad()
