"""One round's history row: a typed record, written by the round core only.

``history.json`` is a list of these rows (``RoundRecord.to_dict``); readers
(``results``, ``compare``, ``sweep``, the benchmarks) name its fields through the
constants below or :meth:`RoundRecord.from_dict`, never by a string literal of
their own. A field that was never set in a round (no DP, no evaluation that
round) is absent from the row; one set to ``None`` (a ``train_loss`` no client
reported) is written as ``null``. Fields not known here (a metric of
``evaluate_fn`` beyond loss/accuracy/perplexity, the ``prof_*`` phase split of
``compute.profile``) go to :attr:`RoundRecord.extra`, written after the rest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundRecord:
    """What one round did; field order is the column order of ``history.csv``.

    Round 0 holds only the evaluation of the starting adapter (and a head
    refit before round 1).
    """

    round: int = 0
    # Wall clock (epoch seconds): where a round sits in a run's timeline.
    started_at: float | None = None
    handshake_seconds: float | None = None  # learning new nodes' partitions
    handshake_messages: int | None = None
    lr: float | None = None  # the clients' lr this round (after fed.lr_decay)
    fit_sampled: int | None = None
    fit_partitions: str | None = None  # comma-separated partition ids
    bytes_down: int | None = None  # fit + federated evaluation payloads
    bytes_down_fit_max: int | None = None
    fit_done_at: float | None = None
    bytes_up: int | None = None  # absent under SecAgg+ (masked vectors)
    bytes_up_max: int | None = None
    fit_ok: int | None = None  # replies that passed validation and the guards
    fit_failed: int | None = None
    fit_dropped: int | None = None  # malformed replies
    weight_capped: int | None = None  # replies whose count guards.weight_cap cut
    # Share of the aggregation weight the cap moved: 1/2 sum_k |p_k - p'_k|.
    weight_cap_moved: float | None = None
    norm_clipped: int | None = None
    norm_rejected: int | None = None
    filtered: int | None = None  # replies guards.filter left out
    norm_bound: float | None = None
    dp_clipped: int | None = None
    train_loss: float | None = None  # example-weighted, over valid replies
    client_seconds_max: float | None = None
    client_seconds_sum: float | None = None
    tokens: int | None = None
    # Instruction data, summed over the replies: training conversations whose
    # responses model.max_length cut short (kept) or cut entirely (left out).
    responses_truncated: int | None = None
    responses_dropped: int | None = None
    # Compute critical path: one worker's calls run in turn, workers in parallel.
    client_seconds_critical: float | None = None
    workers: int | None = None
    model_loads_max: int | None = None
    client_fit_calls_max: int | None = None
    agg_error: float | None = None  # the rule's distance to the exact average
    aggregated: bool | None = None
    dp_noise_std: float | None = None
    dp_epsilon: float | None = None
    dp_epsilon_unamplified: float | None = None
    base_version: int | None = None
    test_loss: float | None = None  # centralised evaluation of the global
    test_accuracy: float | None = None
    test_perplexity: float | None = None
    eval_seconds: float | None = None
    calib_clients: int | None = None  # head.calibration = "lda"
    bytes_down_calib: int | None = None
    bytes_up_calib: int | None = None
    calib_examples: int | None = None
    calib_error: str | None = None
    calib_seconds: float | None = None
    bytes_down_eval: int | None = None
    fed_loss: float | None = None  # federated evaluation (global adapter)
    fed_accuracy: float | None = None
    fed_perplexity: float | None = None
    personal_loss: float | None = None  # federated evaluation (own models)
    personal_accuracy: float | None = None
    personal_perplexity: float | None = None
    eval_kind: str | None = None
    eval_ok: int | None = None  # replies that passed validation and the guards
    eval_dropped: int | None = None  # malformed replies (loss, count, accuracy)
    eval_capped: int | None = None  # replies whose count guards.weight_cap cut
    eval_clipped: int | None = None  # losses guards.norm_guard clipped ...
    eval_rejected: int | None = None  # ... or rejected
    eval_loss_bound: float | None = None
    round_seconds: float | None = None
    aborted: str | None = None  # why the run stopped after this round
    extra: dict[str, Any] = field(default_factory=dict)
    _set: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Mark as written: the round, the non-None fields given, later ones set."""
        object.__setattr__(
            self, "_set", {k for k in _ORDER if getattr(self, k) is not None}
        )
        self._set.add("round")

    def __setattr__(self, name: str, value: Any) -> None:
        """Set a field and mark it as written (``None`` included)."""
        object.__setattr__(self, name, value)
        if name in _FIELDS and "_set" in self.__dict__:
            self._set.add(name)

    def unset(self, name: str) -> None:
        """Take a field out of the row again."""
        object.__setattr__(self, name, None)
        self._set.discard(name)

    def get(self, name: str) -> Any:
        """Return a field (or an :attr:`extra` value) by name, None when unset."""
        if name in _FIELDS:
            return getattr(self, name)
        return self.extra.get(name)

    def update(self, values: Mapping[str, Any]) -> None:
        """Set fields by name; names that are not fields go to :attr:`extra`."""
        for key, value in values.items():
            if key in _FIELDS:
                setattr(self, key, value)
            else:
                self.extra[key] = value

    def to_dict(self) -> dict[str, Any]:
        """Return the history row: set fields in order, then :attr:`extra`."""
        row = {k: getattr(self, k) for k in _ORDER if k in self._set}
        row.update(self.extra)
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> RoundRecord:
        """Read a history row back (unknown keys land in :attr:`extra`)."""
        rec = cls()
        rec.update(row)
        return rec


