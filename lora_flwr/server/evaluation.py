"""Centralised evaluation of the global adapter, in turn or overlapped.

Under ``eval.overlap`` a round's evaluation runs in a background thread
while the next round trains; the round's history row (and its checkpoint,
through the row's callback) waits for it and is reported with the state the
round ended with, kept in a :class:`RoundSnapshot`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from lora_flwr.aggregation import ServerState
from lora_flwr.aggregation.state import Arrays, NDArray
from lora_flwr.server.record import RoundRecord

# Centralised evaluation: (round, global adapter by name, base delta by module).
EvaluateFn = Callable[[int, Arrays, Arrays], dict[str, float]]


class RoundView(Protocol):
    """What ``on_round_end`` reads: the history so far and the round's state.

    The round core itself, or (under ``eval.overlap``) a
    :class:`RoundSnapshot` of the state a round ended with.
    """

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every row up to and including the one being reported."""
        ...

    @property
    def state(self) -> ServerState:
        """The server state after the reported round."""
        ...

    def global_arrays(self) -> Arrays:
        """Return the global adapter after the reported round."""
        ...

    def counters(self, server_round: int) -> dict[str, Any]:
        """Return what a checkpoint after the reported round needs beyond the state."""
        ...


@dataclass(frozen=True)
class RoundSnapshot:
    """A finished round as it stood, reported once its evaluation is done."""

    history: list[dict[str, Any]]  # the core's list: complete when reported
    state: ServerState
    arrays: Arrays
    saved_counters: dict[str, Any]

    def global_arrays(self) -> Arrays:
        """Return the global adapter the round ended with."""
        return self.arrays

    def counters(self, server_round: int) -> dict[str, Any]:
        """Return the counters the round ended with."""
        return dict(self.saved_counters)


def copied_state(state: ServerState) -> ServerState:
    """Return ``state`` with every array copied (what a background thread reads)."""
    return state.replace(
        arrays=_copied(state.arrays),
        base_delta=_copied(state.base_delta),
        extra=_copied(state.extra),
    )


def _copied(arrays: Mapping[str, NDArray]) -> Arrays:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def timed_eval(
    evaluate_fn: EvaluateFn, server_round: int, arrays: Arrays, base_delta: Arrays
) -> tuple[dict[str, float], float]:
    """Run ``evaluate_fn``; return its metrics and the seconds it took."""
    start = time.perf_counter()
    metrics = evaluate_fn(server_round, arrays, base_delta)
    return metrics, time.perf_counter() - start


def eval_fields(metrics: Mapping[str, float], seconds: float) -> dict[str, Any]:
    """Return the history fields of one centralised evaluation."""
    return {**{f"test_{k}": v for k, v in metrics.items()}, "eval_seconds": seconds}


@dataclass
class PendingEval:
    """A centralised evaluation running in the background."""

    server_round: int
    future: Future[tuple[dict[str, float], float]]
    target: RoundRecord  # the record its metrics go into
    # Finished records waiting for the metrics, with the state each ended with.
    held: list[tuple[RoundRecord, RoundSnapshot]] = field(default_factory=list)


class BackgroundEval:
    """One worker thread that evaluates a snapshot while the next round trains."""

    def __init__(self, evaluate_fn: EvaluateFn) -> None:
        self.evaluate_fn = evaluate_fn
        self._pool: ThreadPoolExecutor | None = None
        self.pending: PendingEval | None = None

    def start(
        self, server_round: int, snap: RoundSnapshot, target: RoundRecord
    ) -> PendingEval:
        """Evaluate ``snap``'s global adapter in the background."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lora-flwr-eval")
        future = self._pool.submit(
            timed_eval,
            self.evaluate_fn,
            server_round,
            snap.global_arrays(),
            dict(snap.state.base_delta),
        )
        self.pending = PendingEval(server_round, future, target)
        return self.pending

    def take(self) -> tuple[PendingEval, dict[str, Any]] | None:
        """Wait for the pending evaluation; return it and its history fields."""
        pending = self.pending
        if pending is None:
            return None
        self.pending = None
        try:
            metrics, seconds = pending.future.result()
        except Exception as exc:
            raise RuntimeError(
                f"the centralised evaluation of round {pending.server_round} "
                f"failed: {exc}"
            ) from exc
        return pending, eval_fields(metrics, seconds)
