"""Malformed plan files (finding 7): every one is one line on stderr and exit code 2, fast."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

import offcomp
from offcomp.api import plan_units
from offcomp.cli import app
from offcomp.errors import EXIT_USER, OffcompError
from offcomp.plan import load_plan

from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

GROUP = "groups:\n  - modules: [mlp.up]\n    rank: 2\n"
BAD_PLANS = {
    "binary.yaml": b"\x00\x01\x02\xff\xfe" * 40,
    "latin1.yaml": "groups:\n  - modules: [mlp.up]  # caf\xe9\n    rank: 2\n".encode("latin-1"),
    "regex.yaml": b"groups:\n  - modules: ['re:(']\n    rank: 2\n",
    "regex-exclude.yaml": b"groups:\n  - modules: [mlp.up]\n    exclude: ['re:[a-']\n    rank: 2\n",
    "empty-layers.yaml": b"groups:\n  - modules: [mlp.up]\n    layers: []\n    rank: 2\n",
    "deep.yaml": b"groups: " + b"[" * 20000 + b"]" * 20000 + b"\n",
    "deep.json": b'{"groups": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "deep-mapping.yaml": b"groups:\n" + b"".join(b"  " * i + b"a:\n" for i in range(3000)) + b"  " * 3000 + b"b: 1\n",
    "huge-range.yaml": b"groups:\n  - modules: [mlp.up]\n    layers: '0-1000000000'\n    rank: 2\n",
    "huge-number.yaml": b"groups:\n  - modules: [mlp.up]\n    layers: '0-" + b"9" * 5000 + b"'\n    rank: 2\n",
    "aliases.yaml": b"a: &a [x, x]\nb: &b [*a, *a]\ngroups:\n  - modules: [mlp.up]\n    rank: 2\n",
    "empty.yaml": b"",
    "list.yaml": b"- 1\n- 2\n",
    "tabs.yaml": b"groups:\n\t- modules: [mlp.up]\n",
    "too-big.yaml": GROUP.encode() + b"#" * (2 << 20),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_bad_plan_file_is_one_line_exit_2(name, tmp_path, llama_dir):
    f = tmp_path / name
    f.write_bytes(BAD_PLANS[name])
    t = time.perf_counter()
    res = CliRunner().invoke(app, ["compress", "--model", str(llama_dir), "--plan", str(f), "--out",
                                   str(tmp_path / "out")])
    assert res.exit_code == EXIT_USER, (res.stderr, res.exception)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()
    assert time.perf_counter() - t < 30


def test_huge_layer_range_is_checked_without_expanding():
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "layers": "0-1000000000000", "rank": 2}]})
    t = time.perf_counter()
    with pytest.raises(OffcompError, match=r"beyond the model's 2 layers"):
        plan_units(tiny_llama(layers=2), plan)
    assert time.perf_counter() - t < 5


def test_layer_ranges_and_lists_still_select(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("groups:\n  - modules: [mlp.up]\n    layers: '1-1,0'\n    rank: 2\n"
                 "  - modules: [mlp.down]\n    layers: [1, 1]\n    rank: 2\n")
    units = plan_units(tiny_llama(layers=3), load_plan(f))
    assert [u.unit.names[0] for u in units] == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj",
                                                 "model.layers.1.mlp.down_proj"]
