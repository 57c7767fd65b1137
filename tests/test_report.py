"""`offcomp report` v2 on result files built by hand: rows, Δ, the marked best, the protocol split,
the file formats (LaTeX included), the figures, and the 80-column terminal rendering (golden)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from offcomp.report import build_tables, collect, compression_summary, protocol_line, report_tables
from offcomp.report_plot import plot_tables
from offcomp.report_render import render

GOLDEN = Path(__file__).parent / "golden"
BASE = "b" * 64
DATA = "d" * 64
VALID = "v" * 64
ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]


def manifest(method, budget, *, original=106_168_320, kept=0.8, allocate=None, calib=None, options=None,
             modular=None, seconds=30.0):
    group = {"name": "decoder", "modules": ROLES, "layers": "all", "joint": False, "method": method,
             "options": options or {}, "rank": None, "ratio": None, "cr": None, **({} if allocate else budget)}
    m = {"base": {"name": "smollm2-135m", "sha256": BASE}, "plan_source": f"quick:{method}",
         "plan": {"version": 1, "allocate": allocate, "modular": modular, "groups": [group]},
         "report": {"units": [{"method": method, "original_params": original, "stored_params": round(original * kept)}],
                    "params_before": 134_515_008, "params_after": 134_515_008 - original + round(original * kept),
                    "seconds": seconds, "compressed_original_params": original,
                    "compressed_stored_params": round(original * kept)}}
    if calib:
        m["calibration"] = {"data": {"name": "wiki.valid.raw", "split": "file", "sha256": VALID},
                            "spec": {"samples": calib, "seq_len": 1024, "seed": 0}}
    return m


def ppl_record(ppl, *, man=None, source="x", dtype="float32", seq_len=1024, seconds=100.0, **extra):
    rec = {"type": "ppl", "ppl": ppl, "n_tokens": 16368,
           "protocol": {"kind": "causal", "seq_len": seq_len, "stride": seq_len, "dtype": dtype},
           "data": {"name": "wiki.test.raw", "split": "file", "sha256": DATA}, "seconds": seconds,
           "created": "2026-12-02T00:00:00Z", **extra}
    if man is None:
        rec.update(model={"name": "smollm2-135m", "sha256": BASE, "compressed": False, "base": None},
                   params_before=134_515_008, params_after=134_515_008)
    else:
        rec.update(model={"name": source, "source": source, "compressed": True,
                          "base": {"name": "smollm2-135m", "sha256": BASE}},
                   params_before=man["report"]["params_before"], params_after=man["report"]["params_after"],
                   compress_seconds=man["report"]["seconds"])
    return rec


def write_run(root: Path, name: str, recs: list, man: dict | None = None, embed: bool = False) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if man is not None and not embed:
        (d / "offcomp.json").write_text(json.dumps(man))  # the report reads it next to the results
    lines = [json.dumps(r) if isinstance(r, dict) else r for r in recs]
    (d / "results.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_runs(Path("runs"))


def make_runs(root: Path) -> Path:
    """Dense, plain SVD and SVD-LLM runs at two budgets, another calibration, another dtype, a
    damaged line and a two-metric GLUE record."""
    write_run(root, "dense", [ppl_record(25.05, seconds=190.0)])
    for name, method, budget, kept, ppl, kw in [
        ("svd-0.8", "svd", {"ratio": 0.8}, 0.8, 9.6e7, {}),
        ("svd-0.6", "svd", {"ratio": 0.6}, 0.6, 2.51e7, {}),
        ("svdllm-0.8", "svd-llm", {"ratio": 0.8}, 0.8, 75.53, {"calib": 64}),
        ("svdllm-alloc-0.8", "svd-llm", {}, 0.8001, 62.19, {"calib": 64, "allocate": {"ratio": 0.8, "criterion": "fisher"}}),
        ("svdllm-0.6", "svd-llm", {"ratio": 0.6}, 0.6, 220.5, {"calib": 64}),
        ("svdllm-0.8-c16", "svd-llm", {"ratio": 0.8}, 0.8, 80.1, {"calib": 16}),
    ]:
        man = manifest(method, budget, kept=kept, **kw)
        src = str(root / name)
        extra = {"weights_bytes": 460_000_000} if name == "svd-0.8" else {}
        if name == "svd-0.6":  # the new record shape: the summary travels with the record, no manifest needed
            write_run(root, name, [ppl_record(ppl, man=man, source="gone", compression=compression_summary(man))],
                      man, embed=True)
        else:
            write_run(root, name, [ppl_record(ppl, man=man, source=src, **extra)], man)
    # same evaluation, another dtype: never in the same table
    write_run(root, "dense-bf16", [ppl_record(25.10, dtype="bfloat16"), '{"type": "ppl", "ppl": 3'])  # damaged line
    write_run(root, "glue", [{"type": "glue", "task": "mrpc", "metric_names": ["accuracy", "f1"],
                              "metrics": {"accuracy": 0.79, "f1": 0.86, "eval_loss": 0.5},
                              "model": {"name": "minilm-l6", "sha256": "m" * 64, "compressed": False},
                              "params_before": 22_713_986, "params_after": 22_713_986,
                              "data": {"name": "glue/mrpc", "split": "dev"}, "hyperparameters": {"lr": 1e-4},
                              "seconds": 687.0}])
    return root


def by_title(tables, fragment, note=None):
    found = [t for t in tables if fragment in t.title and (note is None or any(note in n for n in t.notes))]
    assert len(found) == 1, [(t.title, t.notes) for t in tables]
    return found[0]


def test_rows_delta_best_and_protocol_split(runs):
    warnings: list[str] = []
    tables = report_tables(runs, warnings)
    assert len(warnings) == 1 and "dense-bf16/results.jsonl:2" in warnings[0]  # damaged line skipped, named
    ppl = [t for t in tables if t.metric == "ppl"]
    assert len(ppl) == 3  # main, calibration 16 split, bf16
    main = ppl[0]
    assert not main.notes or all("separate" not in n for n in main.notes)
    rows = [(r["method"], r["budget"], r["value"], r["best"]) for r in main.rows]
    assert rows == [
        ("dense", "-", 25.05, False),
        ("svd", "ratio 0.8", 9.6e7, False),
        ("svd-llm", "ratio 0.8", 75.53, False),
        ("svd-llm +alloc(fisher)", "ratio 0.8", 62.19, True),  # best of ratio 0.8
        ("svd", "ratio 0.6", 2.51e7, False),
        ("svd-llm", "ratio 0.6", 220.5, True),
    ]
    r = main.rows[2]
    assert r["delta"] == pytest.approx(75.53 - 25.05) and r["x_dense"] == pytest.approx(75.53 / 25.05, rel=1e-3)
    assert r["kept_modules"] == pytest.approx(0.8) and r["grouping"] == "attn.{k,o,q,v} mlp.{down,gate,up}, separate"
    assert r["kept_model"] == pytest.approx(r["params"] / 134_515_008, abs=1e-4)
    assert main.rows[1]["bytes"] == 460_000_000 and main.rows[2]["bytes"] is None  # absent: no guess
    assert main.rows[0]["kept_model"] == 1.0 and main.rows[0]["delta"] == 0
    # another calibration protocol: its own table, dense + data-free rows repeated for reference
    c16 = by_title(ppl, "PPL", note="calibration protocol differs")
    assert [r["method"] for r in c16.rows] == ["dense", "svd", "svd-llm", "svd"]
    assert "16×1024" in " ".join(c16.notes) and "64×1024" in " ".join(c16.notes)
    # another dtype: never mixed, and the note says why
    bf16 = by_title(ppl, "PPL", note="dtype")
    assert [r["value"] for r in bf16.rows] == [25.10]
    assert "dtype bfloat16 vs float32" in " ".join(bf16.notes)
    # a fine-tuning record with two metrics: one table per metric, higher is better
    acc, f1 = [t for t in tables if t.title.startswith("mrpc")]
    assert (acc.metric, acc.rows[0]["value"], acc.lower_is_better) == ("accuracy", 0.79, False)
    assert f1.metric == "f1"


def test_another_base_model_is_a_separate_table(tmp_path):
    write_run(tmp_path, "a", [ppl_record(25.0)])
    other = ppl_record(30.0)
    other["model"]["sha256"] = "c" * 64
    write_run(tmp_path, "b", [other])
    tables = build_tables(collect(tmp_path))
    assert len(tables) == 2 and "base model" in tables[1].notes[0]


def test_tex_md_csv_json(runs):
    tables = report_tables(runs)
    tex = render(tables, "tex")
    assert tex.count("\\begin{tabular}") == len(tables) == tex.count("\\bottomrule")
    assert "\\toprule" in tex and "\\midrule" in tex and "\\textbf{62.19}" in tex
    assert "attn.\\{k,o,q,v\\}" in tex and "$\\Delta$ vs dense" in tex  # braces and symbols escaped
    body = tex.split("\\begin{tabular}")[1]
    assert "svd-llm +alloc(fisher) & attn" in body and "wiki.test.raw" in tex
    md = render(tables, "md")
    assert "| **62.19** |" in md and md.count("### ") == len(tables)
    csv_text = render(tables, "csv")
    header, *lines = csv_text.strip().splitlines()
    assert header.startswith("table,evaluation,model") and len(lines) == sum(len(t.rows) for t in tables)
    data = json.loads(render(tables, "json"))
    best = [r for t in data for r in t["rows"] if r["best"]]
    assert sorted(r["value"] for r in best) == [62.19, 80.1, 220.5]  # 80.1: best of the calibration-16 table


def test_png_per_table(runs, tmp_path):
    paths = plot_tables(report_tables(runs), tmp_path / "fig")
    # 3 PPL tables + 2 MRPC tables (one point each: the dense line)
    assert len(paths) == 5
    for p in paths:
        blob = p.read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5_000


def _cli(args, cwd, columns="80"):
    env = {**os.environ, "COLUMNS": columns, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("FORCE_COLOR", None)
    return subprocess.run([sys.executable, "-m", "offcomp.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_terminal_80_columns_golden(runs):
    res = _cli(["report", "runs"], Path.cwd())
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert max(len(line) for line in text.splitlines()) <= 80
    for number in ("134,515,008", "9.600e+07", "62.19*", "+50.48", "0.842"):
        assert number in text  # never split across lines
    golden = GOLDEN / "report-80.txt"
    if os.environ.get("OFFCOMP_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    # --wide: every column, on one line each
    wide = _cli(["report", "runs", "--wide"], Path.cwd()).stdout
    assert max(len(line) for line in wide.splitlines()) > 80 and "fit s" in wide and "quick:svd" in wide
    assert re.search(r"svd-llm \+alloc\(fisher\) +│ ratio 0.8 .*│ attn\.\{k,o,q,v\} mlp\.\{down,gate,up\}, separate │", wide)


def test_cli_formats_and_plot(runs, tmp_path):
    res = _cli(["report", "runs", "--format", "tex", "--plot", str(tmp_path / "png")], Path.cwd())
    assert res.returncode == 0 and "\\toprule" in res.stdout
    assert res.stderr.count("wrote ") == 5 and "damaged line(s)" in res.stderr
    res = _cli(["report", "runs", "--format", "yaml"], Path.cwd())
    assert res.returncode == 2 and "unknown format" in res.stderr


def test_real_records_from_compress_and_eval_ppl(tmp_path, bert_tokenizer):
    """The records the pipeline writes (not hand-built ones) land in one table, dense first."""
    import offcomp
    from offcomp.pipeline import compress_model, evaluate_ppl

    from .conftest import save_model_dir, tiny_llama

    base = save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer)), bert_tokenizer, tmp_path / "base")
    text = tmp_path / "test.txt"
    text.write_text("\n".join(f"line {i} of a small text about compression and models." for i in range(80)))
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.up", "mlp.gate"], "ratio": 0.5}]})
    ck = tmp_path / "runs" / "svd"
    compress_model(str(base), plan, ck, seed=0, plan_source="hand")
    for model, results in ((str(base), tmp_path / "runs" / "dense" / "results.jsonl"), (str(ck), None)):
        evaluate_ppl(model, str(text), split="test", seq_len=32, max_tokens=256, results=results)
    (table,) = report_tables(tmp_path / "runs")
    dense, svd = table.rows
    assert (dense["method"], svd["method"], svd["budget"], svd["plan"]) == ("dense", "svd", "ratio 0.5", "hand")
    man = json.loads((ck / "offcomp.json").read_text())["report"]
    assert svd["kept_modules"] == pytest.approx(man["compressed_stored_params"] / man["compressed_original_params"],
                                                abs=1e-4)
    assert svd["params"] == man["params_after"] and svd["delta"] == pytest.approx(svd["value"] - dense["value"])
    assert svd["grouping"] == "mlp.{gate,up}, separate" and svd["calibration"] is None


def test_command_tables_keep_numbers_whole():
    """compress/eval-ppl/capture tables (emit) at 80 columns: text folds, numbers stay on one line."""
    import io

    from rich.console import Console
    from rich.table import Table

    from offcomp.terminal import keep_numbers_whole

    t = Table()
    for c in ("group", "method", "modules", "mode", "hyper", "original", "stored", "max rel. error"):
        t.add_column(c)
    t.add_row("decoder", "svd-llm", "210: model.layers.0.mlp.down_proj…", "separate ×210",
              '{"rank": 100}, {"rank": 102}, {"rank": 104}', "106,168,320", "84,934,656", "0.7727")
    buf = io.StringIO()
    Console(file=buf, width=80).print(keep_numbers_whole(t, 80))
    text = buf.getvalue()
    assert "106,168,320" in text and "84,934,656" in text and "0.7727" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    # headers are not cut inside a word ("grou" / "p"): a numeric column's multi-word header breaks
    # at its spaces and gives the text columns room for their own header words
    header = [line for line in text.splitlines() if line.startswith("┃")]
    words = {w for line in header for cell in line.strip("┃").split("┃") for w in cell.split()}
    assert {"group", "method", "modules", "mode", "hyper", "original", "stored", "max", "rel.", "error"} <= words
    # and the table is not cropped: every line keeps its right border
    assert all(line.rstrip()[-1] in "┓┃┩│┘" for line in text.splitlines() if line.strip())


def test_calibration_note_names_the_modular_training():
    """Regression: runs with and without modular training on the same calibration text were split
    into two tables whose note read 'calibration protocol differs (X vs X)' with X identical."""
    from offcomp.report import _calib_key, _describe

    cal = {"data": "wiki.valid.raw", "split": "file", "sha256": "6" * 64, "samples": 8, "seq_len": 1024, "seed": 0}
    mod = {**cal, "modular": {"data": "wiki.valid.raw", "split": "validation", "seq_len": 1024, "seed": 0,
                              "samples": None}}
    assert _calib_key(cal) != _calib_key(mod)
    plain, trained = _describe("calibration", json.dumps(cal)), _describe("calibration", json.dumps(mod))
    assert plain != trained and trained.startswith(plain)
    assert "modular training on wiki.valid.raw:validation all×1024" in trained


def test_per_file_data_hashes_are_shortened_like_one_hash():
    """GLUE records hash train.tsv and dev.tsv apart; the protocol line printed the Python dict."""
    from offcomp.report import _describe

    assert _describe("data_sha256", {"train.tsv": "a" * 64, "dev.tsv": "b" * 64}) == \
        "train.tsv aaaaaaaa, dev.tsv bbbbbbbb"


def test_scores_before_fine_tuning_get_their_own_column_only_where_recorded(runs):
    """A classifier compressed after fine-tuning is scored before recovery (`pre_metrics`)."""
    rec = {"type": "glue", "task": "mrpc", "metric_names": ["accuracy", "f1"],
           "metrics": {"accuracy": 0.78, "f1": 0.85}, "pre_metrics": {"accuracy": 0.70, "f1": 0.80, "eval_loss": 0.6},
           "model": {"name": "ft", "sha256": "f" * 64, "compressed": False},
           "data": {"name": "glue/mrpc", "split": "dev"}, "hyperparameters": {"lr": 3e-5}}
    write_run(runs, "glue-ft", [rec])
    tables = report_tables(runs)
    with_before = [t for t in tables if t.rows[0].get("value_before") is not None]
    assert [(t.metric, t.rows[0]["value_before"]) for t in with_before] == [("accuracy", 0.70), ("f1", 0.80)]
    headers = [h for _, h, _ in with_before[1].columns]
    assert headers[headers.index("f1") + 1] == "f1 before fine-tuning"
    assert "f1 before fine-tuning" in render(with_before, "md")
    # tables without such a record keep their columns
    plain = [t for t in tables if t.title.startswith("mrpc") and t not in with_before]
    assert plain and all("before" not in " ".join(h for _, h, _ in t.columns) for t in plain)


def test_metric_filter_keeps_only_that_metrics_tables(runs):
    from offcomp.errors import OffcompError

    tables = report_tables(runs, metrics=["f1"])
    assert [t.metric for t in tables] == ["f1"]
    assert {t.metric for t in report_tables(runs, metrics=["f1", "ppl"])} == {"f1", "ppl"}
    with pytest.raises(OffcompError, match="no run under .* has the metric 'F1'; its runs have: accuracy, f1, ppl"):
        report_tables(runs, metrics=["F1"])


def test_an_allocation_that_kept_units_dense_says_so_in_the_method():
    alloc = {"ratio": 0.8, "criterion": "fisher"}
    old = manifest("svd-llm", {}, allocate=alloc, calib=64)
    new = {**manifest("svd-llm", {}, allocate=alloc, calib=64), "allocation": {"dense_units": 127}}
    assert compression_summary(old)["method"] == "svd-llm +alloc(fisher)"
    assert compression_summary(new)["method"] == "svd-llm +alloc(fisher, 127 dense)"


def test_one_file_reached_by_two_paths_is_one_evaluation_and_one_calibration(tmp_path):
    """Before: a run scored on ../shared/…/wiki.test.raw and one on /work/shared/…/wiki.test.raw
    (the same bytes) got two tables, the second "without a dense baseline"; calibration likewise."""
    def cal(path):  # the manifest's calibration names the resolved path, the modular section the typed one
        return {"data": path, "split": "file", "sha256": VALID, "samples": 64, "seq_len": 1024, "seed": 0,
                "modular": {"data": "./" + path, "split": "file", "seq_len": 1024, "seed": 0, "samples": 16}}

    for name, path, ppl, kept in (("a", "/abs/wiki.valid.raw", 40.0, 0.8), ("b", "../rel/wiki.valid.raw", 41.0, 0.8)):
        man = manifest("svd-llm", {"ratio": kept}, calib=64)
        rec = ppl_record(ppl, man=man, source=name)
        rec["data"]["name"] = "/abs/wiki.test.raw" if name == "a" else "../rel/wiki.test.raw"
        rec["compression"] = {**compression_summary(man), "calibration": cal(path)}
        write_run(tmp_path, name, [rec])
    dense = ppl_record(25.0)
    dense["data"]["name"] = "../rel/wiki.test.raw"
    write_run(tmp_path, "dense", [dense])
    tables = build_tables(collect(tmp_path))
    assert len(tables) == 1 and [r["value"] for r in tables[0].rows] == [25.0, 40.0, 41.0]
    assert "/abs/wiki.valid.raw" in protocol_line(tables[0])  # described by the first run's own path
