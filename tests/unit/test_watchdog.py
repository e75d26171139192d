"""The watchdog finds a process's whole tree and stops it once the root is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_flwr.watchdog import descendants, watch

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Linux")

# A parent that starts a long-lived grandchild (re-parented when the parent dies).
_TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_descendants_include_grandchildren() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _TREE, "60"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        found = descendants(os.getpid())
        assert parent.pid in found and grandchild in found
        assert os.getpid() not in found
    finally:
        parent.kill()
        parent.wait()
        os.kill(grandchild, 9)


def test_watch_stops_the_orphans_once_the_root_exits() -> None:
    # The root lives 1.5 s; its grandchild would sleep for a minute.
    root = subprocess.Popen(
        [sys.executable, "-c", _TREE, "1.5"], stdout=subprocess.PIPE, text=True
    )
    assert root.stdout is not None
    grandchild = int(root.stdout.readline())

    watch(root.pid)  # returns once the root is gone and its tree is stopped
    root.wait()

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        # A zombie is gone too: it only waits for init to reap it.
        state = Path(f"/proc/{grandchild}/stat").read_text().split(") ")[1][0]
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} still runs")
