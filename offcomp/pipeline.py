"""One library function per CLI subcommand: load, run, record. The CLI only parses and prints."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from .api import compress_, count_params, plan_units
from .checkpoint import prepare_out_dir, read_manifest, save_compressed, versions
from .errors import OffcompError
from .hygiene import contamination, text_identity
from .models import ModelBundle, cache_dir, load_model, stored_dtype
from .modular import modular_train, teacher_copy
from .plan import Group, Plan
from .progress import ProgressFn, no_progress
from .records import dumps, strict
from .registry import get_method
from .report import compression_summary
from .resume import PartialStore

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
RESULTS = "results.jsonl"


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise OffcompError(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    """cpu, cuda or cuda:N, checked before any work (other torch devices, e.g. meta or mps, are
    not supported: the methods' linear algebra and the evaluators run on CPU and CUDA only)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise OffcompError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise OffcompError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OffcompError(f"device {name!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OffcompError(f"device {name!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def model_config(model: str, trust_remote_code: bool = False) -> Any:
    """The config of a model name, directory or hub id (one line if it cannot be read, e.g. a hub id
    while offline)."""
    from transformers import AutoConfig

    from .models import is_compressed_dir, resolve

    if is_compressed_dir(model):
        raise OffcompError(f"{model} is already compressed; compress its base model instead")
    try:
        return AutoConfig.from_pretrained(resolve(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise OffcompError(f"cannot load the config of model {model!r}: {str(e).splitlines()[0]}") from None


def model_type(model: str, trust_remote_code: bool = False) -> str:
    """`config.model_type` of a model name, directory or hub id."""
    return model_config(model, trust_remote_code).model_type


def quick_plan(model_type: Any, method: str, *, rank: int | None = None, ratio: float | None = None,
               cr: float | None = None, modules: list[str] | None = None, layers: str = "all",
               joint: bool = False, options: dict[str, Any] | None = None,
               allocate: dict[str, Any] | None = None, modular: dict[str, Any] | None = None) -> Plan:
    """The one-group plan behind `offcomp compress --method M --rank R`: by default every linear
    layer of the transformer blocks (all roles), never the embeddings or the LM head. With
    `allocate` ({"ratio": ..., "criterion": ...}) the group has no budget of its own: ranks are
    spread by measured sensitivity (offcomp.allocate). With `modular` ({"epochs": ...}) the compressed
    blocks are then trained to reproduce the dense ones (offcomp.modular). `model_type`: a model type,
    a config or a model (its structure is discovered to find the default modules)."""
    from .swap import default_modules

    mods = modules or default_modules(model_type)
    try:
        group = Group(name=f"{method}", modules=mods, layers=layers, joint=joint, method=method,
                      options=options or {}, rank=rank, ratio=ratio, cr=cr)
        return Plan(groups=[group], allocate=allocate, modular=modular)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()) if not isinstance(x, int))
        raise OffcompError(f"bad compress options: {where + ': ' if where else ''}"
                           f"{err['msg'].removeprefix('Value error, ')}") from None


def compress_model(
    model: str,
    plan: Plan,
    out: str | Path | None,
    *,
    device: str = "cpu",
    seed: int = 0,
    stats: dict[str, dict[str, torch.Tensor]] | None = None,
    calib: dict[str, Any] | None = None,
    valid: dict[str, Any] | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    trust_remote_code: bool = False,
    plan_source: str | None = None,
    save_dtype: str | None = None,
    progress: ProgressFn | None = None,
    verify: bool = True,
    warn: Callable[[str], None] | None = None,
    pipeline: str = "auto",
    calib_loop: str | None = None,
    hidden_states: str = "auto",
) -> dict[str, Any]:
    """Compress a named model by a plan and save the checkpoint; returns the manifest.

    `pipeline`: "sequential" reads and compresses one block at a time (offcomp.sequential: peak
    memory independent of depth; statistics closed-loop on the compressed prefix, or "open" on the
    dense model by `calib_loop`); "global" loads the whole model and captures whole-model
    statistics first; "auto" is sequential whenever the plan needs calibration data and can run
    block by block. `hidden_states`: where the sequential pipeline keeps them (auto, device, cpu, disk).

    Fitting runs in fp32/fp64 whatever `save_dtype` (fp32, bf16, fp16; default: the dtype the base
    checkpoint stores) says; the weights are cast only when written.

    `calib` ({"data", "split", "samples", "seq_len", "seed"}) captures the statistics the plan needs
    on the fly (cached like `offcomp capture`); a plan with `allocate` gets its ranks first. `warn`
    receives one line when the plan is valid but known to wreck the model (offcomp.advice)."""
    from .capture import capture_for_plan, check_stats_model, load_stats

    if pipeline not in ("auto", "sequential", "global"):
        raise OffcompError(f"unknown --pipeline {pipeline!r}; use auto, sequential or global")
    if calib_loop not in (None, "closed", "open"):
        raise OffcompError(f"unknown --calib-loop {calib_loop!r}; use closed or open")
    if hidden_states not in ("auto", "device", "cpu", "disk"):
        raise OffcompError(f"unknown --hidden-states {hidden_states!r}; use auto, device, cpu or disk")
    if out is None and not dry_run:
        raise OffcompError("compress needs --out DIR (or --dry-run)")
    if out is not None and not dry_run:
        prepare_out_dir(out, overwrite, sources=(model,))
    cast = parse_dtype(save_dtype) if save_dtype is not None else None
    if calib is not None and stats is not None:
        raise OffcompError("give either --stats DIR or --calib-data, not both")
    if plan.modular is not None and calib is None and not dry_run:
        raise OffcompError("modular training needs calibration text: pass --calib-data (e.g. wiki.valid.raw)")
    seen: list[dict[str, Any]] = []  # every text the compressed model is fitted on or selected by
    if calib is not None:  # refused by name and by content before the model is loaded
        from .capture import load_calibration_text, refuse_test_split

        text = load_calibration_text(calib["data"], refuse_test_split(calib["data"], calib["split"]))
        seen.append(text_identity(text, "calibration"))
    dev = parse_device(device)
    chosen = choose_pipeline(model, plan, pipeline, calib=calib, stats=stats, valid=valid, dry_run=dry_run,
                             trust_remote_code=trust_remote_code)
    if chosen == "sequential":
        return compress_model_sequential(
            model, plan, out, device=dev, seed=seed, stats=stats, calib=calib, overwrite=overwrite,
            trust_remote_code=trust_remote_code, plan_source=plan_source, save_dtype=cast, progress=progress,
            verify=verify, warn=warn, loop=calib_loop or "closed", placement=hidden_states, seen=seen,
            text=text if calib is not None else None)
    if pipeline == "global" and calib_loop == "closed":
        raise OffcompError("--calib-loop closed needs the sequential pipeline: the global one captures its statistics "
                           "on the dense model (open loop); use --pipeline sequential")
    bundle = load_model(model, trust_remote_code=trust_remote_code, verify=verify)
    limit = getattr(bundle.model.config, "max_position_embeddings", None)
    if calib is not None and limit and calib["seq_len"] > limit:
        raise OffcompError(f"--calib-seq-len {calib['seq_len']} exceeds the model's {limit} positions; "
                           f"use --calib-seq-len {min(limit, 512)} or less")
    needs_capture = plan.allocate is not None or any(
        get_method(g.method).stats_needed(get_method(g.method).parse_config(g.options, g.name or g.method))
        for g in plan.groups)
    if calib is not None and (needs_capture or plan.modular is None):
        stats = load_stats(capture_for_plan(bundle, plan, device=device, progress=progress, **calib).path, verify)
    if stats is not None:
        check_stats_model(stats, bundle.sha256)
        data = (getattr(stats, "meta", None) or {}).get("data")
        if calib is None and isinstance(data, dict):
            seen.append({"role": "calibration", **data})
    calibration = getattr(stats, "meta", None)
    calibration = calibration and {k: calibration.get(k) for k in ("path", "key", "data", "loss", "spec", "n_tokens")}
    allocation, run_plan = None, plan
    if plan.allocate is not None:
        from .allocate import allocate_plan

        result = allocate_plan(bundle.model, plan, stats, progress=progress)
        run_plan, allocation = result.plan, {**result.record, "plan": result.plan.model_dump()}
    if warn is not None and plan.modular is None:
        from .advice import data_free_warning

        advice = data_free_warning(plan_units(bundle.model, run_plan, stats), count_params(bundle.model), bundle.kind)
        if advice:
            warn(advice)
    if dry_run:
        return {"dry_run": True, "model": bundle.protocol(), "allocation": allocation, "units": [
            {"label": p.unit.label, "method": p.method.name, "names": p.unit.names, "joint": p.unit.joint,
             "hyper": p.hyper, "original_params": p.unit.original_params, "stored_params": p.stored_params}
            for p in plan_units(bundle.model, run_plan, stats)]}
    assert out is not None  # checked above, before any work
    torch.manual_seed(seed)
    notes: list[str] = []  # methods' ctx.log (e.g. whitening fallbacks), kept in the manifest
    validate, validation = None, None
    if valid is not None:  # ({"data", "max_tokens"}): early stopping on held-out text, never test
        from .data import load_text
        from .validation import make_validator

        vsource = load_text(valid["data"], split="validation")
        validate = make_validator(bundle.model, bundle.tokenizer, vsource, max_tokens=valid.get("max_tokens", 4096),
                                  seq_len=valid.get("seq_len", 1024), device=dev)
        validation = {**vsource.describe(), "max_tokens": valid.get("max_tokens", 4096)}
        seen.append(text_identity(vsource, "validation"))
    teacher = teacher_copy(bundle.model) if plan.modular is not None else None
    # everything that decides the fitted tensors: a partial directory with another key is discarded
    store = PartialStore(out, {
        "plan": plan.model_dump(), "base_sha256": bundle.sha256, "head": bundle.head,
        "stats_key": (getattr(stats, "meta", None) or {}).get("key") if stats is not None else None,
        "calib": calib, "calib_sha256": _text_sha256(calib), "valid": valid, "valid_sha256": _text_sha256(valid),
        "seed": seed, "device": str(dev),
        "offcomp": versions()["offcomp"], "torch": torch.__version__})
    try:
        report = compress_(bundle.model, run_plan, stats=stats, device=dev, seed=seed, progress=progress,
                           validate=validate, log=notes.append, resume=store)
        modular = None
        if teacher is not None:
            windows = calibration_windows_for(bundle.tokenizer, plan.modular.samples, **calib)  # type: ignore[arg-type]
            modular = modular_train(teacher, bundle.model, windows, plan.modular, device=dev,  # type: ignore[arg-type]
                                    seed=seed, progress=progress, log=notes.append, resume=store)
            modular["data"] = _modular_data(calib, text)  # type: ignore[arg-type]
            del teacher
        bundle.model.to("cpu")
        manifest = _manifest(bundle, plan, plan_source, seed, report, calibration, allocation, validation, modular,
                             notes)
        manifest["pipeline"] = {"pipeline": "global"}
        if seen:
            manifest["calibration_data"] = seen
        manifest["resume"] = {"partial": str(store.path), "resumed_units": report.resumed_units,
                              "fitted_units": len(report.units) - report.resumed_units,
                              "resumed_modular_layers": store.resumed_layers}
        save_compressed(bundle.model, bundle.tokenizer, out, manifest, overwrite=overwrite,
                        dtype=cast or stored_dtype(bundle.source, trust_remote_code))
    except OffcompError:
        store.close(remove=True)  # bad input fails again on a re-run: nothing is left behind
        raise
    except BaseException:
        store.close(remove=False)  # a kill, Ctrl-C or crash: re-running the same command resumes
        raise
    store.close(remove=True)
    return {"out": str(out), **read_manifest(out)}


def compress_model_sequential(
    model: str, plan: Plan, out: str | Path | None, *, device: torch.device, seed: int, stats: Any,
    calib: dict[str, Any] | None, overwrite: bool, trust_remote_code: bool, plan_source: str | None,
    save_dtype: torch.dtype | None, progress: ProgressFn | None, verify: bool, warn: Callable[[str], None] | None,
    loop: str, placement: str, seen: list[dict[str, Any]], text: Any = None,
) -> dict[str, Any]:
    """`compress_model` through offcomp.sequential: the base model's blocks are read from its
    safetensors one at a time (a hub id or another format is loaded whole), compressed on the
    calibration windows' hidden states and written to their output shard at once. `text`: the
    calibration text compress_model has already read and checked (given whenever `calib` is)."""
    from .capture import CaptureSpec, calibration_batches
    from .checkpoint import ShardWriter, save_compressed, save_sharded
    from .data import causal_text
    from .lazy import load_lazy
    from .sequential import compress_sequential, init_distributed, world
    from .swap import discover

    assert out is not None  # compress_model checked it
    try:
        bundle, source = load_lazy(model, trust_remote_code=trust_remote_code)
    except OffcompError as e:
        if "lazy loading reads a local directory" not in str(e):
            raise
        bundle, source = load_model(model, trust_remote_code=trust_remote_code, verify=verify), None
    if stats is not None:
        from .capture import check_stats_model

        check_stats_model(stats, bundle.sha256)
    windows = None
    calibration = None
    if calib is not None:
        limit = getattr(bundle.model.config, "max_position_embeddings", None)
        if limit and calib["seq_len"] > limit:
            raise OffcompError(f"--calib-seq-len {calib['seq_len']} exceeds the model's {limit} positions; "
                               f"use --calib-seq-len {min(limit, 512)} or less")
        kind = bundle.kind if bundle.kind in ("causal", "masked") else "encoder"
        spec = CaptureSpec(samples=calib["samples"], seq_len=calib["seq_len"], seed=calib["seed"])
        # the very windows (and BERT masking) `offcomp capture` draws: open loop equals the global pipeline
        windows = torch.cat([b["input_ids"] for b in calibration_batches(bundle.tokenizer, causal_text(text), spec,
                                                                         kind)])
    reads_stats = plan.allocate is not None or any(
        get_method(g.method).stats_needed(get_method(g.method).parse_config(g.options, g.name or g.method))
        for g in plan.groups)
    if calib is not None and reads_stats:
        calibration = {"data": {k: v for k, v in text_identity(text, "").items() if k != "role"},
                       "spec": {"samples": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed,
                                "batch_size": spec.batch_size}, "loss": kind, "n_tokens": int(windows.numel()),
                       "collected": f"per block, {loop} loop (sequential pipeline)"}
    elif stats is not None:
        meta = getattr(stats, "meta", None) or {}
        calibration = {k: meta.get(k) for k in ("path", "key", "data", "loss", "spec", "n_tokens")}
    if warn is not None and plan.modular is None and plan.allocate is None:
        from .advice import data_free_warning

        advice = data_free_warning(plan_units(bundle.model, plan, stats, stats_later=True),
                                   count_params(bundle.model), bundle.kind)
        if advice:
            warn(advice)
    notes: list[str] = []
    # torchrun: every rank calibrates on its share of the windows; rank 0 alone keeps and writes
    device = init_distributed(device)
    rank, size = world()
    material = {
        "pipeline": "sequential", "loop": loop, "plan": plan.model_dump(), "base_sha256": bundle.sha256,
        "head": bundle.head, "stats_key": (getattr(stats, "meta", None) or {}).get("key") if stats else None,
        "calib": calib, "calib_sha256": text.sha256 if text is not None else None, "seed": seed,
        "device": device.type, "ranks": size,
        "save_dtype": str(save_dtype), "offcomp": versions()["offcomp"], "torch": torch.__version__}
    store = PartialStore(out, material) if rank == 0 else None
    spill = store.path / "hidden" if store is not None else Path(tempfile.mkdtemp(prefix=f"offcomp-rank{rank}-"))
    dtype = save_dtype or stored_dtype(bundle.source, trust_remote_code)
    writer = ShardWriter(store.path / "shards", dtype) if source is not None and store is not None else None
    prefix = discover(bundle.model).blocks
    try:
        report, allocation, modular, run = compress_sequential(
            bundle.model, plan, source=source, windows=windows, stats=stats, device=device, loop=loop,  # type: ignore[arg-type]
            seed=seed, placement=placement, spill=spill, progress=progress, log=notes.append, resume=store,
            write_block=None if writer is None else (lambda i, layer: writer.write(f"block-{i:05d}", layer,
                                                                                 f"{prefix}.{i}")))
        if modular is not None and calib is not None:
            modular["data"] = _modular_data(calib, text)
        if store is not None:
            manifest = _manifest(bundle, plan, plan_source, seed, report, calibration, allocation, None, modular,
                                 notes)
            manifest["pipeline"] = run.to_dict()
            if seen:
                manifest["calibration_data"] = seen
            manifest["resume"] = {"partial": str(store.path), "resumed_units": report.resumed_units,
                                  "fitted_units": len(report.units) - report.resumed_units,
                                  "resumed_modular_layers": store.resumed_layers}
            if writer is not None:
                save_sharded(bundle.model, bundle.tokenizer, out, manifest, writer, overwrite=overwrite, source=source)
            else:
                bundle.model.to("cpu")
                save_compressed(bundle.model, bundle.tokenizer, out, manifest, overwrite=overwrite, dtype=dtype)
    except OffcompError:
        if store is not None:
            store.close(remove=True)
        raise
    except BaseException:
        if store is not None:
            store.close(remove=False)
        raise
    finally:
        if store is None:
            shutil.rmtree(spill, ignore_errors=True)
    if store is not None:
        store.close(remove=True)
    if size > 1:
        import torch.distributed as dist

        dist.barrier()  # the other ranks return the checkpoint rank 0 wrote
    return {"out": str(out), **read_manifest(out)}


def choose_pipeline(model: str, plan: Plan, pipeline: str, *, calib: dict[str, Any] | None, stats: Any,
                    valid: dict[str, Any] | None, dry_run: bool, trust_remote_code: bool = False) -> str:
    """"sequential" or "global" for `--pipeline auto|sequential|global` (see compress_model). An
    explicit "sequential" that cannot work is one line saying why; "auto" then quietly goes global."""
    if pipeline == "global" or dry_run:
        return "global"
    why = None
    if valid is not None:
        why = "--valid-data scores candidates on the whole model"
    elif stats is not None and pipeline == "auto":
        why = "--stats holds whole-model statistics"
    elif calib is None and stats is None and pipeline == "auto":
        why = "the plan uses no calibration data"
    if why is None:
        from .sequential import sequential_blocker
        from .swap import skeleton

        config = model_config(model, trust_remote_code)
        sk = _head_skeleton(config, trust_remote_code) or skeleton(config, trust_remote_code)
        try:
            why = sequential_blocker(sk, plan, stats_given=stats is not None)
        except OffcompError:
            why = None  # a bad plan: the pipeline that runs it says what is wrong
    if why is None:
        return "sequential"
    if pipeline == "sequential":
        raise OffcompError(f"the sequential pipeline cannot run this: {why}; use --pipeline global")
    return "global"


def _head_skeleton(config: Any, trust_remote_code: bool) -> Any:
    """The meta skeleton with the checkpoint's own head (plans may name the LM head)."""
    from .lazy import empty_model
    from .models import HEADS, default_head

    try:
        return empty_model(config, HEADS[default_head(config)], trust_remote_code)
    except (ValueError, KeyError, OSError):
        return None


def _modular_data(calib: dict[str, Any], text: Any) -> dict[str, Any]:
    """The text modular training read, with the split it really was (a file is its own split,
    "file", whatever --calib-split said)."""
    return {"data": calib["data"], "split": getattr(text, "split", calib["split"]),
            "sha256": getattr(text, "sha256", None), "seq_len": calib["seq_len"], "seed": calib["seed"]}


def _text_sha256(source: dict[str, Any] | None) -> str | None:
    """Content hash of calibration/validation text (part of the resume key: a file can change)."""
    if source is None:
        return None
    from .capture import load_calibration_text

    return load_calibration_text(source["data"], source.get("split", "validation")).sha256


def _manifest(bundle: ModelBundle, plan: Plan, plan_source: str | None, seed: int, report: Any,
              calibration: dict[str, Any] | None, allocation: dict[str, Any] | None,
              validation: dict[str, Any] | None, modular: dict[str, Any] | None, notes: list[str]) -> dict[str, Any]:
    return {
        "base": {"name": bundle.name, "source": bundle.source, "sha256": bundle.sha256},
        "head": bundle.head, "kind": bundle.kind, "seed": seed, "plan_source": plan_source,
        "plan": plan.model_dump(), "report": report.to_dict(),
        **({"calibration": calibration} if calibration else {}),
        **({"allocation": allocation} if allocation else {}),
        **({"validation": validation} if validation else {}),
        **({"modular": modular} if modular else {}),
        **({"fit_log": notes} if notes else {}),
    }


def calibration_windows_for(tokenizer: Any, n: int | None, *, data: str, split: str, samples: int, seq_len: int,
                            seed: int) -> torch.Tensor:
    """The calibration windows (n or `samples` × seq_len token ids) that capture would draw."""
    from .capture import load_calibration_text, refuse_test_split
    from .capture_hooks import calibration_windows
    from .data import causal_text

    split = refuse_test_split(data, split)
    ids = torch.tensor(tokenizer(causal_text(load_calibration_text(data, split)), add_special_tokens=False).input_ids)
    return calibration_windows(ids, n or samples, seq_len, seed)


def results_root() -> Path:
    """Where base-model results go unless --results says otherwise: $OFFCOMP_RESULTS, else
    <offcomp cache>/results (a base model has no directory of its own to write into)."""
    env = os.environ.get("OFFCOMP_RESULTS")
    return Path(env) if env else cache_dir() / "results"


def results_path(bundle: ModelBundle, results: str | Path | None) -> Path:
    """--results if given; a compressed checkpoint's own results.jsonl; else results_root()/<name>/."""
    if results is not None:
        return Path(results)
    if bundle.manifest is not None:
        return Path(bundle.source) / RESULTS
    return results_root() / re.sub(r"[^A-Za-z0-9_.-]+", "_", bundle.name) / RESULTS


def append_result(path: Path, record: dict[str, Any]) -> None:
    """Append a record; in a compressed checkpoint also rebuild its model card (README.md)."""
    from .checkpoint import MANIFEST
    from .model_card import write_model_card

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(dumps(record) + "\n")
    if (path.parent / MANIFEST).is_file():
        write_model_card(path.parent)


def model_record(bundle: ModelBundle) -> dict[str, Any]:
    """Model identity and parameter counts, for every result record."""
    rec: dict[str, Any] = {"model": bundle.protocol()}
    if bundle.manifest is not None:
        rep = bundle.manifest["report"]
        rec["params_before"], rec["params_after"] = rep["params_before"], rep["params_after"]
        rec["methods"] = sorted({u["method"] for u in rep["units"]})
        rec["plan_source"] = bundle.manifest.get("plan_source")
        rec["compress_seconds"] = rep["seconds"]
        # method, grouping, budget, compressed modules' counts, calibration: a record that
        # `offcomp report` can place without the checkpoint at hand
        rec["compression"] = compression_summary(bundle.manifest)
        size = bundle.manifest.get("bytes") or {}
        rec["compressed_modules_bytes"] = size.get("compressed_modules")
        rec["weights_dtype"] = size.get("dtype")
    else:
        rec["params_before"] = rec["params_after"] = count_params(bundle.model)
    # what the model's weights take on disk (its *.safetensors files); None for a remote hub id
    src = Path(bundle.source)
    rec["weights_bytes"] = sum(f.stat().st_size for f in src.glob("*.safetensors")) or None if src.is_dir() else None
    return rec


def evaluate_ppl(
    model: str,
    data: str = "embedded",
    *,
    split: str = "test",
    seq_len: int = 1024,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "fp32",
    seed: int = 0,
    results: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: ProgressFn | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Perplexity of a base model or compressed directory; the record is appended to results.jsonl."""
    from .data import load_text
    from .eval.ppl import perplexity
    from .paths import check_output

    dev, dt = parse_device(device), parse_dtype(dtype)
    if results is not None:
        check_output(results, kind="file", option="--results")
    source = load_text(data, split=split)
    bundle = load_model(model, device=dev, dtype=dt, trust_remote_code=trust_remote_code, verify=verify)
    out_file = check_output(results_path(bundle, results), kind="file", option="--results")
    kind = {"causal": "causal", "masked": "masked"}.get(bundle.kind)
    if kind is None:
        raise OffcompError(
            f"{model} has no language-model head ({bundle.head}); perplexity needs a causal or masked LM"
        )
    t = time.perf_counter()
    res = perplexity(bundle.model, bundle.tokenizer, source, kind=kind, seq_len=seq_len, stride=stride,
                     max_tokens=max_tokens, batch_size=batch_size, device=dev, dtype=dt, seed=seed,
                     progress=progress or no_progress)
    # the evaluator's "model" is the class name; the record's "model" is the full identity
    scored = (Path(source.name),) if Path(source.name).is_file() else ()
    record = {"type": "ppl", **res, "architecture": res.get("model"), **model_record(bundle),
              **contamination(bundle.manifest, rows=source.rows, sha256=source.sha256, files=scored),
              "seconds": time.perf_counter() - t,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions()}
    record = strict(record)  # a non-finite number is recorded as null with its reason, never as NaN
    append_result(out_file, record)
    return {**record, "results_file": str(out_file)}


def evaluate_lm(
    model: str,
    tasks: list[str],
    *,
    data_dir: str | Path | None = None,
    include_path: list[str | Path] | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    results: str | Path | None = None,
    trust_remote_code: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """lm-evaluation-harness tasks on a base model or compressed directory, the model passed in memory.

    One record per task (type "lm-eval": every metric with its stderr, task and harness versions,
    the data files' sha256 for local tasks) is appended to results.jsonl; returns them all."""
    from .eval.harness import check_local_data, data_root, require_lm_eval, run_harness, task_manager
    from .paths import check_output

    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise OffcompError("--tasks is empty: give task names, e.g. --tasks local_glue,local_wikitext")
    for key, value, low in (("--limit", limit, 1), ("--batch-size", batch_size, 1), ("--num-fewshot", num_fewshot, 0),
                            ("--max-length", max_length, 2)):
        if value is not None and value < low:
            raise OffcompError(f"{key} must be >= {low}, got {value}")
    require_lm_eval()
    dev, dt = parse_device(device), parse_dtype(dtype)
    if results is not None:
        check_output(results, kind="file", option="--results")
    root = data_root(data_dir)
    local_data = check_local_data(names, root)  # missing files stop us before the model loads
    tm = task_manager(names, [Path(p) for p in include_path or []], root)
    bundle = load_model(model, device=dev, dtype=dt, trust_remote_code=trust_remote_code, verify=verify)
    path = check_output(results_path(bundle, results), kind="file", option="--results")
    if bundle.kind != "causal":
        raise OffcompError(f"{model} is a {bundle.kind} model ({bundle.head}); lm-eval scores causal LMs only")
    t = time.perf_counter()
    out = run_harness(bundle.model, bundle.tokenizer, names, tm, num_fewshot=num_fewshot, limit=limit,
                      batch_size=batch_size, max_length=max_length)
    seconds = time.perf_counter() - t
    protocol = {**out["protocol"], "dtype": dtype, "device": str(dev)}
    base = {**model_record(bundle), "seconds": seconds,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions()}
    records = []
    for task, res in out["tasks"].items():
        data = local_data.get(task) or {"name": "/".join(filter(None, (res["dataset"].get("dataset_path"),
                                                                      res["dataset"].get("dataset_name")))) or task}
        counts = res["n_samples"] or {}
        data = {**data, "split": res["dataset"].get("test_split") or res["dataset"].get("validation_split"),
                "n_docs": counts.get("original"), "n_scored": counts.get("effective")}
        # settings: what must match for two records to be compared (report splits tables on it)
        settings = {"task_version": res["version"], "num_fewshot": res["num_fewshot"], "limit": limit,
                    "max_length": protocol["max_length"], "lm_eval": protocol["lm_eval"], "dtype": dtype}
        rec = {"type": "lm-eval", "task": task, "metrics": res["metrics"],
               "metric_names": [k for k in res["metrics"] if not k.endswith("_stderr")],
               "task_version": res["version"], "num_fewshot": res["num_fewshot"], "output_type": res["output_type"],
               "higher_is_better": res["higher_is_better"], "data": data, "protocol": protocol,
               "settings": settings, "environment": {"dtype": dtype, "device": str(dev)}, **base}
        files = tuple(Path(local_data[task]["root"]) / rel for rel in local_data[task]["sha256"]) \
            if task in local_data else ()
        rec.update(contamination(bundle.manifest, files=files))
        rec = strict(rec)
        append_result(path, rec)
        records.append(rec)
    bad = [f"{r['task']}: {why}" for r in records for why in r.get("non_finite") or []]
    return {"records": records, "results_file": str(path), **({"non_finite": bad} if bad else {})}
