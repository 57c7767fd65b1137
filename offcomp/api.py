"""`compress_(model, plan)`: the in-place verb, plus `plan_units` which does all validation first.

Nothing is fitted until every group of the plan has been expanded, matched, shape-checked and
budgeted, so a bad plan fails in a second with one line and leaves the model untouched.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .errors import OffcompError
from .layers import take_rows
from .plan import Budget, ExpandedGroup, Plan, expand_plan
from .progress import ProgressFn, no_progress, with_info
from .registry import FitContext, FitUnit, Method, get_method
from .swap import SLICE, discover, fused, install, module_view


@dataclass
class PlannedUnit:
    unit: FitUnit
    method: Method
    cfg: Any
    hyper: dict[str, Any]
    stored_params: int


@dataclass
class UnitRecord:
    label: str
    method: str
    names: list[str]
    shapes: list[tuple[int, int]]
    kinds: list[str]
    joint: bool
    budget: dict[str, Any]
    options: dict[str, Any]
    hyper: dict[str, Any]
    original_params: int
    stored_params: int
    rel_error: float  # ‖W − Ŵ‖_F / ‖W‖_F over the unit's weights
    seconds: float


@dataclass
class CompressReport:
    units: list[UnitRecord] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    untied_embeddings: bool = False
    # Elements of the original weights the plan replaces, each tensor once (a tied embedding and
    # LM head compressed together are one tensor), and of the tied copies it had to keep.
    compressed_original_params: int = 0
    untied_copy_params: int = 0
    resumed_units: int = 0  # loaded from an interrupted run's partial directory, not fitted again

    @property
    def ratio(self) -> float:
        """Parameters kept over the whole model (after / before)."""
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["compressed_stored_params"] = sum(u.stored_params for u in self.units)
        d["fitted_units"] = len(self.units) - self.resumed_units
        return d


def count_params(model: nn.Module) -> int:
    """Unique parameter elements (tied or shared tensors counted once)."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())


@dataclass(frozen=True)
class Member:
    """One fitting unit of a plan before its budget is solved: a whole joint group, or one module of
    a separate group, with the group's method and options."""

    group: ExpandedGroup
    method: Method
    cfg: Any
    names: list[str]
    shapes: list[tuple[int, int]]
    kinds: list[str]

    @property
    def label(self) -> str:
        return self.group.label

    @property
    def free(self) -> bool:
        """No budget of its own: `allocate` chooses it."""
        g = self.group.group
        return g.rank is None and g.ratio is None and g.cr is None

    def unit(self, budget: Budget, head_dim: int | None = None) -> FitUnit:
        return FitUnit(self.label, self.names, self.shapes, self.kinds, self.group.group.joint, budget, head_dim)


def plan_members(model: nn.Module, plan: Plan) -> list[Member]:
    """The one place a plan is matched against a model: every fitting unit's group, method, options
    and modules, in plan order. Budgets, statistics and the methods' checks come after (plan_units)."""
    structure = discover(model)
    for i, g in enumerate(plan.groups):
        for entry in [e for e in g.modules if e in structure.unsliced]:
            raise OffcompError(f"group {g.name or f'group{i}'!r}: {entry}: {structure.unsliced[entry]}")
    groups = expand_plan(plan, list(structure.modules), structure.roles())
    picked = {n for g in groups for n in g.names}
    both = sorted(n for n in picked if SLICE in n and n.partition(SLICE)[0] in picked)
    if both:
        raise OffcompError(f"{both[0]} is a row slice of {both[0].partition(SLICE)[0]}, which the plan also "
                           "compresses whole; choose the fused module or its slices")
    out = []
    for g in groups:
        method = get_method(g.group.method)
        cfg = method.parse_config(g.group.options, g.label)
        parts = [(g.names, g.shapes, g.kinds)] if g.group.joint else [
            ([n], [s], [k]) for n, s, k in zip(g.names, g.shapes, g.kinds)]
        out += [Member(g, method, cfg, list(n), list(sh), list(k)) for n, sh, k in parts]
    return out


def plan_units(
    model: nn.Module, plan: Plan, stats: dict[str, dict[str, torch.Tensor]] | None = None,
    stats_later: bool = False,
) -> list[PlannedUnit]:
    """Validate a plan against a model and solve its budgets; returns what would be fitted,
    touching nothing. `stats_later`: the caller (the sequential engine) collects each unit's
    statistics itself, so their absence now is not an error."""
    structure = discover(model)
    members = plan_members(model, plan)
    stats = with_slice_stats(stats, structure)
    planned: list[PlannedUnit] = []
    head_dim = _head_dim(model)
    checked: set[int] = set()
    for mem in members:
        g, method, cfg = mem.group, mem.method, mem.cfg
        if g.index not in checked:
            checked.add(g.index)
            _check_group(g, method, structure)
        unit = mem.unit(g.group.budget(), head_dim)
        need = method.stats_needed(cfg)
        missing = [n for n in mem.names if not stats or not set(need) <= set(stats.get(n, {}))]
        if need and missing and not stats_later:
            raise OffcompError(
                f"group {g.label!r}: method {method.name!r} with these options needs calibration statistics "
                f"({', '.join(need)}) for {missing[0]}; run `offcomp capture` and pass --stats DIR "
                "(or --calib-data)"
            )
        hyper = method.solve(unit, cfg)
        planned.append(PlannedUnit(unit, method, cfg, hyper, method.stored_params(unit, cfg, hyper)))
    check_savings(model, planned)
    return planned


