"""A fine-tuned checkpoint (a classifier, a QA model) keeps its trained head through compression,
and GLUE scores such a head before it trains again (what compression lost, before recovery)."""

from __future__ import annotations

import json

import pytest
import torch

from offcomp.errors import OffcompError
from offcomp.eval.glue import FinetuneArgs, run_glue
from tests.finetune_torchrun import tiny_classifier, tokenizer, write_sst2

pytestmark = pytest.mark.usefixtures("one_thread")
PROSE = "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. " * 60


@pytest.fixture
def classifier_dir(tmp_path):
    """A BertForSequenceClassification saved as transformers saves a fine-tuned classifier."""
    d = tmp_path / "cls"
    model = tiny_classifier()
    torch.nn.init.normal_(model.classifier.weight, std=0.5)  # a head that is not a fresh init's
    model.save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


def test_default_head_names_task_heads_and_their_family():
    from transformers import AutoConfig

    from offcomp.models import default_head, head_kind

    def cfg(arch, model_type):
        c = AutoConfig.for_model(model_type)
        c.architectures = [arch]
        return c

    assert default_head(cfg("BertForSequenceClassification", "bert")) == "sequence-classification"
    assert default_head(cfg("RobertaForQuestionAnswering", "roberta")) == "question-answering"
    llama = cfg("LlamaForSequenceClassification", "llama")
    assert default_head(llama) == "sequence-classification"
    # a decoder with a task head still reads text causally; an encoder's task head does not
    assert head_kind("sequence-classification", llama) == "causal"
    assert head_kind("sequence-classification", cfg("BertForSequenceClassification", "bert")) == "encoder"
    assert head_kind("sequence-classification", cfg("LlamaForCausalLM", "llama")) == "causal"


@pytest.mark.parametrize("pipeline", ["global", "sequential"])
def test_compressing_a_classifier_keeps_its_trained_head(tmp_path, classifier_dir, pipeline):
    """Before: the global pipeline loaded the bare BertModel and dropped the classifier (the
    checkpoint then got a random head at fine-tuning); the sequential one refused the checkpoint."""
    from transformers import AutoModelForSequenceClassification

    import offcomp
    from offcomp.pipeline import compress_model, quick_plan

    text = tmp_path / "calib.txt"
    text.write_text(PROSE)
    calib = {"data": str(text), "split": "validation", "samples": 4, "seq_len": 16, "seed": 0}
    out = tmp_path / "c"
    manifest = compress_model(str(classifier_dir), quick_plan("bert", "svd-llm", ratio=0.7), out, calib=calib,
                              pipeline=pipeline)
    assert manifest["head"] == "sequence-classification"
    dense = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    bundle = offcomp.load(str(out))
    assert torch.equal(bundle.model.classifier.weight, dense.classifier.weight)
    assert torch.equal(bundle.model.bert.pooler.dense.weight, dense.bert.pooler.dense.weight)
    # plain transformers (after `import offcomp`) rebuilds the same classifier
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    x = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        assert torch.allclose(plain(x).logits, bundle.model(x).logits, atol=1e-5)
        assert not torch.allclose(plain(x).logits, dense(x).logits, atol=1e-6)  # it was compressed


def test_fisher_is_refused_without_a_language_model_loss(tmp_path, classifier_dir):
    from offcomp.capture import CaptureSpec, run_capture

    text = tmp_path / "calib.txt"
    text.write_text(PROSE)
    with pytest.raises(OffcompError, match="no language-model head \\(sequence-classification\\)"):
        run_capture(str(classifier_dir), str(text), "validation", CaptureSpec(samples=2, seq_len=16, fisher=True))


QUICK = FinetuneArgs(batch_size=4, grad_accum=1, max_steps=4, eval_batch_size=8, max_length=32, logging_steps=1,
                     checkpoint_steps=0)


def _fine_tuned(tmp_path):
    """SST-2 data, a base encoder directory, and the record of its quick fine-tune (--save-model)."""
    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=12)
    base = tmp_path / "bert"
    tiny_classifier().bert.save_pretrained(base)
    tokenizer().save_pretrained(base)
    return data, base, run_glue(str(base), "sst2", data_dir=data, output_dir=tmp_path / "a", args=QUICK,
                                save_model=True)


def test_glue_scores_a_trained_head_before_training(tmp_path):
    data, _, first = _fine_tuned(tmp_path)
    args = QUICK
    assert first["head_at_start"] == "new" and first["pre_metrics"] == {}  # a random head is not scored
    again = run_glue(first["saved_model"], "sst2", data_dir=data, output_dir=tmp_path / "b", args=args)
    assert again["head_at_start"] == "trained"
    # before training again, the saved classifier scores exactly what it scored when it was saved
    assert again["pre_metrics"] == pytest.approx(first["metrics"])
    assert json.loads((tmp_path / "b" / "glue-sst2.json").read_text())["pre_metrics"] == again["pre_metrics"]


