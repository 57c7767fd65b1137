"""Output directories appear atomically and an interrupted `compress` resumes bit-identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offcomp.checkpoint import atomic_dir, clean_stale
from offcomp.errors import OffcompError
from offcomp.models import file_sha256
from offcomp.pipeline import compress_model, quick_plan
from offcomp.plan import Plan
from offcomp.resume import PartialStore, partial_dir

from .conftest import save_model_dir, tiny_llama


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _full(path: Path, tag: str) -> None:
    (path / "a").write_text(tag)
    (path / "b").write_text(tag)


def _complete(out: Path) -> str:
    """The tag of a complete output (both files, one tag), or fail."""
    tags = {(out / "a").read_text(), (out / "b").read_text()}
    assert len(tags) == 1, tags
    return tags.pop()


# ---------------------------------------------------------------- temporary directories

def test_overwrite_never_leaves_no_output(tmp_path, monkeypatch):
    """Moving the new directory in fails: the old output must still be there, complete. (main deleted
    the old output first, then renamed: a crash in between lost both.)"""
    out = tmp_path / "out"
    atomic_dir(out, lambda t: _full(t, "old"))
    import offcomp.checkpoint as ck

    real = os.replace

    def crash(a, b):
        if Path(b) == out:
            raise OSError("simulated crash while moving the new output in")
        return real(a, b)

    monkeypatch.setattr(ck.os, "replace", crash)
    try:
        atomic_dir(out, lambda t: _full(t, "new"), overwrite=True)
    except OSError:
        pass
    assert _complete(out) in ("old", "new")  # renameat2 swap: "new"; fallback: the old stays
    monkeypatch.setattr(ck.os, "replace", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing hidden left behind


def test_overwrite_fallback_puts_the_old_output_back_after_a_crash(tmp_path, monkeypatch):
    """Without an atomic exchange the old output is renamed aside first; if the process dies before
    the new one is in, the next run restores the old one rather than leaving no output."""
    import offcomp.checkpoint as ck

    out = tmp_path / "out"
    atomic_dir(out, lambda t: _full(t, "old"))
    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    atomic_dir(out, lambda t: _full(t, "new"), overwrite=True)
    assert _complete(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a dead process's state between its two renames: old aside, new complete in its tmp, no out
    pid = _dead_pid()
    os.replace(out, tmp_path / f".out.old-{pid}")
    (tmp_path / f".out.tmp-{pid}").mkdir()
    _full(tmp_path / f".out.tmp-{pid}", "newer")
    clean_stale(out)
    assert _complete(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporary_directories_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / f".out.tmp-{_dead_pid()}"
    live = tmp_path / f".out.tmp-{os.getppid()}"
    other = tmp_path / f".other.tmp-{_dead_pid()}"  # another output's: not ours to judge
    for d in (dead, live, other):
        d.mkdir()
        (d / "x").write_text("partial")
    atomic_dir(out, lambda t: _full(t, "new"))
    assert not dead.exists() and live.exists() and other.exists()
    assert _complete(out) == "new"


# ---------------------------------------------------------------- resume after an interruption

class Interrupt(Exception):
    pass


def _stop_at(message: str, at: int):
    """A progress callback that interrupts the run when `message` reaches step `at`."""
    def progress(msg: str, done: int, total: int) -> None:
        if msg.startswith(message) and done >= at:
            raise Interrupt(msg)
    return progress


@pytest.fixture
def llama_dir(tmp_path, bert_tokenizer, monkeypatch):
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    return save_model_dir(tiny_llama(vocab_size=len(bert_tokenizer), layers=3), bert_tokenizer, tmp_path / "llama")


def _ae_plan() -> Plan:
    # ae starts from random weights: a resumed unit must not disturb the seeding of the next
    return quick_plan("llama", "ae", cr=2, modules=["mlp.up", "mlp.down", "attn.o"], options={"epochs": 3})


def test_interrupted_compress_resumes_bit_identically(tmp_path, llama_dir):
    ref = compress_model(str(llama_dir), _ae_plan(), tmp_path / "ref")
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        compress_model(str(llama_dir), _ae_plan(), out, progress=_stop_at("fitting", 4))
    assert not out.exists() and len(list(partial_dir(out).glob("unit-*.safetensors"))) == 4
    res = compress_model(str(llama_dir), _ae_plan(), out)
    assert res["resume"]["resumed_units"] == 4 and res["resume"]["fitted_units"] == 5
    assert res["report"]["fitted_units"] == 5 and ref["resume"]["resumed_units"] == 0
    assert file_sha256(out / "model.safetensors") == file_sha256(tmp_path / "ref" / "model.safetensors")
    assert [u["rel_error"] for u in res["report"]["units"]] == [u["rel_error"] for u in ref["report"]["units"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out", "ref"]  # the partial dir is gone


def test_a_different_command_never_reuses_partial_work(tmp_path, llama_dir):
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        compress_model(str(llama_dir), _ae_plan(), out, progress=_stop_at("fitting", 3))
    res = compress_model(str(llama_dir), _ae_plan(), out, seed=1)  # another seed: another key
    assert res["resume"]["resumed_units"] == 0
    compress_model(str(llama_dir), _ae_plan(), tmp_path / "ref", seed=1)
    assert file_sha256(out / "model.safetensors") == file_sha256(tmp_path / "ref" / "model.safetensors")


def test_a_damaged_partial_unit_is_fitted_again(tmp_path, llama_dir):
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        compress_model(str(llama_dir), _ae_plan(), out, progress=_stop_at("fitting", 3))
    victim = sorted(partial_dir(out).glob("unit-00001-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte inside a tensor
    victim.write_bytes(bytes(data))
    res = compress_model(str(llama_dir), _ae_plan(), out)
    assert res["resume"]["resumed_units"] == 2  # units 0 and 2; unit 1 refitted, never trusted
    compress_model(str(llama_dir), _ae_plan(), tmp_path / "ref")
    assert file_sha256(out / "model.safetensors") == file_sha256(tmp_path / "ref" / "model.safetensors")


def test_a_refused_plan_leaves_no_new_parent_directories(tmp_path, llama_dir):
    """A plan refused once the model is loaded (here: the budget keeps more than it saves) must leave
    nothing behind, not even the parent directories of --out that the partial store created (found
    by the CLI fuzzer: `out/` stayed behind, empty)."""
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(OffcompError):
        compress_model(str(llama_dir), quick_plan("llama", "svd", rank=10_000, modules=["mlp.up"]), out)
    assert not (tmp_path / "new").exists()


def _weights(out: Path) -> list[str]:
    return [file_sha256(f) for f in sorted(out.glob("*.safetensors"))]


@pytest.mark.parametrize("pipeline,units", [("global", 21), ("sequential", 14)])
@pytest.mark.parametrize("mode", ["sequential", "blocks"])
def test_interrupted_modular_training_resumes_bit_identically(tmp_path, llama_dir, mode, pipeline, units):
    """Global: every unit is fitted before training starts; sequential: a block is trained right
    after its units are fitted, so a stop in layer 1's training has fitted layers 0 and 1 only."""
    plan = quick_plan("llama", "svd", ratio=0.5, modular={"epochs": 2, "mode": mode, "mixup": 0.5})
    calib = {"data": "embedded", "split": "validation", "samples": 4, "seq_len": 32, "seed": 0}
    ref = compress_model(str(llama_dir), plan, tmp_path / "ref", calib=calib, pipeline=pipeline)
    out = tmp_path / "out"
    with pytest.raises(Interrupt):  # while training layer 1 (blocks: its first block)
        compress_model(str(llama_dir), plan, out, calib=calib, progress=_stop_at("modular layers.1", 2),
                       pipeline=pipeline)
    res = compress_model(str(llama_dir), plan, out, calib=calib, pipeline=pipeline)
    assert res["resume"]["resumed_units"] == units and res["resume"]["resumed_modular_layers"] == 1
    assert res["modular"]["resumed_layers"] == 1
    assert [b["nmse_after"] for b in res["modular"]["blocks"]] == [b["nmse_after"] for b in ref["modular"]["blocks"]]
    assert _weights(out) == _weights(tmp_path / "ref") and _weights(out)


