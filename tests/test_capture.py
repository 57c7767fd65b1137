"""Capture: Gram/Fisher statistics against manual computations on tiny Llama and Bert, the cache
key, the test-split refusal, block shards, the chunked LM loss and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from offcomp import capture as cap
from offcomp.capture import (
    CaptureSpec,
    calibration_batches,
    check_stats_model,
    collect_stats,
    load_stats,
    loss_backward,
    run_capture,
    select_inputs,
)
from offcomp.cli import app
from offcomp.errors import OffcompError

from .conftest import save_model_dir, tiny_bert, tiny_llama


def manual_inputs(model, names, batches):
    """Every module's input rows (float64) from plain forward hooks, for comparison."""
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def manual_fisher_rows(model, names, batches):
    rows = {n: 0 for n in names}
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        for n in names:
            rows[n] = rows[n] + model.get_submodule(n).weight.grad.double().pow(2).sum(1)
    model.zero_grad()
    return rows


def check_against_manual(model, batches):
    input_of = select_inputs(model)
    stats = collect_stats(model, batches, input_of).by_module()
    X = manual_inputs(model, list(input_of), batches)
    fisher = manual_fisher_rows(model, list(input_of), batches)
    for n, x in X.items():
        torch.testing.assert_close(stats[n]["xtx"], x.T @ x, rtol=1e-5, atol=1e-4)  # fp32 products per batch
        torch.testing.assert_close(stats[n]["act_sq"], (x * x).sum(0), rtol=1e-5, atol=1e-6)  # diag of the Gram
        torch.testing.assert_close(stats[n]["abs_mean"], x.abs().mean(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stats[n]["fisher_row"], fisher[n], rtol=1e-4, atol=1e-12)
        assert stats[n]["fisher_row"].abs().sum() > 0
    return stats, input_of


def test_llama_gram_and_fisher_match_manual():
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]} for i in range(3)]
    stats, input_of = check_against_manual(model, batches)
    q, k, v = (f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
    assert stats[q]["xtx"] is stats[k]["xtx"] is stats[v]["xtx"]  # one copy per shared input
    gate, up, down = (f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down"))
    assert stats[gate]["xtx"] is stats[up]["xtx"] and stats[down]["xtx"] is not stats[up]["xtx"]
    assert input_of[v] == q and input_of[down] == down
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # left as found
    assert all(p.requires_grad for p in model.parameters())


def test_bert_masked_loss_gram_and_fisher_match_manual(bert_tokenizer):
    model = tiny_bert(vocab_size=len(bert_tokenizer))
    text = " ".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(40))
    batches = calibration_batches(bert_tokenizer, text, CaptureSpec(samples=2, seq_len=32, seed=3), "masked")
    b = batches[0]
    assert b["input_ids"][0, 0] == bert_tokenizer.cls_token_id and b["input_ids"][0, -1] == bert_tokenizer.sep_token_id
    assert (b["labels"] != -100).any() and (b["labels"][:, [0, -1]] == -100).all()
    assert (b["input_ids"] == bert_tokenizer.mask_token_id).any()
    check_against_manual(model, batches)


def test_chunked_causal_loss_equals_model_loss():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 30))
    labels = ids.clone()
    labels[0, 7] = -100
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    g = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    loss = loss_backward(model, {"input_ids": ids, "labels": labels}, chunk=7)
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad, g, rtol=1e-4, atol=1e-7)


def test_calibration_windows_are_seeded_and_refuse_short_text():
    ids = torch.arange(1000)
    a = cap.calibration_windows(ids, 5, 16, seed=1)
    assert a.shape == (5, 16) and torch.equal(a, cap.calibration_windows(ids, 5, 16, seed=1))
    assert not torch.equal(a, cap.calibration_windows(ids, 5, 16, seed=2))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows
    with pytest.raises(OffcompError, match="fewer than"):
        cap.calibration_windows(torch.arange(10), 1, 16, seed=0)


@pytest.fixture
def model_dirs(tmp_path_factory, bert_tokenizer):
    root = tmp_path_factory.mktemp("models")
    out = []
    for seed in (0, 1):
        d = root / f"llama{seed}"
        save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer), seed=seed), bert_tokenizer, d)
        out.append(d)
    return out


def _small(**kw):
    return CaptureSpec(**{"samples": 2, "seq_len": 32, **kw})


