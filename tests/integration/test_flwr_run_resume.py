"""Resume under ``flwr run``: crash a SuperLink-managed run, resume it by run config.

scripts/flwr_run_sim.py runs the smoke experiment (rule ``fedit``, which folds
nothing and is deterministic on CPU) under ``flwr run`` on a private local
SuperLink. The test runs it three times:

1. uninterrupted, to ``ref/``: the reference adapter and history;
2. to ``cut/``, and SIGKILLs the script and every process it started (the
   detached SuperLink, flower-superexec, flwr-simulation with the ServerApp, Ray)
   once ``state/round-001`` is on disk: a crash of the whole job, which leaves a
   ``.lock`` file behind whose holder is dead;
3. the same command with ``--set on_existing=resume``: the run config tells the
   ServerApp to continue ``cut/`` from its last complete round.

The resumed run must finish as ``finished:completed`` (read from ``flwr ls``),
keep the history rows written before the crash, add the missing rounds once each,
and end with an adapter bit-identical to the reference; no process may be left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_flwr.deploy.processes import process_alive
from lora_flwr.fl.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]

SMOKE = REPO / "configs" / "smoke.toml"
ROUNDS = 3
CUT_AFTER = 1  # the crash comes once this round's server state is saved
TIMEOUT = 1500  # seconds per run; ≈ 1-2 min each on an idle 2-core machine


def _command(out: Path, name: str, *extra: str) -> list[str]:
    """``flwr_run_sim.py`` for the smoke experiment as ``<out>/<name>``."""
    sets = [
        f"name={name}",
        f"fed.num_rounds={ROUNDS}",
        "fed.aggregation=fedit",
        *extra,
    ]
    argv = [
        sys.executable,
        str(REPO / "scripts" / "flwr_run_sim.py"),
        "--config",
        str(SMOKE),
        "--num-supernodes",
        "2",
        "--output-dir",
        str(out),
        "--timeout",
        str(TIMEOUT - 100),
    ]
    for item in sets:
        argv += ["--set", item]
    return argv


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to the end; return its outcome (the exit code is not checked)."""
    return subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        check=False,
    )


def _environ(pid: int) -> list[bytes]:
    """The environment of ``pid`` (empty once it is gone)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _processes(var: str, tag: str, raylets: frozenset[int] = frozenset()) -> list[int]:
    """Live PIDs of one run: ``var=tag`` in their environment, or a Ray agent.

    Ray's DashboardAgent and RuntimeEnvAgent get an environment of Ray's making,
    without the tag; ``RAY_RAYLET_PID`` names the raylet that started them, so an
    agent of a raylet in ``raylets`` (PIDs seen tagged) belongs to the run too.
    This process and its ancestors are never part of a run.
    """
    needles = {f"{var}={tag}".encode()}
    needles |= {f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}
    mine = _ancestry()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid in mine or not needles.intersection(_environ(pid)):
            continue
        if process_alive(pid):
            found.append(pid)
    return sorted(found)


def _ancestry() -> set[int]:
    """This process and its ancestors."""
    pids = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def _tag(run_dir: Path) -> tuple[str, str]:
    """The environment tag every process of that run carries (from pids.json)."""
    doc = json.loads((run_dir / "deploy" / "pids.json").read_text())
    return str(doc["tag_var"]), str(doc["tag"])


def _start_until(
    argv: list[str], run_dir: Path, server_round: int
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session; return once the round's state exists."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = run_dir / "state" / f"round-{server_round:03d}"
    deadline = time.monotonic() + TIMEOUT
    while not state.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert state.is_dir(), f"no {state} within {TIMEOUT} s"
    return proc


def _crash(proc: subprocess.Popen[bytes], run_dir: Path) -> frozenset[int]:
    """SIGKILL the script and every process it started; return the raylets' PIDs.

    The script leads its own process group; what it started is found by the tag
    in the environment, and Ray's agents by their raylet (see :func:`_processes`).
    """
    var, tag = _tag(run_dir)
    raylets: set[int] = set()
    os.killpg(proc.pid, signal.SIGKILL)
    for _ in range(20):  # a dying parent may still spawn a helper
        pids = _processes(var, tag, frozenset(raylets))
        if not pids:
            break
        for pid in pids:
            if _is_raylet(pid):
                raylets.add(pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    proc.wait(timeout=30)
    assert raylets, "no raylet was running: the crash missed the simulation"
    assert _processes(var, tag, frozenset(raylets)) == []
    return frozenset(raylets)


def _is_raylet(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return argv0.endswith(b"/raylet")


def _left(run_dir: Path, raylets: frozenset[int] = frozenset()) -> list[int]:
    """Processes of the run in ``run_dir`` (or agents of ``raylets``) still alive."""
    var, tag = _tag(run_dir)
    deadline = time.monotonic() + 10  # helpers notice their parent's death
    while (pids := _processes(var, tag, raylets)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return pids


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _history(run_dir: Path) -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = json.loads((run_dir / "history.json").read_text())
    return history


def _status(run_dir: Path) -> str:
    """The run's status as `flwr ls --format json` reported it (runs.json)."""
    return str(json.loads((run_dir / "deploy" / "runs.json").read_text())["status"])


