"""Modular training: compressed blocks trained in isolation towards the dense blocks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import offcomp
from offcomp.cli import app
from offcomp.layers import CompressedModule, LowRankLinear
from offcomp.modular import _layer_list, block_paths, modular_train, teacher_copy
from offcomp.plan import ModularConfig
from offcomp.swap import discover

from .conftest import save_model_dir, tiny_bert, tiny_llama

ALL = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]


pytestmark = pytest.mark.usefixtures("one_thread")


def windows(n: int, seed: int, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def output_error(teacher, student, ids) -> float:
    with torch.no_grad():
        a, b = teacher(input_ids=ids), student(input_ids=ids)
    a = a.logits if hasattr(a, "logits") else a.last_hidden_state
    b = b.logits if hasattr(b, "logits") else b.last_hidden_state
    return float((a - b).pow(2).mean())


def compressed(model, joint: bool = False, modules=ALL):
    teacher = teacher_copy(model)
    groups = ([{"modules": [m], "joint": True, "ratio": 0.4} for m in modules] if joint
              else [{"modules": modules, "ratio": 0.4}])
    offcomp.compress_(model, offcomp.parse_plan({"groups": groups}))
    return teacher, model


def test_blocks_are_the_attention_and_ffn_modules_or_the_whole_layer():
    llama, bert = tiny_llama(), tiny_bert(head="base")
    assert block_paths(_layer_list(llama)[0], discover(llama).aliases) == ["self_attn", "mlp"]
    assert block_paths(_layer_list(bert)[0], discover(bert).aliases) == [""]  # BERT's FFN is not a module


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_bert(head="base")], ids=["llama", "bert"])
def test_blocks_move_towards_the_dense_model_and_nothing_else_changes(make):
    teacher, student = compressed(make())
    comp = tuple(n + "." for n, m in student.named_modules() if isinstance(m, CompressedModule))
    frozen = {k: v.clone() for k, v in student.state_dict().items() if not k.startswith(comp)}
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    test = windows(4, seed=99)
    err0 = output_error(teacher, student, test)
    rec = modular_train(teacher, student, windows(16, seed=1), ModularConfig(epochs=4, lr=1e-3, mode="blocks"))
    assert rec["blocks"] and all(b["nmse_after"] <= b["nmse_before"] for b in rec["blocks"])
    assert sum(b["nmse_after"] < 0.9 * b["nmse_before"] for b in rec["blocks"]) >= len(rec["blocks"]) // 2
    assert output_error(teacher, student, test) < 0.8 * err0  # on windows it never saw
    after = student.state_dict()
    assert frozen and all(torch.equal(v, after[k]) for k, v in frozen.items())  # only compressed modules train
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_teacher.items())


def test_factors_shared_across_layers_stay_frozen():
    teacher, student = compressed(tiny_llama(), joint=True, modules=["mlp.up", "attn.q"])
    ups = [m for n, m in student.named_modules() if n.endswith("mlp.up_proj")]
    assert isinstance(ups[0], LowRankLinear) and ups[0].V is ups[1].V
    V, U0 = ups[0].V.detach().clone(), ups[0].U.detach().clone()
    rec = modular_train(teacher, student, windows(8, seed=2), ModularConfig(epochs=2, lr=1e-3, mode="blocks"))
    assert rec["frozen_shared_tensors"] == 2  # one V per joint group
    assert torch.equal(ups[0].V, V) and not torch.equal(ups[0].U, U0)


def test_compress_with_modular_plan_from_the_cli(tmp_path, bert_tokenizer, monkeypatch):
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "llama"
    save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer)), bert_tokenizer, d)
    out = tmp_path / "out"
    args = ["compress", "-m", str(d), "--method", "svd", "--ratio", "0.5", "--modular-epochs", "2",
            "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out), "--json"]
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 2 and "--calib-data" in bad.output and not out.exists()
    r = CliRunner().invoke(app, [*args, "--calib-data", "embedded"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "offcomp.json").read_text())
    mod = manifest["modular"]
    assert mod["windows"] == [4, 32] and mod["config"]["epochs"] == 2 and mod["config"]["mode"] == "sequential"
    assert [b["block"] for b in mod["blocks"]] == ["layers.0", "layers.1"]  # sequential: one unit per layer
    assert mod["data"]["split"] == "validation" and "calibration" not in manifest  # svd needs no statistics
    assert not (tmp_path / "cache" / "captures").exists()
    assert all(b["nmse_after"] <= b["nmse_before"] for b in mod["blocks"])
    # the trained factors are what is saved: plain SVD of the same plan gives other factors
    plain = tmp_path / "plain"
    assert CliRunner().invoke(app, [*args[:7], "--out", str(plain)]).exit_code == 0
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        a = offcomp.checkpoint.load_compressed(out).model(ids).logits
        b = offcomp.checkpoint.load_compressed(plain).model(ids).logits
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_encoder_modular_from_the_cli_checks_the_window_length(tmp_path, bert_tokenizer, monkeypatch):
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    d = save_model_dir(tiny_bert(vocab_size=len(bert_tokenizer), head="base"), bert_tokenizer, tmp_path / "bert")
    base = ["compress", "-m", str(d), "--method", "svd", "--ratio", "0.5", "--modular-epochs", "1",
            "--calib-data", "embedded", "--calib-samples", "4"]
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "x")])  # default 1024 > 128 positions
    assert bad.exit_code == 2 and "positions" in bad.output and not (tmp_path / "x").exists()
    ok = CliRunner().invoke(app, [*base, "--calib-seq-len", "64", "--out", str(tmp_path / "y")])
    assert ok.exit_code == 0, ok.output
    blocks = json.loads((tmp_path / "y" / "offcomp.json").read_text())["modular"]["blocks"]
    assert [b["block"] for b in blocks] == ["layers.0", "layers.1"]


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_bert(head="base")], ids=["llama", "bert"])
def test_sequential_mode_trains_layers_on_the_compressed_stream(make):
    teacher, student = compressed(make())
    test = windows(4, seed=99)
    err0 = output_error(teacher, student, test)
    layers = _layer_list(student)
    rec = modular_train(teacher, student, windows(16, seed=1), ModularConfig(epochs=4, lr=1e-3, mode="sequential"))
    assert [b["block"] for b in rec["blocks"]] == [f"layers.{i}" for i in range(len(layers))]  # one unit per layer
    assert all(b["nmse_after"] <= b["nmse_before"] for b in rec["blocks"])
    assert output_error(teacher, student, test) < 0.8 * err0


def test_sequential_mode_corrects_drift_that_blocks_mode_cannot():
    """Blocks trained on the dense model's inputs never see the errors of the layers before them;
    layers trained on the compressed stream learn to undo them, so the whole model ends closer."""
    base = tiny_llama()
    results = {}
    for mode in ("blocks", "sequential"):
        model = copy.deepcopy(base)
        teacher = teacher_copy(model)
        offcomp.compress_(model, offcomp.parse_plan({"groups": [{"modules": ALL, "ratio": 0.3}]}))
        rec = modular_train(teacher, model, windows(16, seed=1),
                            ModularConfig(epochs=4, lr=1e-3, mode=mode, mixup=0.0))
        results[mode] = (output_error(teacher, model, windows(4, seed=99)), rec)
    assert results["sequential"][0] < results["blocks"][0]


def test_modular_mode_from_the_cli(tmp_path, bert_tokenizer, monkeypatch):
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    d = save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer)), bert_tokenizer, tmp_path / "llama")
    base = ["compress", "-m", str(d), "--method", "svd", "--ratio", "0.5", "--calib-data", "embedded",
            "--calib-samples", "4", "--calib-seq-len", "32", "--json"]
    bad = CliRunner().invoke(app, [*base, "--modular-mode", "layers", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "modular" in bad.output.lower() and not (tmp_path / "x").exists()
    ok = CliRunner().invoke(app, [*base, "--modular-mode", "sequential", "--out", str(tmp_path / "y")])
    assert ok.exit_code == 0, ok.output
    mod = json.loads((tmp_path / "y" / "offcomp.json").read_text())["modular"]
    assert mod["config"]["mode"] == "sequential" and [b["block"] for b in mod["blocks"]] == ["layers.0", "layers.1"]


@pytest.mark.parametrize("pipeline", ["global", "sequential"])
def test_modular_training_on_a_file_records_the_split_it_read(tmp_path, bert_tokenizer, pipeline):
    """A file is its own split: the manifest said "validation" (the --calib-split default) for the
    modular training while its calibration, on the same file, said "file"."""
    from offcomp.pipeline import compress_model, quick_plan

    d = tmp_path / "llama"
    save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer)), bert_tokenizer, d)
    text = tmp_path / "calib.txt"
    text.write_text("Explicit is better than implicit. Simple is better than complex. " * 200)
    calib = {"data": str(text), "split": "validation", "samples": 4, "seq_len": 32, "seed": 0}
    manifest = compress_model(str(d), quick_plan("llama", "svd-llm", ratio=0.5, modular={"epochs": 1}),
                              tmp_path / "out", calib=calib, pipeline=pipeline)
    assert manifest["modular"]["data"]["split"] == "file" == manifest["calibration"]["data"]["split"]
    assert manifest["modular"]["data"]["sha256"] == manifest["calibration"]["data"]["sha256"]
