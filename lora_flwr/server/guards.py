"""The server's round-level defences: metric hygiene and hostile-update guards.

No Flower import: the strategy calls these on what it has already decoded, and the
unit tests call them directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np

from lora_flwr.aggregation import ClientReply
from lora_flwr.aggregation.robust import (
    FilterMode,
    cap_counts,
    clip_update,
    cosine_outliers,
    krum_outliers,
    norm_bound,
)
from lora_flwr.protocol import (
    ACCURACY,
    BASE_VERSION,
    FIT_CALLS,
    MODEL_LOADS,
    NUM_TOKENS,
    PERPLEXITY,
    RESPONSES_DROPPED,
    RESPONSES_TRUNCATED,
    SECONDS,
    TRAIN_LOSS,
    WORKER_PID,
)
from lora_flwr.validation import update_norm

MetricValue = bool | bytes | float | int | str


# A reply the count cap acts on (a dataclass with ``num_examples``).
_Counted = TypeVar("_Counted", ClientReply, "EvalScore")


class RunAborted(RuntimeError):
    """The run cannot do its job (e.g. every client keeps failing); stop it."""


# Metrics the server computes with, and what each must be.
_REALS = (TRAIN_LOSS, SECONDS, ACCURACY, PERPLEXITY)
_COUNTS = (
    NUM_TOKENS,
    MODEL_LOADS,
    FIT_CALLS,
    BASE_VERSION,
    RESPONSES_TRUNCATED,
    RESPONSES_DROPPED,
)


def is_finite_number(value: object) -> bool:
    """Whether ``value`` is a finite int or float (not a bool).

    An int too large for a float (``10**400``) is not: the server computes in
    floats.
    """
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def clean_metrics(
    metrics: Mapping[str, MetricValue],
) -> tuple[dict[str, MetricValue], list[str]]:
    """Drop malformed client metrics; return what is kept and why others went.

    Known numeric metrics must be finite real numbers (counts: non-negative
    integers); the worker id an int or a string; any other float must be finite.
    A client's bad metric is then simply absent, as if it had not reported it.
    """
    kept: dict[str, MetricValue] = {}
    problems: list[str] = []
    for key, value in metrics.items():
        if key in _REALS:
            ok = is_finite_number(value)
            what = "a finite number"
        elif key in _COUNTS:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            what = "a non-negative integer"
        elif key == WORKER_PID:
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, str) and len(value) <= 256
            )
            what = "an integer or a short string"
        else:
            ok = not isinstance(value, float) or math.isfinite(value)
            what = "finite"
        if ok:
            kept[key] = value
        else:
            problems.append(f"metric {key}={_short(value)} should be {what}")
    return kept, problems


def moved_weight(before: Sequence[int], after: Sequence[int]) -> float:
    """Share of the aggregation weight that moved: ``1/2 sum_k |p_k - p'_k|``.

    ``p_k = n_k / sum_j n_j`` before the cap and ``p'_k`` after it: 0 when the
    cap changed no weight, up to 1 when it moved all of it.
    """
    total, capped = sum(before), sum(after)
    if not total or not capped:
        return 0.0
    return 0.5 * sum(
        abs(n / total - c / capped) for n, c in zip(before, after, strict=True)
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class GuardReport:
    """What the round's guards did: warnings to log and counts for the history."""

    warnings: list[str] = field(default_factory=list)
    weight_capped: int = 0
    norm_clipped: int = 0
    norm_rejected: int = 0
    norm_bound: float | None = None
    filtered: int = 0  # replies the update filter left out
    # Share of the aggregation weight the count cap moved (None: cap off).
    weight_moved: float | None = None


