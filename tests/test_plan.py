"""Plan parsing, expansion and every validation error: one line, exit code 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import offcomp
from offcomp.cli import app
from offcomp.errors import OffcompError
from offcomp.plan import parse_layers
from offcomp.swap import module_table, role_table

from .conftest import tiny_bert, tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bert_tokenizer):
    # three layers, not conftest's two: test_cli_dry_run_writes_nothing counts 3 × 7 units
    d = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_llama(vocab_size=len(bert_tokenizer), layers=3).save_pretrained(d)
    bert_tokenizer.save_pretrained(d)
    return d


def test_parse_layers():
    assert parse_layers("all") is None
    assert set(parse_layers("0-3,8")) == {0, 1, 2, 3, 8}
    assert set(parse_layers([1, 5])) == {1, 5}
    for bad in ("3-1", "x", "1-"):
        with pytest.raises(ValueError):
            parse_layers(bad)


def test_roles_resolve_per_architecture():
    for model, q in ((tiny_llama(), "model.layers.1.self_attn.q_proj"), (tiny_bert(), "bert.encoder.layer.1.attention.self.query")):
        plan = offcomp.parse_plan({"groups": [{"modules": ["attn.q"], "layers": "1", "rank": 2}]})
        units = offcomp.plan_units(model, plan)
        assert [u.unit.names for u in units] == [[q]]


def test_expansion_order_and_exclude(llama):
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.up", "mlp.gate"], "joint": True, "exclude": ["re:.*\\.1\\..*"],
                                           "cr": 2}]})
    (u,) = offcomp.plan_units(llama, plan)
    assert u.unit.names == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"]


def test_module_table_roles(llama):
    table = {m.name: m for m in module_table(llama)}
    assert table["model.layers.1.mlp.down_proj"].role == "mlp.down_proj"  # the path inside the block
    assert role_table(llama)["mlp.down"] == "mlp.down_proj"  # the friendly alias selects it
    assert table["model.layers.1.mlp.down_proj"].layer == 1
    assert table["model.embed_tokens"].role == "embed" and table["model.embed_tokens"].kind == "embedding"
    assert "lm_head" in role_table(llama)


@pytest.mark.parametrize(
    "group, message",
    [
        ({"modules": ["mlp.nope"], "rank": 4}, "match nothing"),
        ({"modules": ["mlp.up"], "layers": "0-7", "rank": 4}, "beyond the model"),
        ({"modules": ["mlp.up", "mlp.down"], "joint": True, "rank": 4}, "needs one input size"),
        ({"modules": ["mlp.up"], "rank": 43}, "saves nothing"),
        ({"modules": ["mlp.up"], "cr": 5000}, "less than rank 1"),
        ({"modules": ["mlp.up"], "method": "nope", "rank": 4}, "unknown method"),
        ({"modules": ["mlp.up"], "options": {"bogus": 1}, "rank": 4}, "option bogus"),
    ],
)
def test_plan_errors_name_the_group(llama, group, message):
    plan = offcomp.parse_plan({"groups": [{"name": "g", **group}]})
    with pytest.raises(OffcompError, match=message) as e:
        offcomp.plan_units(llama, plan)
    assert "'g'" in str(e.value) or "unknown method" in str(e.value)


def test_overlapping_groups(llama):
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.up"], "rank": 2}, {"modules": ["re:.*up_proj"], "rank": 2}]})
    with pytest.raises(OffcompError, match="already in group"):
        offcomp.plan_units(llama, plan)


@pytest.mark.parametrize("raw, message", [
    ({"groups": [{"modules": ["mlp.up"]}]}, "exactly one of rank, ratio, cr"),
    ({"groups": [{"modules": ["mlp.up"], "rank": 2, "cr": 3}]}, "exactly one"),
    ({"groups": [{"modules": ["mlp.up"], "ratio": 1.5}]}, "ratio"),
    ({"groups": []}, "groups"),
    ({"groups": [{"modules": ["mlp.up"], "rank": 2, "typo": 1}]}, "typo"),
])
def test_schema_errors(raw, message):
    with pytest.raises(OffcompError, match=message):
        offcomp.parse_plan(raw)


def _run(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


@pytest.mark.parametrize("plan_text, message", [
    ("groups: [{modules: [mlp.nope], rank: 4}]", "match nothing"),
    ("groups: [{modules: [mlp.up], rank: 64}]", "saves nothing"),
    ("groups: [{modules: [mlp.up, mlp.down], joint: true, cr: 2}]", "split the group"),
    ("groups: [{modules: [mlp.up]}]", "exactly one of"),
    ("groups: [ {modules: [", "cannot parse plan"),
])
def test_cli_bad_plans_exit_2_one_line_nothing_written(tmp_path, llama_dir, plan_text, message):
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text)
    out = tmp_path / "out"
    code, output = _run(["compress", "--model", str(llama_dir), "--plan", str(plan), "--out", str(out)])
    assert code == 2, output
    assert message in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("args, message", [
    (["compress", "--model", "/nonexistent/model", "--method", "svd", "--rank", "2", "--out", "x"], "not found"),
    (["compress", "--plan", "/nonexistent.yaml", "--out", "x"], "plan file not found"),
    (["compress", "--method", "svd", "--out", "x"], "exactly one of rank"),
    (["eval-ppl", "/nonexistent/dir"], "not found"),
    (["export", "--dense", "/nonexistent", "y"], "not an offcomp checkpoint"),
    (["report", "/nonexistent"], "does not exist"),
])
def test_cli_bad_input_exit_2(tmp_path, llama_dir, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [str(llama_dir) if a == "LLAMA" else a for a in args]
    code, output = _run(args)
    assert code == 2, output
    assert message in output and "Traceback" not in output


def test_cli_dry_run_writes_nothing(tmp_path, llama_dir):
    code, output = _run(["compress", "--model", str(llama_dir), "--method", "svd", "--ratio", "0.5",
                         "--dry-run", "--json", "--out", str(tmp_path / "o")])
    assert code == 0, output
    result = json.loads(output.strip().splitlines()[-1])
    assert result["dry_run"] and len(result["units"]) == 3 * 7
    assert not (tmp_path / "o").exists()


def test_cli_ae_with_validation_early_stopping(tmp_path, llama_dir):
    text = tmp_path / "valid.txt"
    text.write_text("\n".join(f"validation sentence number {i} about plans and ranks." for i in range(200)))
    code, output = _run(["compress", "--model", str(llama_dir), "--method", "ae", "--cr", "2", "--modules", "mlp.up",
                         "--joint", "-o", "epochs=2", "-o", "validate_every=1", "--valid-data", str(text),
                         "--valid-tokens", "256", "--valid-seq-len", "64", "--out", str(tmp_path / "o"), "--json"])
    assert code == 0, output
    manifest = json.loads(output.strip().splitlines()[-1])
    assert manifest["validation"]["max_tokens"] == 256 and len(manifest["validation"]["sha256"]) == 64


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("sample_plans/*.*")), ids=lambda p: p.name)
def test_sample_plans_validate_on_both_architectures(path):
    """Every shipped plan parses and expands on a decoder and on an encoder (the FFN and attention
    roles exist in both), within its budget."""
    plan = offcomp.load_plan(path)
    if plan.allocate is not None:  # ranks come from measured sensitivity: check the plan at its mean budget
        plan = plan.model_copy(update={"allocate": None, "groups": [
            g.model_copy(update={"ratio": plan.allocate.ratio}) for g in plan.groups]})
    for model in (tiny_llama(layers=2), tiny_bert(layers=2)):
        stats = {n: {"xtx": torch.eye(m.in_features, dtype=torch.float64), "act_sq": torch.ones(m.in_features),
                     "abs_mean": torch.ones(m.in_features), "fisher_row": torch.ones(m.out_features)}
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        planned = offcomp.plan_units(model, plan, stats)
        assert planned and all(p.stored_params < p.unit.original_params for p in planned)
