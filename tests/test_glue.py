"""GLUE: tsv parsing of every task layout, the hub column mapping, and fine-tuning on tiny random
BERTs (classification, regression, MNLI's two dev sets, --freeze-compressed, torchrun)."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from offcomp.errors import OffcompError
from offcomp.eval.glue import TASKS, FinetuneArgs, load_glue, read_glue_tsv, run_glue
from offcomp.eval.metrics import accuracy, pearson, spearman
from offcomp.report import collect
from tests.finetune_torchrun import tiny_classifier, tokenizer, write_sst2

SHARED = Path("/work/shared/data/glue")
QUICK = FinetuneArgs(batch_size=8, grad_accum=1, epochs=1, eval_batch_size=8, max_length=32, logging_steps=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path: Path, text: str, bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())


def test_tsv_layouts(tmp_path):
    mrpc = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \" the witness \" .\tShe said so .\n"
    mrpc += "0\t3\t4\ta\tb\textra-column\n0\t5\t6\tc\td\n"  # a malformed row is skipped and counted
    _write(tmp_path / "MRPC" / "train.tsv", mrpc, bom=True)
    _write(tmp_path / "MRPC" / "dev.tsv", mrpc, bom=True)
    d = load_glue("mrpc", tmp_path)
    assert d.train == {"a": ['He said " the witness " .', "c"], "b": ["She said so .", "d"], "label": [1, 0]}
    assert d.source["skipped_rows"] == {"train": 1, "dev": 1} and set(d.source["sha256"]) == {"train.tsv", "dev.tsv"}

    cola = "gj04\t1\t\tThe sailors rode .\ngj04\t0\t*\tRode sailors the ."  # no header, no final newline
    _write(tmp_path / "CoLA" / "train.tsv", cola)
    _write(tmp_path / "CoLA" / "dev.tsv", cola)
    d = load_glue("CoLA", tmp_path / "CoLA")  # the task folder itself is accepted too
    assert d.train == {"a": ["The sailors rode .", "Rode sailors the ."], "b": None, "label": [1, 0]}

    hdr = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    rows = "0\t1\t1\tx\tp one\th one\tneutral\tcontradiction\n1\t2\t2\tx\tp two\th two\tneutral\tentailment\n"
    for f in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write(tmp_path / "MNLI" / f, hdr + rows)
    d = load_glue("mnli", tmp_path)
    assert d.train["label"] == [2, 0] and set(d.evals) == {"matched", "mismatched"}  # HF label order

    _write(tmp_path / "STS-B" / "dev.tsv", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t3.800\n")
    split, skipped = read_glue_tsv(TASKS["stsb"], tmp_path / "STS-B" / "dev.tsv")
    assert split["label"] == [3.8] and skipped == 0


def test_data_errors(tmp_path):
    with pytest.raises(OffcompError, match="unknown GLUE task"):
        load_glue("squad", tmp_path)
    with pytest.raises(OffcompError, match="no rte tsv files"):
        load_glue("rte", tmp_path)
    _write(tmp_path / "QNLI" / "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tq\ts\tentailment\n")
    with pytest.raises(OffcompError, match="train.tsv not found"):
        load_glue("qnli", tmp_path)
    _write(tmp_path / "RTE" / "train.tsv", "index\tpremise\thypothesis\tlabel\n")
    _write(tmp_path / "RTE" / "dev.tsv", "index\tpremise\thypothesis\tlabel\n")
    with pytest.raises(OffcompError, match="header lacks"):
        load_glue("rte", tmp_path)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared GLUE data not present")
@pytest.mark.parametrize(
    "task, n_train, n_dev, dev_counts",
    [("mrpc", 3668, 408, {1: 279, 0: 129}), ("cola", 8551, 1043, {1: 721, 0: 322}),
     ("rte", 2490, 277, {0: 146, 1: 131}), ("sst2", 67349, 872, {1: 444, 0: 428}), ("stsb", 5749, 1500, None),
     ("wnli", 635, 71, None)],
)
def test_shared_files_give_official_counts(task, n_train, n_dev, dev_counts):
    d = load_glue(task, SHARED)
    assert len(d.train["label"]) == n_train and len(d.evals["dev"]["label"]) == n_dev
    assert sum(d.source["skipped_rows"].values()) == 0
    if dev_counts:
        labels = d.evals["dev"]["label"]
        assert {k: labels.count(k) for k in dev_counts} == dev_counts


def test_hub_path_maps_columns(monkeypatch):
    import datasets

    def fake_load(name, config):
        assert (name, config) == ("nyu-mll/glue", "mnli")
        part = {"premise": ["p"], "hypothesis": ["h"], "label": [1], "idx": [0]}
        return datasets.DatasetDict({s: datasets.Dataset.from_dict(part)
                                     for s in ("train", "validation_matched", "validation_mismatched")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    d = load_glue("mnli")
    assert d.train == {"a": ["p"], "b": ["h"], "label": [1]} and set(d.evals) == {"matched", "mismatched"}
    assert d.source["source"] == "datasets"

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OffcompError, match="--data-dir"):
        load_glue("rte")


def test_classification_record_and_scores(tmp_path):
    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=12)
    model = tiny_classifier()
    before = copy.deepcopy(model.state_dict())
    rec = run_glue(model, "sst2", tokenizer=tokenizer(), data_dir=data, output_dir=tmp_path / "out",
                   args=QUICK, pre_metrics={"ppl": 12.5})
    on_disk = json.loads((tmp_path / "out" / "glue-sst2.json").read_text())
    assert on_disk["metrics"] == pytest.approx(rec["metrics"]) and on_disk["pre_metrics"] == {"ppl": 12.5}
    rows = collect(tmp_path / "out")  # `offcomp report` sees the run
    assert [(r["task"], r["metric"], r["value"]) for r in rows] == [("sst2", "accuracy", rec["metrics"]["accuracy"])]
    from offcomp.report import _metric
    assert _metric({"type": "glue", "task": "mrpc", "metrics": {"accuracy": 0.5, "f1": 0.25, "eval_loss": 1.0,
                                                                "n_missing": 0}}) == ("mrpc", "accuracy / f1",
                                                                                       "0.5 / 0.25")
    assert rec["data"]["n_train"] == 16 and rec["data"]["n_scored"] == {"dev": 12}
    assert rec["train"]["steps"] == 2 and rec["world_size"] == 1 and rec["effective_batch_size"] == 8
    assert rec["params"]["trainable"] == rec["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert rec["model"]["sha256"] and rec["hyperparameters"]["learning_rate"] == 2e-5
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained
    # The recorded accuracy is the trained model's own accuracy on the dev rows, in file order.
    dev = read_glue_tsv(TASKS["sst2"], data / "SST-2" / "dev.tsv")[0]
    model.eval()
    with torch.no_grad():
        enc = tokenizer()(dev["a"], padding=True, truncation=True, max_length=32, return_tensors="pt")
        preds = model(**enc).logits.argmax(-1).numpy()
    assert rec["metrics"]["accuracy"] == pytest.approx(accuracy(preds, dev["label"]))


def test_gradient_accumulation_averages_the_loss(tmp_path):
    """A random binary head starts at CE ≈ ln 2; the logged loss must not be summed over the
    accumulation steps (Trainer does that for models whose forward takes **kwargs)."""
    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=4)
    args = FinetuneArgs(batch_size=4, grad_accum=2, epochs=1, max_length=32, logging_steps=1)
    rec = run_glue(tiny_classifier(), "sst2", tokenizer=tokenizer(), data_dir=data, output_dir=tmp_path / "o",
                   args=args)
    assert rec["train"]["steps"] == 2 and rec["effective_batch_size"] == 8
    assert all(abs(loss - math.log(2)) < 0.1 for _, loss in rec["train"]["loss_curve"])


def test_regression_stsb(tmp_path):
    rows = "".join(f"{i}\tg\tf\ty\t0\tn\tn\tword {i} here\tword {i} there\t{(i % 6) * 1.0:.3f}\n" for i in range(16))
    hdr = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(tmp_path / "STS-B" / "train.tsv", hdr + rows)
    _write(tmp_path / "STS-B" / "dev.tsv", hdr + rows)
    model = tiny_classifier(num_labels=1)
    rec = run_glue(model, "stsb", tokenizer=tokenizer(), data_dir=tmp_path, output_dir=tmp_path / "out", args=QUICK)
    assert model.config.problem_type == "regression"
    assert set(rec["metrics"]) == {"pearson", "spearman", "eval_loss"}
    # Scores, loss and correlations are the trained model's own: MSE against the float labels.
    dev = read_glue_tsv(TASKS["stsb"], tmp_path / "STS-B" / "dev.tsv")[0]
    model.eval()
    with torch.no_grad():
        enc = tokenizer()(dev["a"], dev["b"], padding=True, truncation=True, max_length=32, return_tensors="pt")
        scores = model(**enc).logits.squeeze(-1).numpy()
    gold = np.array(dev["label"])
    assert rec["metrics"]["eval_loss"] == pytest.approx(float(((scores - gold) ** 2).mean()), rel=1e-4)
    assert rec["metrics"]["pearson"] == pytest.approx(pearson(scores, gold), abs=1e-5)
    assert rec["metrics"]["spearman"] == pytest.approx(spearman(scores, gold), abs=1e-5)


def test_mnli_scores_both_dev_sets_and_checks_head(tmp_path):
    hdr = "index\tsentence1\tsentence2\tgold_label\n"
    rows = "".join(f"{i}\tp {i}\th {i}\t{['entailment', 'neutral', 'contradiction'][i % 3]}\n" for i in range(6))
    for f in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write(tmp_path / "MNLI" / f, hdr + rows)
    with pytest.raises(OffcompError, match="3 label"):
        run_glue(tiny_classifier(2), "mnli", tokenizer=tokenizer(), data_dir=tmp_path, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # refused before writing anything
    rec = run_glue(tiny_classifier(3), "mnli", tokenizer=tokenizer(), data_dir=tmp_path,
                   output_dir=tmp_path / "o", args=QUICK)
    assert {"accuracy", "matched_accuracy", "mismatched_accuracy"} & set(rec["metrics"]) == {
        "matched_accuracy", "mismatched_accuracy"}
    assert rec["data"]["n_scored"] == {"matched": 6, "mismatched": 6}


def test_model_object_needs_tokenizer(tmp_path):
    with pytest.raises(OffcompError, match="tokenizer"):
        run_glue(tiny_classifier(), "sst2", data_dir=write_sst2(tmp_path), output_dir=tmp_path / "o")


def test_freeze_compressed(tmp_path):
    from offcomp.layers import LowRankLinear
    from offcomp.swap import replace_module

    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    with pytest.raises(OffcompError, match="no compressed modules"):
        run_glue(tiny_classifier(), "sst2", tokenizer=tokenizer(), data_dir=data, output_dir=tmp_path / "o",
                 args=QUICK, freeze_compressed=True)
    model = tiny_classifier()
    name = "bert.encoder.layer.0.intermediate.dense"
    dense = model.get_submodule(name)
    u, s, vh = torch.linalg.svd(dense.weight.detach(), full_matrices=False)
    lr = LowRankLinear(dense.in_features, dense.out_features, rank=8, bias=True)
    with torch.no_grad():
        lr.U.copy_(u[:, :8] * s[:8])
        lr.V.copy_(vh[:8])
        lr.bias.copy_(dense.bias)
    replace_module(model, name, lr)
    frozen_before = (lr.U.detach().clone(), lr.V.detach().clone(), lr.bias.detach().clone())
    head_before = model.classifier.weight.detach().clone()
    rec = run_glue(model, "sst2", tokenizer=tokenizer(), data_dir=data, output_dir=tmp_path / "o", args=QUICK,
                   freeze_compressed=True)
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, (lr.U, lr.V, lr.bias)))
    assert not torch.equal(head_before, model.classifier.weight)
    n_lr = 8 * (dense.in_features + dense.out_features) + dense.out_features
    assert rec["params"]["frozen_compressed"] == rec["params"]["compressed_modules"] == n_lr
    assert rec["params"]["trainable"] == rec["params"]["total"] - n_lr
    assert rec["model"]["compressed"] and rec["model"]["compressed_modules"] == 1


def test_torchrun_two_processes(tmp_path):
    """Both fine-tuning commands under `torchrun --nproc_per_node 2` (gloo on CPU): one record each,
    written by rank 0, with the batches sharded and the predictions gathered exactly once."""
    script = Path(__file__).with_name("finetune_torchrun.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers: nothing left behind
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "glue-sst2.json", "results.jsonl", "squad.json"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2  # rank 0 only, one line per run
    glue = json.loads((tmp_path / "glue-sst2.json").read_text())
    assert glue["world_size"] == 2 and glue["effective_batch_size"] == 8
    assert glue["train"]["steps"] == 4  # 32 examples / (4 per process × 2 processes)
    assert glue["data"]["n_scored"] == {"dev": 16}  # gathered across ranks, no duplicates
    squad = json.loads((tmp_path / "squad.json").read_text())
    assert squad["world_size"] == 2 and squad["data"]["protocol"] == "split-dev"
    assert squad["metrics"]["n_questions"] == 3 and squad["metrics"]["n_missing"] == 0
