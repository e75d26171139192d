"""CPU lists as ``taskset -c`` writes them (``0``, ``0-3``, ``0,2-3``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Collection


def parse_cpus(text: str) -> frozenset[int]:
    """Parse a CPU list such as ``0``, ``0-3`` or ``0,2-3`` (as ``taskset -c``).

    Parameters
    ----------
    text
        Comma-separated CPU numbers and inclusive ranges.

    Returns
    -------
    frozenset of int
        The CPUs named.

    Raises
    ------
    argparse.ArgumentTypeError
        If the list is malformed or names a CPU this process may not use.
    """
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            first, last = int(low), int(high if dash else low)
            if first < 0 or last < first:
                raise ValueError(part)
            cpus.update(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a CPU list such as 0, 0-3 or 0,2-3"
        ) from None
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise argparse.ArgumentTypeError(
            f"CPUs {format_cpus(cpus - allowed)} are not available here "
            f"(this process may use {format_cpus(allowed)})"
        )
    return frozenset(cpus)


def format_cpus(cpus: Collection[int]) -> str:
    """``0,2,3`` for a set of CPUs."""
    return ",".join(str(c) for c in sorted(cpus))
