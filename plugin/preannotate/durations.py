"""Durations as operators write them in function settings (``90s``, ``5m``, ``1h30m``): Go's syntax, as Nuclio's."""

from __future__ import annotations

import re

_UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}


def parse_duration(text: str) -> float:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(text))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        raise ValueError(f"{text!r} is not a duration like 30s or 1m30s")
    return sum(float(n) * _UNITS[u] for n, u in parts)
