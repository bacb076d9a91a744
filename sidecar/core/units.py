"""Durations and sizes as operators write them in YAML (`30s`, `64MiB`)."""

from __future__ import annotations

import math
import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from `100ms`, `30s`, `10m`, `24h`, `7d`.

    A bare number is refused: `timeout: 30` could mean seconds or milliseconds, and a guess
    would become a silent default.
    """
    if isinstance(value, str):
        match = _DURATION.match(value)
        # (four hundred nines read as a float are infinite)
        if match and math.isfinite(
                seconds := float(match.group(1)) * _DURATION_UNITS[match.group(2)]):
            return seconds
    raise ValueError(f"expected a duration like '30s', '100ms' or '10m', got {value!r}")


def parse_size(value: object) -> int:
    """Bytes from `512`, `64KiB`, `1MiB`, `2GB`."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and math.isfinite(size := float(match.group(1)) * _SIZE_UNITS[match.group(2)]):
            return int(size)
    raise ValueError(f"expected a size like '64MiB', '512KiB' or a number of bytes, got {value!r}")


def parse_percent(value: object) -> float:
    """`20%` -> 0.2; a bare number between 0 and 1 is taken as the fraction itself."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1])
        except ValueError:
            number = -1.0
        if not 0 <= number <= 100:
            raise ValueError(f"expected a percentage between 0% and 100%, got {value!r}")
        return number / 100
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise ValueError(f"expected a percentage like '20%', got {value!r}")


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{seconds / factor:g}{unit}"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """`64MiB` for 67108864, as a config would say it: the largest binary unit that divides it
    exactly, else bytes (messages quote sizes back in the units they were written in)."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"
