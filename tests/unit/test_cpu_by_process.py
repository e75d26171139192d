"""benchmarks/cpu_by_process.py names processes by what they run, counts their CPU."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import cpu_by_process  # noqa: E402


def test_processes_are_named_by_what_they_run() -> None:
    label = cpu_by_process.label
    venv = "/work/.venv/bin/"
    assert label(
        [venv + "python", venv + "flwr", "ls", "conn", "--format", "json"]
    ) == ("flwr ls")
    assert label([venv + "python", venv + "flwr-clientapp", "--insecure"]) == (
        "flwr-clientapp"
    )
    assert label(["ray::IDLE"]) == "ray::IDLE"
    assert label(["ray::DashboardAgent   "]) == "ray::DashboardAgent"
    assert (
        label(["python3", "-u", "/x/ray/_private/log_monitor.py"]) == "log_monitor.py"
    )
    assert label(["python3", "-m", "lora_flwr.watchdog", "12"]) == (
        "python -m lora_flwr.watchdog"
    )
    assert label(["python3", "-c", "a = 1\nb = 2"]) == "python -c a = 1 b = 2"
    assert label(["/usr/bin/raylet", "--x"]) == "raylet"
    assert label([]) == "?"


def test_a_busy_child_is_counted() -> None:
    # Execute: a child that burns ≈ 0.3 CPU-seconds in pure Python.
    code = (
        "import time\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass"
    )
    doc = cpu_by_process.measure([sys.executable, "-c", code], interval=0.05)

    # Assert: its group holds most of what it burned, and it exited cleanly.
    assert doc["returncode"] == 0
    name = cpu_by_process.label([sys.executable, "-c", code])
    assert 0.2 <= doc["groups"][name]["cpu_s"] <= 1.0
    assert doc["groups"][name]["processes"] == 1
