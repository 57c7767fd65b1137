"""Compression plans: which modules, grouped how, compressed by which method to which budget.

A plan is data (pydantic, loaded from YAML or JSON) and `expand_plan` is a pure function that turns
it into sorted concrete module names before any tensor is touched, so every mistake in a plan is
reported up front, naming the group.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import OffcompError


class Group(BaseModel):
    """One set of modules that share a method and a budget.

    `joint: true` compresses all the group's matrices as one (stacked across layers with shared
    factors); otherwise each matrix is compressed on its own at the group's budget.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    modules: list[str] = Field(min_length=1, description="roles (attn.k, mlp.up), name suffixes or re:regex")
    layers: str | list[int] = Field("all", description='"all", "0-11", "0-3,8" or a list of indices')
    exclude: list[str] = Field(default_factory=list)
    joint: bool = False
    method: str = "svd"
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific options")
    rank: int | list[int] | None = None
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of the group's parameters kept")
    cr: float | None = Field(None, gt=1, description="compression factor original/stored")

    @model_validator(mode="after")
    def _one_budget(self) -> Group:
        # No budget at all is allowed here and checked by Plan: only a plan with `allocate` may omit it.
        given = [k for k in ("rank", "ratio", "cr") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one of rank, ratio, cr (got {', '.join(given)})")
        return self

    @field_validator("rank")
    @classmethod
    def _positive_rank(cls, v: int | list[int] | None) -> int | list[int] | None:
        ranks = v if isinstance(v, list) else [v] if v is not None else []
        if any(r <= 0 for r in ranks):
            raise ValueError("rank must be positive")
        return v

    @field_validator("modules", "exclude")
    @classmethod
    def _check_patterns(cls, v: list[str]) -> list[str]:
        for entry in v:
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except (re.error, RecursionError, OverflowError) as e:
                    raise ValueError(f"bad regular expression {entry[:60]!r}: {e}") from None
        return v

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: str | list[int]) -> str | list[int]:
        parse_layers(v)  # raises ValueError on a malformed spec
        return v

    def budget(self) -> Budget:
        if self.rank is None and self.ratio is None and self.cr is None:
            raise OffcompError(f"group {self.name!r} has no budget; its ranks come from the plan's `allocate` "
                               "(offcomp.allocate.allocate_plan), or give it rank, ratio or cr")
        if self.rank is not None:
            return Budget("rank", self.rank)
        if self.ratio is not None:
            return Budget("ratio", self.ratio)
        return Budget("cr", self.cr)  # type: ignore[arg-type]


class Allocate(BaseModel):
    """One budget for the whole plan, spread over the groups that give none of their own by
    measured sensitivity (offcomp.allocate): groups with their own rank/ratio/cr keep it."""

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(gt=0, lt=1, description="fraction of the parameters of all the plan's modules kept")
    criterion: Literal["whitened", "fisher", "weight"] = "whitened"
    min_rank: int = Field(1, ge=1)


class ModularConfig(BaseModel):
    """The plan's `modular:` section: after compression, train each compressed attention/FFN block
    in isolation to reproduce the dense block (offcomp.modular; needs calibration text)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1, description="passes over the calibration sequences per block")
    # smollm2-135m, every linear at ratio 0.8 by SVD-LLM + Fisher allocation (test PPL 62.19; dense
    # 25.05), 2 epochs: blocks lr 1e-3 on 8 × 1024 tokens 62.19 (no epoch beat the init); on 16 × 1024
    # blocks 1e-4 49.23, sequential 3e-4 48.48, sequential 1e-4 45.81. Near-optimal inits want small steps.
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    mixup: float = Field(0.5, ge=0, description="weight of the mixup term (0: plain MSE)")
    holdout: float = Field(0.125, ge=0, lt=1, description="share of sequences held out to select the epoch")
    samples: int | None = Field(None, ge=1, description="calibration sequences to train on (default: all)")
    # "blocks": the paper's regime, every block on the dense model's inputs towards the dense block's
    # outputs, layers independent. "sequential": layer by layer on the *compressed* model's own
    # hidden states towards the dense layer's outputs, so each layer also undoes the drift the
    # layers before it left in the residual stream (which block-wise training never sees).
    mode: Literal["blocks", "sequential"] = Field("sequential", description="blocks | sequential")


class Plan(BaseModel):
    """A compression plan: groups of modules, each with a method and a budget; optionally one
    budget spread over them by sensitivity (`allocate`) and training after compression (`modular`)."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    description: str | None = Field(None, description="one line on what the plan does (shown by `offcomp plans`)")
    allocate: Allocate | None = None
    modular: ModularConfig | None = None
    groups: list[Group] = Field(min_length=1)

    @field_validator("groups")
    @classmethod
    def _budgets_given(cls, groups: list[Group], info: Any) -> list[Group]:
        if info.data.get("allocate") is None:
            for i, g in enumerate(groups):
                if g.rank is None and g.ratio is None and g.cr is None:
                    raise ValueError(f"group {g.name or f'group{i}'!r}: give exactly one of rank, ratio, cr "
                                     "(or a plan-level `allocate: {ratio: ...}`)")
        return groups


