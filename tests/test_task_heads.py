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


def test_glue_scores_a_trained_head_before_training(tmp_path):
    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=12)
    args = FinetuneArgs(batch_size=4, grad_accum=1, max_steps=4, eval_batch_size=8, max_length=32, logging_steps=1,
                        checkpoint_steps=0)
    base = tmp_path / "bert"
    tiny_classifier().bert.save_pretrained(base)
    tokenizer().save_pretrained(base)
    first = run_glue(str(base), "sst2", data_dir=data, output_dir=tmp_path / "a", args=args, save_model=True)
    assert first["head_at_start"] == "new" and first["pre_metrics"] == {}  # a random head is not scored
    again = run_glue(first["saved_model"], "sst2", data_dir=data, output_dir=tmp_path / "b", args=args)
    assert again["head_at_start"] == "trained"
    # before training again, the saved classifier scores exactly what it scored when it was saved
    assert again["pre_metrics"] == pytest.approx(first["metrics"])
    assert json.loads((tmp_path / "b" / "glue-sst2.json").read_text())["pre_metrics"] == again["pre_metrics"]
