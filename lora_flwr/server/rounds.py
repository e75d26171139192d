"""A round's replies -> its outcome: the fit aggregate and the federated evaluation.

Functions of the :class:`~lora_flwr.server.core.RoundCore` they are given, kept
apart so that the core reads as its state and plans. Every reply is checked
against what its client was sent; a bad one is dropped with a warning, and the
global state changes only through a finite aggregate of enough valid replies.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_flwr.aggregation import ClientReply
from lora_flwr.protocol import ACCURACY, BASE_VERSION, PARTITION_ID, PERPLEXITY
from lora_flwr.server.guards import (
    MetricValue,
    clean_metrics,
    guard_replies,
    is_finite_number,
)
from lora_flwr.server.hooks import FitRound
from lora_flwr.server.replies import (
    Incoming,
    check_reply,
    decode_arrays,
    fit_metrics,
)

if TYPE_CHECKING:
    from lora_flwr.server.core import RoundCore

log = logging.getLogger("flwr")


@dataclass(frozen=True)
class EvalIncoming:
    """One client's federated-evaluation reply as it arrived."""

    node: str
    loss: object
    num_examples: object
    metrics: Mapping[str, MetricValue]


def fit_outcome(
    core: RoundCore,
    server_round: int,
    incoming: Sequence[Incoming],
    failures: Sequence[tuple[str, str]],
) -> bool:
    """Validate, guard and aggregate a round's fit replies; True if aggregated."""
    rec = core.open_record()
    rec.fit_done_at = time.time()
    up = [res.nbytes for res in incoming]
    rec.bytes_up = sum(up)
    rec.bytes_up_max = max(up, default=0)
    for node, text in failures:
        # It may have folded before failing: send it the whole delta next.
        sent = core.fit_sent.get(node)
        core.nodes.note_version(sent.partition if sent else None, None)
        # One line (the innermost error): the full Ray traceback is Flower's.
        core.runlog.last_failure = text
        log.warning("round %d: client %s failed: %s", server_round, node, text)
    replies, metrics, dropped = _valid_replies(core, server_round, incoming)
    replies, report = guard_replies(
        replies,
        weight_cap=core.cfg.guards.weight_cap,
        norm_guard=core.cfg.guards.norm_guard,
        norm_factor=core.cfg.guards.norm_guard_factor,
        update_filter=core.cfg.guards.filter,
        min_cosine=core.cfg.guards.min_cosine,
    )
    for warning in report.warnings:
        log.warning("round %d: %s", server_round, warning)
    rec.fit_ok = len(replies)
    rec.fit_failed = len(failures)
    rec.fit_dropped = dropped
    rec.weight_capped = report.weight_capped
    if report.weight_moved is not None:
        rec.weight_cap_moved = report.weight_moved
    rec.norm_clipped = report.norm_clipped
    rec.norm_rejected = report.norm_rejected
    if report.norm_bound is not None:
        rec.norm_bound = report.norm_bound
    if core.cfg.guards.filter != "none":
        rec.filtered = report.filtered
    fit = FitRound(server_round, rec, incoming, dropped)
    for hook in core.hooks:
        replies = hook.on_replies(fit, replies)
    rec.update(fit_metrics(metrics))
    fit_ok = rec.fit_ok
    if not replies or fit_ok < core.cfg.sampling.min_replies:
        log.warning(
            "round %d: %d valid replies < sampling.min_replies=%d; the global "
            "adapter is kept unchanged",
            server_round,
            fit_ok,
            core.cfg.sampling.min_replies,
        )
        rec.aggregated = False
        return False
    replies.sort(key=lambda r: r.partition)  # sums in a fixed order
    try:
        new = core.aggregate(fit, replies)
    except Exception as exc:  # a broken aggregate must not become the global
        log.error("round %d: aggregation failed, global kept: %s", server_round, exc)
        rec.aggregated = False
        return False
    core.state = new
    rec.aggregated = True
    for hook in core.hooks:
        hook.on_aggregated(fit, new)
    rec.base_version = new.base_version
    return True