@dataclass(frozen=True)
class Budget:
    kind: Literal["rank", "ratio", "cr"]
    value: Any

    def target_params(self, original: int) -> int:
        """Stored-parameter target for `original` parameters (ratio/cr budgets only)."""
        frac = self.value if self.kind == "ratio" else 1.0 / self.value
        return int(original * frac)

    def __str__(self) -> str:
        return f"{self.kind}={self.value}"


@dataclass(frozen=True)
class ModuleInfo:
    """What the planner needs to know of a compressible module (built from the torch model)."""

    name: str
    kind: Literal["linear", "embedding"]
    shape: tuple[int, int]  # weight shape: (out, in) for linear, (num, dim) for embedding
    layer: int | None
    role: str | None


@dataclass(frozen=True)
class ExpandedGroup:
    index: int
    label: str
    group: Group
    names: list[str]
    shapes: list[tuple[int, int]]
    kinds: list[str]


@dataclass(frozen=True)
class LayerSet:
    """Layer indices as sorted inclusive ranges: `"0-1000000000"` is one range, never 10⁹ integers.
    Check `last` against the model's layer count before iterating."""

    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and any(lo <= i <= hi for lo, hi in self.ranges)

    def __iter__(self) -> Iterator[int]:
        seen: set[int] = set()
        for lo, hi in self.ranges:
            for i in range(lo, hi + 1):
                if i not in seen:
                    seen.add(i)
                    yield i

    @property
    def last(self) -> int:
        return max(hi for _, hi in self.ranges)


def parse_layers(spec: str | list[int]) -> LayerSet | None:
    """`"all"` → None (no filter); `"0-3,8"` → ranges (0, 3), (8, 8); a list → those indices."""
    if isinstance(spec, list):
        if not spec:
            raise ValueError('empty layer list: give at least one index, or "all"')
        if any(i < 0 for i in spec):
            raise ValueError("layer indices must be >= 0")
        return LayerSet(tuple((i, i) for i in sorted(set(spec))))
    s = spec.strip().lower()
    if s == "all":
        return None
    ranges: list[tuple[int, int]] = []
    for part in s.split(","):
        m = re.fullmatch(r"\s*(\d{1,18})\s*(?:-\s*(\d{1,18})\s*)?", part)
        if not m:
            raise ValueError(f'bad layer range {spec[:40]!r}: use "all", "0-11", "0-3,8" or a list')
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"bad layer range {part.strip()!r}: end before start")
        ranges.append((lo, hi))
    return LayerSet(tuple(sorted(ranges)))


MAX_PLAN_BYTES = 1 << 20  # a plan is a few groups; anything larger is not a plan
MAX_PLAN_NESTING = 64  # a plan needs about 5 levels


PLANS_DIR = Path(__file__).parent / "plans"  # the sample plans shipped with the package


def shipped_plans() -> dict[str, Path]:
    """Name (file stem) -> path of every plan shipped with offcomp."""
    return {p.stem: p for p in sorted(PLANS_DIR.glob("*.yaml"))} | {
        p.name: p for p in sorted(PLANS_DIR.glob("*.json"))}


def plan_description(path: Path) -> str:
    """A shipped plan's `description` (cheap: no validation)."""
    raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    return str((raw or {}).get("description") or "-")


