"""PromptGrid: replies collected soon after they arrive, everything else delegated."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import Message, RecordDict
from flwr.server import Grid

from lora_flwr.fl.grid import PromptGrid


class _Reply:
    """The one field of a reply that send_and_receive reads."""

    def __init__(self, to: str) -> None:
        self.metadata = type("Meta", (), {"reply_to_message_id": to})()


class _ScriptedGrid(Grid):
    """A grid whose replies arrive at scripted times on a fake clock."""

    def __init__(self, arrivals: dict[str, float], now: list[float]) -> None:
        self.arrivals, self.now = arrivals, now
        self.calls: list[str] = []

    def set_run(self, run: Any) -> None:
        self.calls.append("set_run")

    @property
    def run(self) -> Any:
        return "the-run"

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        self.calls.append(f"create {message_type} {dst_node_id} {group_id} {ttl}")
        return "msg"  # type: ignore[return-value]

    def get_node_ids(self) -> Iterable[int]:
        return [3, 5]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return list(self.arrivals)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        due = [m for m, t in self.arrivals.items() if m in wanted and t <= self.now[0]]
        return [_Reply(m) for m in due]  # type: ignore[misc]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise AssertionError("PromptGrid must not use the wrapped grid's loop")


def _prompt(arrivals: dict[str, float]) -> tuple[PromptGrid, list[float], list[float]]:
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    inner = _ScriptedGrid(arrivals, now)
    return PromptGrid(inner, sleep=sleep, clock=lambda: now[0]), now, waits


def test_every_reply_is_collected_within_a_fraction_of_its_wait() -> None:
    # Prepare: two replies, at 2.0 s and 10.0 s.
    grid, now, waits = _prompt({"a": 2.0, "b": 10.0})

    # Execute
    replies = list(grid.send_and_receive(["m1", "m2"]))  # type: ignore[list-item]

    # Assert: both in, the last seen within 5 % of its arrival (Flower's own loop:
    # up to 3 s), with waits that grow and never exceed 3 s.
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert 10.0 <= now[0] <= 10.0 * 1.05 + 1e-9
    assert waits == sorted(waits)
    assert waits[0] == pytest.approx(0.05) and max(waits) <= 3.0
    assert grid.pulls == len(waits) + 1 < 80


def test_a_timeout_returns_what_arrived_and_stops_on_time() -> None:
    # Prepare
    grid, now, _ = _prompt({"a": 1.0, "b": 100.0})

    # Execute
    replies = list(grid.send_and_receive(["m"], timeout=5.0))  # type: ignore[list-item]

    # Assert
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert now[0] == pytest.approx(5.0)


def test_the_other_methods_are_the_wrapped_grids() -> None:
    # Prepare
    grid, _, _ = _prompt({})
    inner = grid.inner
    assert isinstance(inner, _ScriptedGrid)

    # Execute
    grid.set_run("r")  # type: ignore[arg-type]
    grid.create_message(RecordDict(), "train", 3, "1", ttl=9.0)

    # Assert
    assert grid.run == "the-run"
    assert list(grid.get_node_ids()) == [3, 5]
    assert [n.node_id for n in grid.get_nodes()] == [3, 5]
    assert inner.calls == ["set_run", "create train 3 1 9.0"]
    assert list(grid.send_and_receive([])) == []  # nothing pushed, nothing awaited


def test_bad_intervals_are_refused() -> None:
    with pytest.raises(ValueError, match="0 < first <= longest"):
        PromptGrid(_ScriptedGrid({}, [0.0]), first=5.0, longest=1.0)
    with pytest.raises(ValueError, match="`fraction` should be > 0"):
        PromptGrid(_ScriptedGrid({}, [0.0]), fraction=0.0)
