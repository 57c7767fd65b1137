"""One progress line per command: stages restart it, the live loss shows, nothing stays behind,
nothing is drawn without a terminal, and three-argument callbacks keep working."""

from __future__ import annotations

import io
import re

from rich.console import Console

from offcomp.progress import no_progress, with_info
from offcomp.terminal import progress_display


def run_stages(console: Console) -> None:
    with progress_display(console) as progress:
        for i in range(1, 4):
            progress(f"fitting model.layers.{i}.mlp.up_proj (svd)", i, 3)  # one stage, label changing
        for i in range(1, 3):
            progress("modular layers.0", i, 2, {"loss": 0.25 / i})  # a new stage with a loss


def test_one_transient_line_with_eta_and_loss():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80, color_system=None)
    run_stages(console)
    raw = buf.getvalue()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "loss 0.125" in text and "eta" in text and "fitting model.layers.1" in text
    # transient: the display ends by moving up and erasing its line (no "fitting ... 3/3" left behind)
    assert raw.endswith("\x1b[1A\x1b[2K")
    assert text.count("━━━━━━━━━━━━━━━━ 2/2") <= 1  # one bar, redrawn in place, never stacked


def test_quiet_without_a_terminal():
    buf = io.StringIO()
    run_stages(Console(file=buf, force_terminal=False, width=80))
    assert buf.getvalue() == ""


def test_three_argument_callbacks_still_work():
    seen = []
    progress = with_info(lambda label, done, total: seen.append((label, done, total)))
    progress("x", 1, 2)
    progress("x", 2, 2, {"loss": 1.0})
    assert seen == [("x", 1, 2), ("x", 2, 2)]
    assert with_info(no_progress) is no_progress  # the four-argument form passes through
