"""The downstream CLI commands are wired to their library functions (tiny BERT, tiny data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from offcomp.cli import app

from .conftest import save_model_dir, tiny_bert

GLUE = Path(__file__).resolve().parents[2] / "shared/data/glue"
SQUAD_DEV = Path(__file__).resolve().parents[2] / "shared/data/squad/dev-v1.1.json"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, bert_tokenizer):
    d = tmp_path_factory.mktemp("m") / "tiny-bert"
    save_model_dir(tiny_bert(vocab_size=len(bert_tokenizer), head="base"), bert_tokenizer, d)
    return d


def run(args):
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLUE.is_dir(), reason="needs ../shared/data/glue")
def test_finetune_glue_cli(bert_dir, tmp_path):
    rec = run(["finetune-glue", "--task", "stsb", "--model", str(bert_dir), "--data-dir", str(GLUE),
               "--max-steps", "2", "--max-train-samples", "32", "--max-eval-samples", "24", "--batch-size", "8",
               "--grad-accum", "1", "--out", str(tmp_path / "g")])
    assert rec["task"] == "stsb" and {"pearson", "spearman"} <= set(rec["metrics"])
    assert rec["hyperparameters"]["max_steps"] == 2 and rec["hyperparameters"]["batch_size"] == 8


@pytest.mark.skipif(not (GLUE / "STS-B").is_dir(), reason="needs ../shared/data/glue/STS-B")
def test_eval_sts_cli(bert_dir):
    rec = run(["eval-sts", str(bert_dir), "--data-dir", str(GLUE / "STS-B"), "--max-eval-samples", "40"])
    assert rec["metrics"]["n_pairs"] == 40 and -1 <= rec["metrics"]["spearman"] <= 1


def test_finetune_glue_bad_task_exits_2(bert_dir, tmp_path):
    res = CliRunner().invoke(app, ["finetune-glue", "--task", "nope", "--model", str(bert_dir), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output
