"""docs/readme_tables.py pastes `offcomp report` output between README markers, idempotently."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture
def tool(monkeypatch):
    path = Path(__file__).resolve().parents[1] / "docs" / "readme_tables.py"
    spec = importlib.util.spec_from_file_location("readme_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "report_md", lambda root: f"#### table of {root}\n\n| a |\n|---|\n| {root} |")
    return mod


def test_tables_are_pasted_between_markers_and_rerun_changes_nothing(tool):
    text = "# R\n\n<!-- report:runs/a -->\n\nprose a\n\n<!-- report:runs/b -->\n\nprose b\n"
    once = tool.fill(text)
    assert once.count("<!-- /report -->") == 2
    assert once.index("| runs/a |") < once.index("prose a") < once.index("| runs/b |") < once.index("prose b")
    assert tool.fill(once) == once


def test_a_stale_table_is_replaced_not_kept(tool):
    text = "<!-- report:runs/a -->\n| old numbers |\n<!-- /report -->\n\nprose\n"
    out = tool.fill(text)
    assert "old numbers" not in out and "| runs/a |" in out and out.endswith("\n\nprose\n")


def test_a_marker_passes_its_report_options_and_keeps_them(tool, monkeypatch):
    monkeypatch.setattr(tool, "report_md", lambda root, opts=(): f"| {root} {' '.join(opts)} |")
    text = "<!-- report:runs/a --metric f1 -->\n<!-- report:runs/b -->\n"
    once = tool.fill(text)
    assert "| runs/a --metric f1 |" in once and "| runs/b  |" in once
    assert once.startswith("<!-- report:runs/a --metric f1 -->\n") and tool.fill(once) == once
