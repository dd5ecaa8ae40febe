"""Sizes written for people in config (4G, 512M) as bytes."""

from __future__ import annotations

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str | int) -> int:
    """'4G' -> 4 GiB; plain integers are bytes."""
    s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1] if s and s[-1] in _UNITS else ""
    try:
        return int(float(s[: len(s) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size (for example 4G, 512M)") from None
