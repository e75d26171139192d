"""trim_heap: glibc's malloc_trim where it exists."""

from __future__ import annotations

import platform

import pytest

from lora_flwr.heap import trim_heap


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
