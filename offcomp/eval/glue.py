"""GLUE fine-tuning on Hugging Face `Trainer`: the papers' protocol for judging a compressed encoder.

`Trainer` is used (rather than a hand-written loop) so that `torchrun` / `accelerate launch`
scale the same code to several processes: every rank loads the model and data, `Trainer` shards
the batches and gathers the predictions, and only rank 0 writes the record.

Data come from the GLUE tsv files (`data_dir`, the `download_glue_data.py` layout) or, without
`data_dir`, from the `datasets` hub copy `nyu-mll/glue`. Compressed modules train with the rest
(their factors are ordinary Parameters) unless `freeze_compressed` is set.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from transformers import (
    DataCollatorWithPadding,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from offcomp.errors import OffcompError
from offcomp.eval import finetuned
from offcomp.eval.metrics import GLUE_METRICS, glue_metrics
from offcomp.layers import CompressedModule
from offcomp.models import default_head, file_sha256, load_model, state_dict_sha256
from offcomp.progress import ProgressFn
from offcomp.records import dumps


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's columns live in the tsv files and in the `datasets` copy."""

    name: str
    dir_name: str
    tsv_columns: tuple  # (text_a, text_b | None, label) as header names, or ints when there is no header
    hf_columns: tuple[str, str | None]
    label_names: tuple[str, ...] | None  # tsv label strings in class-id order; None: the tsv holds ids/scores
    num_labels: int
    eval_splits: dict[str, tuple[str, str]]  # record name -> (tsv file, datasets split)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_DEV = {"dev": ("dev.tsv", "validation")}
_NLI2 = ("entailment", "not_entailment")
_S12 = ("sentence1", "sentence2")
_MNLI_DEV = {"matched": ("dev_matched.tsv", "validation_matched"),
             "mismatched": ("dev_mismatched.tsv", "validation_mismatched")}
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", "CoLA", (3, None, 1), ("sentence", None), None, 2, _DEV),
        TaskSpec("sst2", "SST-2", ("sentence", None, "label"), ("sentence", None), None, 2, _DEV),
        TaskSpec("mrpc", "MRPC", ("#1 String", "#2 String", "Quality"), _S12, None, 2, _DEV),
        TaskSpec("qqp", "QQP", ("question1", "question2", "is_duplicate"), ("question1", "question2"),
                 None, 2, _DEV),
        TaskSpec("stsb", "STS-B", (*_S12, "score"), _S12, None, 1, _DEV),
        TaskSpec("mnli", "MNLI", (*_S12, "gold_label"), ("premise", "hypothesis"),
                 ("entailment", "neutral", "contradiction"), 3, _MNLI_DEV),
        TaskSpec("qnli", "QNLI", ("question", "sentence", "label"), ("question", "sentence"), _NLI2, 2, _DEV),
        TaskSpec("rte", "RTE", (*_S12, "label"), _S12, _NLI2, 2, _DEV),
        TaskSpec("wnli", "WNLI", (*_S12, "label"), _S12, None, 2, _DEV),
    ]
}
HF_GLUE = "nyu-mll/glue"


