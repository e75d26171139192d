"""The one interface a side protocol plugs into the round core through.

A hook sees a round's validated, guarded replies before the rule averages them
(it may clip or replace them) and the new state after an aggregate. DP
(:mod:`lora_flwr.server.dp`) and SecAgg+ (:mod:`lora_flwr.server.secagg`) are
hooks; a hook holds its own counters and says which it checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lora_flwr.aggregation import ClientReply, ServerState
from lora_flwr.server.record import RoundRecord
from lora_flwr.server.replies import Incoming


@dataclass
class FitRound:
    """One round's fit phase as a hook sees it."""

    server_round: int
    record: RoundRecord
    incoming: Sequence[Incoming]  # every reply that arrived, valid or not
    dropped: int  # replies that failed validation


class RoundHook(Protocol):
    """A side protocol of the round core."""

    # True when the hook turns the replies into one pre-averaged reply (the
    # rule's distance to the exact per-client average is then undefined).
    collapses: bool

    def on_replies(
        self, fit: FitRound, replies: list[ClientReply]
    ) -> list[ClientReply]:
        """Return the replies to aggregate (may record fields on ``fit.record``)."""
        ...

    def on_aggregated(self, fit: FitRound, state: ServerState) -> None:
        """See the new global state (it is kept whatever the hook does)."""
        ...

    def counters(self) -> dict[str, Any]:
        """Return what a checkpoint must hold to continue this hook's counts."""
        ...

    def restore(self, counters: dict[str, Any]) -> None:
        """Continue the counts saved by :meth:`counters`."""
        ...
