"""The command line reads well anywhere: cheap import, --version, help that fits 80 columns with
every option name whole, completion, and export without its redundant flag."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import offcomp
from offcomp.cli import app

from .conftest import save_model_dir, tiny_llama

ENV = {**os.environ, "COLUMNS": "80", "PYTHONPATH": os.getcwd()}


def py(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_importing_offcomp_and_its_cli_does_not_import_torch():
    # `offcomp --help` took ~2.5 s because `import offcomp` imported torch; now it is lazy
    out = py("import sys, offcomp, offcomp.cli, offcomp.report; print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert out.split() == ["False", "False"]
    # the public names still resolve (and then torch is there)
    out = py("import sys, offcomp; offcomp.compress_; print(offcomp.parse_plan.__module__, 'torch' in sys.modules)")
    assert out.split() == ["offcomp.plan", "True"]


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        offcomp.no_such_thing  # noqa: B018


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"offcomp {offcomp.__version__}"


def test_completion_is_offered():
    res = CliRunner().invoke(app, ["--help"])
    assert "--install-completion" in res.stdout and "--show-completion" in res.stdout


def _commands() -> list[tuple[str, Any]]:
    group = typer.main.get_command(app)
    assert hasattr(group, "commands")
    return [("", group), *((name, cmd) for name, cmd in group.commands.items())]


@pytest.mark.parametrize("name", [n for n, _ in _commands()])
def test_help_fits_80_columns_and_names_every_option_whole(name):
    cmd = dict(_commands())[name]
    text = subprocess.run([sys.executable, "-m", "offcomp.cli", *([name] if name else []), "--help"],
                          capture_output=True, text=True, env=ENV, timeout=60).stdout
    assert text.startswith("Usage:")
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text and "..." not in text.replace("[ARGS]...", "")  # nothing cut off
    for param in cmd.params:
        for opt in [*param.opts, *param.secondary_opts]:
            if opt.startswith("-"):
                assert opt in text, f"{opt} missing from `offcomp {name} --help`"
    if hasattr(cmd, "commands"):
        for sub, subcmd in cmd.commands.items():
            # the whole summary appears (wrapped), not cut at the column
            words = (subcmd.help or "").split("\n\n")[0].split()
            assert " ".join(words) in " ".join(text.split()), sub


def test_export_needs_no_dense_flag(tmp_path, bert_tokenizer):
    from offcomp.pipeline import compress_model

    base = save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer)), bert_tokenizer, tmp_path / "base")
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 4}]})
    compress_model(str(base), plan, tmp_path / "ck", seed=0)
    res = CliRunner().invoke(app, ["export", str(tmp_path / "ck"), str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "plain" / "config.json").is_file()
    res = CliRunner().invoke(app, ["export", "--dense", str(tmp_path / "ck"), str(tmp_path / "plain2")])
    assert res.exit_code == 0, res.output  # the old spelling still works