@pytest.mark.slow
def test_flwr_run_killed_then_resumed_by_run_config_equals_the_whole_run(
    tmp_path: Path,
) -> None:
    # Prepare: the reference, uninterrupted.
    start = time.perf_counter()
    whole = _run(_command(tmp_path, "ref"))
    whole_seconds = time.perf_counter() - start
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    assert _status(tmp_path / "ref") == "finished:completed"
    assert _left(tmp_path / "ref") == []

    # Execute: the same run to cut/, crashed after round 1's state is saved ...
    cut = tmp_path / "cut"
    start = time.perf_counter()
    proc = _start_until(_command(tmp_path, "cut"), cut, CUT_AFTER)
    crash_tag = _tag(cut)  # the resume overwrites deploy/pids.json
    crashed = _crash(proc, cut)
    cut_seconds = time.perf_counter() - start
    before = _history(cut)
    saved = latest_checkpoint(cut)
    assert saved is not None
    done = int(saved.name.removeprefix("round-"))  # CUT_AFTER, or later if slow
    assert CUT_AFTER <= done < ROUNDS  # it really was cut short
    assert not (cut / "adapter").exists()
    holder = int((cut / ".lock").read_text())  # the lock file stays; its holder died
    assert not process_alive(holder)

    # ... then the same command, resumed through the run config.
    start = time.perf_counter()
    resumed = _run(_command(tmp_path, "cut", "on_existing=resume"))
    resume_seconds = time.perf_counter() - start
    log = resumed.stdout[-3000:] + resumed.stderr[-3000:]

    # Assert: completed, with nothing left running.
    assert resumed.returncode == 0, log
    assert _status(cut) == "finished:completed", log
    assert _left(cut, crashed) == []
    assert _processes(*crash_tag, crashed) == []
    print(
        f"flwr run resume: reference {whole_seconds:.0f} s, cut after round "
        f"{done} at {cut_seconds:.0f} s, resume {resume_seconds:.0f} s"
    )

    # Every round once; the rows of the rounds saved before the crash (timings
    # included) are kept as they were: those rounds did not run again.
    after = _history(cut)
    assert [r["round"] for r in after] == list(range(ROUNDS + 1))
    assert after[: done + 1] == before[: done + 1]
    # Flower ran only the missing rounds in the resumed ServerApp.
    flwr_log = (cut / "deploy" / "flwr-run.log").read_text(errors="replace")
    assert f"Run finished {ROUNDS - done} round(s)" in flwr_log

    # fedit folds nothing: the resumed run is the same computation, bit for bit.
    reference = _history(tmp_path / "ref")
    for key in ("train_loss", "test_loss", "test_accuracy", "agg_error"):
        assert [r.get(key) for r in after] == [r.get(key) for r in reference], key
    got, want = _adapter(cut), _adapter(tmp_path / "ref")
    assert sorted(got) == sorted(want) and want
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert np.array_equal(got[name], array), name
