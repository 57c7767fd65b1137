"""Rank allocation under a plan-wide budget: greedy is optimal for the estimated error (checked by
brute force), the budget holds exactly, sensitive units get more rank than robust ones, fixed
groups keep their budgets, plan validation, and the CLI path (on-the-fly capture + manifest)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

import offcomp
from offcomp.allocate import allocate_plan, stat_keys
from offcomp.cli import app
from offcomp.errors import OffcompError
from offcomp.plan import parse_plan

from .conftest import save_model_dir, tiny_llama


def set_weight(model, name, w):
    model.get_submodule(name).weight.data.copy_(w)


def low_rank_plus_noise(n, m, r, noise, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, m, generator=g) + noise * torch.randn(n, m, generator=g)


def plan(ratio=0.5, criterion="weight", modules=("mlp.up", "mlp.down"), extra=()):
    groups = [{"modules": list(modules), "method": "svd"}, *extra]
    return parse_plan({"allocate": {"ratio": ratio, "criterion": criterion}, "groups": groups})


def test_greedy_is_optimal_and_budget_exact():
    model = tiny_llama(layers=1)
    for i, name in enumerate(["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]):
        w = model.get_submodule(name).weight
        set_weight(model, name, low_rank_plus_noise(*w.shape, r=2 + 10 * i, noise=1e-3, seed=i))
    res = allocate_plan(model, plan(ratio=0.16))  # 13 ranks of 192 parameters for the two matrices
    rec = res.record
    assert rec["allocated_params"] <= rec["budget_params"] == int(0.16 * rec["original_params"])
    units = rec["units"]
    energies = []
    for u in units:
        W = torch.cat([model.get_submodule(n).weight.detach().double() for n in u["names"]])
        s2 = torch.linalg.svdvals(W).square()
        energies.append(s2 / s2.sum())
    dense = 8192  # each matrix's own parameters: staying dense is the last option of every unit

    def error(e, r):
        return 0.0 if r == "dense" else float(e[r:].sum())

    def cost(u, r):
        return dense if r == "dense" else r * u["per_rank"]

    best = min(
        (sum(error(e, r) for e, r in zip(energies, ranks)), ranks)
        for ranks in itertools.product(*([*range(1, u["max_rank"] + 1), "dense"] for u in units))
        if sum(cost(u, r) for r, u in zip(ranks, units)) <= rec["budget_params"]
    )
    assert rec["estimated_error"] == pytest.approx(best[0], rel=1e-9, abs=1e-12)
    assert rec["estimated_error"] <= rec["estimated_error_uniform"] + 1e-12
    # the near-rank-2 matrix gets its 2 ranks, the near-rank-12 one the rest (uniform: 6 and 6)
    assert [u["rank"] for u in units] == [2, 11] and [u["uniform_rank"] for u in units] == [6, 6]


def test_concrete_plan_compresses_to_the_global_budget():
    model = tiny_llama()
    res = allocate_plan(model, plan(ratio=0.4, modules=("attn.q", "attn.o", "mlp.up", "mlp.down")))
    units = res.record["units"]
    ranks = {u["names"][0]: u["rank"] for u in units if not u["dense"]}
    assert len(set(ranks.values())) > 1  # not uniform
    report = offcomp.compress_(model, res.plan)
    assert {u.names[0]: u.hyper["rank"] for u in report.units} == ranks  # dense units are not compressed
    kept_dense = sum(u["per_rank"] * (u["max_rank"] + 1) for u in units if u["dense"])  # an upper bound
    stored = sum(u.stored_params for u in report.units)
    assert stored <= res.record["allocated_params"] <= stored + kept_dense
    assert res.record["allocated_params"] <= 0.4 * res.record["original_params"]
    assert all(u.budget == {"kind": "rank", "value": ranks[u.names[0]]} for u in report.units)


def test_fixed_groups_keep_their_budget_and_count_against_the_total():
    model = tiny_llama()
    fixed = {"modules": ["attn.o"], "method": "svd", "rank": 3}
    res = allocate_plan(model, plan(ratio=0.5, extra=[fixed]))
    rec = res.record
    assert rec["fixed_stored_params"] == 2 * 3 * (64 + 64)
    assert rec["budget_params"] == int(0.5 * rec["original_params"]) - rec["fixed_stored_params"]
    assert any(g.rank == 3 and g.modules == ["attn.o"] for g in res.plan.groups)


def test_joint_group_gets_one_rank():
    model = tiny_llama()
    p = parse_plan({"allocate": {"ratio": 0.5, "criterion": "weight"},
                    "groups": [{"modules": ["mlp.up"], "joint": True, "method": "svd"},
                               {"modules": ["mlp.down"], "method": "svd"}]})
    res = allocate_plan(model, p)
    joint = [g for g in res.plan.groups if g.joint]
    assert len(joint) == 1 and joint[0].rank == res.record["units"][0]["rank"]
    separate = [u for u in res.record["units"][1:] if not u["dense"]]
    assert len(res.plan.groups) == 1 + len(separate)  # joint unit + one group per separate compressed module


def test_a_unit_past_its_break_even_stays_dense():
    """Factors at the break-even rank store as much as the matrix and still lose its tail. A matrix
    with a flat spectrum (no low-rank structure, like a GQA key/value projection) is kept dense
    when its last ranks would cost more than not factoring it; before, it got max_rank factors."""
    model = tiny_llama(layers=1)
    up, down = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
    g = torch.Generator().manual_seed(0)
    set_weight(model, up, torch.linalg.qr(torch.randn(128, 64, generator=g))[0] * 3)  # flat: σ all equal
    set_weight(model, down, low_rank_plus_noise(64, 128, r=4, noise=1e-3, seed=1))
    res = allocate_plan(model, plan(ratio=0.6))
    by_name = {u["names"][0]: u for u in res.record["units"]}
    assert by_name[up]["dense"] and by_name[up]["rank"] is None and by_name[up]["est_error"] == 0
    assert not by_name[down]["dense"] and by_name[down]["rank"] >= 4
    assert res.record["dense_units"] == 1 and res.record["allocated_params"] <= res.record["budget_params"]
    report = offcomp.compress_(model, res.plan)
    assert [u.names[0] for u in report.units] == [down]
    assert isinstance(model.get_submodule(up), torch.nn.Linear)  # untouched


def test_whitened_and_fisher_criteria_need_statistics():
    from offcomp.capture import collect_stats, select_inputs

    model = tiny_llama()
    with pytest.raises(OffcompError, match="needs 'xtx'"):
        allocate_plan(model, plan(criterion="whitened"))
    ids = torch.randint(0, 128, (2, 16))
    stats = collect_stats(model, [{"input_ids": ids, "labels": ids}], select_inputs(model)).by_module()
    for crit in ("whitened", "fisher"):
        rec = allocate_plan(model, plan(criterion=crit), stats).record
        assert rec["criterion"] == crit and rec["allocated_params"] <= rec["budget_params"]
    assert stat_keys(plan(criterion="fisher")) == {"fisher_row"}
    assert stat_keys(parse_plan({"allocate": {"ratio": 0.5}, "groups": [{"modules": ["mlp.up"],
                                                                         "method": "asvd"}]})) == {"abs_mean", "xtx"}


def test_plan_validation():
    with pytest.raises(OffcompError, match="exactly one of rank, ratio, cr"):
        parse_plan({"groups": [{"modules": ["mlp.up"]}]})
    with pytest.raises(OffcompError, match="exactly one of"):
        parse_plan({"allocate": {"ratio": 0.5}, "groups": [{"modules": ["mlp.up"], "rank": 2, "ratio": 0.5}]})
    with pytest.raises(OffcompError, match="has no budget"):  # compress_ without allocation first
        offcomp.compress_(tiny_llama(), plan())
    with pytest.raises(OffcompError, match="no single rank"):
        allocate_plan(tiny_llama(), parse_plan({"allocate": {"ratio": 0.5},
                                                "groups": [{"modules": ["mlp.up"], "method": "prune"}]}))
    with pytest.raises(OffcompError, match="less than min_rank"):
        allocate_plan(tiny_llama(), plan(ratio=0.001))


def test_cli_allocate_with_on_the_fly_capture(tmp_path, bert_tokenizer, monkeypatch):
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "llama"
    save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer)), bert_tokenizer, d)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compress", "-m", str(d), "--method", "svd-llm", "--allocate", "0.5",
                                 "--calib-data", "embedded", "--calib-samples", "2", "--calib-seq-len", "32",
                                 "--out", str(out), "--json", "--pipeline", "global"])  # the capture is tested
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "offcomp.json").read_text())
    assert manifest["plan"]["allocate"]["ratio"] == 0.5
    alloc = manifest["allocation"]
    assert alloc["criterion"] == "whitened" and len({u["rank"] for u in alloc["units"]}) > 1
    assert manifest["calibration"]["n_tokens"] == 64 and manifest["calibration"]["spec"]["fisher"] is False
    rep = manifest["report"]
    assert rep["compressed_stored_params"] <= 0.5 * rep["compressed_original_params"]
    assert len(list((tmp_path / "cache" / "captures").iterdir())) == 1
    ids = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(offcomp.checkpoint.load_compressed(out).model(ids).logits).all()
    bad = CliRunner().invoke(app, ["compress", "-m", str(d), "--method", "svd-llm", "--allocate", "0.5",
                                   "--calib-data", "embedded", "--calib-split", "test", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "refused" in bad.output


def test_cli_says_how_many_matrices_the_allocation_kept_dense(llama_dir):
    res = CliRunner().invoke(app, ["compress", "-m", str(llama_dir), "--method", "svd", "--allocate", "0.5",
                                   "--allocate-criterion", "weight", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    dense = json.loads(res.stdout)["allocation"]["dense_units"]
    assert dense > 0  # random weights: flat spectra, cheaper to keep than to factor at the break-even rank
    res = CliRunner().invoke(app, ["compress", "-m", str(llama_dir), "--method", "svd", "--allocate", "0.5",
                                   "--allocate-criterion", "weight", "--dry-run"], env={"COLUMNS": "200"})
    assert f"allocation kept {dense} matrices dense" in res.stdout
