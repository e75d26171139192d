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

import numpy as np

from lora_flwr.aggregation import ClientReply
from lora_flwr.aggregation.robust import RobustMode, robust_mean
from lora_flwr.protocol import ACCURACY, BASE_VERSION, PARTITION_ID, PERPLEXITY
from lora_flwr.server.guards import (
    EvalScore,
    MetricValue,
    clean_metrics,
    guard_eval,
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
        update_filter=core.cfg.update_filter(),
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
    if core.cfg.update_filter() != "none":
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
    """Validate and guard the clients' evaluation replies; mean loss and accuracy.

    A reply is dropped unless its loss is a finite number >= 0, its count a
    positive integer and its accuracy (if any) in [0, 1]; a malformed metric alone
    is ignored. The fit guards then apply (:func:`guard_eval`): the loss guard
    (``guards.norm_guard`` at ``eval_loss_factor`` x the round's lower-median
    loss) and the count cap (``guards.eval_weight_cap``). The means are
    example-weighted, or with ``guards.robust`` the unweighted median / trimmed
    mean of the replies.
    ``failures`` are ``(node, repr of the failure)``. Returns the mean loss (None
    without a valid reply) and the history fields, which also go into the open
    round's record.
    """
    for node, text in failures:
        sent = core.eval_sent.get(node)
        core.nodes.note_version(sent.partition if sent else None, None)
        log.warning("round %d: evaluation failed: %s", server_round, text)
    valid: list[EvalScore] = []
    dropped = 0
    for res in results:
        sent = core.eval_sent.get(res.node)
        clean, problems = clean_metrics(res.metrics)
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
        score, faults = _eval_score(res, clean)
        if score is None:
            dropped += 1
            log.warning(
                "round %d: dropped the evaluation reply of client %s: %s",
                server_round,
                res.node,
                "; ".join(faults),
            )
            continue
        valid.append(score)
    guards = core.cfg.guards
    kept, report = guard_eval(
        valid,
        weight_cap=guards.eval_weight_cap,
        loss_guard=guards.norm_guard,
        loss_factor=guards.eval_loss_factor,
    )
    for warning in report.warnings:
        log.warning("round %d: %s", server_round, warning)
    prefix = "personal" if core.personal() else "fed"
    if guards.robust == "none":
        out = _weighted(kept, prefix)
    else:
        out = _robust(kept, prefix, guards.robust, guards.trim_fraction)
    if core.rule.personalized:
        out["eval_kind"] = "personalized: each client's model on its local split"
    elif core.rule.local_head:
        out["eval_kind"] = "personalized: global adapter, each client's own head"
    rec = core.open_record()
    rec.update(out)
    rec.eval_ok = len(kept)
    rec.eval_dropped = dropped
    rec.eval_capped = report.capped
    rec.eval_clipped = report.clipped
    rec.eval_rejected = report.rejected
    if report.loss_bound is not None:
        rec.eval_loss_bound = report.loss_bound
    loss = out.get(f"{prefix}_loss")
    return loss, out


def _eval_score(
    res: EvalIncoming, clean: Mapping[str, MetricValue]
) -> tuple[EvalScore | None, list[str]]:
    """Return the reply as an :class:`EvalScore`, or None and what is wrong."""
    faults: list[str] = []
    raw = res.loss
    loss = float(raw) if is_finite_number(raw) else math.nan  # type: ignore[arg-type]
    if not loss >= 0:
        faults.append(f"loss={raw!r} should be a finite number >= 0")
    n = res.num_examples
    if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
        faults.append(f"num_examples={n!r} should be a positive integer")
    acc = clean.get(ACCURACY)  # a finite number if present (clean_metrics)
    if isinstance(acc, int | float) and not 0 <= acc <= 1:
        faults.append(f"accuracy={acc!r} should be in [0, 1]")
    if faults or not isinstance(n, int):
        return None, faults
    return EvalScore(res.node, n, loss, clean), faults


def _weighted(valid: Sequence[EvalScore], prefix: str) -> dict[str, Any]:
    """``<prefix>_loss`` / ``_accuracy`` / ``_perplexity``: example-weighted means."""
    out: dict[str, Any] = {}
    if not valid:
        return out
    total = sum(s.num_examples for s in valid)
    loss = sum(s.num_examples * s.loss for s in valid) / total
    out[f"{prefix}_loss"] = loss
    accs = [
        (s.num_examples, s.metrics[ACCURACY]) for s in valid if ACCURACY in s.metrics
    ]
    if accs:
        weighted = sum(n * float(a) for n, a in accs)
        out[f"{prefix}_accuracy"] = weighted / sum(n for n, _ in accs)
    if any(PERPLEXITY in s.metrics for s in valid):
        out[f"{prefix}_perplexity"] = math.exp(min(loss, 700.0))
    return out


def _robust(
    valid: Sequence[EvalScore], prefix: str, mode: RobustMode, trim: float
) -> dict[str, Any]:
    """Return :func:`_weighted`'s fields by ``guards.robust`` (unweighted)."""
    out: dict[str, Any] = {}
    if not valid:
        return out

    def average(values: Sequence[float]) -> float:
        column = [np.array([v], dtype=np.float64) for v in values]
        return float(robust_mean(column, mode, trim)[0])

    loss = average([s.loss for s in valid])
    out[f"{prefix}_loss"] = loss
    accs = [float(s.metrics[ACCURACY]) for s in valid if ACCURACY in s.metrics]
    if accs:
        out[f"{prefix}_accuracy"] = average(accs)
    if any(PERPLEXITY in s.metrics for s in valid):
        out[f"{prefix}_perplexity"] = math.exp(min(loss, 700.0))
    return out
