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
