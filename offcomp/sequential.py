"""The sequential engine: compress a model one block at a time, never holding all of it.

    embed the calibration windows (hidden states entering block 0)
    for each block i:
        read block i's weights (lazily, from the safetensors files) onto the device
        run the hidden states through the dense block, collecting exactly the statistics its
            units' methods declare (XᵀX per shared input, Σx², mean |x|)
        fit its units; optionally train the block (modular training)
        closed loop: run the *compressed* block to produce block i+1's inputs
        write the block into its output shard, drop its weights and statistics

Closed loop (the default) takes every block's statistics on the outputs of the compressed blocks
before it, so a block is fitted to the inputs it will really see; `loop="open"` keeps the dense
model's hidden states throughout, which gives the global pipeline's statistics (`offcomp capture`
on the dense model) to rounding. Fisher information needs a backward pass through the whole model:
it comes from a separate capture (`--stats`), never from here.

Peak memory ≈ the parts outside the blocks (embeddings, head) + one block in fp32 + its fitted
replacement + the hidden states (N windows × L tokens × d) + one block's statistics; the hidden
states stay on the device when they fit, else in CPU memory, else in a memory-mapped file.

The walking primitives (`layer_inputs`, `BlockCall`) are shared with `offcomp.modular`.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from .errors import OffcompError
from .progress import ProgressFn, no_progress, with_info

Loop = Literal["closed", "open"]
# statistics a block's forward pass provides; anything else (Fisher) needs a whole-model backward pass
BLOCK_STATS = ("xtx", "act_sq", "abs_mean")


class _Stop(Exception):
    pass


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def _split(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any], bool]:
    """(hidden states, other args, other kwargs, hidden given by keyword?) of a block call."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), False
    kw = dict(kwargs)
    return kw.pop("hidden_states"), (), kw, True


class BlockCall:
    """How a block was called by its model: everything but the hidden states, which is the same
    for every calibration window of one length (rotary embeddings, masks)."""

    def __init__(self, args: tuple, kwargs: dict[str, Any], by_keyword: bool) -> None:
        self.args, self.kwargs, self.by_keyword = args, kwargs, by_keyword

    def __call__(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.by_keyword:
            return _first(block(*self.args, hidden_states=x, **self.kwargs))
        return _first(block(x, *self.args, **self.kwargs))


@torch.no_grad()
def layer_inputs(model: nn.Module, first: nn.Module, windows: torch.Tensor, device: torch.device,
                 sink: Callable[[int, torch.Tensor], None] | None = None) -> tuple[list[torch.Tensor], BlockCall]:
    """Hidden states entering the first block for every window (N × L token ids), and how the
    blocks are called. With `sink`, each window's states go to `sink(i, x)` instead of the list."""
    seen: dict[str, Any] = {"x": []}

    def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x, rest, kw, by_kw = _split(args, kwargs)
        seen["x"].append(x.detach())
        seen.setdefault("call", BlockCall(rest, kw, by_kw))
        raise _Stop

    h = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, w in enumerate(windows):
            try:
                model(input_ids=w[None].to(device), use_cache=False)
            except _Stop:
                pass
            if sink is not None:
                sink(i, seen["x"].pop())
    finally:
        h.remove()
    if "call" not in seen:
        raise OffcompError("the model never called its first block; it cannot be compressed block by block")
    return seen["x"], seen["call"]


# ---------------------------------------------------------------- hidden states


def _available_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of accelerate
        return 1 << 62


def choose_placement(nbytes: int, device_type: str, device_free: int | None, ram_free: int) -> str:
    """Where `nbytes` of hidden states go: on a GPU when they take under a quarter of its free
    memory (the block, its statistics and the fit need the rest), else in CPU memory when under a
    third of the free RAM, else on disk (a memory-mapped file)."""
    if device_type == "cuda" and device_free is not None and nbytes < device_free // 4:
        return "device"
    if nbytes < ram_free // 3:
        return "device" if device_type == "cpu" else "cpu"
    return "disk"


class HiddenStates:
    """N windows of hidden states (1 × L × d each) kept where they fit: on the compute device,
    else in CPU memory, else in a memory-mapped file under `spill` (`placement` forces one)."""

    def __init__(self, n: int, seq_len: int, width: int, device: torch.device, *, spill: Path | None = None,
                 placement: str = "auto", dtype: torch.dtype = torch.float32) -> None:
        self.shape = (n, 1, seq_len, width)
        self.device = device
        nbytes = n * seq_len * width * torch.empty((), dtype=dtype).element_size()
        if placement == "auto":
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
            placement = choose_placement(nbytes, device.type, free, _available_ram())
        if placement not in ("device", "cpu", "disk"):
            raise OffcompError(f"unknown hidden-state placement {placement!r}; use auto, device, cpu or disk")
        self.placement, self.nbytes, self.file = placement, nbytes, None
        if placement == "disk":
            if spill is None:
                raise OffcompError("hidden states do not fit in memory and there is no directory to spill them to")
            spill.mkdir(parents=True, exist_ok=True)
            self.file = spill / f"hidden-{os.getpid()}-{id(self):x}.bin"
            self.data = torch.from_file(str(self.file), shared=True, size=n * seq_len * width,
                                        dtype=dtype).view(self.shape)
        else:
            self.data = torch.empty(self.shape, dtype=dtype, device=device if placement == "device" else "cpu")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i].to(self.device, non_blocking=False)

    def __setitem__(self, i: int, x: torch.Tensor) -> None:
        self.data[i].copy_(x.reshape(self.shape[1:]))

    def copy(self, spill: Path | None = None) -> HiddenStates:
        """Another stream with the same states, in the same kind of place."""
        other = HiddenStates(len(self), self.shape[2], self.shape[3], self.device, spill=spill or (
            self.file.parent if self.file else None), placement=self.placement, dtype=self.data.dtype)
        for w in range(len(self)):
            other[w] = self[w]
        return other

    def close(self) -> None:
        self.data = torch.empty(0)
        if self.file is not None:
            self.file.unlink(missing_ok=True)


