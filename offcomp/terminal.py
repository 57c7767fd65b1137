"""Terminal rendering for the CLI (rich): comparison tables that fit the terminal width, and the
one progress line of a command.

Numbers never wrap (a split `134,515` / `,008` reads as two numbers); text columns wrap, and when
even that does not fit, the least important columns go first. `--wide` and the file formats keep
every column."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table
from rich.text import Text

from .progress import ProgressFn
from .report import ReportTable, fmt_value, protocol_line

# key, short header, priority (lower stays longer); path and plan only with --wide
TERMINAL_COLUMNS: list[tuple[str, str, int]] = [
    ("method", "method", 0),
    ("budget", "budget", 0),
    ("value", "", 0),  # the metric's own name
    ("delta", "Δ dense", 1),
    ("kept_model", "kept\nmodel", 2),
    ("kept_modules", "kept\nmodules", 3),
    ("grouping", "grouping", 4),
    ("params", "params", 5),
    ("x_dense", "×dense", 6),
    ("bytes", "MB", 7),
    ("compress_s", "fit s", 8),
    ("eval_s", "eval s", 9),
    ("plan", "plan", 10),
]
WIDE_ONLY = {"plan"}


def _cell(key: str, kind: str, value: Any) -> str:
    if key == "bytes" and isinstance(value, int):
        return f"{value / 1e6:,.1f}"
    return fmt_value(key, kind, value)


def _rows(t: ReportTable, keys: list[str]) -> list[list[str]]:
    kinds = {k: kind for k, _, kind in t.columns}
    rows = []
    for r in t.rows:
        cells = [_cell(k, kinds[k], r.get(k)) for k in keys]
        if r.get("best"):
            cells[keys.index("value")] += "*"
        rows.append(cells)
    return rows


def _rich_table(t: ReportTable, keys: list[str]) -> Table:
    kinds = {k: kind for k, _, kind in t.columns}
    headers = {k: (h or t.metric) for k, h, _ in TERMINAL_COLUMNS}
    rows = _rows(t, keys)
    table = Table(title=t.title, title_justify="left")
    for i, k in enumerate(keys):
        text = kinds[k] == "text"
        widest = max([len(w) for row in rows for w in row[i].split()] + [len(x) for x in headers[k].split("\n")])
        table.add_column(headers[k], justify="left" if text else "right", no_wrap=not text, overflow="fold",
                         min_width=widest)  # rich never folds a column below its longest word
    for r, cells in zip(t.rows, rows):
        styled: list[Any] = list(cells)
        if r.get("best"):
            styled[keys.index("value")] = Text(cells[keys.index("value")], style="bold")
        table.add_row(*styled, style=None if r["compressed"] else "dim")
    return table


def _fits(table: Table, cells: list[list[str]], width: int) -> bool:
    """Rendered at `width`, is every number whole on one line and no text column squeezed?"""
    # each column: its minimum width + one space of padding either side + one rule
    if sum(c.min_width or 0 for c in table.columns) + 3 * len(table.columns) + 1 > width:
        return False
    console = Console(width=width, file=io.StringIO(), color_system=None, force_terminal=False)
    with console.capture() as cap:
        console.print(table)
    text = cap.get()
    lines = text.splitlines()
    if any(len(line) > width for line in lines):
        return False
    return all(any(cell in line for line in lines) for row in cells for cell, col in zip(row, table.columns)
               if col.no_wrap)


def _notes(t: ReportTable) -> list[str]:
    lines = [protocol_line(t)] if t.protocol else []
    lines += t.notes
    if any(r.get("best") for r in t.rows):
        lines.append("* best of its budget")
    return lines


def fit_table(t: ReportTable, width: int, wide: bool = False) -> Table:
    """The rich table of `t` with as many columns as fit `width` (all of them with `wide`)."""
    present = [k for k, _, _ in TERMINAL_COLUMNS
               if any(r.get(k) not in (None, "-") for r in t.rows) or k in ("method", "budget", "value")]
    if wide:
        return _rich_table(t, present)
    keys = [k for k in present if k not in WIDE_ONLY]
    prio = {k: p for k, _, p in TERMINAL_COLUMNS}
    while True:
        table = _rich_table(t, keys)
        if len(keys) <= 3 or _fits(table, _rows(t, keys), width):
            return table
        keys.remove(max(keys, key=lambda k: prio[k]))


def print_tables(tables: list[ReportTable], console: Console, wide: bool = False) -> None:
    if wide:  # the whole table, however wide: a pager or a file does not wrap it
        console = Console(file=console.file, width=100_000, force_terminal=console.is_terminal,
                          no_color=console.no_color)
    for i, t in enumerate(tables):
        if i:
            console.print()
        console.print(fit_table(t, console.width, wide))
        for line in _notes(t):
            console.print(line, style="dim", highlight=False, markup=False,
                          width=None if not wide else max(80, len(line)))


@contextlib.contextmanager
def progress_display(console: Console) -> Iterator[ProgressFn]:
    """One transient progress line for a whole command: what runs now, its bar, steps, elapsed and
    remaining time of the current stage, and the live loss of trained methods. A new stage (another
    total, or a count going back) restarts the line instead of stacking bars; nothing is left behind
    when the command ends, and nothing is drawn when stderr is not a terminal (logs, pipes, CI)."""
    columns = (TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
               BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal,
                  expand=True) as bar:
        task = bar.add_task("", total=None, info="")
        state = {"total": None, "done": -1}

        def progress(label: str, done: int, total: int, info: dict[str, float] | None = None, /) -> None:
            text = " ".join(f"{k} {v:.4g}" for k, v in (info or {}).items())
            if total != state["total"] or done < state["done"]:  # a new stage: its own time estimate
                bar.reset(task, total=total, completed=done, description=label, info=text)
            else:
                bar.update(task, completed=done, description=label, info=text)
            state.update(total=total, done=done)

        yield progress


_NUMBER = re.compile(r"^[+-]?[\d,]*\.?\d+(e[+-]?\d+)?[×%]?\*?$")


def keep_numbers_whole(table: Table, width: int = 80) -> Table:
    """Columns holding only numbers get no_wrap and their full width, so rich wraps or folds the
    text columns instead of splitting `134,515` / `,008` across lines. The text columns share the
    width that is left: each first gets its header's longest word (or 4), then the rest goes to the
    columns whose text is longest; widths are fixed here because rich's own collapsing can leave a
    min_width column wider than its share and crop the table's right edge."""
    numeric = []
    for col in table.columns:
        cells = [str(c) for c in col._cells]  # noqa: SLF001  (rich keeps a column's cells here)
        if cells and all(_NUMBER.match(c.strip()) or c.strip() in ("-", "") for c in cells):
            numeric.append((col, max(len(c) for c in cells + str(col.header).split())))
    text = [col for col in table.columns if all(col is not c for c, _ in numeric)]
    # only when the numbers and a few characters of every text column fit: else rich's own layout
    need = sum(w for _, w in numeric) + 4 * len(text) + 3 * len(table.columns) + 1
    if need > width:
        return table
    for col, w in numeric:
        # no_wrap holds the header too: a multi-word header wider than the numbers ("max rel.
        # error") goes one word a line, else it alone takes the width the text columns need
        col.no_wrap, col.min_width = True, w
        if len(str(col.header)) > w:
            col.header = "\n".join(str(col.header).split())
    natural = [max(len(line) for c in [*col._cells, col.header] for line in str(c).splitlines() or [""])  # noqa: SLF001
               for col in text]
    words = [max((len(x) for x in str(col.header).split()), default=0) for col in text]
    widths = [min(n, max(4, w)) for n, w in zip(natural, words)]
    room = width - (sum(w for _, w in numeric) + 3 * len(table.columns) + 1)
    if sum(widths) > room:  # header words do not all fit: 4 each, as before
        widths = [min(n, 4) for n in natural]
    left = room - sum(widths)
    while left > 0:  # one character at a time to the column with the most text still folded
        i = max(range(len(text)), key=lambda j: natural[j] - widths[j], default=None)
        if i is None or natural[i] <= widths[i]:
            break
        widths[i] += 1
        left -= 1
    for col, w in zip(text, widths):
        col.overflow, col.width = "fold", w
    return table


