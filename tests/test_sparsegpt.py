"""sparsegpt (OBS reconstruction) and N:M patterns of every pruning method."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import yaml
from typer.testing import CliRunner

import offcomp
from offcomp.api import plan_units
from offcomp.cli import app
from offcomp.errors import OffcompError
from offcomp.methods.sparsegpt import output_error, proportional, sparsegpt_prune
from offcomp.plan import Budget, parse_plan
from offcomp.registry import FitContext, FitUnit, get_method

from .conftest import save_model_dir, tiny_llama


def correlated_inputs(tokens: int, m: int, seed: int = 0) -> torch.Tensor:
    """Activations like a transformer's: a few shared directions plus noise, channel scales spread
    over two decades in no particular order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, m // 4, generator=g) @ torch.randn(m // 4, m, generator=g)
    x = x + 0.1 * torch.randn(tokens, m, generator=g)
    return x * torch.logspace(-1, 1, m)[torch.randperm(m, generator=g)]


def fit(method: str, mods: list[nn.Linear], budget: Budget, options: dict | None = None,
        stats: dict | None = None, joint: bool = False):
    m = get_method(method)
    cfg = m.parse_config(options or {}, "t")
    names = [f"m{i}" for i in range(len(mods))]
    unit = FitUnit("t", names, [tuple(x.weight.shape) for x in mods], ["linear"] * len(mods), joint, budget)
    hyper = m.solve(unit, cfg)
    return m.fit(unit, cfg, hyper, mods, FitContext(stats=stats)), hyper, m.stored_params(unit, cfg, hyper)