def _valid_replies(
    core: RoundCore, server_round: int, incoming: Sequence[Incoming]
) -> tuple[list[ClientReply], list[tuple[int, Mapping[str, MetricValue]]], int]:
    """Validate each reply against what its client was sent; drop bad ones."""
    replies: list[ClientReply] = []
    metrics: list[tuple[int, Mapping[str, MetricValue]]] = []
    dropped = 0
    for res in incoming:
        sent = core.fit_sent.get(res.node)
        try:
            if sent is None:
                raise ValueError("this node was not sent a fit instruction")
            clean, problems = clean_metrics(res.metrics)
            for problem in problems:
                log.warning(
                    "round %d: client %s (partition %d): %s; ignored",
                    server_round,
                    res.node,
                    sent.partition,
                    problem,
                )
            reported = clean.get(PARTITION_ID)
            if isinstance(reported, int) and reported != sent.partition:
                # Trained on other data than the server counts it for: ask the
                # node again next round instead of trusting the map.
                core.nodes.contradicted(res.node)
                raise ValueError(
                    f"it reports partition {reported} but was sampled as "
                    f"partition {sent.partition}"
                )
            core.nodes.note_version(sent.partition, clean.get(BASE_VERSION))
            if isinstance(res.arrays, Exception):
                raise res.arrays  # the reply's tensors could not be read
            with core.phase("server_serialization"):
                arrays = decode_arrays(core.rule, sent, res.arrays, core.checks)
            reply = check_reply(core.rule, sent, arrays, res.num_examples, core.checks)
        except Exception as exc:  # any malformed reply is dropped, never fatal
            dropped += 1
            log.warning(
                "round %d: dropped reply of client %s (partition %s): %s",
                server_round,
                res.node,
                sent.partition if sent else "?",
                exc,
            )
            continue
        replies.append(reply)
        metrics.append((reply.num_examples, clean))
    return replies, metrics, dropped


def eval_outcome(
    core: RoundCore,
    server_round: int,
    results: Sequence[EvalIncoming],
    failures: Sequence[tuple[str, str]],
) -> tuple[float | None, dict[str, Any]]:
    """Example-weighted mean of the clients' local loss and accuracy.

    ``failures`` are ``(node, repr of the failure)``. Returns the mean loss (None
    without a valid reply) and the history fields, which also go into the open
    round's record.
    """
    for node, text in failures:
        sent = core.eval_sent.get(node)
        core.nodes.note_version(sent.partition if sent else None, None)
        log.warning("round %d: evaluation failed: %s", server_round, text)
    valid = []
    for res in results:
        sent = core.eval_sent.get(res.node)
        clean, problems = clean_metrics(res.metrics)
        loss_ok = is_finite_number(res.loss)
        n = res.num_examples
        n_ok = isinstance(n, int) and not isinstance(n, bool) and n > 0
        if not loss_ok:
            problems.append(f"loss={res.loss!r} should be a finite number")
        if not n_ok:
            problems.append(f"num_examples={n!r} should be a positive integer")
        for problem in problems:
            log.warning(
                "round %d: evaluation reply of client %s: %s; ignored",
                server_round,
                res.node,
                problem,
            )
        core.nodes.note_version(
            sent.partition if sent else None, clean.get(BASE_VERSION)
        )
        if loss_ok and n_ok:
            valid.append((int(n), float(res.loss), clean))  # type: ignore[call-overload, arg-type]
    prefix = "personal" if core.personal() else "fed"
    out = _weighted(valid, prefix)
    if core.rule.personalized:
        out["eval_kind"] = "personalized: each client's model on its local split"
    elif core.rule.local_head:
        out["eval_kind"] = "personalized: global adapter, each client's own head"
    rec = core.open_record()
    rec.update(out)
    rec.eval_ok = len(valid)
    loss = out.get(f"{prefix}_loss")
    return loss, out


def _weighted(
    valid: Sequence[tuple[int, float, Mapping[str, MetricValue]]], prefix: str
) -> dict[str, Any]:
    """``<prefix>_loss`` / ``_accuracy`` / ``_perplexity`` over valid replies."""
    out: dict[str, Any] = {}
    if not valid:
        return out
    total = sum(n for n, _, _ in valid)
    loss = sum(n * lo for n, lo, _ in valid) / total
    out[f"{prefix}_loss"] = loss
    accs = [(n, m[ACCURACY]) for n, _, m in valid if ACCURACY in m]
    if accs:
        weighted = sum(n * float(a) for n, a in accs)
        out[f"{prefix}_accuracy"] = weighted / sum(n for n, _ in accs)
    if any(PERPLEXITY in m for _, _, m in valid):
        out[f"{prefix}_perplexity"] = math.exp(min(loss, 700.0))
    return out
