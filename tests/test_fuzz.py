"""Property-based fuzzing (hypothesis, derandomized: the same examples on every run) of plans and of
CLI argument combinations on tiny models. The contract under test:

- a plan is either accepted or refused with OffcompError (never another exception);
- an accepted plan compresses with finite tensors and a stored count in (0, before);
- a command exits 0 or 2 (3 only for a non-finite measurement), exit 2 prints exactly one line on
  stderr and no traceback, a failed command leaves no output behind, and with --json stdout holds
  exactly one JSON object (nothing on a failure).

Most plan examples stop at `plan_units` (validation only); a smaller share runs `compress_`."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import offcomp
from offcomp.api import count_params, plan_units
from offcomp.cli import app
from offcomp.errors import EXIT_NON_FINITE, EXIT_USER, OffcompError
from offcomp.plan import load_plan
from offcomp.registry import available_methods, get_method

from .conftest import save_model_dir, tiny_bert, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
FUZZ = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                print_blob=True)

ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down", "embed", "lm_head"]
ODD_ENTRIES = ["q_proj", "up_proj", "dense", "re:.*", r"re:model\.layers\.0\..*", "re:(", "re:[a-", "re:.*proj",
               "", "nothing.here", "layers.0", "re:" + "a" * 50]
METHODS = available_methods()
OPTION_KEYS = sorted({k for m in METHODS for k in get_method(m).Config.model_fields} | {"bogus"})
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=6), st.sampled_from(["float32", "float64", "wanda", "magnitude", "2:4", "mlp",
                                                          "linear", "whitened", "fisher_row", "auto", "fit"]))
NUMBERS = st.one_of(st.integers(-3, 200), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 0.5, 1, 2, 1e30, -0.0, 0.999, 1.0001, "3", "x", True]),
                    st.lists(st.integers(-1, 40), max_size=3), st.none())
ENTRY = st.one_of(st.sampled_from(ROLES), st.sampled_from(ODD_ENTRIES), st.text(max_size=10))
LAYERS = st.one_of(st.sampled_from(["all", "0", "0-1", "1", "0-1000000000", "1-0", "0,1", "x", "", " all ", "-1", "0-",
                                    "0-1,1", "9" * 30]),
                   st.lists(st.integers(-3, 5), max_size=3), st.integers(-2, 3), st.text(max_size=6), st.none())
OPTIONS = st.one_of(st.dictionaries(st.sampled_from(OPTION_KEYS), SCALARS, max_size=3), st.text(max_size=4), st.none())
GARBAGE = {"modules": st.one_of(st.lists(ENTRY, max_size=3), ENTRY), "layers": LAYERS,
           "exclude": st.one_of(st.lists(ENTRY, max_size=2), ENTRY), "joint": SCALARS,
           "method": st.one_of(st.sampled_from(METHODS), st.sampled_from(["nope", "", "SVD"])),
           "options": OPTIONS, "rank": NUMBERS, "ratio": NUMBERS, "cr": NUMBERS,
           "name": st.one_of(st.text(max_size=8), st.none(), st.integers()), "extra": SCALARS}
BUDGET = st.one_of(st.builds(lambda r: {"rank": r}, st.integers(1, 40)),
                   st.builds(lambda r: {"ratio": r}, st.floats(0.02, 0.98)),
                   st.builds(lambda c: {"cr": c}, st.floats(1.02, 30)))


@st.composite
def group(draw):
    """A plausible group, then 0-2 of its fields replaced by something odd."""
    g = {"modules": draw(st.lists(st.sampled_from(ROLES), min_size=1, max_size=3, unique=True)),
         "layers": draw(st.sampled_from(["all", "0", "1", "0-1", [0], [1, 0]])),
         "joint": draw(st.booleans()), "method": draw(st.sampled_from(METHODS)),
         **draw(BUDGET)}
    if draw(st.booleans()):
        g["options"] = draw(st.dictionaries(st.sampled_from(OPTION_KEYS), SCALARS, max_size=2))
    if draw(st.integers(0, 3)) == 2:
        g["exclude"] = draw(st.lists(st.sampled_from(ROLES + ODD_ENTRIES), max_size=2))
    for key in draw(st.lists(st.sampled_from(sorted(GARBAGE)), max_size=2)) if draw(st.integers(0, 2)) == 1 else []:
        g[key] = draw(GARBAGE[key])
    return g


SECTION = st.one_of(st.dictionaries(st.sampled_from(["ratio", "criterion", "min_rank", "epochs", "lr", "mode",
                                                     "mixup", "holdout", "samples", "bogus"]),
                                    st.one_of(NUMBERS, st.sampled_from(["whitened", "fisher", "weight", "blocks",
                                                                        "sequential"])), max_size=3),
                    SCALARS)


@st.composite
def plan(draw):
    p = {"groups": draw(st.lists(group(), min_size=1, max_size=3))}
    if draw(st.integers(0, 5)) == 3:
        p["allocate"] = draw(st.one_of(st.fixed_dictionaries({"ratio": st.floats(0.1, 0.9)}), SECTION))
    if draw(st.integers(0, 7)) == 3:
        p["modular"] = draw(st.one_of(st.fixed_dictionaries({"epochs": st.integers(1, 2)}), SECTION))
    if draw(st.integers(0, 9)) == 3:
        p[draw(st.sampled_from(["version", "groups", "bogus"]))] = draw(SCALARS)
    return p


JSONISH = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                       max_leaves=8)
RAW_PLAN = st.one_of(plan(), plan(), plan(), plan(), plan(), plan(), plan(), plan(), plan(), JSONISH)


def _stats(model: torch.nn.Module, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Statistics of every linear/embedding from random inputs (what capture would store)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            x = torch.randn(64, mod.in_features, generator=g, dtype=torch.float64)
            out[name] = {"xtx": x.T @ x, "abs_mean": x.abs().mean(0), "act_sq": (x * x).sum(0),
                         "fisher_row": torch.rand(mod.out_features, generator=g, dtype=torch.float64) + 0.1}
    return out


MODELS = {"llama": tiny_llama(layers=2), "bert": tiny_bert(layers=2)}
STATS = {k: _stats(m) for k, m in MODELS.items()}


def _load_either(raw, tmp: Path, fmt: str):
    """The raw plan written as a YAML or JSON file and read back by load_plan (the CLI's path)."""
    f = tmp / f"plan.{fmt}"
    try:
        text = json.dumps(raw) if fmt == "json" else yaml.safe_dump(raw)
    except (TypeError, ValueError, yaml.YAMLError):
        return offcomp.parse_plan(raw)
    f.write_text(text)
    return load_plan(f)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(FUZZ, max_examples=600)
@given(raw=RAW_PLAN, arch=st.sampled_from(sorted(MODELS)), with_stats=st.booleans(),
       fmt=st.sampled_from(["yaml", "json"]))
def test_fuzz_plans_validate_or_refuse(raw, arch, with_stats, fmt, scratch):
    try:
        plan = _load_either(raw, scratch, fmt)
        planned = plan_units(MODELS[arch], plan, STATS[arch] if with_stats else None)
    except OffcompError as e:
        assert str(e).strip(), "an empty error message"
        return
    assert planned
    for p in planned:
        assert 0 < p.stored_params < p.unit.original_params, p


SAFE_OPTIONS = {"ae": {"epochs": 1, "arch": "linear"}, "ae-embed": {"epochs": 1}, "kronecker": {},
                "tucker": {"n_iter_max": 5}, "prune": {}, "prune-structured": {}, "svd": {}, "svd-llm": {},
                "asvd": {}, "fwsvd": {}, "sparsegpt": {}}
RUN_GROUP = st.fixed_dictionaries(
    {"modules": st.lists(st.sampled_from(ROLES), min_size=1, max_size=3, unique=True),
     "method": st.sampled_from(sorted(SAFE_OPTIONS)),
     "budget": st.one_of(st.builds(lambda r: {"rank": r}, st.integers(1, 70)),
                         st.builds(lambda r: {"ratio": r}, st.floats(0.01, 0.99)),
                         st.builds(lambda c: {"cr": c}, st.floats(1.01, 50)))},
    optional={"layers": st.sampled_from(["all", "0", "1", [0, 1], "0-1"]), "joint": st.booleans(),
              "extra_options": st.sampled_from([{}, {"compute_dtype": "float32"}, {"score": "wanda"},
                                                {"pattern": "2:4"}, {"loss_space": "whitened"}])})


@settings(FUZZ, max_examples=70)
@given(groups=st.lists(RUN_GROUP, min_size=1, max_size=2), arch=st.sampled_from(sorted(MODELS)),
       seed=st.integers(0, 3))
def test_fuzz_compress_runs(groups, arch, seed):
    torch.set_num_threads(1)
    model = copy.deepcopy(MODELS[arch])
    raw = {"groups": [{"modules": g["modules"], "method": g["method"], "layers": g.get("layers", "all"),
                       "joint": g.get("joint", False), "options": {**SAFE_OPTIONS[g["method"]],
                                                                  **g.get("extra_options", {})}, **g["budget"]}
                      for g in groups]}
    before = count_params(model)
    try:
        report = offcomp.compress_(model, offcomp.parse_plan(raw), stats=STATS[arch], seed=seed)
    except OffcompError as e:
        assert str(e).strip()
        return
    assert 0 < report.params_after < before == report.params_before
    assert all(math.isfinite(u.rel_error) for u in report.units)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.randint(0, 128, (1, 8))).logits
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------- CLI

