"""Fine-tuning keeps its model (--save-model) and resumes from Trainer checkpoints after a kill."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from offcomp.errors import OffcompError
from offcomp.eval.glue import TASKS, FinetuneArgs, read_glue_tsv, run_glue
from offcomp.eval.metrics import accuracy
from offcomp.eval.squad import SQUAD_DEFAULTS, run_squad
from tests.finetune_torchrun import squad_json, tiny_config, tokenizer, write_sst2

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = FinetuneArgs(batch_size=4, grad_accum=1, max_steps=6, eval_batch_size=8, max_length=32, logging_steps=1,
                    checkpoint_steps=2)


class Interrupt(Exception):
    pass


def _stop_at(step: int):
    def progress(what: str, done: int, total: int) -> None:
        if what == "train" and done >= step:
            raise Interrupt
    return progress


@pytest.fixture
def bert_dir(tmp_path):
    """A tiny BERT encoder saved as a plain HF directory (as `offcomp finetune-glue --model DIR` takes)."""
    from transformers import BertModel

    torch.manual_seed(0)
    d = tmp_path / "bert"
    BertModel(tiny_config()).save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


def _dev_accuracy(model, data) -> float:
    dev = read_glue_tsv(TASKS["sst2"], data / "SST-2" / "dev.tsv")[0]
    model.eval()
    with torch.no_grad():
        enc = tokenizer()(dev["a"], padding=True, truncation=True, max_length=32, return_tensors="pt")
        return accuracy(model(**enc).logits.argmax(-1).numpy(), dev["label"])


def test_save_model_of_a_base_model_is_a_plain_hf_checkpoint(tmp_path, bert_dir):
    from transformers import AutoModelForSequenceClassification

    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=12)
    rec = run_glue(str(bert_dir), "sst2", data_dir=data, output_dir=tmp_path / "out", args=ARGS, save_model=True)
    saved = tmp_path / "out" / "model"
    assert rec["saved_model"] == str(saved) and not (saved / "offcomp.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(saved)  # vanilla transformers loads it
    assert _dev_accuracy(model, data) == pytest.approx(rec["metrics"]["accuracy"])
    assert json.loads((saved / "offcomp-finetuned.json").read_text())["task"] == "sst2"
    # the checkpoints were only for resuming: gone once the run is recorded
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["glue-sst2.json", "model", "results.jsonl"]


def test_save_model_of_a_compressed_model_stays_compressed(tmp_path, bert_dir, monkeypatch):
    import offcomp
    from offcomp.layers import CompressedModule
    from offcomp.pipeline import compress_model, quick_plan

    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    comp = tmp_path / "comp"
    compress_model(str(bert_dir), quick_plan("bert", "svd", rank=4, modules=["mlp.up", "mlp.down"]), comp)
    data = write_sst2(tmp_path / "glue", n_train=16, n_dev=12)
    rec = run_glue(str(comp), "sst2", data_dir=data, output_dir=tmp_path / "out", args=ARGS, save_model=True)
    saved = tmp_path / "out" / "model"
    manifest = json.loads((saved / "offcomp.json").read_text())
    assert manifest["head"] == "sequence-classification" and manifest["finetuned"]["task"] == "sst2"
    assert [u["names"][0] for u in manifest["report"]["units"]][0].startswith("bert.encoder.layer.0.")
    bundle = offcomp.load(str(saved))
    assert sum(isinstance(m, CompressedModule) for m in bundle.model.modules()) == 4  # 2 layers × up, down
    assert _dev_accuracy(bundle.model, data) == pytest.approx(rec["metrics"]["accuracy"])
    # it trained: the factors differ from the compressed checkpoint's
    before = load_file(str(comp / "model.safetensors"))
    after = load_file(str(saved / "model.safetensors"))
    key = next(k for k in before if k.endswith("intermediate.dense.U"))
    assert not torch.equal(before[key], after["bert." + key])


def test_an_interrupted_finetune_resumes_from_its_last_checkpoint(tmp_path, bert_dir):
    data = write_sst2(tmp_path / "glue", n_train=32, n_dev=12)
    ref = run_glue(str(bert_dir), "sst2", data_dir=data, output_dir=tmp_path / "ref", args=ARGS, save_model=True)
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        run_glue(str(bert_dir), "sst2", data_dir=data, output_dir=out, args=ARGS, progress=_stop_at(5))
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    # another run's checkpoints are never continued
    with pytest.raises(OffcompError, match="another run"):
        run_glue(str(bert_dir), "sst2", data_dir=data, output_dir=out, args=dataclasses.replace(ARGS, seed=1))
    rec = run_glue(str(bert_dir), "sst2", data_dir=data, output_dir=out, args=ARGS, save_model=True)
    assert rec["resumed_from"] == "checkpoint-4" and ref["resumed_from"] is None
    assert rec["train"]["steps"] == 6 and rec["metrics"] == pytest.approx(ref["metrics"])
    assert [s for s, _ in rec["train"]["loss_curve"]][-2:] == [5, 6]  # only steps 5-6 were trained again
    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(tmp_path / "ref" / "model" /
                                                                              "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not any(p.name.startswith("checkpoint-") for p in out.iterdir())


def test_squad_saves_and_resumes(tmp_path, bert_dir):
    from transformers import AutoModelForQuestionAnswering

    dev = squad_json(tmp_path / "dev.json", copies=2)
    args = dataclasses.replace(SQUAD_DEFAULTS, batch_size=2, max_steps=4, max_length=64, logging_steps=1,
                               checkpoint_steps=2)
    kw = dict(dev_file=dev, split_dev=2, args=args, doc_stride=16, save_model=True)
    ref = run_squad(str(bert_dir), output_dir=tmp_path / "ref", **kw)
    with pytest.raises(Interrupt):
        run_squad(str(bert_dir), output_dir=tmp_path / "out", progress=_stop_at(3), **kw)
    rec = run_squad(str(bert_dir), output_dir=tmp_path / "out", **kw)
    assert rec["resumed_from"] == "checkpoint-2" and rec["metrics"] == pytest.approx(ref["metrics"])
    model = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "out" / "model")
    refm = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "ref" / "model")
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.parameters(), refm.parameters()))


def test_cli_save_model_and_checkpoint_steps(tmp_path, bert_dir):
    from typer.testing import CliRunner

    from offcomp.cli import app

    data = write_sst2(tmp_path / "glue", n_train=8, n_dev=4)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["finetune-glue", "--task", "sst2", "--model", str(bert_dir), "--data-dir", str(data),
                                 "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--save-model",
                                 "--checkpoint-steps", "1", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["hyperparameters"]["checkpoint_steps"] == 1 and rec["saved_model"] == str(out / "model")
    assert (out / "model" / "model.safetensors").is_file() and not list(out.glob("checkpoint-*"))