def one_linear(n: int, m: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(m, n, bias=True)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_reconstruction_beats_the_wanda_mask(pattern):
    lin = one_linear(48, 96)
    x = correlated_inputs(1024, 96)
    stats = {"m0": {"xtx": (x.T @ x).double()}}
    opts = {"pattern": pattern} if pattern else {}
    (sg,), _, _ = fit("sparsegpt", [lin], Budget("ratio", 0.5), {**opts, "block_size": 32}, stats)
    (wanda,), _, _ = fit("prune", [lin], Budget("ratio", 0.5), {**opts, "score": "wanda", "compare": "row"}, stats)
    with torch.no_grad():
        err = {k: (lin(x) - layer(x)).norm().item() for k, layer in (("sparsegpt", sg), ("wanda", wanda))}
        mask_only = (x @ (lin.weight * (1.0 - sg.mask.float())).T).norm().item()  # its mask, no reconstruction
    assert err["sparsegpt"] < 0.75 * err["wanda"], err
    assert err["sparsegpt"] < 0.6 * mask_only  # the reconstruction, not just the mask, does the work
    assert int(sg.mask.sum()) == int(wanda.mask.sum()) == 48 * 96 // 2
    assert torch.equal(sg.bias, lin.bias)


def test_no_pruning_returns_w_exactly():
    torch.manual_seed(1)
    W = torch.randn(20, 40)
    x = correlated_inputs(256, 40)
    x[:, 7] = 0  # a dead input must not change anything either
    W_hat, keep = sparsegpt_prune(W, x.T @ x, 0, block_size=16)
    assert keep.all() and torch.equal(W_hat, W.double())


def test_single_drop_is_the_exact_obs_optimum():
    """Dropping column 0 of one row: the Cholesky bookkeeping must give the least-squares optimum
    of the remaining weights, w_F + w_0 H_FF⁻¹ H_F0 (and the OBS error w_0²/[H⁻¹]_00)."""
    torch.manual_seed(2)
    m = 12
    x = correlated_inputs(200, m).double()
    H = x.T @ x
    w = torch.randn(1, m, dtype=torch.float64) * 10
    w[0, 0] = 1e-3  # the obvious entry to drop
    W_hat, keep = sparsegpt_prune(w, H, 1, damp=0.0, block_size=5)
    assert keep.tolist()[0] == [False] + [True] * (m - 1)
    optimum = w[0, 1:] + w[0, 0] * torch.linalg.solve(H[1:, 1:], H[1:, 0])
    torch.testing.assert_close(W_hat[0, 1:], optimum, rtol=1e-8, atol=1e-12)
    d = w - W_hat
    torch.testing.assert_close((d @ H @ d.T).item(), (w[0, 0] ** 2 / torch.linalg.inv(H)[0, 0]).item(), rtol=1e-8,
                               atol=0)


def test_exact_counts_with_uneven_blocks_and_joint_units():
    mods = [one_linear(10, 37, seed=0), one_linear(7, 37, seed=1)]
    x = correlated_inputs(300, 37)
    xtx = (x.T @ x).double()
    stats = {"m0": {"xtx": xtx}, "m1": {"xtx": xtx}}
    for ratio in (0.13, 0.5, 0.77):
        layers, hyper, stored = fit("sparsegpt", mods, Budget("ratio", ratio), {"block_size": 8}, stats, joint=True)
        assert stored == hyper["keep"] == int(17 * 37 * ratio) == sum(int(la.mask.sum()) for la in layers)
        assert [int(la.mask.sum()) for la in layers] == [t - a for t, a in zip((370, 259), proportional([370, 259], 629 - stored))]
        assert all((la.weight[~la.mask] == 0).all() for la in layers)
    assert proportional([3, 3, 1], 5) == [2, 2, 1] and sum(proportional([5, 7, 11], 13)) == 13


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
@pytest.mark.parametrize("method,options", [("sparsegpt", {"block_size": 12}), ("prune", {}),
                                            ("prune", {"score": "wanda"})])
def test_nm_masks_have_exactly_n_zeros_in_every_group(pattern, method, options):
    n, m = map(int, pattern.split(":"))
    lin = one_linear(9, 48)
    x = correlated_inputs(200, 48)
    stats = {"m0": {"xtx": (x.T @ x).double()}}
    (layer,), hyper, stored = fit(method, [lin], Budget("ratio", (m - n) / m), {**options, "pattern": pattern}, stats)
    zeros = (~layer.mask).reshape(9, 48 // m, m).sum(-1)
    assert (zeros == n).all()
    assert stored == hyper["keep"] == int(layer.mask.sum()) == 9 * 48 * (m - n) // m
    assert (layer.to_dense()[~layer.mask] == 0).all()


def test_nm_pattern_picks_the_lowest_scores():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -3.0, 2.0, 0.2]]))
    (layer,), _, _ = fit("prune", [lin], Budget("cr", 2), {"pattern": "2:4"})
    assert layer.mask.tolist() == [[False, True, True, False]]


def test_pattern_and_budget_errors(llama):
    lin = one_linear(4, 6)
    with pytest.raises(OffcompError, match="multiples of 4"):
        fit("prune", [lin], Budget("ratio", 0.5), {"pattern": "2:4"})
    with pytest.raises(OffcompError, match="keeps exactly 2/4.*ratio: 0.5"):
        fit("prune", [one_linear(4, 8)], Budget("ratio", 0.4), {"pattern": "2:4"})
    with pytest.raises(OffcompError, match="rank means nothing"):
        fit("sparsegpt", [lin], Budget("rank", 2))
    with pytest.raises(OffcompError, match="saves nothing"):
        fit("sparsegpt", [lin], Budget("ratio", 1.0))
    for bad in ("4:4", "0:4", "2-4", "a:b"):
        with pytest.raises(OffcompError, match="N:M"):
            get_method("sparsegpt").parse_config({"pattern": bad}, "t")
    unquoted = yaml.safe_load("pattern: 2:4")  # YAML 1.1 reads this as 124
    with pytest.raises(OffcompError, match="quoted"):
        get_method("prune").parse_config(unquoted, "t")
    p = parse_plan({"groups": [{"modules": ["mlp.down"], "method": "sparsegpt", "ratio": 0.5}]})
    with pytest.raises(OffcompError, match="calibration statistics"):
        plan_units(llama, p)
    with pytest.raises(OffcompError, match="cannot compress"):
        plan_units(llama, parse_plan({"groups": [{"modules": ["embed"], "method": "sparsegpt", "ratio": 0.5}]}))