def load_plan(path: str | Path) -> Plan:
    """Read a YAML/JSON plan, or a shipped plan by name (`offcomp plans`); every way the file can
    be unreadable is one OffcompError line."""
    p = Path(path)
    if not p.is_file() and str(path) in shipped_plans():
        p = shipped_plans()[str(path)]
    if not p.is_file():
        raise OffcompError(f"plan file not found: {p} (give a path, or a shipped plan: "
                           f"{', '.join(shipped_plans())})")
    try:
        blob = p.read_bytes()
    except OSError as e:
        raise OffcompError(f"cannot read plan {p}: {e.strerror or e}") from None
    if len(blob) > MAX_PLAN_BYTES:
        raise OffcompError(f"plan {p} is {len(blob):,} bytes; a plan is a short YAML/JSON file (< 1 MiB)")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OffcompError(f"plan {p} is not UTF-8 text (byte {e.start}); give a YAML or JSON file") from None
    if "\x00" in text:
        raise OffcompError(f"plan {p} is a binary file; give a YAML or JSON file")
    if _nesting(text) > MAX_PLAN_NESTING:
        raise OffcompError(f"cannot parse plan {p}: nested more than {MAX_PLAN_NESTING} levels deep")
    try:
        raw = json.loads(text) if p.suffix == ".json" else _yaml_without_aliases(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise OffcompError(f"cannot parse plan {p}: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise OffcompError(f"cannot parse plan {p}: nested too deeply") from None
    return parse_plan(raw, source=str(p))


def _nesting(text: str) -> int:
    """Rough nesting depth, in linear time: brackets outside quotes, and indentation / 2. The YAML
    scanner is quadratic in bracket depth (20,000 `[` take a minute), so depth is checked first."""
    depth = deepest = 0
    quote = ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    indent = max((len(ln) - len(ln.lstrip(" \t")) for ln in text.splitlines()), default=0)
    return max(deepest, indent // 2)


def _yaml_without_aliases(text: str) -> Any:
    """yaml.safe_load, refusing anchors/aliases: a plan never needs them, and nested aliases can
    expand a few lines into billions of nodes ("billion laughs")."""
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, yaml.AliasToken | yaml.AnchorToken):
            raise yaml.YAMLError("YAML anchors and aliases (&name, *name) are not allowed in a plan")
    return yaml.safe_load(text)


def parse_plan(raw: Any, source: str = "plan") -> Plan:
    try:
        return Plan.model_validate(raw)
    except RecursionError:
        raise OffcompError(f"invalid plan {source}: nested too deeply") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        msg = err['msg'].removeprefix('Value error, ')
        raise OffcompError(f"invalid plan {source}: {loc[:80]}: {msg}{more}") from None


def _matches(entry: str, info: ModuleInfo, roles: dict[str, str]) -> bool:
    if ":" in info.name and entry not in roles:  # a fused projection's row slice: by its role only
        return False
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], info.name) is not None
    if entry in roles:  # a role (or alias) matches by role only: BERT's `output.dense` is not attn.o's
        return roles[entry] == info.role
    return info.name == entry or info.name.endswith("." + entry)


def expand_plan(plan: Plan, modules: list[ModuleInfo], roles: dict[str, str]) -> list[ExpandedGroup]:
    """Resolve every group to sorted concrete module names; errors name the group at fault."""
    owner: dict[str, str] = {}
    n_layers = 1 + max((m.layer for m in modules if m.layer is not None), default=-1)
    out = []
    for i, g in enumerate(plan.groups):
        label = g.name or f"group{i}"
        wanted = parse_layers(g.layers)
        if wanted is not None and wanted.last >= n_layers:
            raise OffcompError(
                f"group {label!r}: layers {g.layers!r} go beyond the model's {n_layers} layers (0-{n_layers - 1})"
            )
        picked = [
            m
            for m in modules
            if any(_matches(e, m, roles) for e in g.modules)
            and not any(_matches(e, m, roles) for e in g.exclude)
            and (wanted is None or m.layer in wanted)
        ]
        if not picked:
            names = [m.name for m in modules]
            close = difflib.get_close_matches(g.modules[0], names, n=3, cutoff=0.3) or names[:3]
            raise OffcompError(
                f"group {label!r}: modules {g.modules} match nothing"
                f"{' in layers ' + str(g.layers) if wanted is not None else ''}; "
                f"roles are {', '.join(sorted(roles))}; close names: {', '.join(close)}"
            )
        picked.sort(key=lambda m: (m.layer if m.layer is not None else -1, g_order(g, m, roles), m.name))
        for m in picked:
            if m.name in owner:
                raise OffcompError(f"group {label!r}: {m.name} is already in group {owner[m.name]!r}")
            owner[m.name] = label
        out.append(
            ExpandedGroup(i, label, g, [m.name for m in picked], [m.shape for m in picked], [m.kind for m in picked])
        )
    return out


def g_order(g: Group, m: ModuleInfo, roles: dict[str, str]) -> int:
    """Within a layer, keep the order in which the plan lists the modules (q before k before v)."""
    return next(i for i, e in enumerate(g.modules) if _matches(e, m, roles))
