"""Progress lines inside a training call: throttled by time, shown in a worker."""

from __future__ import annotations

import logging

import pytest

from lora_flwr.training.progress import (
    PROGRESS_LOGGER,
    ProgressLine,
    show_progress_lines,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_comes_at_most_every_period_with_the_rate_since_the_last() -> None:
    # Prepare: 10 s between lines; steps of 3 s and 500 tokens each.
    clock = FakeClock()
    lines: list[str] = []
    progress = ProgressLine(
        "client 3 (round 2)", 12, 10.0, clock=clock, emit=lines.append
    )

    # Execute
    returned = []
    for step in range(1, 13):
        clock.now += 3.0
        returned.append(progress.step(step, 1.0 / step, 500))

    # Assert: at 12 s (step 4) and 24 s (step 8) and 36 s (step 12) only.
    assert [i + 1 for i, r in enumerate(returned) if r] == [4, 8, 12]
    assert lines == [r for r in returned if r]
    assert lines[0] == "client 3 (round 2): step 4/12, loss 0.25, 167 tokens/s"
    # 4 steps of 500 tokens in the 12 s since the last line.
    assert lines[1] == "client 3 (round 2): step 8/12, loss 0.125, 167 tokens/s"


def test_a_slow_step_gives_one_line_not_a_burst() -> None:
    # Prepare
    clock = FakeClock()
    lines: list[str] = []
    progress = ProgressLine("train", 5, 10.0, clock=clock, emit=lines.append)

    # Execute: one 35 s step, then quick ones.
    clock.now += 35.0
    progress.step(1, 2.0, 1000)
    for step in range(2, 6):
        clock.now += 1.0
        progress.step(step, 2.0, 1000)

    # Assert
    assert lines == ["train: step 1/5, loss 2, 29 tokens/s"]


def test_every_0_never_logs() -> None:
    # Prepare
    clock = FakeClock()
    lines: list[str] = []
    progress = ProgressLine("train", 3, 0.0, clock=clock, emit=lines.append)

    # Execute
    for step in range(1, 4):
        clock.now += 1000.0
        progress.step(step, 1.0, 10)

    # Assert
    assert lines == []


def test_a_worker_without_logging_setup_gets_a_stderr_handler(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a process whose logging nobody configured (a Ray worker).
    logger = logging.getLogger(PROGRESS_LOGGER)
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger("lora_flwr"), "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "handlers", [])

    # Execute
    show_progress_lines()
    show_progress_lines()  # once only
    ProgressLine("client 0 (round 1)", 2, 1e-9).step(1, 0.5, 10)

    # Assert
    assert len(logger.handlers) == 1
    err = capsys.readouterr().err
    assert err.count("client 0 (round 1): step 1/2, loss 0.5") == 1


def test_the_trainer_logs_progress_lines_when_no_bar_is_shown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a line after every step (a tiny period).
    from test_trainer import _setup

    s = _setup(compute={"progress_every": 1e-9})
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)

    # Execute
    s.trainer.train(s.train, steps=3, seed=0, progress=False, name="client 5")

    # Assert
    lines = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert [line.split(",")[0] for line in lines] == [
        "client 5: step 1/3",
        "client 5: step 2/3",
        "client 5: step 3/3",
    ]
    assert all(line.endswith("tokens/s") for line in lines)