DATA_MIN = 12  # columns the data name keeps in the eval-ppl table before it moves to the title


def _ppl_number(v: float | None) -> str:
    """A perplexity cell: 4 decimals while that stays short, else 4 significant digits (a wrecked
    model's 9.6e7 printed as `96012345.6789` pushed the data column off an 80-column table)."""
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.3e}"


def ppl_table(rec: dict[str, Any], model: str, width: int = 80) -> Table:
    """The table `eval-ppl` prints for one result record. Numbers never wrap or shrink; the data
    name folds, and keeps at least `DATA_MIN` columns: when even that does not fit `width`, it moves
    to the title, and the least important numbers (tok/s, then params) move to the caption."""
    data_rec = rec.get("data") or {}
    data = f"{data_rec.get('name')}:{data_rec.get('split')}"
    cells = {"data": data, "scored": f"{rec['n_tokens']:,}", "PPL": _ppl_number(rec["ppl"]),
             "word PPL": _ppl_number(rec.get("word_perplexity")),
             "bits/B": "-" if rec.get("bits_per_byte") is None else f"{rec['bits_per_byte']:.4f}",
             "params": f"{rec['params_after']:,}", "tok/s": f"{rec['tokens_per_s']:,.0f}"}
    widths = {k: len(k) if k == "data" else max(len(k), len(v)) for k, v in cells.items()}
    widths["data"] = min(len(data), DATA_MIN)

    def need(keys: list[str]) -> int:  # each column: its width + one space either side + one rule
        return sum(widths[k] for k in keys) + 3 * len(keys) + 1

    keys = list(cells)
    title = f"perplexity: {model}"
    moved: list[str] = []
    if need(keys) > width:
        keys.remove("data")
        title += f" on {data}"
    for drop in ("tok/s", "params"):
        if need(keys) > width:
            keys.remove(drop)
            moved.append(f"{drop} {cells[drop]}")
    table = Table(title=title)
    for k in keys:
        if k == "data":
            table.add_column(k, overflow="fold", min_width=widths[k])
        else:
            table.add_column(k, no_wrap=True, justify="right", min_width=widths[k])
    table.add_row(*(cells[k] for k in keys))
    caption = []
    if "n_windows" in rec:  # why "scored" is below --max-tokens: a window's first token has no context
        caption.append(f"{rec['n_windows']:,} windows × {rec['protocol']['seq_len']:,} tokens; "
                       f"{rec['n_tokens']:,} scored (each window's first token is context only)")
    caption += moved
    caption.append("tok/s: model forward only")
    table.caption = "; ".join(caption)
    return table

