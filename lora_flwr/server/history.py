"""The run's history: closing rounds, centralised evaluation, when to stop.

A round's record is closed once (:meth:`History.finish_round`), whichever
Flower callback ends the round; it becomes a history row and goes to the
``on_round_end`` callback, after its centralised evaluation when that runs in
the background (``eval.overlap``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lora_flwr.profiling import round_profile
from lora_flwr.server.evaluation import (
    BackgroundEval,
    EvaluateFn,
    RoundSnapshot,
    copied_state,
    eval_fields,
    timed_eval,
)
from lora_flwr.server.guards import RunAborted
from lora_flwr.server.record import RoundRecord

if TYPE_CHECKING:
    from lora_flwr.server.core import RoundCore

log = logging.getLogger("flwr")

RoundCallback = Callable[[dict[str, Any], Any], None]


class History:
    """History rows, round counters and the centralised evaluation of a core."""

    def __init__(
        self,
        core: RoundCore,
        evaluate_fn: EvaluateFn | None,
        on_round_end: RoundCallback | None,
    ) -> None:
        self.core = core
        self.evaluate_fn = evaluate_fn
        self.on_round_end = on_round_end
        self.rows: list[dict[str, Any]] = []
        self.failed_rounds = 0  # consecutive rounds without an aggregate
        self.aggregated_rounds = 0
        self.last_failure = ""
        self.background = (
            BackgroundEval(evaluate_fn)
            if evaluate_fn is not None and core.cfg.eval.overlap
            else None
        )
        self.held: list[tuple[RoundRecord, RoundSnapshot]] = []
        # What on_round_end sees of a round reported in turn (default: the core).
        self.view: Any = core

    # ------------------------------------------------------------ counters
    def counters(self) -> dict[str, Any]:
        """Return the round counters a checkpoint holds."""
        return {
            "failed_rounds": self.failed_rounds,
            "aggregated_rounds": self.aggregated_rounds,
            "last_failure": self.last_failure,
        }

    def restore(
        self, counters: Mapping[str, Any], history: Sequence[dict[str, Any]], done: int
    ) -> None:
        """Continue the counters and rows of a run checkpointed after ``done``."""
        self.failed_rounds = int(counters.get("failed_rounds", 0))
        self.aggregated_rounds = int(counters.get("aggregated_rounds", 0))
        self.last_failure = str(counters.get("last_failure", ""))
        self.rows = [dict(r) for r in history if int(r.get("round", 0)) <= done]
        rounds = [int(r.get("round", -1)) for r in self.rows]
        if rounds != list(range(done + 1)):
            raise ValueError(
                f"history to resume holds rounds {rounds}; expected 0..{done}"
            )

    # ----------------------------------------------------------- evaluation
    def evaluate(
        self, server_round: int, calib: dict[str, Any]
    ) -> tuple[float, dict[str, float]] | None:
        """Evaluate centrally: round 0, every ``eval_every`` rounds and the last.

        A personalised rule has no global model: its evaluation is federated.
        Under ``eval.overlap`` every round but the last is evaluated in the
        background and None is returned (the metrics go to the history).
        """
        core = self.core
        if self.evaluate_fn is None or core.rule.personalized:
            self._eval_entry(server_round, calib)
            return None
        if not core.eval_round(server_round):  # never round 0
            self._eval_entry(server_round, calib)
            return None
        if self.background is not None and server_round < core.fed.num_rounds:
            self._start_background(server_round, calib)
            return None
        with core.phase("server_evaluation"):
            metrics, seconds = timed_eval(
                self.evaluate_fn,
                server_round,
                core.global_arrays(),
                dict(core.state.base_delta),
            )
        self._eval_entry(server_round, {**eval_fields(metrics, seconds), **calib})
        return float(metrics["loss"]), {k: float(v) for k, v in metrics.items()}

    def _eval_entry(self, server_round: int, fields: dict[str, Any]) -> None:
        """Round 0 is a row of its own; a later round's fields join its record."""
        if server_round == 0:
            rec = RoundRecord(round=0)
            rec.update(fields)
            self._append(rec)
        else:
            self.core.open_record().update(fields)

    def _start_background(self, server_round: int, calib: dict[str, Any]) -> None:
        assert self.background is not None
        snap = self.snapshot(server_round)  # what the thread reads: a copy
        if server_round == 0:
            target = RoundRecord(round=0)
        else:
            target = self.core.open_record()
        target.update(calib)
        self.background.start(server_round, snap, target)
        if server_round == 0:  # nothing else goes into round 0's record
            self.held.append((target, snap))

    def snapshot(self, server_round: int) -> RoundSnapshot:
        """Keep the state ``server_round`` ended with, to report after evaluation."""
        state = copied_state(self.core.state)
        return RoundSnapshot(
            history=self.rows,
            state=state,
            arrays=self.core.rule.global_arrays(state),  # from the copy
            saved_counters=self.core.counters(server_round),
        )

    def settle(self) -> None:
        """Wait for the background evaluation, then report the rounds it held."""
        if self.background is None or self.background.pending is None:
            return
        with self.core.phase("server_evaluation"):  # the wait is the round's cost
            taken = self.background.take()
        assert taken is not None
        pending, fields = taken
        pending.target.update(fields)
        held, self.held = self.held, []
        for rec, view in held:
            self._append(rec, view)

    # -------------------------------------------------------------- closing
    def finish_round(self) -> None:
        """Close the open round: time it, count it, report it; stop if hopeless."""
        core = self.core
        rec = core.record
        if rec is None:
            return
        # Server phases read first, so that none runs past the round's end.
        server = core.prof.snapshot() if core.prof is not None else None
        rec.round_seconds = time.perf_counter() - core._round_start
        if server is not None:
            rec.update(round_profile(rec.round_seconds, server, core.prof_calls))
            core.prof = None
        if rec.aggregated:
            self.failed_rounds = 0
            self.aggregated_rounds += 1
        else:
            self.failed_rounds += 1
        reason = self._abort_reason(rec)
        if reason:
            rec.aborted = reason  # the run outputs skip the final adapter
        core.record = None
        pending = self.background.pending if self.background is not None else None
        if pending is not None and pending.target is rec and not reason:
            # Reported when its evaluation is done, with the state it ended with.
            self.held.append((rec, self.snapshot(rec.round)))
            return
        self.settle()
        self._append(rec)
        if reason:
            raise RunAborted(reason)

    def _abort_reason(self, rec: RoundRecord) -> str:
        """Why the run must stop now (every client failing, say), or ``""``.

        After more than ``fed.max_failed_rounds`` consecutive rounds without an
        aggregate, or at the last round when no round produced one, the round's
        callback still runs (history written) and then :class:`RunAborted` stops
        the server.
        """
        fed = self.core.fed
        reason = ""
        if self.failed_rounds > fed.max_failed_rounds:
            reason = (
                f"{self.failed_rounds} consecutive rounds without an aggregate "
                f"(fed.max_failed_rounds={fed.max_failed_rounds})"
            )
        elif rec.round >= fed.num_rounds and self.aggregated_rounds == 0:
            reason = f"none of the {fed.num_rounds} rounds produced an aggregate"
        if not reason:
            return ""
        last = f"; last client error: {self.last_failure}" if self.last_failure else ""
        return (
            f"run stopped at round {rec.round}: {reason}; last round: "
            f"{rec.fit_ok or 0} valid replies, "
            f"{rec.fit_failed or 0} client failures, "
            f"{rec.fit_dropped or 0} dropped{last}"
        )

    def _append(self, rec: RoundRecord, view: Any = None) -> None:
        row = rec.to_dict()
        self.rows.append(row)
        log.info("round %s: %s", row.get("round"), short(row))
        if self.on_round_end is not None:
            self.on_round_end(row, self.view if view is None else view)


def short(row: Mapping[str, Any]) -> str:
    """Return the few fields of a row that the server's log line shows."""
    keys = (
        "train_loss",
        "test_loss",
        "test_accuracy",
        "test_perplexity",
        "personal_accuracy",
        "agg_error",
        "fit_ok",
    )
    return ", ".join(
        f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
        for k in keys
        if k in row and row[k] is not None
    )
