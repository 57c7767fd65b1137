"""`offcomp report --plot DIR`: one PNG per comparison table, metric against the kept fraction
of the model's parameters, one line per method, the dense baseline as a horizontal line.

matplotlib's object API on the Agg canvas: no display, no pyplot global state, no backend switch."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from .errors import OffcompError
from .report import ReportTable, fmt_cell


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80] or "table"


def plot_table(table: ReportTable, path: Path) -> bool:
    """Write `table`'s figure to `path`; False (nothing written) when it has no number to plot."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OffcompError("--plot needs matplotlib: pip install matplotlib") from None
    points: dict[str, list[tuple[float, float]]] = {}
    dense = None
    for r in table.rows:
        v, x = r.get("value"), r.get("kept_model")
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        if not r["compressed"]:
            dense = v if dense is None else dense
        elif isinstance(x, int | float):
            points.setdefault(str(r["method"]), []).append((float(x), float(v)))
    if not points and dense is None:
        return False
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, pts in sorted(points.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense ({fmt_cell(float(dense))})")
    values = [v for pts in points.values() for _, v in pts] + ([dense] if dense is not None else [])
    if table.lower_is_better and min(values) > 0:  # perplexities span decades
        ax.set_yscale("log")
    ax.set_xlabel("kept fraction of the model's parameters")
    ax.set_ylabel(table.metric + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title("\n".join(textwrap.wrap(table.title, 70)), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return True


def plot_tables(tables: list[ReportTable], out_dir: str | Path) -> list[Path]:
    """One PNG per table with numbers, named after its title; returns the paths written."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    for i, t in enumerate(tables, 1):
        if t.metric == "-":
            continue
        path = out_dir / f"{i:02d}-{_slug(t.title)}.png"
        if plot_table(t, path):
            written.append(path)
    return written