def guard_replies(
    replies: Sequence[ClientReply],
    *,
    weight_cap: float,
    norm_guard: Literal["clip", "reject", "off"],
    norm_factor: float,
    update_filter: FilterMode = "none",
    min_cosine: float = 0.0,
) -> tuple[list[ClientReply], GuardReport]:
    """Apply the norm guard, the update filter, then the count cap to the replies.

    Parameters
    ----------
    replies
        Replies that passed validation (names, shapes, dtype, finite).
    weight_cap
        ``guards.weight_cap``: a count is capped at this multiple of the lower median
        count of the replies kept (0: off).
    norm_guard
        ``guards.norm_guard``: an update ``reply - start`` whose norm exceeds
        ``norm_factor`` times the lower median norm of the non-zero updates is
        scaled back to that bound (``"clip"``) or removed (``"reject"``). With
        fewer than two non-zero updates there is no honest scale to compare with,
        and nothing is clipped.
    norm_factor
        ``guards.norm_guard_factor``.
    update_filter
        ``guards.filter``: leave out the updates that point away from the
        others (``"cosine"``, mean cosine below ``min_cosine``) or that
        Multi-Krum scores worst (``"krum"``); see :func:`filter_updates`.
    min_cosine
        ``guards.min_cosine``.

    Returns
    -------
    tuple
        The replies to aggregate and a :class:`GuardReport`.
    """
    report = GuardReport()
    kept = list(replies)
    norms = [update_norm(r.arrays, r.start) for r in kept] if kept else []
    # Only clients that moved set the scale: a client that sent its start back
    # unchanged (one class under loss.name=logit_adjust, nothing to train) says
    # nothing about how far an honest update goes, and a median of zeros would
    # clip every real update to nothing.
    moved = [n for n in norms if n > 0]
    if norm_guard != "off" and len(moved) >= 2:
        bound = norm_bound(moved, norm_factor)
        report.norm_bound = bound
        guarded: list[ClientReply] = []
        for reply, norm in zip(kept, norms, strict=True):
            if norm <= bound:
                guarded.append(reply)
                continue
            who = f"partition {reply.partition}"
            if norm_guard == "reject":
                report.norm_rejected += 1
                report.warnings.append(
                    f"rejected the update of {who}: norm {norm:.4g} > {bound:.4g} "
                    f"({norm_factor:g} x the round's median update norm)"
                )
                continue
            report.norm_clipped += 1
            report.warnings.append(
                f"clipped the update of {who}: norm {norm:.4g} -> {bound:.4g} "
                f"({norm_factor:g} x the round's median update norm)"
            )
            clipped = clip_update(reply.arrays, reply.start, bound)
            guarded.append(dataclasses.replace(reply, arrays=clipped))
        kept = guarded
    if update_filter != "none":
        kept = filter_updates(kept, update_filter, min_cosine, report)
    if weight_cap > 0 and kept:
        kept = _cap_reply_counts(kept, weight_cap, report)
    return kept, report


def _cap_reply_counts(
    replies: Sequence[ClientReply], weight_cap: float, report: GuardReport
) -> list[ClientReply]:
    """Cap each reply's count at ``weight_cap`` x the lower median; note it."""
    out, warnings, counts, capped = _cap_counted(
        replies, weight_cap, lambda r: f"example count of partition {r.partition}"
    )
    report.weight_capped += len(warnings)
    report.warnings.extend(warnings)
    report.weight_moved = moved_weight(counts, capped)
    return out


def _cap_counted(
    items: Sequence[_Counted], weight_cap: float, what: Callable[[_Counted], str]
) -> tuple[list[_Counted], list[str], list[int], list[int]]:
    """Cap the items' ``num_examples`` at ``weight_cap`` x their lower median.

    Returns the items (an uncapped one as it came), a warning per capped one
    (``capped the <what(item)>: n -> c ...``), and the counts before and after.
    """
    counts = [item.num_examples for item in items]
    capped = cap_counts(counts, weight_cap)
    out: list[_Counted] = []
    warnings: list[str] = []
    for item, n, c in zip(items, counts, capped, strict=True):
        if c < n:
            warnings.append(
                f"capped the {what(item)}: {n} -> {c} "
                f"({weight_cap:g} x the round's median count)"
            )
            item = dataclasses.replace(item, num_examples=c)
        out.append(item)
    return out, warnings, counts, capped