def _check_group(g: ExpandedGroup, method: Method, structure: Any) -> None:
    """What a group's method cannot do on its modules, one line each."""
    refused = [n for n in g.names if n in structure.refused]
    if refused:
        raise OffcompError(f"group {g.label!r}: {refused[0]} cannot be compressed: "
                           f"{structure.refused[refused[0]]}; exclude it")
    fused_paths = fused(structure)
    # (a row slice too: its narrower output would no longer fit the widths the model splits the fused output by)
    hidden = [n for n in g.names if getattr(method, "needs_channels", False)
              and (m := structure.layer_regex().match(n)) and m.group(2).partition(SLICE)[0] in fused_paths]
    if hidden:
        rx = structure.layer_regex().match(hidden[0])
        parts = "/".join(fused_paths[rx.group(2).partition(SLICE)[0]][0])  # type: ignore[union-attr]
        what = "a row slice of a fused projection" if SLICE in hidden[0] else "a fused projection"
        raise OffcompError(f"group {g.label!r}: {hidden[0]} is {what} ({parts} in one matrix); "
                           f"method {method.name!r} removes heads/neurons of separate projections, which "
                           f"{structure.model_type} does not expose; use a low-rank method or unstructured prune")
    bad = [n for n, k in zip(g.names, g.kinds) if k not in method.kinds]
    if bad:
        raise OffcompError(f"group {g.label!r}: method {method.name!r} cannot compress {bad[0]} ({bad[0]!r} kind)")
    if g.group.joint:
        _check_joint_shapes(g.label, method, g.names, g.shapes)