def test_cache_key_reuse_and_invalidation(tmp_path, model_dirs, monkeypatch):
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(f"line {i} of some calibration text about cats and dogs" for i in range(200)))
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"row {i} with different words entirely, say apples" for i in range(200)))
    root = tmp_path / "caps"
    first = run_capture(str(model_dirs[0]), str(data), spec=_small(), root=root)
    assert not first.reused and (first.path / "stats.safetensors").is_file()

    calls = []
    real = cap.collect_stats
    monkeypatch.setattr(cap, "collect_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_capture(str(model_dirs[0]), str(data), spec=_small(), root=root)
    assert again.reused and again.path == first.path and not calls  # same key: nothing recomputed

    variants = [
        run_capture(str(model_dirs[1]), str(data), spec=_small(), root=root),  # other weights
        run_capture(str(model_dirs[0]), str(other), spec=_small(), root=root),  # other data
        run_capture(str(model_dirs[0]), str(data), spec=_small(seed=1), root=root),
        run_capture(str(model_dirs[0]), str(data), spec=_small(samples=3), root=root),
        run_capture(str(model_dirs[0]), str(data), spec=_small(fisher_full=True), root=root),
    ]
    assert len(calls) == len(variants) and not any(v.reused for v in variants)
    assert len({first.path, *(v.path for v in variants)}) == 1 + len(variants)
    keys = {first.meta["key"], *(v.meta["key"] for v in variants)}
    assert len(keys) == 1 + len(variants)
    assert not list(root.glob(".*tmp*"))  # atomic: no temporary directory left behind
    subset = run_capture(str(model_dirs[0]), str(data), spec=_small(fisher=False), root=root)
    assert subset.reused and len(calls) == len(variants)  # a superset serves (Gram + Fisher holds Gram)
    assert subset.path in (first.path, variants[-1].path)

    stats = load_stats(first.path)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert stats[q]["xtx"] is stats[k]["xtx"] and stats[q]["fisher_row"] is not stats[k]["fisher_row"]
    assert set(stats[q]) == {"xtx", "act_sq", "abs_mean", "fisher_row"}
    assert load_stats(variants[-1].path)[q]["fisher"].shape == (64, 64) and "fisher" not in stats[q]
    check_stats_model(stats, first.meta["key_material"]["model_sha256"])
    with pytest.raises(OffcompError, match="another model"):
        check_stats_model(stats, variants[0].meta["key_material"]["model_sha256"])


def test_test_split_is_refused(tmp_path, model_dirs):
    test_file = tmp_path / "wiki.test.raw"
    test_file.write_text("some text\n" * 100)
    with pytest.raises(OffcompError, match="test split"):
        run_capture(str(model_dirs[0]), str(test_file), spec=_small(), root=tmp_path / "c")
    with pytest.raises(OffcompError, match="refused"):
        run_capture(str(model_dirs[0]), "embedded", split="test", spec=_small(), root=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_block_shards_hold_block_inputs_and_outputs(tmp_path, model_dirs):
    res = run_capture(str(model_dirs[0]), "embedded", spec=_small(gram=False, fisher=False, blocks="1"),
                      root=tmp_path)
    shards = sorted((res.path / "blocks").glob("shard-*.safetensors"))
    assert len(shards) == 2 and res.meta["blocks"]["layers"] == [1]
    from offcomp.models import load_model

    model = load_model(str(model_dirs[0])).model
    layer = model.model.layers[1]
    with safe_open(str(shards[1]), "pt") as f:
        ids = f.get_tensor("input_ids")
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert set(got) == {"input_ids", *(f"layers.1.{s}" for s in ("attn.in", "attn.out", "mlp.in", "mlp.out"))}
    seen = {}
    hooks = [layer.self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("attn.out", o)),
             layer.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp.out", o)),
             layer.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp.in", a[0]))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for k in ("attn.out", "mlp.in", "mlp.out"):
        torch.testing.assert_close(got[f"layers.1.{k}"], seen[k], rtol=1e-5, atol=1e-6)
    assert got["layers.1.attn.in"].shape == (1, 32, 64)


def test_encoder_without_head_refuses_fisher(tmp_path, bert_tokenizer):
    d = tmp_path / "bert"
    save_model_dir(tiny_bert(vocab_size=len(bert_tokenizer), head="base"), bert_tokenizer, d)
    with pytest.raises(OffcompError, match="no-fisher"):
        run_capture(str(d), "embedded", spec=_small(), root=tmp_path / "c")
    res = run_capture(str(d), "embedded", spec=_small(fisher=False), root=tmp_path / "c")
    assert "xtx" in load_stats(res.path)["encoder.layer.0.attention.self.query"]


def test_cli_capture_and_errors(tmp_path, model_dirs):
    runner = CliRunner()
    args = ["capture", "-m", str(model_dirs[0]), "--data", "embedded", "--samples", "2", "--seq-len", "16",
            "--no-fisher", "--out", str(tmp_path), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["reused"] is False and rec["n_tokens"] == 32 and "fisher_row" not in rec["statistics"]
    r2 = runner.invoke(app, args)
    assert json.loads(r2.stdout.strip().splitlines()[-1])["reused"] is True
    bad = runner.invoke(app, ["capture", "-m", str(model_dirs[0]), "--data", "embedded", "--split", "test"])
    assert bad.exit_code == 2 and "refused" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["compress", "-m", str(model_dirs[0]), "--method", "svd", "--rank", "2",
                              "--stats", str(tmp_path), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 2 and "not a capture directory" in bad.output
