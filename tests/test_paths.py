"""Output paths are checked before any work (issue 10 finding 8), export never destroys its source
(finding 5), and `offcomp report` survives damaged results lines (finding 11)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import offcomp
from offcomp.checkpoint import load_compressed
from offcomp.cli import app
from offcomp.pipeline import compress_model

pytestmark = pytest.mark.usefixtures("one_thread")
GLUE = Path(__file__).resolve().parents[2] / "shared/data/glue"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama_dir):
    out = tmp_path_factory.mktemp("c") / "ck"
    compress_model(str(llama_dir), offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 4}]}), out)
    return out


def refused(args: list[str]) -> str:
    res = CliRunner().invoke(app, args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, (res.exit_code, res.output)
    return lines[0]


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_export_never_destroys_its_source_finding_5(where, checkpoint, tmp_path):
    """`offcomp export --dense X X --overwrite` deleted the compressed checkpoint X."""
    root = tmp_path / "root"
    src = root / "ck"
    shutil.copytree(checkpoint, src)
    dst = {"same": src, "inside": src / "dense", "contains": root}[where]
    line = refused(["export", "--dense", str(src), str(dst), "--overwrite"])
    assert "source model directory" in line
    assert load_compressed(src).manifest["files"]  # intact: every file still matches its hash


def _commands(model: Path, bad: Path, tmp: Path) -> dict[str, list[str]]:
    plan = Path(__file__).resolve().parents[1] / "sample_plans/demo-svd.yaml"
    return {
        "compress": ["compress", "--model", str(model), "--plan", str(plan), "--out", str(bad)],
        "eval-ppl": ["eval-ppl", str(model), "--data", "embedded", "--results", str(bad)],
        "export": ["export", "--dense", str(model), str(bad)],
        "capture": ["capture", "--model", str(model), "--data", "embedded", "--out", str(bad)],
        "finetune-glue": ["finetune-glue", "--task", "stsb", "--model", str(model), "--data-dir", str(GLUE),
                          "--out", str(bad)],
        "squad": ["squad", "--model", str(model), "--out", str(bad)],
        "eval-sts": ["eval-sts", str(model), "--data-dir", str(GLUE / "STS-B"), "--out", str(bad)],
    }


COMMANDS = ["compress", "eval-ppl", "export", "capture", "finetune-glue", "squad", "eval-sts"]


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_output_path_is_refused_before_the_model_is_loaded_finding_8(command, tmp_path):
    """The model does not exist: if the path were checked after loading (or after the work, as
    before), the error would be about the model, or a traceback after a lost run."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = blocker / "out"  # its parent is a file: nothing can be created there
    line = refused(_commands(tmp_path / "no-such-model", bad, tmp_path)[command])
    assert str(bad) in line and "is a file" in line



def test_compress_checks_out_before_reading_statistics(tmp_path):
    """`--stats` of a missing capture is an error too, but the bad --out is reported first."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = _commands(tmp_path / "no-such-model", blocker / "out", tmp_path)["compress"]
    line = refused([*args, "--stats", str(tmp_path / "no-capture")])
    assert "is a file" in line


@pytest.mark.parametrize("command", ["compress", "capture", "finetune-glue", "squad", "eval-sts"])
def test_output_inside_or_at_the_source_model_is_refused(command, llama_dir, tmp_path):
    for bad in (llama_dir, llama_dir / "out"):
        line = refused(_commands(llama_dir, bad, tmp_path)[command])
        assert "source model directory" in line
    assert sorted(p.name for p in llama_dir.iterdir()) == sorted(  # nothing was written into it
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])


@pytest.mark.parametrize("command", ["compress", "export", "eval-ppl"])
def test_existing_file_where_a_directory_is_needed_or_vice_versa(command, checkpoint, llama_dir, tmp_path):
    if command == "eval-ppl":  # --results is a file: a directory is refused
        line = refused(_commands(llama_dir, tmp_path, tmp_path)[command])
        assert "is a directory" in line
        return
    f = tmp_path / "exists.txt"
    f.write_text("x")
    model = checkpoint if command == "export" else llama_dir
    line = refused([*_commands(model, f, tmp_path)[command], "--overwrite"])
    assert "not a directory" in line and f.read_text() == "x"


def test_report_skips_damaged_results_lines_with_one_warning(checkpoint, tmp_path):
    """Finding 11: one damaged line in results.jsonl crashed `offcomp report`."""
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    good = {"type": "ppl", "ppl": 12.5, "model": {"name": "m", "compressed": False}, "params_before": 10,
            "params_after": 10, "data": {"name": "d", "split": "test"}, "seconds": 1.0}
    lines = [json.dumps(good), '{"type": "ppl", "ppl": 1', "[1, 2]", json.dumps({**good, "params_before": "10"}),
             json.dumps({**good, "ppl": 13.5})]
    (run / "results.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copytree(checkpoint, tmp_path / "runs" / "ck")
    (tmp_path / "runs" / "ck" / "offcomp.json").write_text('{"report": 3}')
    res = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--format", "md"])
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(warnings) == 2 and "results.jsonl:2: skipped 3 damaged line(s) of 5" in warnings[0]
    assert "damaged manifest" in warnings[1]
    assert "12.5" in res.stdout and "13.5" in res.stdout
    from offcomp.report import collect

    assert [r["value"] for r in collect(tmp_path / "runs")] == [12.5, 13.5]
