"""`offcomp capture`: calibration statistics for the data-aware methods (fwsvd, asvd, svd-llm, wanda).

A capture runs a model over random windows of calibration text (WikiText-2 *validation* by default;
the test split is refused, it is what results are measured on) with forward hooks, and backward
hooks for Fisher information, and writes one directory:

    capture.json        identity (cache key and what went into it: model sha256, tokenizer, data
                        sha256 + split, samples, seq-len, seed, batch size, loss, what was captured),
                        the module → input map, token count, timing, versions
    stats.safetensors   "<input>::xtx"       (in, in) float64  Σ_t x_t x_tᵀ over every calibration token (fp32
                                                            products per batch, fp64 sum of batches)
                        "<input>::act_sq"    (in,)    float64  Σ_t x_tj², the diagonal of xtx (for Wanda)
                        "<input>::abs_mean"  (in,)    float64  mean_t |x_tj| (for ASVD)
                        "<module>::fisher_row" (out,) float64  Σ_batches Σ_j (∂L_b/∂W_ij)²
                        "<module>::fisher"   (out, in) float32 Σ_batches (∂L_b/∂W_ij)²  (--fisher-full only)
    blocks/shard-NNNNN.safetensors   (--blocks only) block inputs/outputs, see `BLOCK_FORMAT`

<input> is the first captured module of a set that reads one tensor (q/k/v, gate/up: traced on
one forward pass by `offcomp.swap.shared_inputs`), so their Gram is computed and stored once;
`load_stats` hands every module of the set the same tensor object. Fisher uses *per-batch*
gradients (as FWSVD did): L_b is the mean token loss of one batch of `batch_size` sequences
(default 1, so per sequence) — the causal LM loss for decoders, the masked-LM loss (15 % of
tokens, BERT 80/10/10) for encoders.

The directory name carries a hash of everything above, so a run with the same inputs reuses it and
a different model, tokenizer, data, seed, sample count or capture set never does. Writes are atomic
(temporary sibling directory, then rename). The hooks themselves live in `offcomp.capture_hooks`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .capture_hooks import (  # noqa: F401  (re-exported: the capture API in one place)
    BLOCK_FORMAT,
    BLOCK_HOOKS,
    Captured,
    Stats,
    calibration_batches,
    calibration_windows,
    collect_stats,
    loss_backward,
    mask_for_mlm,
)
from .errors import OffcompError
from .integrity import hash_files, read_json, seal, verify_document, verify_files
from .progress import ProgressFn, no_progress
from .records import dumps

CAPTURE_FORMAT = 2  # 2: Gram products in float32 per batch
META = "capture.json"
STATS = "stats.safetensors"
BLOCKS = "blocks"
SEP = "::"
# Which capture part provides each statistic a method can ask for (Method.needs_stats).
PART_OF_KEY = {"xtx": "gram", "act_sq": "gram", "abs_mean": "gram", "fisher_row": "fisher", "fisher": "fisher_full"}
_BLOCK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RECAPTURE = "re-run `offcomp capture` (with --force) to re-create it"


class _Input(BaseModel):
    model_config = ConfigDict(strict=True)
    input: str


class _Meta(BaseModel):
    """The fields of capture.json that loading uses (others are kept, not checked)."""

    model_config = ConfigDict(strict=True)
    format: str
    format_version: int
    key: str
    key_material: dict[str, Any]
    modules: dict[str, _Input]


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture and from how much text. Everything here is part of the cache key."""

    samples: int = 64
    seq_len: int = 1024
    seed: int = 0
    batch_size: int = 1
    gram: bool = True  # xtx, act_sq, abs_mean
    fisher: bool = True  # fisher_row
    fisher_full: bool = False  # per-element fisher
    blocks: str | None = None  # layer spec ("0-3", "all") whose block inputs/outputs are streamed to shards
    block_dtype: Literal["float32", "bfloat16"] = "float32"
    modules: tuple[str, ...] = ()  # roles / name suffixes / re:regex; empty = every role of the adapter
    layers: str = "all"
    mask_prob: float = 0.15  # masked-LM loss of encoders

    def check(self) -> None:
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise OffcompError("capture needs --samples >= 1, --seq-len >= 2 and --batch-size >= 1")
        if not (self.gram or self.fisher or self.fisher_full or self.blocks):
            raise OffcompError("nothing to capture: enable --gram, --fisher, --fisher-full or --blocks")
        if self.block_dtype not in _BLOCK_DTYPES:
            raise OffcompError(f"--block-dtype must be one of {', '.join(_BLOCK_DTYPES)}")
        if not 0 < self.mask_prob < 1:
            raise OffcompError("mask probability must be in (0, 1)")

    @classmethod
    def for_keys(cls, keys: set[str], **kw: Any) -> CaptureSpec:
        """The smallest capture providing the statistics `keys` (e.g. the plan's needs_stats)."""
        unknown = sorted(k for k in keys if k not in PART_OF_KEY)
        if unknown:
            raise OffcompError(f"capture cannot provide statistic(s) {', '.join(unknown)}")
        parts = {PART_OF_KEY[k] for k in keys}
        return cls(gram="gram" in parts, fisher="fisher" in parts, fisher_full="fisher_full" in parts, **kw)