# ---------------------------------------------------------------- statistics of one block


@torch.no_grad()
def collect_block_stats(layer: nn.Module, call: BlockCall, stream: HiddenStates, needs: dict[str, set[str]],
                        prefix: str, *, write_outputs: bool = False, progress: ProgressFn = no_progress,
                        label: str = "") -> dict[str, dict[str, torch.Tensor]]:
    """Run every window of `stream` through the block `layer` (named `prefix` in the model) and
    return, per module (full name), the statistics `needs[name]` asks for. Modules that read the
    very same input tensor (q/k/v) share one accumulator, found by identity on each window as
    `offcomp.swap.shared_inputs` finds it on the whole model; they get the same tensor objects.
    `write_outputs`: the block's outputs replace its inputs in `stream` (the open loop's next states)."""
    from .capture_hooks import accumulate_input, finish_input

    rel = {name: name[len(prefix) + 1:] for name in needs}
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [layer.get_submodule(r).register_forward_hook(
        lambda m, args, out, name=name: calls.append((name, args[0]))) for name, r in rel.items()]
    acc: dict[str, dict[str, torch.Tensor]] = {}
    leader_of: dict[str, str] = {}
    wants: dict[str, set[str]] = {}  # leader → what its followers' methods read together
    n_tokens = 0
    try:
        for w in range(len(stream)):
            progress(label, w, len(stream))
            out = call(layer, stream[w])
            if write_outputs:
                stream[w] = out
            leaders: list[tuple[torch.Tensor, str]] = []
            for name, x in calls:
                lead = next((n for t, n in leaders if t is x), None)
                if lead is None:
                    leaders.append((x, name))
                    lead = name
                leader_of.setdefault(name, lead)
            for x, lead in leaders:
                if lead not in wants:
                    wants[lead] = set().union(*(needs[n] for n, ld in leader_of.items() if ld == lead))
                accumulate_input(acc.setdefault(lead, {}), x, wants[lead])
            n_tokens += stream.shape[2]
            calls.clear()
    finally:
        for h in handles:
            h.remove()
    n_tokens = _sum_over_ranks(acc, n_tokens)
    for d in acc.values():
        finish_input(d, n_tokens)
    missing = [n for n in needs if n not in leader_of]
    if missing:
        raise OffcompError(f"{missing[0]} was never called on the block's forward pass; its statistics cannot be "
                           "collected block by block (use --pipeline global)")
    return {n: acc[leader_of[n]] for n in needs}


