"""Give the C heap's free pages back to the operating system after a client call.

A simulation actor serves client after client in one process. Each fit allocates
and frees activations, optimiser state and a partition's batches; glibc keeps the
freed pages in its arenas, so the actor's resident size creeps up round after round
although nothing is in use (measured in docs/BENCHMARKS.md, "Scale"). glibc's
``malloc_trim(0)`` returns them. Elsewhere (macOS, musl) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        trim = lib.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    mallopt = getattr(lib, "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
    return lib


def trim_heap() -> bool:
    """Release the C heap's free pages (glibc ``malloc_trim(0)``).

    Returns
    -------
    bool
        True where glibc's ``malloc_trim`` ran, False where it is not available.
    """
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True


_M_ARENA_MAX = -8  # mallopt parameter number in glibc's malloc.h


def limit_arenas(count: int = 1) -> bool:
    """Cap the number of glibc malloc arenas (``mallopt(M_ARENA_MAX, count)``).

    glibc gives threads that contend for the heap arenas of their own (up to 8 per
    core); each keeps its freed pages, which ``malloc_trim`` does not fully return.
    One client process's resident size after five clients' training (MiniLM, 15
    steps each, trimmed after each) was 663 MB with the default and 454 MB with one
    arena, at the same training speed (docs/BENCHMARKS.md, "Scale"). Takes effect
    for arenas created after the call, so call it early in the process.

    Returns
    -------
    bool
        True where glibc's ``mallopt`` accepted it, False elsewhere.
    """
    if count < 1:
        raise ValueError(f"`count` should be >= 1 but the value passed is {count}")
    lib = _libc()
    if lib is None or getattr(lib, "mallopt", None) is None:
        return False
    return bool(lib.mallopt(_M_ARENA_MAX, count))
