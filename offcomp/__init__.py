"""offcomp: offline compression of pretrained transformer language models."""

__version__ = "0.1.0"

import os  # noqa: E402

# Must be set before torch loads its OpenMP runtime (importing offcomp imports torch): spinning
# worker threads make the many small LAPACK calls of fitting up to 1000x slower on a busy 2-core
# machine. Only a default: a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import CompressReport, compress_, plan_units  # noqa: E402
from .errors import OffcompError  # noqa: E402
from .plan import Plan, load_plan, parse_plan  # noqa: E402


def load(path: str, **kwargs):  # noqa: ANN201
    """Rebuild a compressed checkpoint (or load any model name); returns a ModelBundle."""
    from .models import load_model

    return load_model(path, **kwargs)


__all__ = ["CompressReport", "OffcompError", "Plan", "compress_", "load", "load_plan", "parse_plan", "plan_units"]
