"""What the server sent each client, and the checks its reply must pass.

Plain values in, plain values out: the Flower translator decodes ``FitRes`` into
an :class:`Incoming` and hands it here; a reply that fails any check raises
``ValueError`` naming what is wrong, and the round core drops it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lora_flwr.aggregation import ClientReply, Rule
from lora_flwr.aggregation.state import Arrays
from lora_flwr.compression import Codec, decode_reply
from lora_flwr.protocol import (
    FIT_CALLS,
    MODEL_LOADS,
    NUM_TOKENS,
    RESPONSES_DROPPED,
    RESPONSES_TRUNCATED,
    SECONDS,
    TRAIN_LOSS,
    WORKER_PID,
    Plan,
    pair_names,
)
from lora_flwr.server.guards import MetricValue
from lora_flwr.validation import check_arrays, update_norm


@dataclass(frozen=True)
class Sent:
    """What the server sent one client this round (to check its reply against)."""

    partition: int
    plan: Plan
    start: Arrays
    nbytes: int


@dataclass(frozen=True)
class Incoming:
    """One client's reply as it arrived (arrays deserialized, nothing checked)."""

    node: str
    arrays: Sequence[object] | Exception  # an Exception: could not be read
    num_examples: object
    metrics: Mapping[str, MetricValue]
    nbytes: int


@dataclass(frozen=True)
class ReplyChecks:
    """The settings a fit reply is checked under (from ``[fed]``)."""

    compression: Codec = "none"
    topk_fraction: float = 1.0
    secagg: bool = False
    max_update_norm: float = 0.0


def decode_arrays(
    rule: Rule, sent: Sent, arrays: Sequence[object], checks: ReplyChecks
) -> Sequence[object]:
    """Undo the reply's compression: ``reference + update`` in float32.

    The reference is what the client started from (zero for private groups), so
    every later check sees float32 arrays as without compression.
    """
    if checks.compression == "none":
        return arrays
    spec = rule.reply_spec(sent.plan)
    reference = [
        sent.start[n] if n in sent.start else np.zeros(s, np.float32) for n, s in spec
    ]
    return decode_reply(
        checks.compression,
        arrays,
        reference,
        fraction=checks.topk_fraction,
    )


def check_reply(
    rule: Rule,
    sent: Sent,
    arrays: Sequence[object],
    num_examples: object,
    checks: ReplyChecks,
) -> ClientReply:
    """Validate one decoded reply against its plan; raise ValueError on any fault."""
    spec = rule.reply_spec(sent.plan)
    named = pair_names(spec, arrays)
    # Under SecAgg+ the arrays are the unmasked float64 mean, checked later.
    dtype = None if checks.secagg else np.float32
    check_arrays(named, spec, dtype=dtype, what="reply")
    n = num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"num_examples={n!r} must be a positive integer")
    typed: Arrays = {k: v for k, v in named.items()}  # type: ignore[misc]
    if checks.max_update_norm > 0:
        norm = update_norm(typed, sent.start)
        if norm > checks.max_update_norm:
            raise ValueError(
                f"update norm {norm:.4g} exceeds "
                f"guards.max_update_norm={checks.max_update_norm:g}"
            )
    return ClientReply(sent.partition, sent.plan, typed, n, sent.start)


def failure_text(failure: object) -> str:
    """One short line for a client failure (an exception or a failed reply)."""
    if isinstance(failure, tuple):
        res = failure[1]
        status = getattr(res, "status", None)
        text = getattr(status, "message", "") or repr(res)
    else:
        text = f"{type(failure).__name__}: {failure}"
    # A ClientApp error arrives wrapped in Ray's and Flower's tracebacks: the
    # innermost "XxxError: message" line is the one that says what went wrong.
    raised = re.findall(r"\b(\w+(?:Error|Exception): [^\n'>]+)", str(text))
    if raised:
        text = raised[-1]
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


def fit_metrics(
    metrics: Sequence[tuple[int, Mapping[str, MetricValue]]],
) -> dict[str, Any]:
    """Example-weighted train loss, client compute time, tokens and model loads.

    ``client_seconds_critical`` is the round's compute critical path: calls served by
    one worker process run one after another, workers run in parallel. The
    instruction-data cut counts (``responses_truncated``, ``responses_dropped``) are
    summed over the clients that report them, and absent when none does.
    """
    if not metrics:
        return {}
    per_worker: dict[MetricValue, float] = {}
    for i, (_, m) in enumerate(metrics):
        key = m.get(WORKER_PID, f"unknown-{i}")
        per_worker[key] = per_worker.get(key, 0.0) + _real(m, SECONDS)
    # Over the clients that reported a (valid) loss only.
    losses = [(n, _real(m, TRAIN_LOSS)) for n, m in metrics if TRAIN_LOSS in m]
    return {
        "train_loss": sum(n * lo for n, lo in losses) / sum(n for n, _ in losses)
        if losses
        else None,
        "client_seconds_max": max(_real(m, SECONDS) for _, m in metrics),
        "client_seconds_sum": sum(_real(m, SECONDS) for _, m in metrics),
        "tokens": sum(_count(m, NUM_TOKENS) for _, m in metrics),
        "client_seconds_critical": max(per_worker.values()),
        "workers": len(per_worker),
        "model_loads_max": max(_count(m, MODEL_LOADS) for _, m in metrics),
        "client_fit_calls_max": max(_count(m, FIT_CALLS) for _, m in metrics),
        **{
            key: sum(_count(m, key) for _, m in metrics)
            for key in (RESPONSES_TRUNCATED, RESPONSES_DROPPED)
            if any(key in m for _, m in metrics)
        },
    }


def _real(metrics: Mapping[str, MetricValue], key: str) -> float:
    return float(metrics.get(key, 0.0))


def _count(metrics: Mapping[str, MetricValue], key: str) -> int:
    return int(metrics.get(key, 0))