def _quiet_classifier_dir(path, seed=0):
    """A classifier without dropout (its training forward equals its eval forward), saved with its head."""
    from transformers import BertForSequenceClassification

    from tests.finetune_torchrun import tiny_config

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(num_labels=2, hidden_dropout_prob=0.0,
                                                      attention_probs_dropout_prob=0.0))
    torch.nn.init.normal_(model.classifier.weight, std=2.0)  # a head whose answers depend on the input
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def test_distillation_loss_is_the_softened_kl_and_mixes_with_the_task_loss():
    import torch.nn.functional as F

    from offcomp.eval.glue import Distill

    class Teacher(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.tensor([[2.0, -1.0], [0.5, 0.5]])})()

    s = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    task = torch.tensor(0.7)
    d = Distill(Teacher(), weight=0.25, temperature=3.0)
    ps, pt = F.softmax(s / 3, -1), F.softmax(torch.tensor([[2.0, -1.0], [0.5, 0.5]]) / 3, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean() * 9
    got = d.loss(s, {"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])}, task)
    assert got.item() == pytest.approx(0.75 * 0.7 + 0.25 * kl.item(), rel=1e-6)
    reg = Distill(Teacher(), weight=1.0, regression=True)
    assert reg.loss(s, {"input_ids": None}, task).item() == pytest.approx(F.mse_loss(s, Teacher()(None).logits).item())
    for bad in ({"weight": 0.0}, {"weight": 1.5}, {"temperature": 0.0}):
        with pytest.raises(OffcompError):
            Distill(Teacher(), **bad)


def test_glue_distils_from_a_fine_tuned_teacher(tmp_path):
    """Distillation alone (weight 1) from a teacher that gives one answer to everything teaches the
    student to do the same, whatever the labels say."""
    from transformers import AutoModelForSequenceClassification

    from offcomp.eval.glue import TASKS, read_glue_tsv

    data = write_sst2(tmp_path / "glue", n_train=32, n_dev=12)
    args = FinetuneArgs(batch_size=8, grad_accum=1, max_steps=12, eval_batch_size=8, max_length=32, logging_steps=1,
                        checkpoint_steps=0, learning_rate=1e-3)
    student = _quiet_classifier_dir(tmp_path / "student")
    dev = read_glue_tsv(TASKS["sst2"], data / "SST-2" / "dev.tsv")[0]
    enc = tokenizer()(dev["a"], padding=True, truncation=True, max_length=32, return_tensors="pt")

    def predictions(path):
        with torch.no_grad():
            return AutoModelForSequenceClassification.from_pretrained(path).eval()(**enc).logits.argmax(-1).tolist()

    first = predictions(student)
    taught = 1 - max(set(first), key=first.count)  # the class the student answers least
    teacher = tmp_path / "teacher"
    t = AutoModelForSequenceClassification.from_pretrained(student)
    with torch.no_grad():
        t.classifier.weight.zero_()
        t.classifier.bias.copy_(torch.tensor([3.0, -3.0] if taught == 0 else [-3.0, 3.0]))
    t.save_pretrained(teacher)
    tokenizer().save_pretrained(teacher)
    assert first != [taught] * 12
    rec = run_glue(str(student), "sst2", data_dir=data, output_dir=tmp_path / "kd", args=args, save_model=True,
                   teacher=str(teacher), distill_weight=1.0)
    assert rec["hyperparameters"]["distill"]["weight"] == 1.0
    assert rec["hyperparameters"]["distill"]["teacher"]["name"] == str(teacher)
    assert predictions(tmp_path / "kd" / "model") == [taught] * 12
    plain = run_glue(str(student), "sst2", data_dir=data, output_dir=tmp_path / "plain", args=args, save_model=True)
    assert "distill" not in plain["hyperparameters"]  # a run without a teacher keeps the old recipe keys
    assert plain["metrics"]["eval_loss"] != pytest.approx(rec["metrics"]["eval_loss"])


def test_a_teacher_without_its_trained_head_or_with_other_tokens_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from tests.finetune_torchrun import tiny_config

    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    args = FinetuneArgs(batch_size=4, grad_accum=1, max_steps=1, max_length=32, checkpoint_steps=0)
    cls = _quiet_classifier_dir(tmp_path / "cls")
    base = tmp_path / "base"
    from transformers import BertModel

    BertModel(tiny_config()).save_pretrained(base)
    tokenizer().save_pretrained(base)
    with pytest.raises(OffcompError, match="no trained classification head"):
        run_glue(str(cls), "sst2", data_dir=data, output_dir=tmp_path / "a", args=args, teacher=str(base))
    other = _quiet_classifier_dir(tmp_path / "other")
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zzyzx"])
    tok.save_pretrained(other)
    with pytest.raises(OffcompError, match="another vocabulary"):
        run_glue(str(cls), "sst2", data_dir=data, output_dir=tmp_path / "b", args=args, teacher=str(other))


def test_cli_distill_options_need_a_teacher(tmp_path):
    from typer.testing import CliRunner

    from offcomp.cli import app

    r = CliRunner().invoke(app, ["finetune-glue", "--task", "sst2", "--distill-weight", "0.3", "--out",
                                 str(tmp_path / "o")])
    assert r.exit_code == 2 and "give its --teacher" in r.output
    assert not (tmp_path / "o").exists()


def test_eval_glue_scores_a_fine_tuned_head_without_training(tmp_path):
    from typer.testing import CliRunner

    from offcomp.cli import app

    data, base, ft = _fine_tuned(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["eval-glue", "--task", "sst2", "-m", ft["saved_model"], "--data-dir", str(data),
                            "--out", str(tmp_path / "ev"), "--max-length", "32", "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads((tmp_path / "ev" / "glue-sst2.json").read_text())
    assert rec["metrics"] == pytest.approx(ft["metrics"])  # the same head on the same dev set
    assert rec["hyperparameters"] == {"trained": False, "max_length": 32, "eval_batch_size": 64,
                                      "max_eval_samples": None}
    assert "train" not in rec and sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["glue-sst2.json",
                                                                                           "results.jsonl"]
    # a model without its trained head has nothing to score: one line, exit 2, nothing written
    r = runner.invoke(app, ["eval-glue", "--task", "sst2", "-m", str(base), "--data-dir", str(data),
                            "--out", str(tmp_path / "no")])
    assert r.exit_code == 2 and "no trained classification head" in r.output
    assert not (tmp_path / "no" / "glue-sst2.json").exists()


def test_a_score_of_a_compressed_classifier_carries_its_compression(tmp_path, classifier_dir):
    """The record alone (checkpoint deleted, no manifest beside it) gives `report` the method and
    budget; before, GLUE records leaned on the checkpoint still being where it was scored."""
    import shutil

    from offcomp.report import report_tables

    comp = _compressed(classifier_dir, tmp_path / "c")
    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=12)
    args = FinetuneArgs(max_length=32, eval_batch_size=8)
    rec = run_glue(str(comp), "sst2", data_dir=data, output_dir=tmp_path / "runs" / "ev", args=args, train=False)
    assert rec["compression"]["method"] == "svd" and rec["compression"]["budget"] == "ratio 0.7"
    shutil.rmtree(comp)
    (row,) = report_tables(tmp_path / "runs")[0].rows
    assert (row["method"], row["budget"]) == ("svd", "ratio 0.7")


@pytest.mark.parametrize("pipeline", ["global", "sequential"])
def test_a_head_offcomp_cannot_keep_is_refused_not_dropped(tmp_path, pipeline):
    """Before: a BertForTokenClassification compressed into a bare BertModel, its head silently gone
    (global pipeline), or failed on 'tensors the architecture does not have' (sequential)."""
    from transformers import BertForTokenClassification

    from offcomp.pipeline import compress_model, quick_plan
    from tests.finetune_torchrun import tiny_config

    src = tmp_path / "tok"
    BertForTokenClassification(tiny_config(num_labels=5)).save_pretrained(src)
    tokenizer().save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text(PROSE)
    calib = {"data": str(text), "split": "validation", "samples": 2, "seq_len": 16, "seed": 0}
    with pytest.raises(OffcompError, match="saved as BertForTokenClassification, a head offcomp does not keep"):
        compress_model(str(src), quick_plan("bert", "svd-llm", ratio=0.7), tmp_path / "out", calib=calib,
                       pipeline=pipeline)
    assert not (tmp_path / "out").exists()


def test_a_classifier_of_another_task_is_refused_by_its_label_count(tmp_path):
    """Before: "its weights do not fit the architecture ... needs its quantization_config", a message
    about damaged offcomp checkpoints, for a plain 3-label classifier asked for 2 labels."""
    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    three = tmp_path / "mnli-like"
    tiny_classifier(num_labels=3).save_pretrained(three)
    tokenizer().save_pretrained(three)
    for model in (three, _compressed(three, tmp_path / "c")):  # compressed: "does not match its manifest"
        with pytest.raises(OffcompError, match=r"2-label head: its saved head \(BertForSequenceClassification\) has 3"):
            run_glue(str(model), "sst2", data_dir=data, output_dir=tmp_path / "o", args=QUICK, train=False)


def _compressed(src, out):
    from offcomp.pipeline import compress_model, quick_plan

    compress_model(str(src), quick_plan("bert", "svd", ratio=0.7), out)
    return out
