"""Local lm-evaluation-harness tasks: the standard prompts and metrics, data read from files.

Offline there is no hub, so `offcomp eval-lm` ships these YAML task definitions (package data,
found by `TASKS_DIR`). Each mirrors one upstream lm-eval task (its prompt, choices and metrics)
but builds its documents from a local copy of the data under a data root (`--data-dir`,
``$OFFCOMP_DATA`` or ``../shared/data``), passed to the loaders below through the TaskManager's
metadata (lm-eval hands a task's metadata to its ``custom_dataset`` function as keywords).

The documents match the hub datasets the upstream tasks read, field for field, so a local score is
the upstream task's score on the same rows:

- ``local_wikitext``: `EleutherAI/wikitext_document_level` (wikitext-2-raw-v1, test): the raw file
  cut into one document per top-level heading (`` = Title = ``), exactly as that dataset's builder
  does; scored by lm-eval's own wikitext detokenizer and word/byte normaliser.
- ``local_sst2``, ``local_rte``, ``local_mrpc``: `nyu-mll/glue` validation rows from the GLUE dev
  tsv files (labels as HF's class ids), zero-shot multiple choice with the upstream prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offcomp.errors import OffcompError

TASKS_DIR = Path(__file__).parent
DATA_KEY = "offcomp_data_dir"  # the metadata key that carries the data root into the loaders


@dataclass(frozen=True)
class LocalTask:
    """A shipped task: the files it reads (relative to the data root) and the upstream task it mirrors."""

    files: tuple[str, ...]
    upstream: str


LOCAL_TASKS: dict[str, LocalTask] = {
    "local_wikitext": LocalTask(("wikitext-2-raw/wiki.test.raw",), "wikitext"),
    "local_sst2": LocalTask(("glue/SST-2/dev.tsv",), "sst2"),
    "local_rte": LocalTask(("glue/RTE/dev.tsv",), "rte"),
    "local_mrpc": LocalTask(("glue/MRPC/dev.tsv",), "mrpc"),
}
LOCAL_GROUPS: dict[str, tuple[str, ...]] = {"local_glue": ("local_sst2", "local_rte", "local_mrpc")}


def wikitext_documents(text: str) -> list[str]:
    """Split raw WikiText into articles the way `EleutherAI/wikitext_document_level` does.

    Lines are split on ``"\\n"``; a line that is a top-level heading (`` = Title = ``, but not
    `` = = Section = = ``) starts a new document; documents are the lines joined with ``"\\n"``,
    and a document of whitespace only (the file's leading blank line) is skipped.
    """
    docs, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                docs.append(page)
            lines = []
        lines.append(line)
    page = "\n".join(lines)
    if page.strip():
        docs.append(page)
    return docs


def _file(kwargs: dict[str, Any], rel: str) -> Path:
    root = kwargs.get(DATA_KEY)
    if root is None:
        raise OffcompError(f"local lm-eval tasks need the data root: run them through `offcomp eval-lm` "
                           f"(or pass metadata={{'{DATA_KEY}': DIR}} to lm-eval's TaskManager)")
    path = Path(root) / rel
    if not path.is_file():
        raise OffcompError(f"{path} not found: point --data-dir (or $OFFCOMP_DATA) at the folder holding {rel}")
    return path


def _dataset(split: str, rows: dict[str, list]) -> Any:
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows)})


def load_wikitext(**kwargs: Any) -> Any:
    """`custom_dataset` of local_wikitext: {"test": pages}."""
    text = _file(kwargs, LOCAL_TASKS["local_wikitext"].files[0]).read_text(encoding="utf-8")
    return _dataset("test", {"page": wikitext_documents(text)})


def _glue(task: str, local: str, **kwargs: Any) -> Any:
    from offcomp.eval.glue import TASKS, read_glue_tsv

    spec = TASKS[task]
    split, _ = read_glue_tsv(spec, _file(kwargs, LOCAL_TASKS[local].files[0]))
    n = len(split["label"])
    a, b = spec.hf_columns
    rows = {a: split["a"], **({b: split["b"]} if b else {}), "label": split["label"], "idx": list(range(n))}
    return _dataset("validation", rows)


def load_sst2(**kwargs: Any) -> Any:
    return _glue("sst2", "local_sst2", **kwargs)


def load_rte(**kwargs: Any) -> Any:
    return _glue("rte", "local_rte", **kwargs)


def load_mrpc(**kwargs: Any) -> Any:
    return _glue("mrpc", "local_mrpc", **kwargs)