def world() -> tuple[int, int]:
    """(rank, world size) of a torchrun data-parallel run, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPUs) and
    return this rank's device (cuda:LOCAL_RANK for --device cuda). Each rank calibrates on its share
    of the windows; the statistics are summed across ranks before every fit, so every rank fits
    the same units from the same numbers."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _sum_over_ranks(acc: dict[str, dict[str, torch.Tensor]], n_tokens: int) -> int:
    """Data-parallel calibration: every rank's sums become the sums over all ranks' windows."""
    rank, size = world()
    if size == 1:
        return n_tokens
    import torch.distributed as dist

    dev = next((t.device for d in acc.values() for t in d.values()), torch.device("cpu"))
    for lead in sorted(acc):  # the same modules on every rank (same model): the same order
        for key in sorted(acc[lead]):
            dist.all_reduce(acc[lead][key])
    total = torch.tensor([float(n_tokens)], dtype=torch.float64, device=dev)
    dist.all_reduce(total)
    return int(total.item())


# ---------------------------------------------------------------- the engine


@dataclass
class SequentialRun:
    """What the engine did, for the manifest."""

    loop: str
    placement: str | None = None
    hidden_bytes: int = 0
    windows: list[int] = field(default_factory=list)
    n_tokens: int = 0
    layers: int = 0
    peak_cuda_bytes: int | None = None
    ranks: int = 1  # data-parallel processes that shared the calibration windows (torchrun)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pipeline": "sequential", "loop": self.loop, "hidden_states": self.placement,
                "hidden_state_bytes": self.hidden_bytes, "windows": self.windows, "n_tokens": self.n_tokens,
                "layers": self.layers, "peak_cuda_bytes": self.peak_cuda_bytes, "ranks": self.ranks,
                "seconds": self.seconds}


class Blocks:
    """Access to a model's blocks: `load(i)` onto the device before use, `release(i)` after. With a
    lazy checkpoint the weights are read on load and dropped on release; without one the model is
    in memory and a block only moves between the CPU and the device."""

    def __init__(self, model: nn.Module, source: Any, device: torch.device) -> None:
        from .swap import discover

        self.model, self.source, self.device = model, source, device
        self.structure = discover(model)
        self.prefix = self.structure.blocks
        self.layers = list(model.get_submodule(self.prefix))

    def name(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def outside(self) -> list[tuple[str, nn.Module]]:
        """Modules outside the block list (embeddings, norms, head), their own tensors only."""
        inside = {id(m) for layer in self.layers for m in layer.modules()}
        return [(n, m) for n, m in self.model.named_modules() if id(m) not in inside]

    def load_rest(self, head: bool = False) -> None:
        """Everything outside the block list onto the device: the embeddings and norms at the
        start; the LM head (`head=True`) only at the end, for writing: no block needs it, and an
        untied head is as large as the embedding."""
        from .lazy import materialise, tie_after_load

        tied, out = _tied_head(self.model), self.model.get_output_embeddings() \
            if hasattr(self.model, "get_output_embeddings") else None
        for name, mod in self.outside():
            if mod is out and not head:
                continue
            if self.source is not None:
                materialise(self.model, mod, name, self.source, self.device, recurse=False,
                            skip=frozenset({"weight"}) if mod is tied else frozenset())
            mod._apply(lambda t: t if t.device.type == "meta" else t.to(self.device), recurse=False)
        if self.source is not None:
            tie_after_load(self.model)

    def load(self, i: int) -> nn.Module:
        layer = self.layers[i]
        if self.source is not None:
            from .lazy import materialise

            materialise(self.model, layer, self.name(i), self.source, self.device)
        return layer.to(self.device)

    def release_rest(self) -> None:
        """Drop the tensors outside the block list (read back from the checkpoint for writing): once
        the windows are embedded, no block needs the embedding."""
        if self.source is None:
            return
        from .lazy import release, tie_after_load

        for _, mod in self.outside():
            release(mod, recurse=False)
        tie_after_load(self.model)

    def release(self, i: int) -> None:
        if self.source is not None:
            from .lazy import release

            release(self.layers[i])
        elif self.device.type != "cpu":
            self.layers[i].to("cpu")


def _tied_head(model: nn.Module) -> nn.Module | None:
    """The LM head when it shares the input embedding's weight (read once, with the embedding)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _layers_of(rx: Any, names: list[str]) -> set[int | None]:
    """Block indices of module names (a fused slice `m:k` is in its module's block; None: outside)."""
    return {int(m.group(1)) if (m := rx.match(n.partition(":")[0])) else None for n in names}