_TEXT = " ".join(f"Line {i} of a small corpus about rivers, mills and the sea." for i in range(300))


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, bert_tokenizer):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer), layers=2), bert_tokenizer,
                               root / "tiny-llama")
    (root / "text.txt").write_text(_TEXT)
    (root / "a-file").write_text("not a directory")
    (root / "plan.yaml").write_text("groups:\n  - modules: [mlp.up]\n    rank: 4\n")
    (root / "bad-plan.yaml").write_bytes(b"\xff\xfe\x00groups")
    return root, model_dir


PATHS = ["tiny-llama", "text.txt", "a-file", "plan.yaml", "bad-plan.yaml", "missing", "out/x", "a-file/x", ""]
ODD = st.one_of(st.sampled_from(["0", "-1", "1e9", "nan", "inf", "x", "", "2:4", "0-1000000000", "meta", "mps",
                                 "cuda", "cuda:7", "wikitext2", "test"]), st.sampled_from(PATHS), st.text(max_size=5))
# option → plausible values (drawn 3 times in 4); otherwise something odd
COMPRESS_OPTS = {"--modules": ["mlp.up", "attn.q", "re:.*proj", "embed", "lm_head", "mlp.down"],
                 "--layers": ["all", "0", "1", "0-1", "0,1"], "--option": ["compute_dtype=float32", "score=wanda",
                                                                       "pattern=2:4", "epochs=1", "bogus=1"],
                 "--device": ["cpu"], "--seed": ["0", "1", "7"], "--allocate": ["0.5", "0.8"],
                 "--allocate-criterion": ["weight", "whitened", "fisher"], "--stats": ["missing", "a-file"],
                 "--calib-data": ["text.txt"], "--calib-samples": ["2"], "--calib-seq-len": ["16", "32"],
                 "--plan": ["plan.yaml", "bad-plan.yaml"], "--valid-data": ["text.txt"],
                 "--modular-epochs": ["1"], "--out": ["out/a", "a-file", "a-file/x", "out/x/y"]}
