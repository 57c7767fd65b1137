"""Zero-shot / few-shot evaluation through lm-evaluation-harness (the optional extra `offcomp[eval]`).

The model is handed to lm-eval in memory (``HFLM(pretrained=model, tokenizer=tokenizer)``), so a
compressed checkpoint is scored exactly as offcomp loaded it; lm-eval never re-loads it by path
(which would build the dense architecture and miss the factors).

Task lookup: the tasks shipped in `offcomp.eval.lm_tasks` (``local_*``, data from local files) and
any `include_path` folders are indexed first; lm-eval's own catalogue (~15k YAML files, a minute
to index on a small machine, and hub data) only when a name is not found there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from offcomp.errors import OffcompError
from offcomp.eval.lm_tasks import DATA_KEY, LOCAL_GROUPS, LOCAL_TASKS, TASKS_DIR

DATA_ENV = "OFFCOMP_DATA"
DEFAULT_DATA = Path("..") / "shared" / "data"
BOOTSTRAP_ITERS = 1000  # only for metrics without a closed-form stderr (F1); lm-eval's CLI uses 100000


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise OffcompError("eval-lm needs lm-evaluation-harness: pip install 'offcomp[eval]' (or lm-eval)") from None
    return lm_eval


def data_root(data_dir: str | Path | None) -> Path:
    """Where the local tasks' files live: --data-dir, else $OFFCOMP_DATA, else ../shared/data."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else DEFAULT_DATA


def local_tasks_in(names: list[str]) -> list[str]:
    """The shipped local tasks among the requested names (groups expanded)."""
    out: list[str] = []
    for n in names:
        out += list(LOCAL_GROUPS.get(n, (n,) if n in LOCAL_TASKS else ()))
    return out


def check_local_data(names: list[str], root: Path) -> dict[str, dict[str, Any]]:
    """Refuse before any work if a local task's file is missing; returns each local task's data record."""
    from offcomp.models import file_sha256

    out: dict[str, dict[str, Any]] = {}
    for task in local_tasks_in(names):
        files = {}
        for rel in LOCAL_TASKS[task].files:
            path = root / rel
            if not path.is_file():
                raise OffcompError(f"task {task} reads {path}, which does not exist: pass --data-dir DIR or set "
                                   f"${DATA_ENV} to the folder holding {rel} (default {DEFAULT_DATA})")
            files[rel] = file_sha256(path)
        out[task] = {"name": f"local:{','.join(files)}", "root": str(root.resolve()), "sha256": files,
                     "upstream_task": LOCAL_TASKS[task].upstream}
    return out


def task_manager(names: list[str], include_path: list[Path], root: Path, *, catalogue: bool = True) -> Any:
    """A TaskManager that knows every requested name; OffcompError naming the unknown ones.

    `catalogue=False` never indexes lm-eval's own tasks (only the local ones and `include_path`)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    for p in include_path:
        if not p.is_dir():
            raise OffcompError(f"--include-path {p} is not a directory of lm-eval task YAML files")
    paths = [TASKS_DIR, *include_path]
    meta = {DATA_KEY: str(root.resolve())}
    tm = TaskManager(include_defaults=False, include_path=paths, metadata=meta)
    if catalogue and set(tm.match_tasks(names)) != set(names):
        tm = TaskManager(include_path=paths, metadata=meta)  # lm-eval's own catalogue too (slow)
    unknown = sorted(set(names) - set(tm.match_tasks(names)))
    if unknown:
        raise OffcompError(f"unknown lm-eval task(s) {', '.join(unknown)}: use a local task "
                           f"({', '.join([*LOCAL_TASKS, *LOCAL_GROUPS])}), an lm-eval task name, or --include-path DIR")
    return tm


def _number(v: Any) -> Any:
    """lm-eval writes 'N/A' where a stderr was not computed: None. Numbers stay as they are; a
    non-finite one is turned into null *with its reason* when the record is written (records.strict)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def task_metrics(row: dict[str, Any]) -> dict[str, float | None]:
    """{"acc": x, "acc_stderr": s, ...} from lm-eval's {"acc,none": x, "acc_stderr,none": s, ...}."""
    out: dict[str, float | None] = {}
    for key, value in row.items():
        metric, sep, filt = key.partition(",")
        if not sep or key == "alias":
            continue
        out[metric if filt == "none" else f"{metric}[{filt}]"] = _number(value)
    return out


def run_harness(
    model: Any,
    tokenizer: Any,
    names: list[str],
    tm: Any,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
) -> dict[str, Any]:
    """Score `model` on the named tasks; returns lm-eval's per-task results, versions and protocol.

    lm-eval prints to stdout in places (bootstrap notices); that is diverted to stderr, so a
    caller's stdout carries only what the caller writes.
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    was_training = model.training
    model.eval()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, num_fewshot=num_fewshot,
                                          limit=limit, batch_size=batch_size, bootstrap_iters=bootstrap_iters,
                                          log_samples=False)
    except (KeyError, ValueError, FileNotFoundError) as e:  # e.g. a task whose data cannot be loaded
        raise OffcompError(f"lm-eval failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        model.train(was_training)
    cfg = res.get("config", {})
    tasks: dict[str, Any] = {}
    for name, row in res["results"].items():
        tcfg = res.get("configs", {}).get(name, {})
        tasks[name] = {
            "metrics": task_metrics(row),
            "version": res.get("versions", {}).get(name),
            "num_fewshot": res.get("n-shot", {}).get(name),
            "n_samples": res.get("n-samples", {}).get(name),
            "output_type": tcfg.get("output_type"),
            "higher_is_better": res.get("higher_is_better", {}).get(name),
            "dataset": {k: tcfg.get(k) for k in ("dataset_path", "dataset_name", "test_split", "validation_split")
                        if tcfg.get(k) is not None},
        }
    protocol = {
        "harness": "lm-evaluation-harness",
        "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _dist_version("lm_eval"),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        "max_length": lm.max_length,
        "prefix_token_id": lm.prefix_token_id,
        "add_bos_token": getattr(lm, "add_bos_token", None),
        "bootstrap_iters": bootstrap_iters,
        "chat_template": False,
        "seeds": {k: cfg.get(k) for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")},
    }
    return {"tasks": tasks, "protocol": protocol}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def rolling_loglikelihood(model: Any, tokenizer: Any, texts: list[str], *, max_length: int,
                          batch_size: int = 1) -> list[float]:
    """lm-eval's `loglikelihood_rolling` (the protocol of its perplexity tasks) of each text.

    Each text is tokenised on its own, prefixed with the tokenizer's BOS (else EOS), and every
    text token is scored, in disjoint windows of `max_length` inputs whose last position predicts
    the next window's first token. On that same stream (BOS first) this is exactly `offcomp
    eval-ppl --seq-len max_length+1 --stride max_length`: windows of M+1 tokens overlapping by
    one, all M predictions scored (tests/test_eval_lm.py checks the equality). eval-ppl puts a
    BOS first only if the tokenizer adds one by default; without it the first token goes unscored
    and the windows sit one token later. eval-ppl also drops a ragged tail that lm-eval scores.
    """
    require_lm_eval()
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sys.stderr):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i)
                for i, t in enumerate(texts)]
        return [float(x) for x in lm.loglikelihood_rolling(reqs, disable_tqdm=True)]
