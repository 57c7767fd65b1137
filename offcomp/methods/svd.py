"""`svd`: truncated SVD, the data-free baseline. Optimal in Frobenius norm for each unit."""

from __future__ import annotations

from ..registry import MethodConfig, register
from .lowrank import LowRankMethod
from .util import ComputeDtype


class SVDConfig(MethodConfig):
    compute_dtype: ComputeDtype = "float64"


@register
class SVD(LowRankMethod):
    name = "svd"
    Config = SVDConfig
