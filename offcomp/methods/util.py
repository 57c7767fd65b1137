"""Small helpers shared by method files."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


# The precision option of the decompositions (svd, asvd, fwsvd, kronecker, tucker), declared once so
# that its values and help read the same in every method; svd-llm allows float64 only.
ComputeDtype = Annotated[Literal["float64", "float32"], Field(
    description="precision of the decomposition (float64: exact LAPACK, float32: faster)")]