def sequential_blocker(model: nn.Module, plan: Any, *, stats_given: bool) -> str | None:
    """Why `plan` cannot run block by block on `model`, or None. Every unit must lie inside one
    block, and its statistics must come from a block's forward pass (or from captured statistics)."""
    from .allocate import CRITERION_STAT
    from .api import plan_members
    from .swap import discover

    rx = discover(model).layer_regex()
    for m in plan_members(model, plan):
        layers = _layers_of(rx, m.names)
        if None in layers:
            outside = next(n for n in m.names if not rx.match(n.partition(":")[0]))
            return f"group {m.label!r} compresses {outside}, outside the block list"
        if len(layers) > 1:
            return f"group {m.label!r} is joint across {len(layers)} layers"
        extra = set(m.method.stats_needed(m.cfg)) - set(BLOCK_STATS)
        if extra and not stats_given:
            return (f"group {m.label!r} ({m.method.name}) needs {', '.join(sorted(extra))}, which only a "
                    "whole-model backward pass gives (run `offcomp capture` and pass --stats)")
    if plan.allocate is not None and CRITERION_STAT[plan.allocate.criterion] == "fisher_row" and not stats_given:
        return "allocation by Fisher needs a whole-model backward pass (run `offcomp capture` and pass --stats)"
    return None


def compress_sequential(
    model: nn.Module,
    plan: Any,
    *,
    source: Any = None,
    windows: torch.Tensor | None = None,
    stats: dict[str, dict[str, torch.Tensor]] | None = None,
    device: str | torch.device = "cpu",
    loop: Loop = "closed",
    seed: int = 0,
    placement: str = "auto",
    spill: Path | None = None,
    progress: ProgressFn | None = None,
    log: Any = None,
    resume: Any = None,
    write_block: Callable[[int, nn.Module], None] | None = None,
) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None, SequentialRun]:
    """Compress `model` in place block by block (see the module doc). Returns the CompressReport,
    the allocation record (plan `allocate`), the modular-training record (plan `modular`) and what
    the engine did.

    `source` (an `offcomp.lazy.LazyCheckpoint`): `model` is a meta skeleton whose blocks are read
    from it one at a time and dropped after `write_block(i, block)` has saved them. `windows`
    (N × L token ids) is the calibration text; without it only data-free plans run. `stats`:
    captured statistics (e.g. Fisher) used instead of collecting; they are then whole-model."""
    from .api import finish_report, fit_unit, plan_units, start_report, with_slice_stats
    from .capture_hooks import return_freed_memory

    t0 = time.perf_counter()
    return_freed_memory()  # a block's large buffers go back to the OS when freed, not to heap fragments
    progress = with_info(progress or no_progress)
    log = log or (lambda msg: None)
    dev = torch.device(device)
    if loop not in ("closed", "open"):
        raise OffcompError(f"unknown calibration loop {loop!r}; use closed or open")
    why = sequential_blocker(model, plan, stats_given=stats is not None)
    if why:
        raise OffcompError(f"the sequential pipeline cannot run this plan: {why}; use --pipeline global")
    blocks = Blocks(model, source, dev)
    run = SequentialRun(loop=loop, layers=len(blocks.layers))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    blocks.load_rest()
    stats = with_slice_stats(stats, blocks.structure)

    stream: HiddenStates | None = None
    call: BlockCall | None = None
    rank, size = world()
    if windows is not None:
        run.windows = list(windows.shape)
        run.n_tokens = int(windows.numel())
        if size > 1:  # data-parallel calibration: each rank its share of the windows
            if len(windows) < size:
                raise OffcompError(f"{len(windows)} calibration windows for {size} processes; give at least one each")
            if plan.modular is not None:
                raise OffcompError("modular training runs in one process; run it without torchrun")
            run.ranks = size
            windows = windows[rank::size]
        holder: list[HiddenStates] = []

        def sink(w: int, x: torch.Tensor) -> None:
            if not holder:  # the states' width is what the first block really receives
                holder.append(HiddenStates(len(windows), x.shape[-2], x.shape[-1], dev, spill=spill,
                                           placement=placement, dtype=x.dtype))
            holder[0][w] = x

        _, call = layer_inputs(model, blocks.layers[0], windows, dev, sink=sink)
        stream = holder[0]
        run.placement, run.hidden_bytes = stream.placement, stream.nbytes
    blocks.release_rest()  # a lazy model's embedding and head are written from the checkpoint itself

    allocation = None
    if plan.allocate is not None:
        plan, allocation = _allocate(model, plan, blocks, stream, call, stats, progress, log)
    planned = plan_units(model, plan, stats, stats_later=True)
    needs_data = any(p.method.stats_needed(p.cfg) for p in planned) or plan.modular is not None
    if needs_data and stream is None and stats is None:
        raise OffcompError("this plan needs calibration data: pass --calib-data")

    report, acc = start_report(model, planned)
    rx = blocks.structure.layer_regex()
    by_layer: dict[int, list[int]] = {}
    for k, p in enumerate(planned):
        (i,) = _layers_of(rx, p.unit.names)  # one block each: sequential_blocker checked
        by_layer.setdefault(i, []).append(k)  # type: ignore[arg-type]

    trainer = _Trainer(plan.modular, blocks, stream, call, seed, progress, log, resume, spill) \
        if plan.modular is not None else None
    order: list[int] = []
    t_fit = 0.0
    for i in range(len(blocks.layers)):
        layer = blocks.load(i)
        units = by_layer.get(i, [])
        teacher = copy.deepcopy(layer) if trainer is not None else None
        need: dict[str, set[str]] = {}  # module → statistics its units' methods read
        for k in units if stats is None else ():
            keys = set(planned[k].method.stats_needed(planned[k].cfg))
            for n in planned[k].unit.names if keys else ():
                need.setdefault(n.partition(":")[0], set()).update(keys)
        layer_stats = stats
        if stream is not None:
            # open loop without training: the dense outputs replace the stream in the same pass
            advance_now = loop == "open" and trainer is None
            src = trainer.dense if trainer is not None and loop == "open" else stream
            if need or advance_now:
                collected = collect_block_stats(layer, call, src, need, blocks.name(i),  # type: ignore[arg-type]
                                                write_outputs=advance_now, progress=progress,
                                                label=f"statistics {blocks.name(i)}")
                layer_stats = with_slice_stats(collected, blocks.structure) if need else stats
        t = time.perf_counter()
        for k in units:
            p = planned[k]
            progress(f"fitting {p.unit.label} ({p.method.name}) in {blocks.name(i)}", len(order), len(planned))
            fit_unit(model, k, p, report, stats=layer_stats, device=dev, seed=seed, progress=progress, log=log,
                     resume=resume)
            order.append(k)
        t_fit += time.perf_counter() - t
        del layer_stats
        if trainer is not None:
            trainer.layer(i, teacher, layer)  # type: ignore[arg-type]
        elif stream is not None and loop == "closed":
            _advance(layer, call, stream)  # type: ignore[arg-type]
        del teacher
        if write_block is not None:
            write_block(i, layer)
        blocks.release(i)
        progress("blocks", i + 1, len(blocks.layers))
    if stream is not None:
        stream.close()
    if source is None:
        blocks.load_rest(head=True)  # an in-memory model's head goes to the device with the rest
    modular = trainer.record() if trainer is not None else None
    if trainer is not None:
        trainer.close()
    if dev.type == "cuda":
        run.peak_cuda_bytes = int(torch.cuda.max_memory_allocated(dev))
    run.seconds = {"fit": t_fit, "total": time.perf_counter() - t0}
    # the report lists units in plan order, as the global pipeline does
    position = {k: j for j, k in enumerate(order)}
    report.units = [report.units[position[k]] for k in sorted(order)]
    return finish_report(report, acc, t0), allocation, modular, run