PPL_OPTS = {"--split": ["test", "validation"], "--stride": ["8", "16"], "--batch-size": ["1", "2", "3"],
            "--device": ["cpu"], "--dtype": ["fp32", "bf16", "fp16"], "--seed": ["0", "3"]}


@st.composite
def option_values(draw, table: dict[str, list[str]], max_size: int) -> list[str]:
    out: list[str] = []
    for opt in draw(st.lists(st.sampled_from(sorted(table)), max_size=max_size, unique=True)):
        good = draw(st.integers(0, 5)) != 2
        out += [opt, draw(st.sampled_from(table[opt])) if good else draw(ODD)]
    return out


@st.composite
def cli_args(draw):
    command = draw(st.sampled_from(["compress"] * 6 + ["eval-ppl"] * 3 + ["methods", "report", "export", "capture"]))
    args: list[str] = [command]
    if command == "compress":
        args += ["--model", draw(st.sampled_from(["tiny-llama"] * 20 + PATHS))]
        if draw(st.integers(0, 4)) != 2:  # mostly the quick form
            kind = draw(st.sampled_from(["--rank", "--ratio", "--cr"]))
            good = {"--rank": ["2", "4", "8"], "--ratio": ["0.5", "0.3", "0.9"], "--cr": ["2", "3", "10"]}[kind]
            args += ["--method", draw(st.sampled_from(["svd", "prune", "kronecker", "svd", "prune", "svd-llm",
                                                       "ae", "tucker", "prune-structured", "nope"])),
                     kind, draw(st.sampled_from(good)) if draw(st.integers(0, 3)) != 2 else draw(ODD)]
        args += draw(option_values(COMPRESS_OPTS, 2))
        args += draw(st.lists(st.sampled_from(["--joint", "--overwrite", "--no-joint"]), max_size=1))
        if "--out" not in args:
            args += ["--dry-run"] if draw(st.integers(0, 3)) != 1 else ["--out", "out/run"]
        if "--dry-run" not in args:  # real runs: only the fast methods, no validation text (seconds per unit)
            args = [a if a not in ("ae", "tucker", "kronecker", "prune-structured") else "svd" for a in args]
            while "--valid-data" in args:
                i = args.index("--valid-data")
                del args[i:i + 2]
    elif command == "eval-ppl":
        args += [draw(st.sampled_from(["tiny-llama"] * 20 + PATHS)),
                 "--data", draw(st.sampled_from(["text.txt"] * 12 + ["missing", "a-file", "plan.yaml"])),
                 "--seq-len", draw(st.sampled_from(["16", "32"] * 4 + ["64", "1", "100000", "x"])),
                 "--max-tokens", draw(st.sampled_from(["64", "128"] * 4 + ["8", "0"]))]
        args += draw(option_values(PPL_OPTS, 2))
        args += ["--results", "out/results.jsonl"]
    elif command == "report":
        args += [draw(st.sampled_from(PATHS)), "--format", draw(st.sampled_from(["table", "md", "csv", "json", "x"]))]
    elif command == "export":
        args += [draw(st.sampled_from(PATHS)), draw(st.sampled_from(PATHS))]
    elif command == "capture":
        args += ["--model", "tiny-llama", "--data", draw(st.sampled_from(["text.txt", "text.txt", "missing", "a-file"])),
                 "--split", draw(st.sampled_from(["validation", "validation", "test", "x"])),
                 "--samples", draw(st.sampled_from(["2", "2", "0", "x"])),
                 "--seq-len", draw(st.sampled_from(["16", "16", "0", "100000"])), "--out", "out/captures",
                 "--no-fisher"]
    if command in ("compress", "eval-ppl", "capture") and draw(st.booleans()):
        args.append("--json")
    if draw(st.integers(0, 12)) == 5:  # a stray token
        args.insert(draw(st.integers(1, len(args))), draw(ODD))
    return args