_ORDER = tuple(
    f.name for f in dataclasses.fields(RoundRecord) if f.name not in ("extra", "_set")
)
_FIELDS = frozenset(_ORDER)
FIELDS: frozenset[str] = _FIELDS
"""Every history key the round core writes (the ``prof_*`` split aside)."""

# History keys, for readers that look rows up by name (in column order).
ROUND = "round"
STARTED_AT = "started_at"
HANDSHAKE_SECONDS = "handshake_seconds"
LR = "lr"
BYTES_DOWN = "bytes_down"
FIT_DONE_AT = "fit_done_at"
BYTES_UP = "bytes_up"
BYTES_UP_MAX = "bytes_up_max"
FIT_OK = "fit_ok"
FIT_FAILED = "fit_failed"
FIT_DROPPED = "fit_dropped"
WEIGHT_CAPPED = "weight_capped"
NORM_CLIPPED = "norm_clipped"
NORM_REJECTED = "norm_rejected"
FILTERED = "filtered"
TRAIN_LOSS = "train_loss"
RESPONSES_TRUNCATED = "responses_truncated"
RESPONSES_DROPPED = "responses_dropped"
CLIENT_SECONDS_MAX = "client_seconds_max"
CLIENT_SECONDS_CRITICAL = "client_seconds_critical"
MODEL_LOADS_MAX = "model_loads_max"
AGG_ERROR = "agg_error"
AGGREGATED = "aggregated"
DP_EPSILON = "dp_epsilon"
TEST_LOSS = "test_loss"
TEST_ACCURACY = "test_accuracy"
TEST_PERPLEXITY = "test_perplexity"
EVAL_SECONDS = "eval_seconds"
BYTES_DOWN_CALIB = "bytes_down_calib"
BYTES_UP_CALIB = "bytes_up_calib"
CALIB_SECONDS = "calib_seconds"
BYTES_DOWN_EVAL = "bytes_down_eval"
FED_LOSS = "fed_loss"
FED_ACCURACY = "fed_accuracy"
PERSONAL_LOSS = "personal_loss"
PERSONAL_ACCURACY = "personal_accuracy"
PERSONAL_PERPLEXITY = "personal_perplexity"
EVAL_OK = "eval_ok"
EVAL_DROPPED = "eval_dropped"
EVAL_CAPPED = "eval_capped"
EVAL_CLIPPED = "eval_clipped"
EVAL_REJECTED = "eval_rejected"
ROUND_SECONDS = "round_seconds"
ABORTED = "aborted"
assert {
    ROUND,
    STARTED_AT,
    HANDSHAKE_SECONDS,
    LR,
    BYTES_DOWN,
    FIT_DONE_AT,
    BYTES_UP,
    BYTES_UP_MAX,
    FIT_OK,
    FIT_FAILED,
    FIT_DROPPED,
    WEIGHT_CAPPED,
    NORM_CLIPPED,
    NORM_REJECTED,
    FILTERED,
    TRAIN_LOSS,
    RESPONSES_TRUNCATED,
    RESPONSES_DROPPED,
    CLIENT_SECONDS_MAX,
    CLIENT_SECONDS_CRITICAL,
    MODEL_LOADS_MAX,
    AGG_ERROR,
    AGGREGATED,
    DP_EPSILON,
    TEST_LOSS,
    TEST_ACCURACY,
    TEST_PERPLEXITY,
    EVAL_SECONDS,
    BYTES_DOWN_CALIB,
    BYTES_UP_CALIB,
    CALIB_SECONDS,
    BYTES_DOWN_EVAL,
    FED_LOSS,
    FED_ACCURACY,
    PERSONAL_LOSS,
    PERSONAL_ACCURACY,
    PERSONAL_PERPLEXITY,
    EVAL_OK,
    EVAL_DROPPED,
    EVAL_CAPPED,
    EVAL_CLIPPED,
    EVAL_REJECTED,
    ROUND_SECONDS,
    ABORTED,
} <= _FIELDS