@dataclass(frozen=True)
class FinetuneArgs:
    """Fine-tuning hyperparameters. The defaults are the GLUE recipe of the compression papers
    (BERT's: max length 128, lr 2e-5, 3 epochs, 32 × 2 accumulation = 64 per process)."""

    max_length: int = 128
    learning_rate: float = 2e-5
    epochs: float = 3.0
    batch_size: int = 32  # per process
    grad_accum: int = 2
    eval_batch_size: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 42
    max_steps: int = -1  # > 0 overrides epochs (quick runs)
    max_train_samples: int | None = None  # first N training examples (quick runs, tests)
    max_eval_samples: int | None = None  # first N examples of each eval split
    logging_steps: int = 50
    bf16: bool = False  # bf16 autocast (Trainer mixed precision); weights and optimizer stay fp32
    checkpoint_steps: int = 500  # a Trainer checkpoint in --out every N steps, to resume from (0: none)

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size", "grad_accum", "eval_batch_size", "logging_steps"):
            if getattr(self, name) < 1:
                raise OffcompError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and self.epochs > 0):
            raise OffcompError("learning rate and epochs must be positive")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise OffcompError(f"warmup ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.checkpoint_steps < 0:
            raise OffcompError(f"checkpoint_steps must be >= 0, got {self.checkpoint_steps}")
        for name in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OffcompError(f"{name} must be >= 1 when given, got {v}")


GLUE_DEFAULTS = FinetuneArgs()


# ---------------------------------------------------------------------------------------------- data


@dataclass
class GlueData:
    """Raw examples: each split is {"a": [...], "b": [...] | None, "label": [...]}, plus provenance."""

    task: str
    train: dict[str, list]
    evals: dict[str, dict[str, list]]
    source: dict[str, Any] = field(default_factory=dict)


def _task(task: str) -> TaskSpec:
    key = task.lower().replace("-", "")
    if key not in TASKS:
        raise OffcompError(f"unknown GLUE task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[key]


def _task_dir(spec: TaskSpec, data_dir: Path) -> Path:
    """Accept the GLUE root (holding MRPC/, CoLA/, ...) or the task folder itself."""
    for d in (data_dir / spec.dir_name, data_dir):
        if d.is_dir() and any((d / f).is_file() for f, _ in spec.eval_splits.values()):
            return d
    raise OffcompError(
        f"no {spec.name} tsv files under {data_dir}: expected {data_dir / spec.dir_name}/train.tsv and "
        f"{'/'.join(f for f, _ in spec.eval_splits.values())} (the download_glue_data.py layout)"
    )


def read_glue_tsv(spec: TaskSpec, path: Path) -> tuple[dict[str, list], int]:
    """Parse one GLUE tsv; returns the split and the number of malformed rows skipped.

    Fields are split on tabs only, never with csv quoting: MRPC, SST-2 and QQP contain bare `"`
    characters that a csv reader would swallow. `utf-8-sig` drops MRPC's byte-order mark. CoLA has
    no header; all other tasks are read by header name, so column order does not matter.
    """
    if not path.is_file():
        raise OffcompError(f"{path} not found: the {spec.name} split is missing from the data directory")
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    lines = [ln.rstrip("\r") for ln in lines if ln.strip("\r") != ""]
    a_col, b_col, y_col = spec.tsv_columns
    if isinstance(y_col, int):
        width, rows = None, lines
        idx = (a_col, b_col, y_col)
    else:
        header = lines[0].split("\t")
        missing = [c for c in (a_col, b_col, y_col) if c is not None and c not in header]
        if missing:
            raise OffcompError(f"{path}: header lacks column(s) {missing}; is this the {spec.name} file?")
        width, rows = len(header), lines[1:]
        idx = tuple(None if c is None else header.index(c) for c in (a_col, b_col, y_col))
    out: dict[str, list] = {"a": [], "b": [] if b_col is not None else None, "label": []}
    skipped = 0
    for ln in rows:
        parts = ln.split("\t")
        if (width is not None and len(parts) != width) or len(parts) <= max(i for i in idx if i is not None):
            skipped += 1
            continue
        try:
            label = _label(spec, parts[idx[2]])
        except (ValueError, KeyError):
            skipped += 1
            continue
        out["a"].append(parts[idx[0]])
        if out["b"] is not None:
            out["b"].append(parts[idx[1]])
        out["label"].append(label)
    if not out["label"]:
        raise OffcompError(f"{path}: no usable rows for {spec.name} ({skipped} malformed)")
    return out, skipped


def _label(spec: TaskSpec, raw: str) -> int | float:
    raw = raw.strip()
    if spec.is_regression:
        return float(raw)
    if spec.label_names is not None:
        return spec.label_names.index(raw) if raw in spec.label_names else int(raw)
    return int(raw)


def load_glue(task: str, data_dir: str | Path | None = None) -> GlueData:
    """Train and dev splits of one task, with where they came from (file hashes or fingerprints)."""
    spec = _task(task)
    if data_dir is not None:
        d = _task_dir(spec, Path(data_dir))
        train, skipped = read_glue_tsv(spec, d / "train.tsv")
        files = {"train.tsv": file_sha256(d / "train.tsv")}
        skipped_rows = {"train": skipped}
        evals = {}
        for name, (fname, _) in spec.eval_splits.items():
            evals[name], skipped_rows[name] = read_glue_tsv(spec, d / fname)
            files[fname] = file_sha256(d / fname)
        source = {"source": "tsv", "dir": str(d.resolve()), "sha256": files, "skipped_rows": skipped_rows}
        return GlueData(spec.name, train, evals, source)
    return _load_glue_hub(spec)


def _load_glue_hub(spec: TaskSpec) -> GlueData:
    import datasets  # heavy, and only needed on this path

    try:
        dd = datasets.load_dataset(HF_GLUE, spec.name)
    except Exception as e:  # noqa: BLE001 - any hub/network failure has the same fix
        raise OffcompError(
            f"could not load {HF_GLUE}/{spec.name} with `datasets` ({type(e).__name__}); "
            "offline, pass --data-dir with the GLUE tsv files"
        ) from e
    a, b = spec.hf_columns

    def cols(ds) -> dict[str, list]:
        return {"a": list(ds[a]), "b": list(ds[b]) if b else None, "label": list(ds["label"])}

    evals = {name: cols(dd[split]) for name, (_, split) in spec.eval_splits.items()}
    fps = {k: getattr(v, "_fingerprint", None) for k, v in dd.items()}
    source = {"source": "datasets", "name": HF_GLUE, "config": spec.name, "fingerprints": fps}
    return GlueData(spec.name, cols(dd["train"]), evals, source)


def _head(split: dict[str, list], n: int | None) -> dict[str, list]:
    if n is None:
        return split
    return {k: (v[:n] if v is not None else None) for k, v in split.items()}


def tokenize_pairs(tokenizer, split: dict[str, list], max_length: int, regression: bool) -> list[dict]:
    """One dict per example with the model inputs and `labels`; padding happens per batch."""
    enc = tokenizer(split["a"], split["b"], truncation=True, max_length=max_length)
    keys = list(enc.keys())
    dtype = torch.float32 if regression else torch.long
    return [
        {**{k: enc[k][i] for k in keys}, "labels": torch.tensor(split["label"][i], dtype=dtype)}
        for i in range(len(split["label"]))
    ]


# ------------------------------------------------- shared by run_glue, run_squad and run_sts


@dataclass
class Loaded:
    """A model ready for a task, its tokenizer, and its identity for the record."""

    model: nn.Module
    tokenizer: Any
    info: dict[str, Any]
    manifest: dict[str, Any] | None = None


def resolve_model(
    model: str | Path | nn.Module,
    tokenizer: Any,
    *,
    head: str,
    num_labels: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> Loaded:
    """Load a name/path through `offcomp.models.load_model`, or wrap a model built by the caller."""
    if isinstance(model, str | Path):
        b = load_model(str(model), head=head, num_labels=num_labels, device=device, dtype=dtype, verify=verify)
        info = {**b.protocol(), "kind": b.kind, "compressed_modules": n_compressed(b.model)}
        return Loaded(b.model, b.tokenizer, info, b.manifest)
    if tokenizer is None:
        raise OffcompError("a model object was given without its tokenizer: pass tokenizer=...")
    model.to(device=device, dtype=dtype)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or "<in-memory>"
    info = {"name": name, "source": "in-memory", "sha256": state_dict_sha256(model), "head": head,
            "compressed": n_compressed(model) > 0, "base": None, "kind": None,
            "compressed_modules": n_compressed(model)}
    return Loaded(model, tokenizer, info)


def load_teacher(name: str | Path, student: Loaded, spec: Any, device: str, dtype: torch.dtype,
                 verify: bool) -> Loaded:
    """The fine-tuned teacher of a distillation: it must already have its trained head for this
    task (a fresh head would teach noise) and read the student's tokens."""
    t = resolve_model(str(name), None, head="sequence-classification", num_labels=spec.num_labels, device=device,
                      dtype=dtype, verify=verify)
    # (a head with another label count is already refused by the loader: models.label_mismatch)
    if default_head(t.model.config) != "sequence-classification":
        raise OffcompError(f"teacher {name} has no trained classification head: give a model fine-tuned on "
                           f"{spec.name} (finetune-glue --save-model DIR, then --teacher DIR/model)")
    if t.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise OffcompError(f"teacher {name} uses another vocabulary than the student; distillation feeds both "
                           "the same token ids")
    return t


def scored_files(source: dict[str, Any]) -> tuple[Path, ...]:
    """The local files a GLUE / SQuAD / STS-B record scores (none for hub data)."""
    if "file" in source:  # STS-B
        return (Path(source["file"]),)
    if "dev_file" in source:  # SQuAD
        return (Path(source["dev_file"]),)
    if "dir" in source:  # GLUE: every split but train
        return tuple(Path(source["dir"]) / f for f in source.get("sha256", {}) if f != "train.tsv")
    return ()


def model_fields(loaded: Loaded, total_params: int, scored: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Model identity and sizes in the shape `offcomp report` reads from result records, plus the
    calibration data of the model and whether the `scored` files overlap it (offcomp.hygiene)."""
    from offcomp.hygiene import contamination
    from offcomp.report import compression_summary

    rec: dict[str, Any] = {"model": loaded.info, **contamination(loaded.manifest, files=scored)}
    rep = (loaded.manifest or {}).get("report")
    if loaded.manifest:  # the record alone says what was compressed and how, wherever the checkpoint goes
        rec["compression"] = compression_summary(loaded.manifest)
    if rep:
        rec.update(params_before=rep.get("params_before"), params_after=rep.get("params_after"),
                   methods=sorted({u["method"] for u in rep.get("units", [])}),
                   plan_source=loaded.manifest.get("plan_source"))
    else:
        rec["params_before"] = rec["params_after"] = total_params
    return rec


def n_compressed(model: nn.Module) -> int:
    return sum(isinstance(m, CompressedModule) for m in model.modules())


def freeze_compressed_modules(model: nn.Module) -> int:
    """Stop gradients into every compressed module (factors, latents, decoders); returns the
    number of parameters frozen. Shared factors are counted once."""
    frozen: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, CompressedModule):
            for p in m.parameters():
                p.requires_grad_(False)
                frozen[id(p)] = p.numel()
    if not frozen:
        raise OffcompError("--freeze-compressed was given but the model has no compressed modules")
    return sum(frozen.values())


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total / trainable / inside-compressed-modules parameter counts (shared tensors once)."""
    comp = {id(p): p.numel() for m in model.modules() if isinstance(m, CompressedModule)
            for p in m.parameters()}
    params = list(model.parameters())  # nn.Module.parameters() already de-duplicates shared tensors
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "compressed_modules": sum(comp.values()),
    }


def prepare_output_dir(output_dir: str | Path, model: Any = None) -> Path:
    """Check the destination up front (offcomp.paths); it is created only when the record is written."""
    from offcomp.paths import check_output

    source = model if isinstance(model, str | Path) else None
    return check_output(output_dir, kind="dir", option="--out", sources=(source,))


def set_seed(seed: int) -> None:
    import transformers

    transformers.set_seed(seed)


class _Progress(TrainerCallback):
    """Forwards Trainer steps to the library's progress callback, on rank 0 only."""

    def __init__(self, progress: ProgressFn) -> None:
        self.progress, self.done = progress, 0

    def on_step_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.progress("train", state.global_step, state.max_steps)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
        self.done += 1
        if state.is_world_process_zero and eval_dataloader is not None:
            self.progress("eval", self.done, len(eval_dataloader))

    def on_predict(self, args, state, control, **kw):
        self.done = 0


@dataclass
class Distill:
    """Knowledge distillation while fine-tuning: the loss is (1 - weight) × the task loss + weight ×
    the distance to a fine-tuned teacher's outputs on the same batch (KL divergence of the
    temperature-softened class distributions, × temperature², for classification; MSE of the scores
    for regression). The teacher is typically the dense model fine-tuned on the task, the student
    its compressed copy."""

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 2.0
    regression: bool = False
    source: dict[str, Any] = field(default_factory=dict)  # the teacher's name and weights hash, for the record

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise OffcompError(f"distillation weight must be in (0, 1], got {self.weight}")
        if not self.temperature > 0:
            raise OffcompError(f"distillation temperature must be positive, got {self.temperature}")
        self.teacher.eval().requires_grad_(False)

    def loss(self, student_logits: torch.Tensor, inputs: dict[str, Any], task_loss: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        with torch.no_grad():
            t = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()
        s = student_logits.float()
        if self.regression:
            kd = F.mse_loss(s, t)
        else:
            tau = self.temperature
            kd = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), log_target=True,
                          reduction="batchmean") * tau * tau
        return (1 - self.weight) * task_loss + self.weight * kd


class _DistillTrainer(Trainer):
    distill: Distill

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        # only training distils: the eval loss stays the task loss, comparable with any other run
        loss = self.distill.loss(outputs.logits, inputs, outputs.loss) if model.training else outputs.loss
        return (loss, outputs) if return_outputs else loss


def make_trainer(model, tokenizer, train_set, out: Path, args: FinetuneArgs, device: str,
                 progress: ProgressFn | None, collator: Any = None, distill: Distill | None = None) -> Trainer:
    """A Trainer that prints nothing, saves only checkpoints to resume from (the last one, every
    `checkpoint_steps`) and, on CPU, uses gloo under torchrun."""
    targs = TrainingArguments(
        output_dir=str(out),  # checkpoint-N (see eval/finetuned.py); the record goes next to them
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.learning_rate,
        num_train_epochs=args.epochs, max_steps=args.max_steps, weight_decay=args.weight_decay,
        warmup_steps=float(args.warmup_ratio), lr_scheduler_type="linear", seed=args.seed, data_seed=args.seed,
        save_strategy="steps" if args.checkpoint_steps else "no", save_steps=args.checkpoint_steps or 500,
        save_total_limit=1, eval_strategy="no", logging_strategy="steps", logging_steps=args.logging_steps,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, bf16=args.bf16,
        use_cpu=device == "cpu", ddp_backend="gloo" if device == "cpu" and world_size() > 1 else None,
        # Classification/QA losses are per-example means: with token averaging on, Trainer scales the
        # loss by the world size (gradients and the eval loss double under torchrun on 2 processes).
        average_tokens_across_devices=False,
    )
    kind = Trainer if distill is None else _DistillTrainer
    trainer = kind(model=model, args=targs, train_dataset=train_set,
                   data_collator=collator or DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    if distill is not None:
        trainer.distill = distill
    # BERT-style forwards take **kwargs, so Trainer assumes the model divides its loss by the
    # token count it passes and skips the 1/grad_accum scaling; these heads take per-example means
    # and ignore it, which would sum (not average) gradients over accumulation steps.
    trainer.model_accepts_loss_kwargs = False
    trainer.remove_callback(PrinterCallback)  # library code never prints
    trainer.remove_callback(ProgressCallback)
    if progress is not None:
        trainer.add_callback(_Progress(progress))
    return trainer


def train_summary(trainer: Trainer, train_out) -> dict[str, Any]:
    a = trainer.args
    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {
        "world_size": a.world_size,
        "effective_batch_size": a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size,
        "train": {"steps": trainer.state.global_step, "loss": float(train_out.training_loss),
                  "loss_curve": curve},
    }


def environment(device: str, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    from offcomp import __version__ as offcomp_version

    env = {"offcomp": offcomp_version, "torch": torch.__version__, "transformers": transformers.__version__,
           "device": device, "dtype": str(dtype).removeprefix("torch."),
           "torch_threads": torch.get_num_threads()}
    return {"environment": env,
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def world_size() -> int:
    """Processes launched together (torchrun / accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process(trainer: Trainer | None = None) -> bool:
    if trainer is not None:
        return trainer.is_world_process_zero()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def write_record(trainer: Trainer | None, path: Path, record: dict) -> None:
    """Rank 0 writes the JSON record (atomically, so a reader never sees half a file) and appends
    it as one line to results.jsonl beside it, where `offcomp report` finds every run."""
    if not is_main_process(trainer):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    with open(path.parent / "results.jsonl", "a") as f:
        f.write(dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------- run


def score_glue(trainer: Trainer, task: str,
               eval_sets: dict[str, list[dict]]) -> tuple[dict[str, float], dict[str, int]]:
    """The task's metrics (and eval loss) on every eval split, and how many examples each scored."""
    metrics: dict[str, float] = {}
    n_scored = {}
    for name, ds in eval_sets.items():
        pred = trainer.predict(ds, metric_key_prefix=name)
        n_scored[name] = len(pred.label_ids)  # after the cross-process gather: must equal n_eval
        scores = glue_metrics(task, pred.predictions, pred.label_ids)
        prefix = "" if name == "dev" else f"{name}_"
        metrics.update({f"{prefix}{k}": v for k, v in scores.items()})
        metrics[f"{prefix}eval_loss"] = float(pred.metrics.get(f"{name}_loss", float("nan")))
    return metrics, n_scored


def _score_only(loaded: Loaded, spec: TaskSpec, data: GlueData, out: Path, args: FinetuneArgs,
                params: dict[str, int], device: str, dtype: torch.dtype, progress: ProgressFn | None,
                t_start: float) -> dict:
    """`run_glue(train=False)`: score the model's own head on the dev split(s) and write the record."""
    eval_sets = {name: tokenize_pairs(loaded.tokenizer, _head(split, args.max_eval_samples), args.max_length,
                                      spec.is_regression) for name, split in data.evals.items()}
    trainer = make_trainer(loaded.model, loaded.tokenizer, None, out,
                           dataclasses.replace(args, checkpoint_steps=0), device, progress)
    metrics, n_scored = score_glue(trainer, spec.name, eval_sets)
    # the settings that shape a score without training: scores of one task share a table
    hyper = {"trained": False, "max_length": args.max_length, "eval_batch_size": args.eval_batch_size,
             "max_eval_samples": args.max_eval_samples}
    record = _glue_record(spec, loaded, data, eval_sets, metrics, n_scored, {}, True, hyper,
                          {**params, "frozen_compressed": 0}, args.max_eval_samples)
    record.update(world_size=world_size(), seconds=time.perf_counter() - t_start, **environment(device, dtype))
    write_record(trainer, out / f"glue-{spec.name}.json", record)
    return record


def _glue_record(spec: TaskSpec, loaded: Loaded, data: GlueData, eval_sets: dict[str, list[dict]],
                 metrics: dict[str, float], n_scored: dict[str, int], pre_metrics: dict | None, own_head: bool,
                 hyper: dict[str, Any], params: dict[str, int], max_eval_samples: int | None,
                 **train_data: Any) -> dict[str, Any]:
    """The fields a GLUE record has whether the model trained or was only scored (`train_data`: the
    training split's counts, in `data`)."""
    return {
        "type": "glue",
        "task": spec.name,
        "metric_names": list(GLUE_METRICS[spec.name]),
        "metrics": metrics,
        "pre_metrics": dict(pre_metrics or {}),
        "head_at_start": "trained" if own_head else "new",  # pre_metrics: scored before training
        **model_fields(loaded, params["total"], scored_files(data.source)),
        "data": {"name": f"glue/{spec.name}", "split": "+".join(data.evals), **data.source, **train_data,
                 "n_eval": {k: len(v) for k, v in eval_sets.items()}, "n_scored": n_scored,
                 "max_eval_samples": max_eval_samples},
        "hyperparameters": hyper,
        "params": params,
    }


def run_glue(
    model: str | nn.Module,
    task: str,
    *,
    tokenizer: Any = None,
    data_dir: str | Path | None = None,
    output_dir: str | Path,
    args: FinetuneArgs = GLUE_DEFAULTS,
    freeze_compressed: bool = False,
    pre_metrics: dict | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
    verify: bool = True,
    save_model: bool = False,
    teacher: str | Path | None = None,
    distill_weight: float = 0.5,
    distill_temperature: float = 2.0,
    train: bool = True,
) -> dict:
    """Fine-tune `model` on one GLUE task, score its dev set(s) and write `glue-<task>.json`.

    `train=False` only scores a model that already has its trained head for the task (a
    `--save-model` directory, or one compressed after fine-tuning): the record's recipe is then
    the scoring settings alone (max length, eval batch size, eval samples), so every such score of
    one task shares a table.

    A re-run after an interruption resumes from the Trainer checkpoints in `output_dir`;
    `save_model` keeps the fine-tuned model in `output_dir/model` (see eval/finetuned.py).

    `teacher`: a model fine-tuned on this task (a `--save-model` directory) whose outputs the
    training also follows (see `Distill`), e.g. the dense model when `model` is its compressed copy.

    `model` is a name/path (an embedded name, HF id or dir, or an offcomp compressed dir: loaded
    with a fresh sequence-classification head) or an already-built classification model, in
    which case `tokenizer` is required. Returns the record that rank 0 writes (every rank returns
    it). MNLI is scored on both `matched` and `mismatched` dev sets.
    """
    t_start = time.perf_counter()
    spec = _task(task)
    out = prepare_output_dir(output_dir, model)
    data = load_glue(spec.name, data_dir)  # validate data before the (slower) model load
    set_seed(args.seed)  # the new head's init must be identical on every rank and rerun
    loaded = resolve_model(model, tokenizer, head="sequence-classification", num_labels=spec.num_labels,
                           device=device, dtype=dtype, verify=verify)
    n_labels = getattr(loaded.model.config, "num_labels", spec.num_labels)
    if n_labels != spec.num_labels:
        raise OffcompError(f"{spec.name} needs a head with {spec.num_labels} label(s); the model has {n_labels}")
    if spec.is_regression:
        loaded.model.config.problem_type = "regression"
    frozen = freeze_compressed_modules(loaded.model) if freeze_compressed else 0
    params = param_counts(loaded.model)

    def encode(split: dict[str, list], n: int | None) -> list[dict]:
        return tokenize_pairs(loaded.tokenizer, _head(split, n), args.max_length, spec.is_regression)

    # A checkpoint saved with its own classifier (a fine-tuned model, or one compressed after
    # fine-tuning) is scored before training too: what compression lost, before recovery
    own_head = default_head(loaded.model.config) == "sequence-classification"
    if not train:
        if not own_head:
            raise OffcompError(f"{model} has no trained classification head to score ({spec.name}); fine-tune it "
                               "first (offcomp finetune-glue --save-model) and score OUT/model, or compress that")
        if teacher is not None or save_model or freeze_compressed:
            raise OffcompError("teacher, save_model and freeze_compressed shape training: scoring alone takes none")
        return _score_only(loaded, spec, data, out, args, params, device, dtype, progress, t_start)
    train_set = encode(data.train, args.max_train_samples)
    eval_sets = {name: encode(split, args.max_eval_samples) for name, split in data.evals.items()}
    distill = None
    if teacher is not None:
        t = load_teacher(teacher, loaded, spec, device, dtype, verify)
        distill = Distill(t.model, distill_weight, distill_temperature, spec.is_regression,
                          {k: t.info.get(k) for k in ("name", "sha256", "compressed")})
    trainer = make_trainer(loaded.model, loaded.tokenizer, train_set, out, args, device, progress, distill=distill)
    hyper = {**dataclasses.asdict(args), "freeze_compressed": freeze_compressed}
    if distill is not None:  # only then: a run without a teacher keeps the recipe older records have
        hyper["distill"] = {"teacher": distill.source, "weight": distill_weight,
                            "temperature": distill_temperature}

    if own_head and not pre_metrics:
        pre_metrics = score_glue(trainer, spec.name, eval_sets)[0]

    t0 = time.perf_counter()
    train_out, resumed = finetuned.train(trainer, out, {"task": spec.name, "model": loaded.info.get("sha256"),
                                                        "data": data.source, "hyperparameters": hyper,
                                                        "world_size": world_size()})
    train_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics, n_scored = score_glue(trainer, spec.name, eval_sets)
    eval_time = time.perf_counter() - t0

    record = {
        **_glue_record(spec, loaded, data, eval_sets, metrics, n_scored, pre_metrics, own_head, hyper,
                       {**params, "frozen_compressed": frozen}, args.max_eval_samples, n_train=len(train_set),
                       max_train_samples=args.max_train_samples),
        **train_summary(trainer, train_out),
        "resumed_from": resumed and Path(resumed).name,
        "seconds": time.perf_counter() - t_start,
        "wall_time_s": {"train": train_time, "eval": eval_time},
        **environment(device, dtype),
    }
    finetuned.finish(trainer, out, record, f"glue-{spec.name}.json", save_model, loaded, "sequence-classification")
    return record
