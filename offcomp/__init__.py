"""offcomp: offline compression of pretrained transformer language models.

Importing the package is cheap: torch and transformers load only when a name that needs them is
first used (PEP 562 `__getattr__`), so `offcomp --help` and `offcomp --version` answer at once.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Must be set before torch loads its OpenMP runtime (every offcomp module that imports torch runs
# this file first): spinning worker threads make the many small LAPACK calls of fitting up to
# 1000x slower on a busy 2-core machine. Only a default: a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import hf_register  # noqa: E402  (no torch either)
from .errors import OffcompError  # noqa: E402  (no torch: safe to import eagerly)

# The one import side effect: `quant_method: "offcomp"` checkpoints load through any
# `AutoModelFor….from_pretrained` once offcomp is imported (registered when transformers loads).
hf_register.install()

# public name -> submodule that defines it, imported on first access
_LAZY = {
    "CompressReport": "api", "compress_": "api", "plan_units": "api",
    "Plan": "plan", "load_plan": "plan", "parse_plan": "plan",
}

if TYPE_CHECKING:
    from .api import CompressReport, compress_, plan_units
    from .plan import Plan, load_plan, parse_plan


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(path: str, **kwargs: Any) -> Any:
    """Rebuild a compressed checkpoint (through `from_pretrained`, with offcomp's checks) or load any
    model name; returns a ModelBundle."""
    from .models import load_model

    return load_model(path, **kwargs)


__all__ = ["CompressReport", "OffcompError", "Plan", "__version__", "compress_", "load", "load_plan", "parse_plan",
           "plan_units"]