@torch.no_grad()
def _advance(layer: nn.Module, call: BlockCall, stream: HiddenStates) -> None:
    """The block's outputs become the stream (window by window, in place)."""
    for w in range(len(stream)):
        stream[w] = call(layer, stream[w])


def _allocate(model: nn.Module, plan: Any, blocks: Blocks, stream: HiddenStates | None, call: BlockCall | None,
              stats: Any, progress: ProgressFn, log: Any) -> tuple[Any, dict[str, Any]]:
    """Global-budget allocation without the whole model: a first pass over the blocks measures each
    free unit's sensitivity (its weighted spectrum) while the block is loaded, on the dense hidden
    states (whitened criterion), from captured statistics (fisher) or from the weights alone."""
    from .allocate import CRITERION_STAT, allocate_plan, free_units, unit_energy
    from .api import with_slice_stats
    from .swap import module_view

    criterion = plan.allocate.criterion
    key = CRITERION_STAT[criterion]
    units = free_units(model, plan)
    rx = blocks.structure.layer_regex()
    per_layer: dict[int, list[tuple[str, list[str]]]] = {}
    for label, names in units:
        (i,) = _layers_of(rx, names)  # one block each: sequential_blocker checked
        per_layer.setdefault(i, []).append((label, names))  # type: ignore[arg-type]
    if key == "xtx" and stats is None and stream is None:
        raise OffcompError("allocation by the whitened criterion needs calibration data: pass --calib-data")
    if key == "fisher_row" and stats is None:
        raise OffcompError("allocation by Fisher needs captured statistics: run `offcomp capture` and pass --stats")
    # the first pass runs on a copy of the dense stream: the fitting pass needs block 0's inputs again
    dense = None
    if key == "xtx" and stats is None:
        dense = stream.copy()  # type: ignore[union-attr]
    energies: dict[tuple[str, ...], torch.Tensor] = {}
    for i in range(len(blocks.layers)):
        mine = per_layer.get(i, [])
        if not mine and dense is None:
            continue
        layer = blocks.load(i)
        layer_stats = stats
        if dense is not None:
            names = {n.partition(":")[0] for _, ns in mine for n in ns}
            layer_stats = with_slice_stats(collect_block_stats(
                layer, call, dense, {n: {"xtx"} for n in names}, blocks.name(i), write_outputs=True,  # type: ignore[arg-type]
                progress=progress, label=f"allocate: sensitivity {blocks.name(i)}") if names else {},
                blocks.structure)
            if not names:
                _advance(layer, call, dense)  # type: ignore[arg-type]
        for label, names in mine:
            weights = [module_view(model, n).weight for n in names]
            energies[tuple(names)] = unit_energy(weights, names, criterion, layer_stats, label, log).cpu()
        del layer_stats
        blocks.release(i)
    if dense is not None:
        dense.close()
    result = allocate_plan(model, plan, None, progress=progress, log=log, energies=energies)
    source = {"whitened": "whitened error on the dense hidden states, first sequential pass",
              "fisher": "Fisher rows from the captured statistics (--stats)",
              "weight": "singular values of the weights (data-free)"}[criterion]
    return result.plan, {**result.record, "sensitivity": source, "plan": result.plan.model_dump()}