def _snapshot(root: Path) -> set[str]:
    """Files and hidden (temporary/partial) entries; an empty parent directory left by a refused
    run is not counted (compress creates --out's parent before it validates the plan)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.name.startswith(".")}


@settings(FUZZ, max_examples=220)
@given(args=cli_args())
def test_fuzz_cli(args, cli_env):
    root, _ = cli_env
    cwd = os.getcwd()
    os.chdir(root)
    try:
        before = _snapshot(root)
        res = CliRunner().invoke(app, args, env={"OFFCOMP_DEBUG": "", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
        after = _snapshot(root)
    finally:
        os.chdir(cwd)
    where = f"offcomp {' '.join(args)!r}: exit {res.exit_code}\nstderr: {res.stderr[-2000:]}"
    assert res.exit_code in (0, EXIT_USER, EXIT_NON_FINITE), where
    assert "Traceback" not in res.stderr, where
    if res.exit_code == EXIT_USER:
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, where
        assert not (after - before), f"{where}\nleft behind: {sorted(after - before)}"
    if "--json" in args and "--help" not in args:
        if res.exit_code == EXIT_USER:
            assert res.stdout == "", where
        elif args[0] not in ("report", "export", "methods"):
            obj = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}: {where}"))
            assert isinstance(obj, dict) and res.stdout.strip().count("\n") == 0, where
    shutil.rmtree(root / "out", ignore_errors=True)  # each example starts from the same files
