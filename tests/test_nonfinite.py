"""NaN/Inf weights, statistics and fitted tensors (finding 9): one check in the fitting loop stops
every method with a message naming the group and module; nothing is written; --json keeps stdout
clean."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import offcomp
from offcomp.cli import app
from offcomp.errors import EXIT_USER, OffcompError
from offcomp.registry import get_method

from .conftest import save_model_dir, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
BAD = "model.layers.1.self_attn.q_proj"


def poisoned(value: float):
    model = tiny_llama(layers=2)
    with torch.no_grad():
        model.get_submodule(BAD).weight[3, 5] = value
    return model


@pytest.mark.parametrize("method", ["svd", "kronecker", "tucker", "prune", "ae", "prune-structured"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_stops_every_method(method, value):
    model = poisoned(value)
    modules = ["mlp.gate", "mlp.up", "mlp.down"] if method == "prune-structured" else ["attn.q"]
    if method == "prune-structured":
        with torch.no_grad():
            model.get_submodule("model.layers.1.mlp.up_proj").weight[0, 0] = value
    options = {"epochs": 1} if method == "ae" else {}
    plan = offcomp.parse_plan({"groups": [{"name": "g", "modules": modules, "method": method, "ratio": 0.5,
                                           "joint": method == "prune-structured", "options": options}]})
    with pytest.raises(OffcompError, match=r"group 'g': the weight of model\.layers\.1\.\S+ has 1 non-finite"):
        offcomp.compress_(model, plan)


def test_non_finite_statistic_is_refused():
    model = tiny_llama(layers=2)
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
    stats = {n: {"xtx": torch.eye(64, dtype=torch.float64)} for n in names}
    stats[names[1]]["xtx"][2, 2] = float("nan")
    plan = offcomp.parse_plan({"groups": [{"name": "up", "modules": ["mlp.up"], "method": "svd-llm", "rank": 4}]})
    with pytest.raises(OffcompError, match=r"group 'up': calibration statistic 'xtx' of model\.layers\.1\.mlp"):
        offcomp.compress_(model, plan, stats=stats)


def test_non_finite_fitted_tensor_is_refused(monkeypatch):
    method = get_method("svd")
    real = type(method).fit

    def broken_fit(self, unit, cfg, hyper, originals, ctx):
        layers = real(self, unit, cfg, hyper, originals, ctx)
        with torch.no_grad():
            layers[0].U[0, 0] = float("nan")
        return layers

    monkeypatch.setattr(type(method), "fit", broken_fit)
    plan = offcomp.parse_plan({"groups": [{"name": "q", "modules": ["attn.q"], "rank": 4}]})
    with pytest.raises(OffcompError, match=r"group 'q': 'svd' fitted 1 non-finite values in U of model\.layers\.0"):
        offcomp.compress_(tiny_llama(layers=2), plan)


@pytest.mark.parametrize("method", ["svd", "prune"])
def test_cli_non_finite_checkpoint_is_one_line_and_writes_nothing(method, tmp_path, bert_tokenizer):
    model = tiny_llama(vocab_size=len(bert_tokenizer), layers=2)
    with torch.no_grad():
        model.get_submodule(BAD).weight[0, 0] = float("nan")
    src = save_model_dir(model, bert_tokenizer, tmp_path / "nan-model")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["compress", "--model", str(src), "--method", method, "--ratio", "0.5",
                                   "--modules", "attn.q", "--out", str(out), "--json"])
    assert res.exit_code == EXIT_USER, res.output
    assert res.stdout == "" and BAD in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
