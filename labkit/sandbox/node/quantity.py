"""Kubernetes resource quantities (``500m``, ``128Mi``, ``1G``, ``1e3``) as numbers."""

from __future__ import annotations

import math
import re

_SUFFIX = {
    "": 1, "m": 1e-3, "u": 1e-6, "n": 1e-9, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|[munkMGTPE]?)$")


def parse(value: str | int | float) -> float:
    """The quantity's value in base units (cores, bytes); ValueError for anything malformed."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"quantity {value!r} is not a Kubernetes quantity")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def divide(value: float, divisor: str | None) -> str:
    """``resourceFieldRef`` output: the value over the divisor, rounded up to a whole number."""
    return str(max(1, math.ceil(value / parse(divisor or "1")))) if value else "0"