def test_two_runs_on_one_output_are_refused(tmp_path):
    first = PartialStore(tmp_path / "out", {"k": 1})
    try:
        with pytest.raises(OffcompError, match="another offcomp process"):
            PartialStore(tmp_path / "out", {"k": 1})
    finally:
        first.close(remove=True)
    PartialStore(tmp_path / "out", {"k": 1}).close(remove=True)  # free again once the first is done


# ---------------------------------------------------------------- SIGKILL of the real command

def test_sigkill_mid_compress_then_rerun_gives_the_same_checkpoint(tmp_path, llama_dir):
    """`offcomp compress` killed with SIGKILL once some units are on disk; the same command again
    skips them and writes the same bytes as an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]),
           "OFFCOMP_CACHE": str(tmp_path / "cache")}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "offcomp.cli", "compress", "-m", str(llama_dir), "--method", "ae", "--cr", "2",
                "--modules", "mlp.up", "--modules", "mlp.down", "--modules", "attn.o", "-o", "epochs=15",
                "--out", str(out), "--json"]

    out = tmp_path / "out"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while len(list(partial_dir(out).glob("unit-*.safetensors"))) < 2:
            assert proc.poll() is None, "compress finished before it could be killed; give it more work"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = len(list(partial_dir(out).glob("unit-*.safetensors")))
    assert 2 <= done < 9
    again = subprocess.run(cmd(out), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    res = json.loads(again.stdout)
    assert res["resume"]["resumed_units"] >= done and res["resume"]["fitted_units"] == 9 - res["resume"][
        "resumed_units"]
    ref = subprocess.run(cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert json.loads(ref.stdout)["resume"]["resumed_units"] == 0
    assert file_sha256(out / "model.safetensors") == file_sha256(tmp_path / "ref" / "model.safetensors")
    assert not partial_dir(out).exists()


def test_the_same_model_saves_to_the_same_bytes(tmp_path):
    """Two saves of one compressed model have one file hash (safetensors wrote the dropped names of
    tied tensors into its metadata in hash-map order, so the bytes changed from save to save)."""
    from offcomp.api import compress_
    from offcomp.checkpoint import save_compressed

    model = tiny_llama(tie=True)
    report = compress_(model, quick_plan("llama", "svd", rank=4, modules=["mlp.up"], layers="0"))
    for i in range(8):
        save_compressed(model, None, tmp_path / str(i), {"head": "causal-lm", "plan": {}, "report": report.to_dict(),
                                                         "base": {}})
    assert len({file_sha256(tmp_path / str(i) / "model.safetensors") for i in range(8)}) == 1
