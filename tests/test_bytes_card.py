"""Bytes on disk (--save-dtype, manifests, records, report) and the checkpoint's model card."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from offcomp.errors import OffcompError
from offcomp.model_card import write_model_card
from offcomp.pipeline import compress_model, evaluate_ppl, quick_plan
from offcomp.report import collect

from .conftest import save_model_dir, tiny_llama


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory, bert_tokenizer):
    """The same tiny llama saved in fp32 and in bf16."""
    root = tmp_path_factory.mktemp("base")
    model = tiny_llama(vocab_size=len(bert_tokenizer))
    fp32 = save_model_dir(model, bert_tokenizer, root / "fp32")
    bf16 = save_model_dir(model.to(torch.bfloat16), bert_tokenizer, root / "bf16")
    return fp32, bf16


def plan():
    return quick_plan("llama", "svd", ratio=0.5)


def weight_dtypes(path) -> set[torch.dtype]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_save_dtype_defaults_to_the_base_checkpoints_own(base_dirs, tmp_path):
    fp32, bf16 = base_dirs
    a = compress_model(str(fp32), plan(), tmp_path / "a")
    b = compress_model(str(bf16), plan(), tmp_path / "b")
    assert a["bytes"]["dtype"] == "float32" and weight_dtypes(tmp_path / "a") == {torch.float32}
    assert b["bytes"]["dtype"] == "bfloat16" and weight_dtypes(tmp_path / "b") == {torch.bfloat16}


def test_save_dtype_bf16_halves_the_file_and_keeps_the_model(base_dirs, tmp_path):
    fp32, _ = base_dirs
    full = compress_model(str(fp32), plan(), tmp_path / "full", save_dtype="fp32")
    half = compress_model(str(fp32), plan(), tmp_path / "half", save_dtype="bf16")
    assert weight_dtypes(tmp_path / "half") == {torch.bfloat16}
    f, h = full["bytes"], half["bytes"]
    assert f["weights_file"] == (tmp_path / "full" / "model.safetensors").stat().st_size
    assert abs(h["weights_file"] / f["weights_file"] - 0.5) < 0.01
    assert h["compressed_modules"] * 2 == f["compressed_modules"]
    units = half["report"]["units"]
    assert sum(u["stored_bytes"] for u in units) == h["compressed_modules"]
    assert h["compressed_modules"] == 2 * half["report"]["compressed_stored_params"]  # svd, no bias: 2 bytes each
    # the factors were fitted in fp32/fp64 and only cast at save: same rank, same relative errors
    assert [u["hyper"] for u in units] == [u["hyper"] for u in full["report"]["units"]]
    assert [u["rel_error"] for u in units] == [u["rel_error"] for u in full["report"]["units"]]


def test_unknown_save_dtype_is_refused_before_any_work(base_dirs, tmp_path):
    with pytest.raises(OffcompError, match="unknown dtype 'int8'"):
        compress_model(str(base_dirs[0]), plan(), tmp_path / "x", save_dtype="int8")
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def evaluated(base_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "ck"
    compress_model(str(base_dirs[0]), plan(), out, plan_source="quick:svd")
    card_before = (out / "README.md").read_text()
    record = evaluate_ppl(str(out), "embedded", seq_len=32, max_tokens=256)
    return out, card_before, record


def header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_checkpoint_gets_a_model_card(evaluated, base_dirs):
    out, card, _ = evaluated
    meta = header(card)
    assert meta["base_model"] == str(base_dirs[0]) and meta["library_name"] == "transformers"
    assert meta["tags"] == ["offcomp", "compression"]
    manifest = json.loads((out / "offcomp.json").read_text())
    rep, size = manifest["report"], manifest["bytes"]
    assert f"{rep['params_after']:,}" in card and f"{size['weights_file']:,}" in card
    assert "| svd |" in card and "quick:svd" in card and "None recorded yet" in card
    assert "data-free" in card  # no calibration


def test_evaluation_updates_the_card_and_records_bytes(evaluated):
    out, _, record = evaluated
    card = (out / "README.md").read_text()
    assert "None recorded yet" not in card and f"{record['ppl']:.4g}" in card
    assert record["weights_bytes"] == (out / "model.safetensors").stat().st_size
    assert record["weights_dtype"] == "float32" and record["compressed_modules_bytes"] > 0
    assert not list(out.glob(".README.md.tmp-*"))  # written atomically, nothing left behind


def test_card_survives_a_damaged_results_line(evaluated, tmp_path):
    import shutil

    out = tmp_path / "ck"
    shutil.copytree(evaluated[0], out)
    with open(out / "results.jsonl", "a") as f:
        f.write('{"type": "ppl", "ppl": 12.5\n')
    card = write_model_card(out).read_text()
    assert card.count("| ppl | ppl |") == 1


def test_report_shows_bytes_beside_parameters(evaluated, base_dirs, tmp_path):
    out, _, record = evaluated
    rows = collect(out.parent)
    assert [r["bytes"] for r in rows] == [record["weights_bytes"]] == [(out / "model.safetensors").stat().st_size]
    assert rows[0]["params"] == record["params_after"]
    base = evaluate_ppl(str(base_dirs[0]), "embedded", seq_len=32, max_tokens=64, results=tmp_path / "r.jsonl")
    assert base["weights_bytes"] == (base_dirs[0] / "model.safetensors").stat().st_size
