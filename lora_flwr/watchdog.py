"""Stop the processes a simulation started once its driver is gone, even by kill -9.

Ray's helpers (``DashboardAgent``, ``RuntimeEnvAgent``) outlive a driver killed with
SIGKILL: their parent raylet dies with it and they are re-parented to init. A
simulation therefore starts this watchdog as a separate process. It notes the
driver's descendants every second (pid and start time, so a recycled pid is never
touched) and, when the driver has exited for whatever reason, sends them SIGTERM,
then SIGKILL to those still alive two seconds later.

Linux only (it reads ``/proc``); elsewhere :func:`start_watchdog` does nothing.

    python -m lora_flwr.watchdog <driver pid>
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")
POLL_SECONDS = 1.0
GRACE_SECONDS = 2.0


def _stat(pid: int) -> tuple[int, int] | None:
    """Return ``(parent pid, start time)`` of ``pid``; None if gone or a zombie."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited, waiting to be reaped
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Return every living descendant of ``root`` as ``{pid: start time}``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
            starts[int(entry.name)] = stat[1]
    out: dict[int, int] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out and child in starts:
                out[child] = starts[child]
                stack.append(child)
    return out


def _alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[1] == start


def watch(driver: int) -> None:
    """Follow ``driver``'s descendants; stop them once it has exited."""
    driver_stat = _stat(driver)
    if driver_stat is None:
        return
    seen: dict[int, int] = {}
    me = os.getpid()
    while _alive(driver, driver_stat[1]):
        seen.update(descendants(driver))
        time.sleep(POLL_SECONDS)
    seen.pop(me, None)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [pid for pid, start in seen.items() if _alive(pid, start)]
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(GRACE_SECONDS)


def start_watchdog() -> subprocess.Popen[bytes] | None:
    """Start a watchdog of this process (None where /proc is not available)."""
    if not (PROC / str(os.getpid()) / "stat").is_file():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "lora_flwr.watchdog", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]))
