"""Process hygiene hooks: which heap call each moment of a run makes."""

from __future__ import annotations

import pytest

from lora_flwr import lifecycle


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the heap calls the hooks make instead of making them."""
    made: list[str] = []

    def limit_arenas(count: int = 1) -> bool:
        made.append(f"limit_arenas({count})")
        return True

    def trim_heap() -> bool:
        made.append("trim_heap()")
        return True

    monkeypatch.setattr(lifecycle, "limit_arenas", limit_arenas)
    monkeypatch.setattr(lifecycle, "trim_heap", trim_heap)
    return made


@pytest.mark.parametrize("role", ["server", "client"])
def test_a_process_start_caps_the_arenas_at_one(
    calls: list[str], role: lifecycle.Role
) -> None:
    # Execute
    lifecycle.on_process_start(role)

    # Assert
    assert calls == ["limit_arenas(1)"]


@pytest.mark.parametrize("role", ["server", "client"])
def test_the_end_of_a_round_trims_the_heap(
    calls: list[str], role: lifecycle.Role
) -> None:
    # Execute
    lifecycle.after_round(role)

    # Assert
    assert calls == ["trim_heap()"]


def test_an_unknown_role_is_refused_before_any_call(calls: list[str]) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="`role` should be one of"):
        lifecycle.on_process_start("worker")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'worker'"):
        lifecycle.after_round("worker")  # type: ignore[arg-type]
    assert calls == []


def test_the_real_hooks_run_on_this_machine() -> None:
    # Execute / Assert: whatever the libc, neither hook raises
    lifecycle.on_process_start("client")
    lifecycle.after_round("client")
