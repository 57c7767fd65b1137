"""Per-group rank allocation: one plan-wide budget, spread by measured sensitivity.

A uniform ratio gives every matrix the same share, although some matrices lose almost nothing at a
low rank and others a lot. With `allocate: {ratio: 0.8}` in a plan, the groups that have no budget
of their own get ranks chosen to minimise the summed estimated error under the global budget:

    minimise Σ_u e_u(r_u)   subject to   Σ_u cost_u · r_u ≤ ratio · (all the plan's parameters) − fixed groups

e_u(r) is the tail energy Σ_{k>r} σ_k² of the unit's weighted spectrum, by `criterion`:
    whitened  σ(W S), S Sᵀ = XᵀX: the output error on calibration tokens ‖(W − Ŵ)Xᵀ‖², relative to
              ‖W Xᵀ‖² so units with large activations do not take everything (needs `xtx`)
    fisher    σ(diag(√I) W) / √in: Σᵢ Iᵢ/in · ‖ΔWᵢ‖², a second-order estimate of the loss increase,
              comparable across layers as it is (needs `fisher_row`)
    weight    σ(W) relative to ‖W‖²: data-free
Each extra rank of a unit lowers e_u by σ_{r+1}², non-increasing in r, so taking the best marginal
gain per stored parameter greedily (all unit steps sorted by gain/cost) is optimal up to the last
step. A unit may also stay **dense**: for its whole tail e_u(r), at the cost of the rest of its
original parameters. Factors at the break-even rank store as much as the matrix and still drop its
tail; a GQA key/value projection (192 × 576 in smollm2) breaks even at rank 143 of 192, so the last
49 ranks are cheaper to keep by not factoring at all. Dense units leave the plan.
Works for any method whose only hyper-parameter is a rank with stored = rank · cost (the
low-rank family); others must keep their own budget. The result is a concrete plan (rank budgets)
plus a record for the manifest.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .api import plan_members, with_slice_stats
from .errors import OffcompError
from .plan import Budget, Group, Plan
from .progress import ProgressFn, no_progress
from .registry import FitUnit, get_method
from .swap import discover, module_view

CRITERION_STAT = {"whitened": "xtx", "fisher": "fisher_row", "weight": None}


@dataclass
class AllocationResult:
    plan: Plan  # every allocated group now has a rank budget (separate groups: one group per module)
    record: dict[str, Any]


@dataclass
class _Unit:
    group_index: int
    label: str
    names: list[str]
    shapes: list[tuple[int, int]]
    joint: bool
    per_rank: int
    max_rank: int
    energy: torch.Tensor  # σ_k² of the weighted matrix, normalised by the criterion, descending
    original: int = 0  # parameters of the unit's matrices, what staying dense stores
    rank: int = 0
    dense: bool = False  # left uncompressed: cheaper than the last ranks (see the module doc)


def stat_keys(plan: Plan) -> set[str]:
    """Statistics a plan needs: its methods' needs_stats plus the allocation criterion's."""
    keys: set[str] = set()
    for g in plan.groups:
        method = get_method(g.method)
        keys.update(method.stats_needed(method.parse_config(g.options, g.name or g.method)))
    if plan.allocate is not None and CRITERION_STAT[plan.allocate.criterion]:
        keys.add(CRITERION_STAT[plan.allocate.criterion])  # type: ignore[arg-type]
    return keys


def rank_cost(method: Any, unit: FitUnit, cfg: Any) -> int:
    """Stored parameters per unit of rank, or an error if the method is not rank-linear."""
    probe = FitUnit(unit.label, unit.names, unit.shapes, unit.kinds, unit.joint, Budget("rank", 1))
    try:
        hyper = method.solve(probe, cfg)
    except OffcompError:
        hyper = None
    if hyper != {"rank": 1}:
        raise OffcompError(f"group {unit.label!r}: method {method.name!r} has no single rank to allocate; "
                           "give the group its own rank/ratio/cr")
    c1, c2 = (method.stored_params(probe, cfg, {"rank": r}) for r in (1, 2))
    if c2 - c1 != c1:
        raise OffcompError(f"group {unit.label!r}: method {method.name!r} does not store rank·cost parameters; "
                           "give the group its own budget")
    return c1


@torch.no_grad()
def unit_energy(weights: list[torch.Tensor], names: list[str], criterion: str,
                stats: dict[str, dict[str, torch.Tensor]] | None, label: str, log: Any = None) -> torch.Tensor:
    """σ_k² of the unit's weighted stacked matrix, scaled so units are comparable (see module doc)."""
    from .methods.lowrank import gram_whitening, weighted_singular_values

    W = torch.cat([w.detach().to(torch.float64) for w in weights])
    m = W.shape[1]
    if criterion == "weight":
        s2 = weighted_singular_values(W).square()
        return s2 / s2.sum().clamp_min(1e-300)
    key = CRITERION_STAT[criterion]
    missing = [n for n in names if key not in (stats or {}).get(n, {})]
    if missing:
        raise OffcompError(f"allocate criterion {criterion!r} needs {key!r} statistics for {missing[0]}; "
                           "pass --stats DIR from `offcomp capture` (or --calib-data)")
    if criterion == "fisher":
        rows = torch.cat([stats[n]["fisher_row"].to(torch.float64) for n in names])  # type: ignore[index]
        return weighted_singular_values(W, row=rows.clamp_min(0).sqrt()).square() / m
    grams = {id(stats[n]["xtx"]): stats[n]["xtx"] for n in names}  # type: ignore[index]
    C = sum(g.to(torch.float64) for g in grams.values())
    s2 = weighted_singular_values(W, right=gram_whitening(C, label, log)).square()
    return s2 / s2.sum().clamp_min(1e-300)


