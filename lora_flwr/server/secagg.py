"""SecAgg+ on the server: the one unmasked mean becomes the round's single reply.

Flower's SecAgg+ workflow unmasks only the example-weighted mean of what the
clients sent and hands it over as every result's arrays. The rule then averages
one reply: for a plain weighted-sum rule that is the same global as averaging
the clients' replies, up to SecAgg+'s quantisation error. A reply that fails
validation cannot be taken out of the sum, so such a round keeps the global.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from lora_flwr.aggregation import ClientReply, ServerState
from lora_flwr.server.hooks import FitRound

log = logging.getLogger("flwr")


class SecAggHook:
    """Collapse a SecAgg+ round's replies into the one mean it unmasked."""

    collapses = True

    def on_replies(
        self, fit: FitRound, replies: list[ClientReply]
    ) -> list[ClientReply]:
        """Return the single mean reply, or none when the round cannot use it."""
        rec = fit.record
        # Uploads are masked vectors that only Flower's workflow sees.
        rec.unset("bytes_up")
        rec.unset("bytes_up_max")
        # Flower's SecAgg+ workflow lists each failed node twice (1.42): count the
        # sampled clients that sent no masked vector instead.
        rec.fit_failed = int(rec.fit_sampled or 0) - len(fit.incoming)
        out = self._collapse(fit, replies)
        if not out:
            rec.fit_ok = 0
        return out

    def _collapse(self, fit: FitRound, replies: list[ClientReply]) -> list[ClientReply]:
        if not replies:
            return []
        if fit.dropped:
            log.warning(
                "round %d: %d invalid replies are inside the SecAgg+ sum and cannot "
                "be taken out; the global adapter is kept unchanged",
                fit.server_round,
                fit.dropped,
            )
            return []
        first = fit.incoming[0].arrays
        if any(not _same(first, res.arrays) for res in fit.incoming):
            raise RuntimeError(
                "secagg: results carry different parameters; Flower's SecAgg+ "
                "workflow did not run (is the ServerApp built by make_server_app?)"
            )
        plan = replies[0].plan
        if any(r.plan != plan for r in replies):
            raise RuntimeError("secagg: the clients of a round had different plans")
        mean = {
            n: np.asarray(a, dtype=np.float32) for n, a in replies[0].arrays.items()
        }
        total = sum(r.num_examples for r in replies)
        return [ClientReply(replies[0].partition, plan, mean, total, replies[0].start)]

    def on_aggregated(self, fit: FitRound, state: ServerState) -> None:
        """Nothing to do after the aggregate."""

    def counters(self) -> dict[str, Any]:
        """No counters."""
        return {}

    def restore(self, counters: dict[str, Any]) -> None:
        """No counters."""


def _same(a: object, b: object) -> bool:
    """Whether two deserialized replies hold the same arrays, bit for bit."""
    if not isinstance(a, list | tuple) or not isinstance(b, list | tuple):
        return a is b
    return len(a) == len(b) and all(
        isinstance(x, np.ndarray)
        and isinstance(y, np.ndarray)
        and x.dtype == y.dtype
        and x.shape == y.shape
        and x.tobytes() == y.tobytes()
        for x, y in zip(a, b, strict=True)
    )
