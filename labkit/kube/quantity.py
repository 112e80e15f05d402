"""Numbers as manifests write them: resource quantities (``500m``, ``128Mi``), rates (``1mbit``) and
durations (``1m30s``)."""

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


RATE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def rate_bits(text: str) -> float:
    """Bits a second from a rate as tc (and Chaos Mesh) write it: ``"1mbit"``, ``"500kbit"`` are bits,
    ``"1mbps"``, ``"500kbps"`` bytes a second. ValueError if it is not one."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(bit|bps)\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a rate: write it as tc does, \"1mbit\" (bits) or \"1mbps\" (bytes a second)")
    number, prefix, unit = match.groups()
    return float(number) * RATE_UNITS[prefix] * (8 if unit == "bps" else 1)


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def duration_seconds(text: str) -> float:
    """Seconds from a duration as Go (and so Chaos Mesh) writes it: ``"30s"``, ``"1m30s"``, ``"500ms"``.
    ValueError if it is not one."""
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"{text!r} is not a duration: write it as \"30s\", \"2m\" or \"1m30s\"")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
