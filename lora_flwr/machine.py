"""What this machine's CPU is, read from ``/proc/cpuinfo`` (Linux; no torch import).

Benchmarks and reports record the CPU model beside every figure, and precision
``auto`` reads the CPU's feature flags; both come from the first processor's block.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = "/proc/cpuinfo"


def cpuinfo_field(names: tuple[str, ...], path: str = CPUINFO) -> str | None:
    """Return the value of the first line whose key is in ``names``, or None.

    None also where ``path`` cannot be read (not Linux, say).
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return None


def cpu_model_name(path: str = CPUINFO) -> str:
    """Return the CPU's model name as ``lscpu`` prints it (``platform`` elsewhere)."""
    name = cpuinfo_field(("model name",), path)
    return name or platform.processor() or platform.machine() or "unknown CPU"
