"""Method registry: name → one `Method` (options config, budget solver, builder, fitter).

Adding a compression method means adding one file under `offcomp/methods/` that subclasses
`Method` and decorates it with `@register`. Dispatch is a dictionary lookup, never an if/elif on
method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import OffcompError
from .layers import CompressedModule
from .plan import Budget
from .progress import ProgressFn, no_progress


class MethodConfig(BaseModel):
    """Base for method options: unknown keys are errors, so a typo in a plan is caught."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class FitUnit:
    """The modules one `fit` call sees: a whole joint group, or one module of a separate group."""

    label: str
    names: list[str]
    shapes: list[tuple[int, int]]
    kinds: list[str]
    joint: bool
    budget: Budget
    # Attention head size of the model (config.head_dim or hidden/heads), for head-aware methods.
    head_dim: int | None = None

    @property
    def original_params(self) -> int:
        return sum(n * m for n, m in self.shapes)


@dataclass
class FitContext:
    """Everything a fit may need besides the weights. Seed, device and dtype are explicit."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: ProgressFn = no_progress
    # Calibration statistics per module name (XᵀX, Fisher rows, ...), from `offcomp capture`.
    stats: dict[str, dict[str, torch.Tensor]] | None = None
    # Scores a candidate set of replacement modules (lower is better, e.g. validation PPL) by
    # swapping them into the model temporarily; used for early stopping, never the test split.
    validate: Callable[[dict[str, nn.Module]], float] | None = None
    log: Callable[[str], None] = lambda msg: None


class Method:
    """One compression method. Subclasses set the class attributes and implement four functions."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Joint groups need matrices that agree on: "columns" (in_features; rows are stacked),
    # "same" (the full shape) or "any".
    joint_shapes: ClassVar[Literal["columns", "same", "any"]] = "columns"
    kinds: ClassVar[tuple[str, ...]] = ("linear", "embedding")
    # Statistics a fit cannot do without (keys of FitContext.stats entries).
    needs_stats: ClassVar[tuple[str, ...]] = ()

    def stats_needed(self, cfg: Any) -> tuple[str, ...]:
        """The statistics this configuration reads: `needs_stats` plus what options switch on (e.g.
        a Wanda score or a whitened loss), so that a missing capture is caught at plan time."""
        return self.needs_stats

    def solve(self, unit: FitUnit, cfg: Any) -> dict[str, Any]:
        """Turn the unit's budget into the method's hyper-parameters (e.g. {"rank": 37}).

        Raises OffcompError when the budget cannot be met or saves nothing."""
        raise NotImplementedError

    def stored_params(self, unit: FitUnit, cfg: Any, hyper: dict[str, Any]) -> int:
        """Exact count of stored parameters replacing the unit's weights (biases excluded)."""
        raise NotImplementedError

    def build(
        self, unit: FitUnit, cfg: Any, hyper: dict[str, Any], originals: list[nn.Module]
    ) -> list[CompressedModule]:
        """Empty replacement layers with the right structure (used when loading a checkpoint)."""
        raise NotImplementedError

    def fit(
        self, unit: FitUnit, cfg: Any, hyper: dict[str, Any], originals: list[nn.Module], ctx: FitContext
    ) -> list[CompressedModule]:
        """Replacement layers, one per original module, in the unit's order."""
        raise NotImplementedError

    def parse_config(self, options: dict[str, Any], label: str) -> MethodConfig:
        try:
            return self.Config.model_validate(options)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise OffcompError(f"group {label!r}: method {self.name!r} option {loc}: {err['msg']}") from None


_REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"compression method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    from . import methods  # noqa: F401  (importing the package registers the built-in methods)

    if name not in _REGISTRY:
        raise OffcompError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    from . import methods  # noqa: F401

    return sorted(_REGISTRY)


def max_rank(target_params: int, per_rank: int, label: str, budget: Budget) -> int:
    """Largest rank whose cost `per_rank·r` fits the target; at least 1 or an error."""
    r = target_params // per_rank
    if r < 1:
        raise OffcompError(f"group {label!r}: {budget} leaves less than rank 1; raise the budget")
    return int(r)


def check_rank(rank: int, per_rank: int, original: int, label: str) -> int:
    """A rank given directly must save parameters: r·(n+m) < n·m (break-even n·m/(n+m))."""
    if rank * per_rank >= original:
        be = -(-original // per_rank) - 1
        raise OffcompError(
            f"group {label!r}: rank {rank} stores {rank * per_rank} >= {original} original parameters "
            f"(saves nothing); use rank <= {be}"
        )
    return rank


def _type_name(annotation: Any) -> str:
    """`Literal["a", "b"]` -> a|b, `int | None` -> int|None: how `offcomp methods M` shows a type."""
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return "|".join(str(a) for a in args)
    if args:
        return "|".join(_type_name(a) for a in args)
    return "None" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def describe_method(name: str) -> dict[str, Any]:
    """A method's summary and every option (type, default, description), for `offcomp methods M`."""
    m = get_method(name)
    import sys

    # each method file opens with "`name`: what it does ..." (its module docstring)
    text = sys.modules[type(m).__module__].__doc__ or type(m).__doc__ or ""
    doc = " ".join(text.split("\n\n")[0].split()).removeprefix(f"`{m.name}`: ")
    options = [{"name": k, "type": _type_name(f.annotation), "default": f.get_default(call_default_factory=True),
                "description": f.description or ""} for k, f in m.Config.model_fields.items()]
    return {"name": m.name, "summary": doc, "needs_stats": list(m.needs_stats), "kinds": list(m.kinds),
            "joint_shapes": m.joint_shapes, "options": options}
