"""trim_heap: glibc's malloc_trim where it exists."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from lora_flwr.heap import limit_arenas, trim_heap


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim is glibc's",
)
def test_trim_heap_runs_on_glibc() -> None:
    blocks = [bytearray(1 << 16) for _ in range(256)]  # 16 MiB of small blocks
    del blocks
    assert trim_heap() is True


def test_trim_heap_is_safe_to_call_repeatedly() -> None:
    assert trim_heap() == trim_heap()


_ARENAS = """
import ctypes, sys, threading
from lora_flwr.heap import limit_arenas
if sys.argv[1] == "limit":
    assert limit_arenas(1) is True
def work():
    blocks = [bytearray(1 << 20) for _ in range(4)]
    del blocks
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _ARENAS, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return sum(1 for line in out.stderr.splitlines() if line.startswith("Arena "))


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc arenas are glibc's",
)
def test_limit_arenas_keeps_new_threads_on_the_main_arena() -> None:
    # Execute
    default = _arenas("default")
    limited = _arenas("limit")

    # Assert: threads that malloc get arenas of their own unless capped.
    assert default > 1
    assert limited == 1


def test_limit_arenas_refuses_a_count_below_one() -> None:
    with pytest.raises(ValueError, match="`count` should be >= 1"):
        limit_arenas(0)