def free_units(model: nn.Module, plan: Plan) -> list[tuple[str, list[str]]]:
    """(label, module names) of every unit whose rank `allocate_plan` chooses, in its order."""
    return [(m.label, m.names) for m in plan_members(model, plan) if m.free] if plan.allocate is not None else []


def allocate_plan(
    model: nn.Module,
    plan: Plan,
    stats: dict[str, dict[str, torch.Tensor]] | None = None,
    *,
    progress: ProgressFn | None = None,
    log: Any = None,
    energies: dict[tuple[str, ...], torch.Tensor] | None = None,
) -> AllocationResult:
    """Replace the plan-wide `allocate` budget by per-unit ranks (see the module doc).

    `energies` (unit module names → `unit_energy`), when given, were measured elsewhere (the
    sequential engine's first pass, one block at a time); the model's weights are then not read."""
    alloc = plan.allocate
    if alloc is None:
        return AllocationResult(plan, {})
    progress = progress or no_progress
    members = plan_members(model, plan)
    structure = discover(model)
    stats = with_slice_stats(stats, structure)
    total_original = fixed_stored = 0
    units: list[_Unit] = []
    if not any(m.free for m in members):
        raise OffcompError("plan has `allocate` but every group has its own budget; remove one or the other")
    n_free = sum(m.free for m in members)
    for m in members:
        g, method, cfg, names, shapes = m.group, m.method, m.cfg, m.names, m.shapes
        original = sum(a * b for a, b in shapes)
        total_original += original
        if not m.free:
            unit = m.unit(g.group.budget())
            fixed_stored += method.stored_params(unit, cfg, method.solve(unit, cfg))
            continue
        unit = m.unit(Budget("rank", 1))
        per_rank = rank_cost(method, unit, cfg)
        max_rank = (original - 1) // per_rank  # beyond this the factors store more than W
        if max_rank < alloc.min_rank:
            raise OffcompError(f"group {g.label!r}: {names[0]} cannot be factored at rank {alloc.min_rank} "
                               "and save parameters")
        progress("allocate: spectra", len(units), n_free)
        if energies is not None:
            if tuple(names) not in energies:
                raise OffcompError(f"allocation: no sensitivity measured for {names[0]}")
            energy = energies[tuple(names)]
        else:
            weights = [module_view(model, n).weight for n in names]
            energy = unit_energy(weights, names, alloc.criterion, stats, g.label, log)
        units.append(_Unit(g.index, g.label, names, shapes, g.group.joint, per_rank, max_rank, energy, original))
    budget = int(alloc.ratio * total_original) - fixed_stored
    spent = sum(alloc.min_rank * u.per_rank for u in units)
    if spent > budget:
        raise OffcompError(f"allocate ratio {alloc.ratio} leaves {budget:,} parameters, less than min_rank "
                           f"{alloc.min_rank} everywhere ({spent:,}); raise the ratio or lower min_rank")
    for u in units:
        u.rank = alloc.min_rank
    # Max-heap of steps by gain per stored parameter: each unit's next rank, and staying dense from
    # its current rank (an entry made at another rank is stale). A rank step that no longer fits
    # closes the unit's rank steps (its later steps gain less, so skipping one and taking a later is
    # never better); its dense step may still fit and stays in the heap.
    heap: list[tuple[float, int, int, bool]] = []

    def push(i: int) -> None:
        u = units[i]
        if u.rank < u.max_rank:
            heapq.heappush(heap, (-_gain(u), i, u.rank, False))
        heapq.heappush(heap, (-_tail(u, u.rank) / _dense_cost(u), i, u.rank, True))

    for i in range(len(units)):
        push(i)
    while heap:
        neg, i, at, dense = heapq.heappop(heap)
        u = units[i]
        if u.dense or at != u.rank or -neg <= 0:
            continue
        cost = _dense_cost(u) if dense else u.per_rank
        if spent + cost > budget:
            continue
        spent += cost
        if dense:
            u.dense = True
        else:
            u.rank += 1
            push(i)
    progress("allocate: spectra", len(units), len(units))
    return AllocationResult(_concrete_plan(plan, units, structure), _record(alloc, units, budget, spent, fixed_stored,
                                                                  total_original))


