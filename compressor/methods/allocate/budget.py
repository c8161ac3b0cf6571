"""Budgets as users write them, and the room kept for what the output stores besides tensors."""

from __future__ import annotations

import math
import re

from compressor.errors import CompressorError, shown

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z%]*)\s*$")
# Per safetensors file, room for its header (8 bytes of length + JSON naming every tensor): the
# budget holds the header too, since the output's size is its files' sizes.
HEADER_PER_TENSOR = 160
HEADER_PER_FILE = 4096
MAX_BYTES = 10**14  # 100 TB: beyond any model, so a larger size is a typo


def size_text(n: float, up: bool = False) -> str:
    """Bytes as MB (KB below one MB, for small models), rounded up with `up`."""
    scale, unit = (1e6, "MB") if n >= 1e6 else (1e3, "KB")
    value = math.ceil(n / scale * 10) / 10 if up else n / scale
    return f"{value:,.1f} {unit}"


def parse_size(value) -> tuple[str, float]:
    """("bytes", n) or ("relative", fraction of the dense size) from a size option's value."""
    if isinstance(value, bool):
        raise CompressorError(f"key 'size' must be bytes (700MB, 1.2GB, 900MiB) or a fraction of the dense size (0.75x, 75%), got {shown(value)}")
    if isinstance(value, int) and value >= 1:
        return "bytes", float(_bounded(value, value))
    match = _SIZE.match(value) if isinstance(value, str) else None
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in (*_UNITS, "", "x", "%"):
        raise CompressorError(f"key 'size' must be bytes (700MB, 1.2GB, 900MiB) or a fraction of the dense size (0.75x, 75%), got {shown(value)}")
    number = float(match.group(1))
    if unit in ("x", "%"):
        fraction = number / (100 if unit == "%" else 1)
        if not 0 < fraction <= 1:
            raise CompressorError(f"key 'size' {value!r} must be a fraction of the dense size in (0, 1], e.g. 0.75x or 75%")
        return "relative", fraction
    found = number * _UNITS.get(unit or "b", 1)
    if found < 1:
        raise CompressorError(f"key 'size' {value!r} is less than one byte; give e.g. 700MB")
    return "bytes", _bounded(found, value)


def _bounded(found: float, value) -> float:
    if found > MAX_BYTES:
        raise CompressorError(f"key 'size' must be at most 100 TB, got {shown(value)}; give the size in bytes, e.g. 700MB")
    return found


