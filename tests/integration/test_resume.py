"""kill -9 a real simulation mid-run, resume it, and get the uninterrupted result.

The run is the command-line entry point in its own process group (Ray's helpers
included), killed with SIGKILL once a round's server state is on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.toml"


def _cmd(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "run_simulation.py"), *args]


def _fresh(out: Path, name: str, rule: str) -> list[str]:
    return _cmd(
        "--config",
        str(SMOKE),
        "--set",
        f"output_dir={out}",
        "--set",
        f"name={name}",
        "--set",
        "fed.num_rounds=4",
        "--set",
        f"fed.aggregation={rule}",
    )


def _start_until(
    cmd: list[str], run_dir: Path, server_round: int
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session; return once ``server_round``'s state exists."""
    proc = subprocess.Popen(
        cmd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = run_dir / "state" / f"round-{server_round:03d}"
    deadline = time.monotonic() + 300
    while not state.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    return proc


def _adapter(run_dir: Path) -> dict[str, bytes]:
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return {k: v.tobytes() for k, v in tensors.items()}


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["fedit", "fedex"])
def test_kill_9_then_resume_equals_the_uninterrupted_run(
    tmp_path: Path, rule: str
) -> None:
    # Prepare: the reference, uninterrupted.
    subprocess.run(_fresh(tmp_path, "whole", rule), check=True, capture_output=True)

    # Execute: the same run, killed with SIGKILL after round 2's state is written.
    proc = _start_until(_fresh(tmp_path, "cut", rule), tmp_path / "cut", 2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert max(r["round"] for r in history) < 4  # it really was cut short

    resumed = subprocess.run(
        _cmd("--resume", str(tmp_path / "cut")),
        capture_output=True,
        text=True,
        check=False,
    )

    # Assert
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr and "after round 2" in resumed.stderr
    whole = json.loads((tmp_path / "whole" / "history.json").read_text())
    cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [r["round"] for r in cut] == [0, 1, 2, 3, 4]  # no gap, no duplicate
    if rule == "fedit":
        # Nothing is folded: the resumed run is the same computation, bit for bit.
        assert _adapter(tmp_path / "cut") == _adapter(tmp_path / "whole")
        for key in ("test_loss", "train_loss", "agg_error"):
            assert [r.get(key) for r in cut] == [r.get(key) for r in whole], key
    else:
        # FedEx folds: restarted nodes get the whole delta densely instead of the
        # factored steps, so sums differ in the last bits only.
        for a, b in zip(cut[1:], whole[1:], strict=True):
            assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_finished_run_cannot_be_resumed(tmp_path: Path) -> None:
    subprocess.run(_fresh(tmp_path, "done", "fedit"), check=True, capture_output=True)

    again = subprocess.run(
        _cmd("--resume", str(tmp_path / "done")), capture_output=True, text=True
    )

    assert again.returncode == 2
    assert "already finished all fed.num_rounds=4 rounds" in again.stderr


def _session(sid: int) -> list[str]:
    out = subprocess.run(
        ["ps", "-eo", "pid,sid,args"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[1:]
    return [line for line in out if line.split() and line.split()[1] == str(sid)]


@pytest.mark.slow
def test_kill_9_of_the_driver_leaves_no_ray_process_behind(tmp_path: Path) -> None:
    # Prepare: a run in its own session, so its processes can be told apart.
    proc = _start_until(_fresh(tmp_path, "orphans", "fedit"), tmp_path / "orphans", 1)
    assert any("ray::" in line or "raylet" in line for line in _session(proc.pid))

    # Execute: SIGKILL the driver alone (not its group).
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # Assert: without the watchdog, DashboardAgent and RuntimeEnvAgent stay.
    deadline = time.monotonic() + 20
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _session(proc.pid) == []