@dataclass
class CaptureResult:
    path: Path
    meta: dict[str, Any]
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "reused": self.reused, **self.meta}


# ---------------------------------------------------------------- which modules


def select_inputs(model: nn.Module, modules: tuple[str, ...] = (), layers: str = "all") -> dict[str, str]:
    """Linear modules to capture (plan-style selectors; default every linear of the blocks) mapped to
    the module whose input they share (traced on one forward pass: offcomp.swap.shared_inputs)."""
    from .plan import expand_plan, parse_plan
    from .swap import discover, shared_inputs

    structure = discover(model)
    plan = parse_plan({"groups": [{"modules": list(modules) or structure.default_modules(), "layers": layers,
                                   "rank": 1}]}, source="--modules/--layers")
    (group,) = expand_plan(plan, list(structure.modules), structure.roles())
    names = [n for n, k in zip(group.names, group.kinds) if k == "linear"]
    names = list(dict.fromkeys(n.partition(":")[0] for n in names))  # a fused module's slices: the module
    if not names:
        raise OffcompError("the selected modules hold no linear layer; statistics are captured for linear layers")
    return shared_inputs(model, names)


# Block capture slots: (slot, which end, roles that can stand for it, first present wins).
_BLOCK_SLOTS = (("attn.in", "input", ("attn.q", "attn.qkv")), ("attn.out", "output", ("attn.o",)),
                ("mlp.in", "input", ("mlp.up", "mlp.gate_up", "mlp.up_gate")), ("mlp.out", "output", ("mlp.down",)))


def block_roles(model: nn.Module, spec: str) -> dict[int, dict[str, str]]:
    """layer → {attn.q, attn.o, mlp.up, mlp.down → module name} for the layers of `spec` (a fused
    attn.qkv / mlp.gate_up stands for attn.q / mlp.up: it reads the same block input)."""
    from .plan import parse_layers
    from .swap import discover

    try:
        wanted = parse_layers(spec)
    except ValueError as e:
        raise OffcompError(f"--blocks: {e}") from None
    structure = discover(model)
    n_layers = structure.n_layers
    if wanted is not None and wanted.last >= n_layers:
        raise OffcompError(f"--blocks {spec!r}: the model has layers 0-{n_layers - 1}")
    layers = sorted(range(n_layers) if wanted is None else wanted)
    out: dict[int, dict[str, str]] = {}
    for i in layers:
        by_path = {m.role: m.name for m in structure.modules if m.layer == i and m.role}
        roles: dict[str, str] = {}
        for (role, _, _), (_, _, alts) in zip(BLOCK_HOOKS, _BLOCK_SLOTS):
            path = next((structure.aliases[a] for a in alts if structure.aliases.get(a) in by_path), None)
            if path is None:
                raise OffcompError(f"--blocks: layer {i} has no {role} module; block capture needs the attention "
                                   f"input/output and FFN input/output projections, named for {structure.model_type!r} "
                                   "in offcomp.adapters.ALIASES")
            roles[role] = by_path[path].partition(":")[0]  # a fused projection's slice reads the module's input
        out[i] = roles
    return out


# ---------------------------------------------------------------- cache key, run, load


