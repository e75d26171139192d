"""Profiling off: the null timer reads no clock and records nothing."""

from __future__ import annotations

import pytest

from lora_flwr import profiling
from lora_flwr.profiling import NULL_TIMER, NullTimer, PhaseTimer, Timer, maybe_phase


def test_the_null_timer_records_nothing_whatever_is_timed() -> None:
    # Prepare
    timer: Timer = NullTimer()

    # Execute
    timer.restart()
    timer.lap("data")
    with timer.phase("forward"), timer.phase("backward"):
        pass
    timer.lap("optimizer")

    # Assert
    assert dict(timer.seconds) == {}


def test_the_null_timer_reads_no_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: any reading of the clock fails the test
    def no_clock() -> float:
        raise AssertionError("the clock was read")

    monkeypatch.setattr(profiling.time, "perf_counter", no_clock)

    # Execute
    NULL_TIMER.restart()
    NULL_TIMER.lap("data")
    with NULL_TIMER.phase("forward"):
        pass

    # Assert
    assert dict(NULL_TIMER.seconds) == {}


def test_every_phase_of_the_null_timer_is_one_shared_context() -> None:
    # Execute
    first = NULL_TIMER.phase("data")
    second = NullTimer().phase("forward")
    off = maybe_phase(None, "evaluation")

    # Assert: no object is built per phase when profiling is off
    assert first is second is off


def test_a_phase_timer_and_the_null_timer_share_one_interface() -> None:
    # Prepare
    timers: list[Timer] = [PhaseTimer(), NULL_TIMER]

    # Execute
    for timer in timers:
        timer.restart()
        timer.lap("data")
        with timer.phase("forward"):
            pass

    # Assert
    assert set(timers[0].seconds) == {"data", "forward"}
    assert dict(timers[1].seconds) == {}
