"""Durations and sizes: parsed from config strings, formatted for people.

One formatter per unit, so a value reads the same in a blocked reason, ``watchdogctl
status``, metrics help and the docs. Sizes are shown in decimal units (``16.0 MB``),
as ``max_lag: 16MB`` is written in the config.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "kB": 10**3,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def parse_duration(value: object) -> float:
    """``"250ms"`` → 0.25. Raises ValueError for anything else (bare numbers too:
    ``5`` could mean seconds or milliseconds, so the unit is required)."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(f"expected a duration like 5s, got {value!r}")


def parse_size(value: object) -> int:
    """``"16MB"`` → 16_000_000, ``"1GiB"`` → 1_073_741_824, ``4096`` → 4096."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError(f"expected a size like 16MB, got {value!r}")


def format_duration(seconds: float) -> str:
    """``0.25`` → ``250ms``, ``30.0`` → ``30s``."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_bytes(n: float) -> str:
    """``16_000_000`` → ``16.0 MB``: decimal units, as ``max_lag: 16MB`` is written."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