def tokenizer_sha256(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{blob}".encode()).hexdigest()


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def key_material(model_sha: str, tok_sha: str, data_sha: str, split: str, spec: CaptureSpec, kind: str,
                 names: list[str]) -> dict[str, Any]:
    """Everything a capture's numbers depend on; its hash names the directory."""
    return {
        "format": CAPTURE_FORMAT, "model_sha256": model_sha, "tokenizer_sha256": tok_sha, "data_sha256": data_sha,
        "split": split, "samples": spec.samples, "seq_len": spec.seq_len, "seed": spec.seed,
        "batch_size": spec.batch_size, "loss": kind, "mask_prob": spec.mask_prob if kind == "masked" else None,
        "what": {"gram": spec.gram, "fisher": spec.fisher, "fisher_full": spec.fisher_full,
                 "blocks": spec.blocks, "block_dtype": spec.block_dtype if spec.blocks else None},
        "modules": sorted(names), "model_dtype": "float32",
    }


def refuse_test_split(data: str, split: str) -> str:
    from .data import canonical_split

    canon = canonical_split(split)
    if canon == "test":
        raise OffcompError("calibration on the test split is refused (results are measured on it); "
                           "use --split validation")
    name = Path(data).name.lower()
    if Path(data).expanduser().is_file() and re.search(r"(^|[._-])test([._-]|$)", name):
        raise OffcompError(f"{data} looks like a test split; calibrate on validation text (e.g. wiki.valid.raw)")
    return canon


def load_calibration_text(data: str, split: str) -> Any:
    from .data import load_text
    from .hygiene import refuse_evaluation_text

    try:
        source = load_text(data, split=split)
    except OffcompError as e:
        if data.strip().lower().startswith("wikitext"):
            raise OffcompError(f"{e}".split(";")[0] + "; pass --data PATH to a local validation file, "
                               "e.g. ../shared/data/wikitext-2-raw/wiki.valid.raw") from None
        raise
    refuse_evaluation_text(source, "calibration")
    return source


def default_root() -> Path:
    from .models import cache_dir

    return cache_dir() / "captures"


def run_capture(
    model: Any,
    data: str = "wikitext2",
    split: str = "validation",
    spec: CaptureSpec = CaptureSpec(),
    *,
    root: str | Path | None = None,
    device: str = "cpu",
    force: bool = False,
    trust_remote_code: bool = False,
    extra_modules: list[str] | None = None,
    progress: ProgressFn | None = None,
    verify: bool = True,
) -> CaptureResult:
    """Capture statistics for `model` (a name/dir, or an already loaded `ModelBundle`) on `data`, or
    reuse the directory of an identical earlier capture whose files still match their recorded
    hashes (a damaged or edited one is recomputed). Returns where it is and its capture.json."""
    from .checkpoint import atomic_dir, versions
    from .data import causal_text
    from .hygiene import text_identity
    from .models import ModelBundle, load_model
    from .paths import check_output
    from .swap import oriented_weight

    spec.check()
    if root is not None:
        check_output(root, kind="dir", option="--out", sources=(None if isinstance(model, ModelBundle) else model,))
    refuse_test_split(data, split)
    progress = progress or no_progress
    source = load_calibration_text(data, split)
    bundle = model if isinstance(model, ModelBundle) else load_model(
        model, trust_remote_code=trust_remote_code, verify=verify)
    dev = torch.device(device)
    kind = bundle.kind if bundle.kind in ("causal", "masked") else "encoder"
    # Fisher information is the gradient of the LM loss on the calibration text: a task head (a
    # fine-tuned classifier) has no such loss, and calibration text has no task labels
    if bundle.head not in ("causal-lm", "masked-lm") and (spec.fisher or spec.fisher_full):
        raise OffcompError(f"{bundle.name} has no language-model head ({bundle.head}), so there is no loss for "
                           "Fisher information; use Gram statistics (capture --no-fisher; compress "
                           "--allocate-criterion whitened)")
    input_of = select_inputs(bundle.model, spec.modules, spec.layers)
    for n in extra_modules or []:
        input_of.setdefault(n, n)
    blocks = block_roles(bundle.model, spec.blocks) if spec.blocks else {}
    max_pos = getattr(bundle.model.config, "max_position_embeddings", None)
    if max_pos and spec.seq_len > max_pos:
        raise OffcompError(f"--seq-len {spec.seq_len} exceeds the model's {max_pos} positions")
    material = key_material(bundle.sha256, tokenizer_sha256(bundle.tokenizer), source.sha256, source.split, spec,
                            kind, list(input_of))
    key = cache_key(material)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(bundle.name)).name)[:40]
    out = Path(root) if root is not None else default_root()
    out = out / f"{slug}-{key[:16]}"
    if not force and (meta := trusted_meta(out, verify)) is not None and meta["key"] == key:
        return CaptureResult(out, meta, True)
    if not force and (found := find_superset(out.parent, material, verify)) is not None:
        return found
    batches = calibration_batches(bundle.tokenizer, causal_text(source), spec, kind)

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        sink = None
        if blocks:
            (tmp / BLOCKS).mkdir()

            def sink(i: int, tensors: dict[str, torch.Tensor]) -> None:
                save_file(tensors, str(tmp / BLOCKS / f"shard-{i:05d}.safetensors"))

        bundle.model.to(dev).eval()
        res = collect_stats(bundle.model, batches, input_of, gram=spec.gram, fisher=spec.fisher,
                            fisher_full=spec.fisher_full, block_modules=blocks, block_sink=sink,
                            block_dtype=_BLOCK_DTYPES[spec.block_dtype], device=dev, progress=progress)
        tensors = {f"{k}{SEP}{s}": t.cpu().contiguous() for k, d in res.inputs.items() for s, t in d.items()}
        tensors.update({f"{k}{SEP}{s}": t.cpu().contiguous() for k, d in res.modules.items() for s, t in d.items()})
        save_file(tensors, str(tmp / STATS), metadata={"format": "offcomp-capture", "key": key})
        meta = {
            "format": "offcomp-capture", "format_version": CAPTURE_FORMAT, "key": key, "key_material": material,
            "model": bundle.protocol(), "data": {k: v for k, v in text_identity(source, "").items() if k != "role"},
            "loss": kind, "spec": asdict(spec),
            "n_tokens": res.n_tokens, "n_batches": len(batches),
            "fisher_gradients": "per batch of batch_size sequences (mean token loss of the batch)",
            "modules": {n: {"input": k, "shape": list(oriented_weight(bundle.model.get_submodule(n)).shape)}
                        for n, k in input_of.items()},
            "statistics": sorted({s for d in (*res.inputs.values(), *res.modules.values()) for s in d}),
            "blocks": {"layers": sorted(blocks), "n_shards": len(batches), "dtype": spec.block_dtype,
                       "format": BLOCK_FORMAT} if blocks else None,
            "seconds": time.perf_counter() - t0, "device": str(dev),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions(),
        }
        (tmp / META).write_text(dumps(seal({**meta, "files": hash_files(tmp, skip={META})}), indent=2))

    atomic_dir(out, write, overwrite=True)
    return CaptureResult(out, json.loads((out / META).read_text()), False)