class _Trainer:
    """Modular training inside the engine: the dense stream (teacher inputs) runs beside the
    compressed one; each block is trained right after it is fitted, as `offcomp.modular` does on a
    whole model (same functions, same records, same resume files)."""

    def __init__(self, cfg: Any, blocks: Blocks, stream: HiddenStates | None, call: BlockCall | None, seed: int,
                 progress: ProgressFn, log: Any, resume: Any, spill: Path | None) -> None:
        from .modular import _Resume

        if stream is None or call is None:
            raise OffcompError("modular training needs calibration text: pass --calib-data")
        self.cfg, self.blocks, self.stream, self.call = cfg, blocks, stream, call
        self.progress, self.log = progress, log
        self.gen = torch.Generator().manual_seed(seed)
        self.resume = _Resume(resume, self.gen, set())
        self.records: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        n = cfg.samples or len(stream)
        if n > len(stream):
            raise OffcompError(f"modular samples {n} exceeds the {len(stream)} calibration windows")
        self.n = n
        self.dense = stream.copy(spill)  # the dense stream (the student's own is `stream`)

    def layer(self, i: int, teacher: nn.Module, student: nn.Module) -> None:
        from .modular import train_layer_blocks, train_layer_sequential

        dense = [self.dense[w] for w in range(self.n)]
        if self.cfg.mode == "sequential":
            s_hidden = [self.stream[w] for w in range(self.n)]
            recs, outs = train_layer_sequential(i, teacher, student, dense, s_hidden, self.call, set(), self.cfg,
                                                self.gen, self.progress, self.log, self.resume)
        else:
            recs, outs = train_layer_blocks(i, teacher, student, dense, self.call, self.blocks.structure.aliases,
                                            set(), self.cfg, self.gen, self.progress, self.log, self.resume)
        self.records += recs
        with torch.no_grad():
            for w in range(len(self.stream)):  # the compressed stream moves on through the trained block
                self.stream[w] = self.call(student, self.stream[w])
                self.dense[w] = outs[w] if w < self.n else self.call(teacher, self.dense[w])

    def record(self) -> dict[str, Any]:
        return {"config": self.cfg.model_dump(), "windows": [self.n, self.stream.shape[2]], "blocks": self.records,
                "frozen_shared_tensors": 0, "seconds": time.perf_counter() - self.t0,
                "resumed_layers": self.resume.store.resumed_layers if self.resume.store is not None else 0}

    def close(self) -> None:
        self.dense.close()
