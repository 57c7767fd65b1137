"""Strict JSON for every record offcomp writes or prints.

Python's `json.dumps` writes NaN and Infinity by default, which is not JSON: other tools refuse the
line, or read a number that was never measured. Every record goes through `dumps`: a non-finite
float becomes `null`, and a dict record says which fields were non-finite in `non_finite`
(a list of reasons), so a null is never mistaken for a missing measurement.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

NON_FINITE = "non_finite"


def _clean(obj: Any, path: str, found: list[str]) -> Any:
    if isinstance(obj, bool | numbers.Integral):
        return obj if isinstance(obj, int) else int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        if math.isfinite(value):
            return value
        found.append(f"{path or 'value'} was {value} (written as null)")
        return None
    if isinstance(obj, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def strict(obj: Any) -> Any:
    """A copy of `obj` with every non-finite float replaced by None; a dict gets `non_finite`
    reasons added (after any the record already carries)."""
    found: list[str] = []
    clean = _clean(obj, "", found)
    if found and isinstance(clean, dict):
        clean[NON_FINITE] = [*(clean.get(NON_FINITE) or []), *found]
    return clean


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that can only write strict JSON (see `strict`); unknown types become strings."""
    return json.dumps(strict(obj), allow_nan=False, default=str, **kwargs)


def has_non_finite(record: Any) -> bool:
    """True if the record reports a non-finite or unrepresentable number (see `strict`)."""
    return isinstance(record, dict) and bool(strict(record).get(NON_FINITE))