def trusted_meta(path: Path, verify: bool = True) -> dict[str, Any] | None:
    """The capture.json of a cached capture if the capture is intact (valid, with recorded file
    hashes that match), else None: a damaged or edited cache is recomputed, never reused."""
    if not (path / META).is_file():
        return None
    try:
        return read_capture_meta(path, verify)
    except OffcompError:
        return None


def read_capture_meta(path: Path, verify: bool = True) -> dict[str, Any]:
    """capture.json, checked: its structure, its own hash, and the size (always) and sha256 (when
    `verify`) of every file it records."""
    meta = read_json(path / META, "capture.json", RECAPTURE)
    if meta.get("format") != "offcomp-capture" or not isinstance(meta.get("format_version"), int) \
            or meta["format_version"] > CAPTURE_FORMAT:
        raise OffcompError(f"{path}: unknown capture format {meta.get('format')} v{meta.get('format_version')}")
    try:
        _Meta.model_validate(meta)
    except ValidationError as e:
        err = e.errors()[0]
        raise OffcompError(f"{path / META} is malformed ({'.'.join(map(str, err['loc']))}: {err['msg']}); "
                           f"{RECAPTURE}") from None
    if not verify:
        if "files" in meta:
            verify_files(path, meta["files"], verify=False, fix=RECAPTURE, manifest=META)
        return meta
    if "files" not in meta:
        raise OffcompError(f"{path / META} records no file hashes (written by an older offcomp); {RECAPTURE}, "
                           "or pass --no-verify to use it unchecked")
    verify_document(meta, path / META, RECAPTURE)
    verify_files(path, meta["files"], verify=True, fix=RECAPTURE, manifest=META)
    return meta


