"""scripts/deploy_local.py waits for a run without polling ``flwr ls`` all the time."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import deploy_local  # noqa: E402

RUNNING = [{"run-id": 1, "status": "running"}]
FINISHED = [{"run-id": 1, "status": "finished:completed"}]


def _stream(procs: deploy_local.Processes, seconds: float) -> None:
    """A stand-in for ``flwr run --stream`` that exits after ``seconds``."""
    code = f"import time; time.sleep({seconds})"
    procs.start("flwr-run", [sys.executable, "-c", code], dict(os.environ))


def _ended_stream(tmp_path: Path) -> deploy_local.Processes:
    """Processes whose ``flwr-run`` stand-in has already exited."""
    procs = deploy_local.Processes(tmp_path, tag="wait-test")
    _stream(procs, 0.0)
    procs.procs["flwr-run"].wait(timeout=30)
    return procs


def _wait(procs: deploy_local.Processes, timeout: float) -> dict[str, Any]:
    """``wait_for_run`` on ``procs``; every process is stopped afterwards."""
    try:
        return deploy_local.wait_for_run({}, "c", timeout, procs)
    finally:
        procs.stop_all()


def test_the_stream_exit_ends_the_wait_with_one_ls_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a 2 s stream; `flwr ls` says "running" until the stream is gone.
    procs = deploy_local.Processes(tmp_path, tag="wait-test")
    _stream(procs, 2.0)
    calls: list[bool] = []

    def fake_ls(env: dict[str, str], connection: str) -> list[dict[str, Any]]:
        alive = procs.procs["flwr-run"].poll() is None
        calls.append(alive)
        return RUNNING if alive else FINISHED

    monkeypatch.setattr(deploy_local, "list_runs", fake_ls)
    monkeypatch.setattr(deploy_local, "STREAM_CHECK_SECONDS", 0.05)

    # Execute
    run = _wait(procs, 60)

    # Assert: no `flwr ls` while the stream ran, one after it ended.
    assert run == FINISHED[0]
    assert calls == [False]


def test_a_hanging_stream_is_checked_with_flwr_ls_now_and_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a stream that outlives the run; `flwr ls` says finished on call 3.
    procs = deploy_local.Processes(tmp_path, tag="wait-test")
    _stream(procs, 60.0)
    answers = [RUNNING, RUNNING, FINISHED]
    calls: list[bool] = []

    def fake_ls(env: dict[str, str], connection: str) -> list[dict[str, Any]]:
        calls.append(procs.procs["flwr-run"].poll() is None)
        return answers[len(calls) - 1]

    monkeypatch.setattr(deploy_local, "list_runs", fake_ls)
    monkeypatch.setattr(deploy_local, "STREAM_CHECK_SECONDS", 0.02)
    monkeypatch.setattr(deploy_local, "LS_WHILE_STREAMING_SECONDS", 0.3)

    # Execute
    run = _wait(procs, 30)

    # Assert: three spaced calls, all while the stream was alive.
    assert run == FINISHED[0]
    assert calls == [True, True, True]


def test_a_stream_that_exits_without_a_run_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the stream exits at once and the SuperLink lists no run.
    procs = _ended_stream(tmp_path)
    monkeypatch.setattr(deploy_local, "list_runs", lambda env, connection: [])

    # Execute / Assert
    with pytest.raises(deploy_local.DeployError, match="without submitting a run"):
        _wait(procs, 30)


def test_repeated_ls_failures_after_the_stream_end_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the stream has exited and every `flwr ls` fails.
    procs = _ended_stream(tmp_path)
    calls: list[int] = []

    def failing_ls(env: dict[str, str], connection: str) -> list[dict[str, Any]]:
        calls.append(1)
        raise deploy_local.DeployError("`flwr ls` failed: health probe timed out")

    monkeypatch.setattr(deploy_local, "list_runs", failing_ls)
    monkeypatch.setattr(deploy_local, "POLL_SECONDS", 0.01)

    # Execute / Assert
    with pytest.raises(deploy_local.DeployError, match="health probe"):
        _wait(procs, 30)
    assert len(calls) == deploy_local.LS_ATTEMPTS
