"""Paste `offcomp report DIR --format md` into README.md wherever it says `<!-- report:DIR -->`.

Each marker is followed by the generated tables (headings one level down, under the README's own
`###` sections) and closed by `<!-- /report -->`; a re-run replaces what is between them, so the
README's results tables are always the report of the committed records, never typed.

    .venv/bin/python docs/readme_tables.py            # from the repository root
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# `<!-- report:DIR -->`, or with report options: `<!-- report:DIR --metric f1 -->`
MARKER = re.compile(r"<!-- report:(\S+)((?: --\S+ \S+)*) -->\n(?:(?:(?!<!-- report:).)*?<!-- /report -->\n)?", re.S)


def report_md(root: str, options: tuple[str, ...] = ()) -> str:
    """`offcomp report ROOT --format md [OPTIONS]`, run by this interpreter, headings one level down."""
    out = subprocess.run([sys.executable, "-m", "offcomp.cli", "report", root, "--format", "md", *options],
                         capture_output=True, text=True, check=True).stdout
    return re.sub(r"^### ", "#### ", out.strip(), flags=re.M)


def fill(text: str) -> str:
    def table(m: re.Match) -> str:
        opts = tuple(m.group(2).split())
        body = report_md(m.group(1), opts) if opts else report_md(m.group(1))
        return f"<!-- report:{m.group(1)}{m.group(2)} -->\n{body}\n<!-- /report -->\n"

    return MARKER.sub(table, text)


def main() -> None:
    readme = Path("README.md")
    readme.write_text(fill(readme.read_text()))


if __name__ == "__main__":
    main()