def find_superset(root: Path, material: dict[str, Any], verify: bool = True) -> CaptureResult | None:
    """An existing, intact capture of the same model, tokenizer, data and windows that holds at least
    what is asked for (e.g. Gram + Fisher when only Gram is needed), so nothing is computed twice."""
    want = material["what"]
    for meta_file in sorted(root.glob(f"*/{META}")) if root.is_dir() else []:
        try:  # a cheap look first; only a candidate that fits has its files hashed
            have = json.loads(meta_file.read_text())["key_material"]
            same = all(have.get(k) == v for k, v in material.items() if k not in ("what", "modules"))
            covers = (set(material["modules"]) <= set(have.get("modules", []))
                      and all(have["what"].get(p) or not want[p] for p in ("gram", "fisher", "fisher_full"))
                      and (not want["blocks"] or (have["what"].get("blocks") == want["blocks"]
                                                  and have["what"].get("block_dtype") == want["block_dtype"])))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if same and covers and (meta := trusted_meta(meta_file.parent, verify)) is not None:
            return CaptureResult(meta_file.parent, meta, True)
    return None


def load_stats(path: str | Path, verify: bool = True) -> Stats:
    """module name → {xtx, act_sq, abs_mean, fisher_row, fisher}: whatever the capture holds. Modules
    sharing an input get the very same tensor objects (so joint methods can de-duplicate). The files
    are checked against capture.json first (sizes always, hashes unless `verify=False`)."""
    path = Path(path)
    if not (path / META).is_file() or not (path / STATS).is_file():
        raise OffcompError(f"{path} is not a capture directory (no {META} / {STATS}); run `offcomp capture`")
    meta = read_capture_meta(path, verify)
    try:
        flat = load_file(str(path / STATS))
    except (SafetensorError, OSError) as e:
        raise OffcompError(f"{path / STATS} is not a readable safetensors file ({str(e)[:100]}); {RECAPTURE}") from None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        owner, _, stat = k.rpartition(SEP)
        grouped.setdefault(owner, {})[stat] = t
    res = Captured(input_of={n: m["input"] for n, m in meta["modules"].items()})
    for n, k in res.input_of.items():
        res.inputs[k] = {s: t for s, t in grouped.get(k, {}).items() if PART_OF_KEY.get(s) == "gram"}
        res.modules[n] = {s: t for s, t in grouped.get(n, {}).items() if PART_OF_KEY.get(s) != "gram"}
    stats = res.by_module()
    stats.meta = {**meta, "path": str(path)}
    return stats


def check_stats_model(stats: Any, model_sha256: str) -> None:
    """Refuse statistics captured on other weights (same shapes would otherwise pass silently)."""
    meta = getattr(stats, "meta", None) or {}
    captured = meta.get("key_material", {}).get("model_sha256")
    if captured is not None and captured != model_sha256:
        raise OffcompError(f"--stats {meta.get('path', '')} was captured on another model (sha256 {captured[:12]}…, "
                           f"this one is {model_sha256[:12]}…); capture on this model")


def capture_for_plan(bundle: Any, plan: Any, data: str, split: str = "validation", *, samples: int = 64,
                     seq_len: int = 1024, seed: int = 0, root: str | Path | None = None, device: str = "cpu",
                     progress: ProgressFn | None = None) -> CaptureResult:
    """Capture (or reuse) what a plan's methods and allocation need, on the loaded model: Gram
    statistics always (a forward pass), Fisher only when something asks for it (a backward pass)."""
    from .allocate import stat_keys
    from .api import plan_members

    names = [n for m in plan_members(bundle.model, plan) for n, k in zip(m.names, m.kinds) if k == "linear"]
    names = list(dict.fromkeys(n.partition(":")[0] for n in names))  # a fused module's slices: the module
    default = select_inputs(bundle.model)
    spec = CaptureSpec.for_keys(stat_keys(plan) | {"xtx"}, samples=samples, seq_len=seq_len, seed=seed)
    return run_capture(bundle, data, split, spec, root=root, device=device, progress=progress,
                       extra_modules=[n for n in names if n not in default])
