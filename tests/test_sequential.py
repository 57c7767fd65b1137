"""The sequential pipeline (offcomp.sequential, offcomp.lazy): one block at a time, lazily read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import offcomp.api
import offcomp.sequential as seq
from offcomp.cli import app
from offcomp.errors import OffcompError
from offcomp.lazy import LazyCheckpoint
from offcomp.models import load_model, state_dict_sha256
from offcomp.pipeline import compress_model, quick_plan
from offcomp.plan import parse_plan

from .conftest import save_model_dir, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 320


@pytest.fixture
def calib_text(tmp_path_factory):
    """A small validation text (tokenising all of wiki.valid.raw costs seconds per test)."""
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.valid.raw"
    path = tmp_path_factory.mktemp("text") / "calib.valid.txt"
    if src.is_file():
        path.write_text("".join(src.read_text().splitlines(keepends=True)[:400]))
    else:  # no shared data: any prose works
        path.write_text("Beautiful is better than ugly. Explicit is better than implicit. " * 400)
    return str(path)


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    return save_model_dir(tiny_llama(vocab_size=VOCAB, layers=3), tiny_tokenizer(VOCAB), tmp_path / "base")


def _calib(text: str, samples: int = 4, seq_len: int = 48) -> dict:
    return {"data": text, "split": "validation", "samples": samples, "seq_len": seq_len, "seed": 0}


def _state(path) -> dict[str, torch.Tensor]:
    return load_model(str(path)).model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and (a[k] - b[k]).abs().max().item() <= tol
                                        for k in a if a[k].numel())


def test_open_loop_gives_the_global_pipelines_factors(base, calib_text, tmp_path):
    plan = quick_plan("llama", "svd-llm", ratio=0.6)
    g = compress_model(str(base), plan, tmp_path / "g", calib=_calib(calib_text), pipeline="global")
    o = compress_model(str(base), plan, tmp_path / "o", calib=_calib(calib_text), pipeline="sequential",
                       calib_loop="open")
    assert g["pipeline"] == {"pipeline": "global"}
    assert o["pipeline"]["pipeline"] == "sequential" and o["pipeline"]["loop"] == "open"
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()  # written block by block
    assert o["base"]["sha256"] == g["base"]["sha256"]  # the lazy hash is the global one
    assert _same(_state(tmp_path / "g"), _state(tmp_path / "o"), tol=1e-6)
    assert [u["names"] for u in o["report"]["units"]] == [u["names"] for u in g["report"]["units"]]
    assert o["report"]["params_after"] == g["report"]["params_after"]


def test_closed_loop_takes_statistics_on_the_compressed_prefix(base, calib_text, tmp_path, monkeypatch):
    taken: dict[str, torch.Tensor] = {}
    real = seq.collect_block_stats

    def spy(layer, call, stream, needs, prefix, **kw):
        out = real(layer, call, stream, needs, prefix, **kw)
        taken.update({n: d["xtx"].clone() for n, d in out.items() if n.endswith("q_proj")})
        return out

    monkeypatch.setattr(seq, "collect_block_stats", spy)
    plan = quick_plan("llama", "svd-llm", ratio=0.6)
    calib = _calib(calib_text)
    compress_model(str(base), plan, tmp_path / "c", calib=calib, pipeline="sequential")
    closed = dict(taken)
    compress_model(str(base), plan, tmp_path / "o", calib=calib, pipeline="sequential", calib_loop="open")
    q = [f"model.layers.{i}.self_attn.q_proj" for i in range(3)]
    assert torch.equal(closed[q[0]], taken[q[0]])  # block 0 sees the embeddings either way
    assert not torch.allclose(closed[q[1]], taken[q[1]], rtol=1e-3)
    # what block 1 really sees in the compressed model: its Gram is the closed-loop statistic
    from offcomp.capture import CaptureSpec, calibration_batches
    from offcomp.data import causal_text, load_text

    model = load_model(str(tmp_path / "c")).model
    tok = tiny_tokenizer(VOCAB)
    batches = calibration_batches(tok, causal_text(load_text(calib_text, split="validation")),
                                  CaptureSpec(samples=4, seq_len=48, seed=0), "causal")
    gram = torch.zeros(64, 64, dtype=torch.float64)

    def add(mod, args, out):
        x = args[0].reshape(-1, 64).double()
        gram.add_(x.T @ x)

    hook = model.model.layers[1].self_attn.q_proj.register_forward_hook(add)
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    hook.remove()
    # the compressed block 0's output was fp32 in the run and fp32 here: equal to fp32 rounding
    assert torch.allclose(closed[q[1]], gram, rtol=1e-4, atol=1e-4 * gram.abs().max().item())


def test_bf16_shards_are_read_one_block_at_a_time(tmp_path, calib_text, monkeypatch):
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    model = tiny_llama(vocab_size=VOCAB, layers=4).to(torch.bfloat16)
    d = tmp_path / "bf16"
    model.save_pretrained(d, max_shard_size="60KB")
    tiny_tokenizer(VOCAB).save_pretrained(d)
    assert len(list(d.glob("model-*.safetensors"))) >= 3
    # the global pipeline loads everything; it runs first, before from_pretrained is forbidden
    plan = quick_plan("llama", "svd-llm", ratio=0.6)
    compress_model(str(d), plan, tmp_path / "g", calib=_calib(calib_text), pipeline="global")
    resident: list[int] = []
    real_load = seq.Blocks.load

    def load(self, i):
        layer = real_load(self, i)
        loaded = [j for j, blk in enumerate(self.layers) if any(p.device.type != "meta" for p in blk.parameters())]
        resident.append(len(loaded))
        return layer

    def refuse(*a, **k):
        raise AssertionError("the sequential pipeline must not materialise the whole model")

    import transformers

    monkeypatch.setattr(seq.Blocks, "load", load)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("offcomp.models.state_dict_sha256", refuse)
    reads = []
    real_read = LazyCheckpoint.read
    monkeypatch.setattr(LazyCheckpoint, "read", lambda self, keys, dev, dt: reads.append(len(keys)) or
                        real_read(self, keys, dev, dt))
    o = compress_model(str(d), plan, tmp_path / "o", calib=_calib(calib_text), pipeline="sequential",
                       calib_loop="open")
    monkeypatch.undo()
    assert resident == [1, 1, 1, 1]  # never two blocks at once
    assert max(reads) <= 9  # one block (or the embedding, norm, head) per read, never the state dict
    assert o["dtype"] == "bfloat16"  # saved as the base stores it
    assert _same(_state(tmp_path / "g"), _state(tmp_path / "o"), tol=0.0)


def test_lazy_hash_equals_the_loaded_models(tmp_path):
    model = tiny_llama(vocab_size=VOCAB, layers=2)
    d = save_model_dir(model, tiny_tokenizer(VOCAB), tmp_path / "m")
    from offcomp.lazy import load_lazy

    bundle, _ = load_lazy(str(d))
    assert bundle.sha256 == state_dict_sha256(load_model(str(d)).model)
    assert all(p.device.type == "meta" for p in bundle.model.parameters())


def test_kill_midway_and_rerun_resumes_identically(base, calib_text, tmp_path, monkeypatch):
    plan = quick_plan("llama", "svd-llm", ratio=0.6)
    calib = _calib(calib_text)
    compress_model(str(base), plan, tmp_path / "ref", calib=calib, pipeline="sequential")
    real, calls = offcomp.api.fit_unit, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 9:  # block 1, in the middle
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(offcomp.api, "fit_unit", dies)
    with pytest.raises(KeyboardInterrupt):
        compress_model(str(base), plan, tmp_path / "out", calib=calib, pipeline="sequential")
    monkeypatch.undo()
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    r = compress_model(str(base), plan, tmp_path / "out", calib=calib, pipeline="sequential")
    assert r["resume"]["resumed_units"] == 8 and r["resume"]["fitted_units"] == 13
    assert _same(_state(tmp_path / "ref"), _state(tmp_path / "out"))
    assert not (tmp_path / ".out.partial").exists()


def test_hidden_states_on_disk_give_the_same_model(base, calib_text, tmp_path):
    from offcomp.lazy import load_lazy

    plan = quick_plan("llama", "svd-llm", ratio=0.6)
    windows = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))
    out = {}
    for placement in ("device", "disk"):
        bundle, source = load_lazy(str(base))
        rep, _, _, run = seq.compress_sequential(bundle.model, plan, source=source, windows=windows,
                                                 device=torch.device("cpu"), placement=placement,
                                                 spill=tmp_path / "spill")
        assert run.placement == placement
        out[placement] = {k: v.clone() for k, v in bundle.model.state_dict().items() if v.device.type != "meta"}
    assert _same(out["device"], out["disk"]) and not list((tmp_path / "spill").iterdir())


def test_in_memory_model_runs_block_by_block_too(calib_text):
    """Without a checkpoint to read (a model from Python, a hub id), blocks are moved, not read."""
    model = tiny_llama(vocab_size=VOCAB, layers=2)
    from offcomp.layers import CompressedModule

    windows = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    plan = quick_plan(model, "prune", ratio=0.5, options={"score": "wanda"})
    rep, _, _, run = seq.compress_sequential(model, plan, windows=windows)
    assert run.loop == "closed" and len(rep.units) == 14 and rep.params_after < rep.params_before
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, CompressedModule) and 0.45 <= (q.to_dense() == 0).float().mean() <= 0.55


def test_allocation_in_a_first_pass_matches_the_global_ranks(base, calib_text, tmp_path):
    plan = quick_plan("llama", "svd-llm", allocate={"ratio": 0.6, "criterion": "whitened"})
    g = compress_model(str(base), plan, tmp_path / "g", calib=_calib(calib_text), pipeline="global")
    o = compress_model(str(base), plan, tmp_path / "o", calib=_calib(calib_text), pipeline="sequential",
                       calib_loop="open")
    ranks = lambda r: {u["label"]: u["rank"] for u in r["allocation"]["units"]}  # noqa: E731
    assert ranks(g) == ranks(o)
    assert o["allocation"]["sensitivity"].startswith("whitened error on the dense hidden states")
    assert _same(_state(tmp_path / "g"), _state(tmp_path / "o"), tol=1e-6)


def test_modular_training_inside_the_engine(base, calib_text, tmp_path):
    plan = quick_plan("llama", "svd-llm", ratio=0.6, modular={"epochs": 1, "lr": 1e-3})
    compress_model(str(base), plan, tmp_path / "g", calib=_calib(calib_text), pipeline="global")
    o = compress_model(str(base), plan, tmp_path / "o", calib=_calib(calib_text), pipeline="sequential",
                       calib_loop="open")
    assert [b["block"] for b in o["modular"]["blocks"]] == ["layers.0", "layers.1", "layers.2"]
    assert all(b["nmse_after"] <= b["nmse_before"] for b in o["modular"]["blocks"])
    # open loop + sequential training is the global recipe, in one pass: same factors
    assert _same(_state(tmp_path / "g"), _state(tmp_path / "o"), tol=1e-5)


def test_auto_picks_sequential_only_where_it_can(base, calib_text, tmp_path):
    r = compress_model(str(base), quick_plan("llama", "svd-llm", ratio=0.6), tmp_path / "a",
                       calib=_calib(calib_text))
    assert r["pipeline"]["pipeline"] == "sequential" and r["pipeline"]["loop"] == "closed"
    free = compress_model(str(base), quick_plan("llama", "svd", ratio=0.6), tmp_path / "b")
    assert free["pipeline"] == {"pipeline": "global"}  # no calibration data: nothing to gain
    joint = parse_plan({"groups": [{"modules": ["attn.q"], "joint": True, "method": "svd-llm", "ratio": 0.5}]})
    assert compress_model(str(base), joint, tmp_path / "c", calib=_calib(calib_text))["pipeline"] == {
        "pipeline": "global"}  # joint across layers: global
    with pytest.raises(OffcompError, match="joint across 3 layers.*--pipeline global"):
        compress_model(str(base), joint, tmp_path / "d", calib=_calib(calib_text), pipeline="sequential")
    fisher = quick_plan("llama", "fwsvd", ratio=0.6)
    with pytest.raises(OffcompError, match="fisher_row.*whole-model backward"):
        compress_model(str(base), fisher, tmp_path / "e", calib=_calib(calib_text), pipeline="sequential")
    assert not any((tmp_path / n).exists() for n in "de")


def test_cli_options_and_one_line_errors(base, calib_text, tmp_path):
    args = ["compress", "-m", str(base), "--method", "svd-llm", "--ratio", "0.6", "--calib-data", calib_text,
            "--calib-samples", "2", "--calib-seq-len", "32"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--pipeline", "sequential",
                                 "--hidden-states", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "x" / "offcomp.json").read_text())
    assert manifest["pipeline"]["hidden_states"] == "cpu" and manifest["calibration"]["n_tokens"] == 64
    shards = sorted((tmp_path / "x").glob("model-*.safetensors"))
    assert len(shards) == 4 and all(load_file(str(s)) for s in shards)  # 3 blocks + the rest
    for extra, msg in ((["--pipeline", "fast"], "unknown --pipeline"), (["--calib-loop", "half"], "unknown --calib-loop"),
                       (["--pipeline", "global", "--calib-loop", "closed"], "--calib-loop closed needs"),
                       (["--hidden-states", "gpu"], "unknown --hidden-states")):
        bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "y"), *extra])
        assert bad.exit_code == 2 and msg in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output
        assert not (tmp_path / "y").exists()


def test_torchrun_data_parallel_calibration_gives_the_one_process_model(base, calib_text, tmp_path):
    """The multi-GPU route, on CPUs (gloo): 2 ranks take 2 windows each, their statistics are
    summed before every fit, rank 0 writes; the checkpoint is the one-process one."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    args = ["compress", "-m", str(base), "--method", "svd-llm", "--ratio", "0.6", "--calib-data", calib_text,
            "--calib-samples", "4", "--calib-seq-len", "32", "--pipeline", "sequential"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run([torchrun, "--nproc-per-node", "2", "--no-python", sys.executable, "-c",
                          "from offcomp.cli import app; app()", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")]).exit_code == 0
    two = json.loads((tmp_path / "two" / "offcomp.json").read_text())
    assert two["pipeline"]["ranks"] == 2 and two["calibration"]["n_tokens"] == 128
    assert _same(_state(tmp_path / "one"), _state(tmp_path / "two"), tol=1e-5)


@pytest.mark.parametrize("nbytes,device,gpu_free,ram_free,where", [
    (1 << 30, "cuda", 80 << 30, 16 << 30, "device"),   # fits the GPU with room for the block
    (30 << 30, "cuda", 80 << 30, 256 << 30, "cpu"),    # too much for the GPU, fine for the host
    (30 << 30, "cuda", 80 << 30, 64 << 30, "disk"),    # for neither
    (1 << 30, "cpu", None, 16 << 30, "device"),        # on a CPU run the device is the host memory
    (8 << 30, "cpu", None, 16 << 30, "disk"),
])
def test_hidden_state_placement_rule(nbytes, device, gpu_free, ram_free, where):
    assert seq.choose_placement(nbytes, device, gpu_free, ram_free) == where


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_blocks_on_the_gpu_give_the_cpu_model(base, calib_text, tmp_path):
    plan = quick_plan("llama", "svd-llm", ratio=0.6)
    compress_model(str(base), plan, tmp_path / "cpu", calib=_calib(calib_text), pipeline="sequential")
    g = compress_model(str(base), plan, tmp_path / "gpu", calib=_calib(calib_text), pipeline="sequential",
                       device="cuda")
    assert g["pipeline"]["peak_cuda_bytes"] > 0 and g["pipeline"]["hidden_states"] == "device"
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        a = load_model(str(tmp_path / "cpu")).model(ids).logits
        b = load_model(str(tmp_path / "gpu")).model(ids).logits
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def _bert_dir(tmp_path, bert_tokenizer, extra: dict[str, torch.Tensor]):
    """A tiny BERT encoder directory whose model.safetensors also holds `extra` tensors."""
    from safetensors.torch import save_file

    from .conftest import tiny_bert

    d = save_model_dir(tiny_bert(vocab_size=bert_tokenizer.vocab_size, head="base"), bert_tokenizer, tmp_path / "bert")
    state = load_file(d / "model.safetensors")
    save_file({**state, **extra}, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_stored_non_persistent_buffer_is_not_a_foreign_tensor(tmp_path, bert_tokenizer, calib_text, monkeypatch):
    """minilm-l6's checkpoint stores `embeddings.position_ids` (a buffer transformers now computes):
    the sequential pipeline refused it, so the encoder recipe failed under the default `auto`."""
    monkeypatch.setenv("OFFCOMP_CACHE", str(tmp_path / "cache"))
    d = _bert_dir(tmp_path, bert_tokenizer, {"embeddings.position_ids": torch.arange(128)[None]})
    plan = quick_plan("bert", "svd-llm", ratio=0.7)
    man = compress_model(str(d), plan, tmp_path / "seq", calib=_calib(calib_text, seq_len=16),
                         pipeline="sequential")
    assert man["pipeline"]["pipeline"] == "sequential"
    glob = compress_model(str(d), plan, tmp_path / "glob", calib=_calib(calib_text, seq_len=16),
                          pipeline="global")
    assert man["base"]["sha256"] == glob["base"]["sha256"]


def test_tensor_of_another_layout_is_still_refused(tmp_path, bert_tokenizer):
    from offcomp.lazy import load_lazy

    d = _bert_dir(tmp_path, bert_tokenizer, {"embeddings.word_embeddings.weight_v2": torch.zeros(4, 4)})
    with pytest.raises(OffcompError, match="architecture does not have"):
        load_lazy(str(d))
