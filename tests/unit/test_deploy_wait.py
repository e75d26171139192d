"""The launchers wait for a run without polling ``flwr ls`` all the time."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from lora_flwr.deploy import cli
from lora_flwr.deploy.errors import DeployError
from lora_flwr.deploy.processes import Processes

RUNNING = [{"run-id": 1, "status": "running"}]
FINISHED = [{"run-id": 1, "status": "finished:completed"}]


def _stream(procs: Processes, seconds: float) -> None:
    """A stand-in for ``flwr run --stream`` that exits after ``seconds``."""
    code = f"import time; time.sleep({seconds})"
    procs.start("flwr-run", [sys.executable, "-c", code], dict(os.environ))


def _ended_stream(tmp_path: Path) -> Processes:
    """Processes whose ``flwr-run`` stand-in has already exited."""
    procs = Processes(tmp_path, tag="wait-test")
    _stream(procs, 0.0)
    procs.procs["flwr-run"].wait(timeout=30)
    return procs


def _wait(procs: Processes, timeout: float) -> dict[str, Any]:
    """``wait_for_run`` on ``procs``; every process is stopped afterwards."""
    try:
        return cli.wait_for_run({}, "c", timeout, procs)
    finally:
        procs.stop_all()


def test_the_stream_exit_ends_the_wait_with_one_ls_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a 2 s stream; `flwr ls` says "running" until the stream is gone.
    procs = Processes(tmp_path, tag="wait-test")
    _stream(procs, 2.0)
    calls: list[bool] = []

    def fake_ls(env: dict[str, str], connection: str) -> list[dict[str, Any]]:
        alive = procs.procs["flwr-run"].poll() is None
        calls.append(alive)
        return RUNNING if alive else FINISHED

    monkeypatch.setattr(cli, "list_runs", fake_ls)
    monkeypatch.setattr(cli, "STREAM_CHECK_SECONDS", 0.05)

    # Execute
    run = _wait(procs, 60)

    # Assert: no `flwr ls` while the stream ran, one after it ended.
    assert run == FINISHED[0]
    assert calls == [False]


def test_a_hanging_stream_is_checked_with_flwr_ls_now_and_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a stream that outlives the run; `flwr ls` says finished on call 3.
    procs = Processes(tmp_path, tag="wait-test")
    _stream(procs, 60.0)
    answers = [RUNNING, RUNNING, FINISHED]
    calls: list[bool] = []

    def fake_ls(env: dict[str, str], connection: str) -> list[dict[str, Any]]:
        calls.append(procs.procs["flwr-run"].poll() is None)
        return answers[len(calls) - 1]

    monkeypatch.setattr(cli, "list_runs", fake_ls)
    monkeypatch.setattr(cli, "STREAM_CHECK_SECONDS", 0.02)
    monkeypatch.setattr(cli, "LS_WHILE_STREAMING_SECONDS", 0.3)

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
    monkeypatch.setattr(cli, "list_runs", lambda env, connection: [])

    # Execute / Assert
    with pytest.raises(DeployError, match="without submitting a run"):
        _wait(procs, 30)


def test_repeated_ls_failures_after_the_stream_end_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the stream has exited and every `flwr ls` fails.
    procs = _ended_stream(tmp_path)
    calls: list[int] = []

    def failing_ls(env: dict[str, str], connection: str) -> list[dict[str, Any]]:
        calls.append(1)
        raise DeployError("`flwr ls` failed: health probe timed out")

    monkeypatch.setattr(cli, "list_runs", failing_ls)
    monkeypatch.setattr(cli, "POLL_SECONDS", 0.01)

    # Execute / Assert
    with pytest.raises(DeployError, match="health probe"):
        _wait(procs, 30)
    assert len(calls) == cli.LS_ATTEMPTS