def filter_updates(
    replies: Sequence[ClientReply],
    mode: FilterMode,
    min_cosine: float,
    report: GuardReport,
) -> list[ClientReply]:
    """Leave out the replies the update filter flags; count them in ``report``.

    The updates ``reply - start`` are compared over the arrays every reply holds
    with one shape (under rank tiers: the arrays all tiers share, such as a head);
    with none in common nothing is filtered.
    """
    if len(replies) < 3:
        return list(replies)
    shared = _shared_names(replies)
    if not shared:
        return list(replies)
    updates = [
        np.concatenate(
            [
                (r.arrays[n].astype(np.float64) - r.start[n].astype(np.float64)).ravel()
                for n in shared
            ]
        )
        for r in replies
    ]
    if mode == "cosine":
        out = cosine_outliers(updates, min_cosine)
        why = (
            "its update points away from the round's others (mean cosine "
            f"< {min_cosine:g})"
        )
    else:
        out = krum_outliers(updates)
        why = "Multi-Krum scored its update farthest from the others"
    for k in out:
        report.warnings.append(
            f"left out the update of partition {replies[k].partition}: {why}"
        )
    report.filtered = len(out)
    return [r for k, r in enumerate(replies) if k not in set(out)]


def _shared_names(replies: Sequence[ClientReply]) -> list[str]:
    """Names every reply's update holds, with one shape across replies (sorted)."""
    first = replies[0]
    names = []
    for name in sorted(first.start):
        shape = first.arrays[name].shape if name in first.arrays else None
        if shape is not None and all(
            name in r.start and name in r.arrays and r.arrays[name].shape == shape
            for r in replies
        ):
            names.append(name)
    return names


@dataclass(frozen=True)
class EvalScore:
    """One federated-evaluation reply that passed validation."""

    node: str
    num_examples: int
    loss: float  # finite, >= 0
    metrics: Mapping[str, MetricValue]  # cleaned; an accuracy lies in [0, 1]


@dataclass
class EvalGuardReport:
    """What the guards did to a round's evaluation replies."""

    warnings: list[str] = field(default_factory=list)
    capped: int = 0
    clipped: int = 0
    rejected: int = 0
    loss_bound: float | None = None


def guard_eval(
    scores: Sequence[EvalScore],
    *,
    weight_cap: float,
    loss_guard: Literal["clip", "reject", "off"],
    loss_factor: float,
) -> tuple[list[EvalScore], EvalGuardReport]:
    """Apply the loss guard, then the example-count cap, to one round's evaluation.

    The fit guards' twins (:func:`guard_replies`), on the numbers an evaluation
    reply carries: its loss plays the update norm. A loss above ``loss_factor``
    times the lower median of the positive losses is clipped to that bound
    (``"clip"``) or the reply removed (``"reject"``); with fewer than two positive
    losses nothing is compared. Then each count is capped at ``weight_cap`` times
    the lower median count of the replies kept (0: off). A reply neither guard
    touches is returned as it came (the same object).
    """
    report = EvalGuardReport()
    kept = list(scores)
    positive = [s.loss for s in kept if s.loss > 0]
    if loss_guard != "off" and len(positive) >= 2:
        bound = norm_bound(positive, loss_factor)
        report.loss_bound = bound
        guarded: list[EvalScore] = []
        for score in kept:
            if score.loss <= bound:
                guarded.append(score)
                continue
            why = f"{loss_factor:g} x the round's median evaluation loss"
            if loss_guard == "reject":
                report.rejected += 1
                report.warnings.append(
                    f"rejected the evaluation of client {score.node}: loss "
                    f"{score.loss:.4g} > {bound:.4g} ({why})"
                )
                continue
            report.clipped += 1
            report.warnings.append(
                f"clipped the evaluation loss of client {score.node}: "
                f"{score.loss:.4g} -> {bound:.4g} ({why})"
            )
            guarded.append(dataclasses.replace(score, loss=bound))
        kept = guarded
    if weight_cap > 0 and kept:
        kept, warnings, _, _ = _cap_counted(
            kept, weight_cap, lambda s: f"evaluation example count of client {s.node}"
        )
        report.capped += len(warnings)
        report.warnings.extend(warnings)
    return kept, report
