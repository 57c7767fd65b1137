"""`svd`: truncated SVD, the data-free baseline. Optimal in Frobenius norm for each unit."""

from __future__ import annotations

from typing import Literal

from ..registry import MethodConfig, register
from .lowrank import LowRankMethod


class SVDConfig(MethodConfig):
    compute_dtype: Literal["float64", "float32"] = "float64"


@register
class SVD(LowRankMethod):
    name = "svd"
    Config = SVDConfig
