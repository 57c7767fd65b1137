"""`offcomp eval-lm` over lm-evaluation-harness: local tasks, records, and lm-eval vs eval-ppl.

Tiny llama + tiny byte-level tokenizer (conftest), tiny local data files written per test, so the
tests need neither the hub nor ../shared/data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from offcomp.cli import app
from offcomp.data import TextSource, rows_sha256
from offcomp.errors import OffcompError
from offcomp.eval.harness import check_local_data, rolling_loglikelihood, task_manager, task_metrics
from offcomp.eval.lm_tasks import (
    DATA_KEY,
    LOCAL_GROUPS,
    LOCAL_TASKS,
    TASKS_DIR,
    load_mrpc,
    load_rte,
    load_sst2,
    wikitext_documents,
)
from offcomp.eval.ppl import perplexity, token_text_spans
from offcomp.models import file_sha256

from .conftest import save_model_dir, tiny_llama, tiny_tokenizer

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")

WIKI = (" \n = Alpha = \n \n Alpha is a letter , used @-@ widely . It 's first . \n \n"
        " = = Usage = = \n \n Greek and Latin use it ; so does maths . \n \n"
        " = Beta = \n \n Beta comes second , after alpha . Café naïve ! \n \n")
SST2 = "sentence\tlabel\nit 's a charming journey . \t1\nbleak and desperate \t0\na \" quoted \" film . \t1\n"
RTE = ("index\tsentence1\tsentence2\tlabel\n0\tDana died at 44.\tDana is dead.\tentailment\n"
       "1\tBacteria win.\tAntibiotics win.\tnot_entailment\n")
MRPC = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said \" no .\tHe said no .\n"
        "0\t3\t4\tThe dollar rose .\tThe yen fell .\n")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for rel, text in (("wikitext-2-raw/wiki.test.raw", WIKI), ("glue/SST-2/dev.tsv", SST2),
                      ("glue/RTE/dev.tsv", RTE), ("glue/MRPC/dev.tsv", MRPC)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return save_model_dir(tiny_llama(vocab_size=len(tok)), tok, tmp_path_factory.mktemp("m") / "tiny-llama")


def test_wikitext_documents_split_on_top_level_headings():
    docs = wikitext_documents(WIKI)
    assert len(docs) == 2  # the leading blank line is no document; "= = Usage = =" does not split
    assert docs[0].startswith(" = Alpha = \n") and "= = Usage = =" in docs[0] and "Beta" not in docs[0]
    assert docs[1].startswith(" = Beta = \n") and docs[1].endswith("\n \n")
    assert "\n".join([" ", *docs]) == WIKI  # nothing lost or added


def test_local_glue_rows_as_hf_glue(data):
    kw = {DATA_KEY: str(data)}
    sst2 = load_sst2(**kw)["validation"]
    assert sst2["sentence"][2] == 'a " quoted " film . ' and sst2["label"] == [1, 0, 1]
    rte = load_rte(**kw)["validation"]
    assert rte["label"] == [0, 1] and rte["sentence2"][0] == "Dana is dead."  # HF: entailment = 0
    mrpc = load_mrpc(**kw)["validation"]
    assert mrpc["label"] == [1, 0] and mrpc["sentence1"][0] == 'He said " no .'  # BOM and quotes survive
    with pytest.raises(OffcompError, match="eval-lm"):
        load_sst2()


def test_shipped_yaml_tasks_match_the_table():
    found, tags = {}, {}
    for f in TASKS_DIR.glob("*.yaml"):
        text = f.read_text().replace("!function", "")  # the tag needs lm-eval's loader; the names do not
        cfg = yaml.safe_load(text)
        found[cfg["task"]] = cfg
        if "tag" in cfg:
            tags.setdefault(cfg["tag"], set()).add(cfg["task"])
    assert set(found) == set(LOCAL_TASKS)
    assert tags == {g: set(ts) for g, ts in LOCAL_GROUPS.items()}
    assert all(c["metadata"]["upstream"].split()[0] == LOCAL_TASKS[t].upstream for t, c in found.items())


def test_missing_data_refused_before_the_model_loads(tmp_path):
    res = CliRunner().invoke(app, ["eval-lm", "no-such-model", "--tasks", "local_glue", "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "glue/SST-2/dev.tsv" in res.output and "--data-dir" in res.output
    with pytest.raises(OffcompError, match="OFFCOMP_DATA"):
        check_local_data(["local_rte"], Path("../shared/data-that-is-not-there"))


def test_unknown_task_names_are_refused(data):
    with pytest.raises(OffcompError, match="local_nope"):
        task_manager(["local_nope"], [], data, catalogue=False)
    assert task_manager(["local_glue", "local_wikitext"], [], data, catalogue=False) is not None


def test_task_metrics_strict_json():
    row = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": "N/A", "f1,none": float("inf"), "acc,strict": 1.0}
    assert task_metrics(row) == {"acc": 0.5, "acc_stderr": None, "f1": float("inf"), "acc[strict]": 1.0}
    # written as null with its reason, never as a bare null that looks like "not measured"
    from offcomp.records import strict

    assert strict({"metrics": task_metrics(row)})["non_finite"] == ["metrics.f1 was inf (written as null)"]


def _choice_logprob(model, tok, context, continuation):
    whole = tok(context + continuation).input_ids
    n_ctx = len(tok(context).input_ids)
    x = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_eval_lm_cli_records_every_metric(model_dir, data, tok, tmp_path):
    results = tmp_path / "r" / "results.jsonl"
    res = CliRunner().invoke(app, ["eval-lm", str(model_dir), "--tasks", "local_sst2,local_wikitext", "--limit", "3",
                                   "--data-dir", str(data), "--results", str(results), "--batch-size", "2",
                                   "--max-length", "64", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # stdout is exactly one JSON object
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["task"] for r in lines] == [r["task"] for r in out["records"]] == ["local_sst2", "local_wikitext"]
    sst2, wiki = lines
    for rec in lines:
        assert rec["type"] == "lm-eval" and rec["task_version"] == 1.0 and rec["num_fewshot"] == 0
        assert rec["protocol"]["lm_eval"] and rec["protocol"]["max_length"] == 64 and rec["protocol"]["limit"] == 3
        assert rec["model"]["sha256"] and rec["params_after"] == rec["params_before"]
    assert set(sst2["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert sst2["metric_names"] == ["acc", "acc_norm"] and sst2["settings"]["max_length"] == 64
    # offcomp report reads these records: one row per metric, stderr not among them
    from offcomp.report import collect

    rows = collect(tmp_path / "r")
    assert {(r["task"], r["metric"]) for r in rows} == {("local_sst2", "acc"), ("local_sst2", "acc_norm"),
                                                       ("local_wikitext", "word_perplexity"),
                                                       ("local_wikitext", "byte_perplexity"),
                                                       ("local_wikitext", "bits_per_byte")}
    assert sst2["data"]["n_scored"] == 3 and sst2["data"]["n_docs"] == 3
    assert sst2["data"]["sha256"] == {"glue/SST-2/dev.tsv": file_sha256(data / "glue/SST-2/dev.tsv")}
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(wiki["metrics"])
    assert wiki["metrics"]["bits_per_byte"] == pytest.approx(math.log2(wiki["metrics"]["byte_perplexity"]))
    assert wiki["data"]["n_scored"] == 2 and wiki["higher_is_better"]["bits_per_byte"] is False

    # the scored model is the one in the directory: accuracy by hand from its log-probabilities
    from offcomp.models import load_model

    model = load_model(str(model_dir)).model
    rows = [r.split("\t") for r in SST2.splitlines()[1:]]
    hits = 0
    for sentence, label in rows:
        ctx = f"{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        scores = [_choice_logprob(model, tok, ctx, " " + c) for c in ("negative", "positive")]
        hits += int(scores.index(max(scores)) == int(label))
    assert sst2["metrics"]["acc"] == pytest.approx(hits / 3)


def test_eval_lm_scores_the_compressed_model_in_memory(model_dir, data, tmp_path):
    from offcomp.pipeline import compress_model, quick_plan

    out = tmp_path / "svd"
    compress_model(str(model_dir), quick_plan("llama", "svd", rank=4), out)
    rec = {}
    for name, path in (("dense", model_dir), ("svd", out)):
        res = CliRunner().invoke(app, ["eval-lm", str(path), "--tasks", "local_wikitext", "--limit", "1",
                                       "--data-dir", str(data), "--max-length", "64", "--json",
                                       "--results", str(tmp_path / name / "results.jsonl")])
        assert res.exit_code == 0, res.output
        rec[name] = json.loads(res.stdout)["records"][0]
    assert rec["svd"]["model"]["compressed"] is True and rec["svd"]["params_after"] < rec["dense"]["params_after"]
    assert rec["svd"]["contaminated"] is False and rec["svd"]["calibration_data"] == []  # data-free svd
    # a rank-4 model is a different model: had lm-eval re-loaded the directory by path, it would
    # have scored a dense llama with random matrices in place of the factors (or the same numbers)
    assert rec["svd"]["metrics"]["bits_per_byte"] != rec["dense"]["metrics"]["bits_per_byte"]


def test_token_text_spans_tile_the_text(tok):
    text = " Café naïve — 日本語 text , with  double  spaces\nand lines .\n"
    ids, nbytes, nwords = token_text_spans(tok, text)
    assert len(ids) == len(nbytes) == len(nwords)
    assert nbytes.sum() == len(text.encode("utf-8")) and nwords.sum() == len(text.split())
    assert (nbytes >= 0).all()


class _BosFirst:
    """The tiny tokenizer, but its default encoding starts with BOS (Llama-style), so eval-ppl's
    stream starts with the token lm-eval prefixes every document with."""

    is_fast = True

    def __init__(self, tok):
        self.tok, self.bos_token_id = tok, tok.bos_token_id

    def __call__(self, text, add_special_tokens=True, **kw):
        enc = self.tok(text, add_special_tokens=False, **kw)
        if add_special_tokens:
            enc["input_ids"] = [self.bos_token_id, *enc["input_ids"]]
        return enc


def test_bits_per_byte_agrees_with_lm_eval_rolling(tok):
    """Same text, same windows: lm-eval (max_length M) and eval-ppl (seq_len M+1, stride M).

    lm-eval prefixes the text with BOS and scores every token in disjoint windows of M inputs;
    eval-ppl with windows of M+1 tokens overlapping by one scores the same predictions from the
    same contexts when its stream starts with BOS too. With k*M text tokens (no ragged tail) the
    log-likelihoods, byte counts and bits per byte are equal."""
    model = tiny_llama(vocab_size=len(tok), seed=3)
    M, k = 16, 4
    text = "\n".join(wikitext_documents(WIKI * 3))
    ids, nbytes, _ = token_text_spans(tok, text)
    text = text.encode("utf-8")[: int(nbytes[: k * M].sum())].decode("utf-8")
    assert len(tok(text).input_ids) == k * M  # the cut is a token boundary
    src = TextSource(name="t", split="test", rows=[text], sha256=rows_sha256([text]))
    ours = perplexity(model, _BosFirst(tok), src, seq_len=M + 1, stride=M)
    (ll,) = rolling_loglikelihood(model, tok, [text], max_length=M)
    assert ours["protocol"]["bos"] is True and ours["n_tokens"] == k * M and ours["n_windows"] == k
    assert -ll == pytest.approx(ours["nll"] * ours["n_tokens"], rel=1e-6)
    n_bytes = len(text.encode("utf-8"))
    assert ours["n_bytes"] == n_bytes and ours["n_words"] == len(text.split())
    assert ours["bits_per_byte"] == pytest.approx(-ll / math.log(2) / n_bytes, rel=1e-6)
    # without the BOS (SmolLM2/GPT-2 tokenizers add none) eval-ppl's windows sit one token later
    # and its first token goes unscored: close, not equal
    plain = perplexity(model, tok, src, seq_len=M + 1, stride=M)
    assert plain["n_tokens"] == k * M - M and plain["bits_per_byte"] != ours["bits_per_byte"]
