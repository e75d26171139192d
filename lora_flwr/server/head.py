"""The label-skew head refit (``head.calibration = "lda"``) on the server side.

Every node gets the global adapter with a ``head_stats`` evaluate instruction and
answers with the class statistics of the head's inputs on its training split
(:mod:`lora_flwr.aggregation.lda`). This module decides when a refit is due,
checks each answer and refits the head from their sum; the Flower translator
only carries the messages.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from lora_flwr.aggregation import ServerState
from lora_flwr.aggregation.lda import (
    ClassStats,
    decode_stats,
    head_weight_names,
    lda_head,
    merge_stats,
)
from lora_flwr.config import ExperimentConfig
from lora_flwr.protocol import BASE_VERSION, HEAD_STATS, AdapterLayout
from lora_flwr.server.guards import MetricValue, clean_metrics
from lora_flwr.server.nodes import NodeBook
from lora_flwr.validation import check_arrays

log = logging.getLogger("flwr")


@dataclass(frozen=True)
class StatsAnswer:
    """One node's answer to a ``head_stats`` instruction, as it arrived.

    ``error`` says why there is no usable answer at all (no reply, a failed
    status); otherwise ``metrics`` and ``num_examples`` are the reply's.
    """

    node: str
    partition: int | None
    error: str | None = None
    num_examples: object = 0
    metrics: Mapping[str, MetricValue] | None = None


def read_stats(answer: StatsAnswer, num_labels: int, dim: int) -> ClassStats:
    """Check one answer and decode its class statistics.

    Raises
    ------
    ValueError
        If the call failed, or the statistics are malformed or inconsistent
        (their counts must add up to the reply's ``num_examples``).
    """
    if answer.error is not None or answer.metrics is None:
        raise ValueError(answer.error or "no reply")
    stats = decode_stats(answer.metrics.get(HEAD_STATS), num_labels, dim)
    if stats.total != answer.num_examples:
        raise ValueError(
            f"counts add up to {stats.total} but the reply says "
            f"num_examples={answer.num_examples}"
        )
    return stats


class HeadRefit:
    """Refit the global classifier head by LDA on the clients' class statistics."""

    def __init__(self, cfg: ExperimentConfig, layout: AdapterLayout) -> None:
        self.head = cfg.head
        self.num_rounds = cfg.fed.num_rounds
        self.layout = layout
        self.weight_name, self.bias_name = head_weight_names(
            layout.names, layout.shapes, cfg.model.num_labels
        )
        self.num_labels, self.dim = dict(layout.items())[self.weight_name]

    def due(self, server_round: int) -> bool:
        """Whether the head is refitted after ``server_round`` (0: before round 1)."""
        every = self.head.lda_every
        return server_round % every == 0 or server_round == self.num_rounds

    def refit(
        self,
        server_round: int,
        state: ServerState,
        answers: Sequence[StatsAnswer],
        nodes: NodeBook,
        dtype: npt.DTypeLike,
    ) -> tuple[ServerState, dict[str, Any]]:
        """Return the state with the refitted head, and the history fields.

        A malformed, inconsistent or missing answer is left out with a warning;
        if none is usable or the fit fails, the head stays as it was
        (``calib_error`` says why).
        """
        parts: list[ClassStats] = []
        for answer in answers:
            try:
                stats = read_stats(answer, self.num_labels, self.dim)
                clean, _ = clean_metrics(answer.metrics or {})
                nodes.note_version(answer.partition, clean.get(BASE_VERSION))
                parts.append(stats)
            except ValueError as exc:
                nodes.note_version(answer.partition, None)
                log.warning(
                    "round %d: head statistics of client %s: %s; left out",
                    server_round,
                    answer.node,
                    exc,
                )
        out: dict[str, Any] = {"calib_clients": len(parts)}
        try:
            if not parts:
                raise ValueError("no client sent usable statistics")
            total = merge_stats(parts)
            out["calib_examples"] = total.total
            weight, bias = lda_head(total, self.head.lda_shrinkage)
        except ValueError as exc:
            log.warning("round %d: head kept as it was: %s", server_round, exc)
            out["calib_error"] = str(exc)
            return state, out
        arrays = dict(state.arrays)
        arrays[self.weight_name] = np.asarray(weight).astype(dtype)
        arrays[self.bias_name] = np.asarray(bias).astype(dtype)
        check_arrays(arrays, self.layout.items(), what="refitted head")
        return state.replace(arrays=arrays), out