def test_pattern_survives_cr_budgets_and_fractions():
    (layer,), hyper, _ = fit("prune", [one_linear(3, 9)], Budget("cr", 1.5), {"pattern": "1:3"})
    assert hyper["keep"] == 18 and int(layer.mask.sum()) == 18


def test_calibration_error_is_reported_and_dense_inputs_fail_cleanly():
    lin = one_linear(8, 16)
    x = correlated_inputs(64, 16).double()
    H = x.T @ x
    W_hat, _ = sparsegpt_prune(lin.weight, H, 64)
    e = output_error(lin.weight, W_hat, H)
    with torch.no_grad():
        direct = ((lin.weight.double() - W_hat) @ x.T).norm() / (lin.weight.double() @ x.T).norm()
    assert 0 < e < 1 and abs(e - direct.item()) < 1e-9
    with pytest.raises(OffcompError, match="inf/NaN"):
        sparsegpt_prune(lin.weight, torch.full((16, 16), float("nan")), 8)
    with pytest.raises(OffcompError, match="shape"):
        fit("sparsegpt", [lin], Budget("ratio", 0.5), stats={"m0": {"xtx": torch.eye(8)}})


def test_compress_with_calibration_then_save_and_load(tmp_path, bert_tokenizer, monkeypatch):
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    d = save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer)), bert_tokenizer, tmp_path / "llama")
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line {i}: the cat sat on the mat while the dog ran after {i % 7} birds"
                              for i in range(300)))
    outs = {}
    for tag, extra in (("unstructured", []), ("nm", ["-o", "pattern=2:4"])):
        out = tmp_path / tag
        r = CliRunner().invoke(app, ["compress", "-m", str(d), "--method", "sparsegpt", "--ratio", "0.5",
                                     "--calib-data", str(text), "--calib-samples", "4", "--calib-seq-len", "32",
                                     *extra, "--out", str(out), "--json", "--pipeline", "global"])
        assert r.exit_code == 0, r.output
        man = json.loads((out / "offcomp.json").read_text())
        rep = man["report"]
        assert rep["compressed_stored_params"] == rep["compressed_original_params"] // 2
        assert man["calibration"]["n_tokens"] == 128
        assert all(u["method"] == "sparsegpt" and u["hyper"]["index_bytes"] > 0 for u in rep["units"])
        outs[tag] = out
    loaded = offcomp.checkpoint.load_compressed(outs["nm"]).model
    down = loaded.get_submodule("model.layers.1.mlp.down_proj")
    assert ((~down.mask).reshape(down.out_features, -1, 4).sum(-1) == 2).all()
    # the same compression in memory gives the same logits as the checkpoint
    model = offcomp.models.load_model(str(d)).model
    from offcomp.capture import load_stats

    stats = load_stats(next((tmp_path / "cache" / "captures").iterdir()))
    plan = parse_plan(json.loads((outs["nm"] / "offcomp.json").read_text())["plan"])
    offcomp.compress_(model, plan, stats=stats)
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # the evaluation record and `offcomp report` carry the compression time and the bytes on disk
    ev = CliRunner().invoke(app, ["eval-ppl", str(outs["nm"]), "--data", str(text), "--split", "validation",
                                  "--seq-len", "32", "--max-tokens", "64", "--json"])
    assert ev.exit_code == 0, ev.output
    rep = CliRunner().invoke(app, ["report", str(outs["nm"]), "--format", "json"])
    ((row,),) = [t["rows"] for t in json.loads(rep.stdout)]
    assert row["bytes"] == (outs["nm"] / "model.safetensors").stat().st_size > 0
    man = json.loads((outs["nm"] / "offcomp.json").read_text())
    assert row["compress_s"] == round(man["report"]["seconds"], 1) and row["metric"] == "ppl"