def _gain(u: _Unit) -> float:
    return float(u.energy[u.rank]) / u.per_rank if u.rank < u.energy.numel() else 0.0


def _tail(u: _Unit, rank: int) -> float:
    return float(u.energy[rank:].sum())


def _dense_cost(u: _Unit) -> int:
    """What keeping the unit dense adds to its factors at the current rank (at least 1)."""
    return max(1, u.original - u.rank * u.per_rank)


def _one_module(name: str, structure: Any) -> dict[str, Any]:
    """Plan selectors for exactly the module `name`: a regex of its name, or for a fused
    projection's row slice (which regexes never select) its role in its one layer."""
    if name in structure.slices:
        info = next(m for m in structure.modules if m.name == name)
        return {"modules": [info.role], "layers": str(info.layer)}
    return {"modules": [f"re:{re.escape(name)}"]}


def _concrete_plan(plan: Plan, units: list[_Unit], structure: Any) -> Plan:
    by_group: dict[int, list[_Unit]] = {}
    for u in units:
        by_group.setdefault(u.group_index, []).append(u)
    groups: list[Group] = []
    for i, g in enumerate(plan.groups):
        mine = by_group.get(i)
        if mine is None:
            groups.append(g)
            continue
        label = g.name or f"group{i}"
        for u in mine:
            if u.dense:  # stays as it is: not in the concrete plan
                continue
            if u.joint:
                groups.append(g.model_copy(update={"name": label, "rank": u.rank}))
            else:
                groups.append(Group(name=label, **_one_module(u.names[0], structure), method=g.method,
                                    options=g.options, rank=u.rank))
    return Plan(groups=groups)  # never empty: ratio < 1 cannot keep every free unit dense


def _record(alloc: Any, units: list[_Unit], budget: int, spent: int, fixed: int, original: int) -> dict[str, Any]:
    """What the manifest keeps: the rule, the budget and each unit's rank next to the uniform one."""
    uniform = {id(u): min(u.max_rank, max(alloc.min_rank, int(alloc.ratio * sum(a * b for a, b in u.shapes))
                                           // u.per_rank)) for u in units}
    return {
        "ratio": alloc.ratio, "criterion": alloc.criterion, "min_rank": alloc.min_rank,
        "original_params": original, "fixed_stored_params": fixed, "budget_params": budget,
        "allocated_params": spent,
        "estimated_error": sum(0.0 if u.dense else _tail(u, u.rank) for u in units),
        "estimated_error_uniform": sum(_tail(u, uniform[id(u)]) for u in units),
        "dense_units": sum(u.dense for u in units),
        "units": [{"label": u.label, "names": u.names, "rank": None if u.dense else u.rank, "dense": u.dense,
                   "uniform_rank": uniform[id(u)], "max_rank": u.max_rank, "per_rank": u.per_rank,
                   "est_error": 0.0 if u.dense else _tail(u, u.rank)} for u in units],
    }