@dataclass(frozen=True)
class Accounting:
    """What a plan does to the stored parameter count, each tensor counted once."""

    removed: int  # elements of the distinct original weights the plan replaces
    stored: int  # elements the methods store instead
    copied: int  # elements of tied copies kept for modules outside the plan (e.g. the LM head)
    ties: tuple[tuple[str, ...], ...]  # groups of module names sharing one weight, touched by the plan

    @property
    def saved(self) -> int:
        return self.removed - self.stored - self.copied


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(weight) → names of the Linear/Embedding modules that hold it (several when tied)."""
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and isinstance(mod, nn.Linear | nn.Embedding):
            owners.setdefault(id(w), []).append(name)
    return owners


def _shares(model: nn.Module) -> dict[int, int]:
    shares: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        shares[id(p)] = shares.get(id(p), 0) + 1
    return shares


def _untie_list(model: nn.Module, names: set[str]) -> list[tuple[str, bool]]:
    """Modules outside `names` whose weight is tied to one inside (they keep their own copy), with
    whether their bias is shared too (BERT's MLM decoder shares it with `cls.predictions.bias`)."""
    shares = _shares(model)
    out = []
    for tied in _weight_owners(model).values():
        if len(tied) > 1 and any(n in names for n in tied):
            for n in tied:
                if n not in names:
                    bias = getattr(model.get_submodule(n), "bias", None)
                    out.append((n, isinstance(bias, nn.Parameter) and shares.get(id(bias), 0) > 1))
    return out


def accounting(model: nn.Module, planned: list[PlannedUnit]) -> Accounting:
    names = {n for p in planned for n in p.unit.names}
    unique: dict[int, int] = {}
    views = [module_view(model, n) for n in names]  # kept alive: ids of freed views would be reused
    for v in views:
        unique[id(v.weight)] = v.weight.numel()
    copied = 0
    for n, with_bias in _untie_list(model, names):
        mod = model.get_submodule(n)
        copied += mod.weight.numel() + (mod.bias.numel() if with_bias else 0)
    # a replacement layer owns its bias: one shared with another parameter (BERT's MLM decoder bias
    # is also `cls.predictions.bias`) is stored twice from then on
    shares = _shares(model)
    for n in names:
        bias = getattr(module_view(model, n), "bias", None)
        if isinstance(bias, nn.Parameter) and shares.get(id(bias), 0) > 1:
            copied += bias.numel()
    ties = tuple(tuple(t) for t in _weight_owners(model).values() if len(t) > 1 and any(n in names for n in t))
    return Accounting(sum(unique.values()), sum(p.stored_params for p in planned), copied, ties)


def check_savings(model: nn.Module, planned: list[PlannedUnit]) -> None:
    """Refuse a plan that would not reduce the stored parameter count: tied tensors count once, and
    compressing one owner of a tied weight keeps a full copy for the others."""
    acc = accounting(model, planned)
    if acc.saved > 0:
        return
    tie = f"; tied weights ({'; '.join(' = '.join(t) for t in acc.ties)}) count once" if acc.ties else ""
    copy = f", plus {acc.copied:,} kept as the tied copy of modules outside the plan" if acc.copied else ""
    raise OffcompError(
        f"the plan saves nothing: it replaces {acc.removed:,} stored parameters by {acc.stored:,}{copy}{tie}; "
        "lower the budgets, or compress every module that shares a tied weight together")


def with_slice_stats(stats: Any, structure: Any) -> Any:
    """Statistics for row slices of fused projections, from the fused module's: a slice reads the
    same input (Gram, mean |x| unchanged), its Fisher rows are the module's rows of the slice."""
    if not stats or not structure.slices:
        return stats
    import copy

    out = copy.copy(stats)
    for name, (owner, rows) in structure.slices.items():
        if owner in stats and name not in stats:
            d = stats[owner]
            out[name] = {**d, **{k: take_rows(d[k], rows) for k in ("fisher_row", "fisher") if k in d}}
    return out


def _head_dim(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "head_dim", None):
        return int(cfg.head_dim)
    heads, hidden = getattr(cfg, "num_attention_heads", None), getattr(cfg, "hidden_size", None)
    return hidden // heads if heads and hidden else None


def _check_joint_shapes(label: str, method: Method, names: list[str], shapes: list[tuple[int, int]]) -> None:
    if method.joint_shapes == "any":
        return
    key = (lambda s: s[1]) if method.joint_shapes == "columns" else (lambda s: s)
    for n, s in zip(names, shapes):
        if key(s) != key(shapes[0]):
            what = "input size" if method.joint_shapes == "columns" else "shape"
            raise OffcompError(
                f"group {label!r}: joint {method.name!r} needs one {what}, but {names[0]} is "
                f"{tuple(shapes[0])} and {n} is {tuple(s)}; split the group"
            )


def _untie_if_needed(model: nn.Module, names: set[str]) -> int:
    """A compressed weight must not stay tied to another module (e.g. the LM head to the input
    embedding): give the other module its own copy and stop the config from re-tying on load."""
    copied = 0
    for n, with_bias in _untie_list(model, names):
        mod = model.get_submodule(n)
        mod.weight = nn.Parameter(mod.weight.detach().clone())
        copied += mod.weight.numel()
        # an untied skeleton does not re-share a shared bias on load, so the head gets its own too
        if with_bias:
            mod.bias = nn.Parameter(mod.bias.detach().clone())
            copied += mod.bias.numel()
    if copied:
        cfg = getattr(model, "config", None)
        if cfg is not None:
            cfg.tie_word_embeddings = False
            if hasattr(cfg, "get_text_config"):
                cfg.get_text_config().tie_word_embeddings = False
    return copied


def _non_finite(t: torch.Tensor) -> int:
    return 0 if not t.is_floating_point() else int((~torch.isfinite(t)).sum())


@torch.no_grad()
def check_inputs_finite(unit: FitUnit, weights: list[torch.Tensor],
                        stats: dict[str, dict[str, torch.Tensor]] | None) -> None:
    """A NaN/Inf weight or statistic would crash LAPACK or give a non-finite checkpoint: stop first,
    naming the group and module (one check here for every method)."""
    for name, w in zip(unit.names, weights):
        if bad := _non_finite(w):
            raise OffcompError(f"group {unit.label!r}: the weight of {name} has {bad:,} non-finite values "
                               "(NaN/Inf); the base checkpoint is damaged, nothing was written")
        for key, t in ((stats or {}).get(name) or {}).items():
            if isinstance(t, torch.Tensor) and (bad := _non_finite(t)):
                raise OffcompError(f"group {unit.label!r}: calibration statistic {key!r} of {name} has {bad:,} "
                                   "non-finite values; recapture (offcomp capture --force), nothing was written")


@torch.no_grad()
def check_fitted_finite(unit: FitUnit, method: str, layers: list[nn.Module]) -> None:
    for name, layer in zip(unit.names, layers):
        for pname, t in [*layer.named_parameters(), *layer.named_buffers()]:
            if bad := _non_finite(t):
                raise OffcompError(f"group {unit.label!r}: {method!r} fitted {bad:,} non-finite values in "
                                   f"{pname} of {name} (ill-conditioned data or budget); nothing was written")


def _resume_unit(model: nn.Module, i: int, p: PlannedUnit, originals: list[nn.Module], resume: Any,
                 report: CompressReport) -> bool:
    """Swap in unit i from the partial directory if it is there and intact."""
    try:
        layers = p.method.build(p.unit, p.cfg, p.hyper, originals)
    except OffcompError:  # the structure depends on the fit (a joint pruning unit's split): fit again
        return False
    record = resume.load_unit(i, layers, p.unit.names)
    if record is None:
        return False
    for name, layer in zip(p.unit.names, layers):
        install(model, name, layer)
    record["shapes"] = [tuple(s) for s in record["shapes"]]
    report.units.append(UnitRecord(**record))
    report.resumed_units += 1
    return True


@torch.no_grad()
def _rel_error(originals: list[torch.Tensor], layers: list[nn.Module]) -> float:
    num = den = 0.0
    for w, layer in zip(originals, layers):
        w = w.double()
        num += (w - layer.to_dense().detach().double()).pow(2).sum().item()
        den += w.pow(2).sum().item()
    return (num / den) ** 0.5 if den else 0.0


def start_report(model: nn.Module, planned: list[PlannedUnit]) -> tuple[CompressReport, Accounting]:
    """The report before any fit: counts, and tied copies made for modules outside the plan."""
    acc = accounting(model, planned)
    report = CompressReport(params_before=count_params(model), compressed_original_params=acc.removed)
    # The untied copy is stored too, so it counts against the savings.
    copied = _untie_if_needed(model, {n for p in planned for n in p.unit.names})
    report.untied_embeddings = copied > 0
    report.untied_copy_params = acc.copied
    return report, acc


def finish_report(report: CompressReport, acc: Accounting, t0: float) -> CompressReport:
    # each original tensor once (tied weights are one tensor), whatever number of units replaced it
    report.params_after = report.params_before - acc.removed + acc.stored + acc.copied
    report.seconds = time.perf_counter() - t0
    return report


def fit_unit(model: nn.Module, i: int, p: PlannedUnit, report: CompressReport, *,
             stats: dict[str, dict[str, torch.Tensor]] | None, device: torch.device, seed: int,
             progress: ProgressFn, validate: Any = None, log: Any = None, resume: Any = None) -> None:
    """Fit unit i of a plan (or take it from `resume`), install its layers in `model`, record it.
    Each unit is seeded `seed + i`, so the units can be fitted in any order or subset."""
    originals = [module_view(model, n) for n in p.unit.names]
    if resume is not None and _resume_unit(model, i, p, originals, resume, report):
        return
    weights = [o.weight.detach().clone() for o in originals]
    check_inputs_finite(p.unit, weights, stats)
    ctx = FitContext(device=device, seed=seed + i, progress=progress, stats=stats, validate=validate)
    if log:
        ctx.log = log
    torch.manual_seed(seed + i)
    t = time.perf_counter()
    layers = p.method.fit(p.unit, p.cfg, p.hyper, originals, ctx)
    seconds = time.perf_counter() - t
    check_fitted_finite(p.unit, p.method.name, layers)
    for name, layer in zip(p.unit.names, layers):
        install(model, name, layer)
    report.units.append(
        UnitRecord(
            p.unit.label, p.method.name, p.unit.names, p.unit.shapes, p.unit.kinds, p.unit.joint,
            {"kind": p.unit.budget.kind, "value": p.unit.budget.value},
            p.cfg.model_dump(), p.hyper, p.unit.original_params, p.stored_params,
            _rel_error(weights, layers), seconds,
        )
    )
    if resume is not None:
        resume.save_unit(i, layers, asdict(report.units[-1]))


def compress_(
    model: nn.Module,
    plan: Plan,
    *,
    stats: dict[str, dict[str, torch.Tensor]] | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    validate: Any = None,
    log: Any = None,
    resume: Any = None,
) -> CompressReport:
    """Compress `model` in place according to `plan` and report what was done.

    `resume` (an `offcomp.resume.PartialStore`) keeps every fitted unit and hands back those an
    interrupted run already fitted; each unit is seeded `seed + i`, so skipping some changes nothing."""
    t0 = time.perf_counter()
    stats = with_slice_stats(stats, discover(model))
    planned = plan_units(model, plan, stats)
    progress = with_info(progress or no_progress)  # methods may add {"loss": ...}; a 3-argument callback works
    report, acc = start_report(model, planned)
    dev = torch.device(device) if device else next(model.parameters()).device
    for i, p in enumerate(planned):
        progress(f"fitting {p.unit.label} ({p.method.name})", i, len(planned))
        fit_unit(model, i, p, report, stats=stats, device=dev, seed=seed, progress=progress, validate=validate,
                 log=log, resume=resume)
    progress("fitting done", len(planned), len(planned))
    return finish_report(report, acc, t0)
