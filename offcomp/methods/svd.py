"""`svd`: truncated SVD, the data-free baseline. Optimal in Frobenius norm for each unit."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..registry import MethodConfig, register
from .lowrank import LowRankMethod


class SVDConfig(MethodConfig):
    compute_dtype: Literal["float64", "float32"] = Field("float64",
        description="precision of the decomposition (float64: exact LAPACK, float32: faster)")


@register
class SVD(LowRankMethod):
    name = "svd"
    Config = SVDConfig
