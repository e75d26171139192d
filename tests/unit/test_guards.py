"""Metric hygiene and the round's hostile-update guards (no Flower)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_flwr.aggregation import ClientReply
from lora_flwr.protocol import (
    ACCURACY,
    BASE_VERSION,
    NUM_TOKENS,
    SECONDS,
    TRAIN_LOSS,
    WORKER_PID,
    Plan,
)
from lora_flwr.server.guards import clean_metrics, guard_replies
from lora_flwr.validation import update_norm


def test_clean_metrics_keeps_good_values() -> None:
    good = {
        TRAIN_LOSS: 0.5,
        SECONDS: 3,
        NUM_TOKENS: 10,
        BASE_VERSION: 0,
        WORKER_PID: 1234,
        "custom": "text",
    }
    kept, problems = clean_metrics(good)
    assert kept == good
    assert problems == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (SECONDS, "abc"),
        (ACCURACY, "abc"),
        (TRAIN_LOSS, math.nan),
        (TRAIN_LOSS, math.inf),
        (TRAIN_LOSS, True),
        (NUM_TOKENS, -1),
        (NUM_TOKENS, 2.5),
        (BASE_VERSION, "1"),
        (WORKER_PID, 1.5),
        ("custom", math.nan),
    ],
)
def test_clean_metrics_drops_a_malformed_value_and_says_why(
    key: str, value: object
) -> None:
    kept, problems = clean_metrics({key: value, TRAIN_LOSS + "_ok": 1.0})  # type: ignore[dict-item]
    assert key not in kept
    assert kept == {TRAIN_LOSS + "_ok": 1.0}
    assert len(problems) == 1 and f"metric {key}=" in problems[0]


def _reply(pid: int, step: float, n: int = 100) -> ClientReply:
    start = {"b": np.zeros((4, 2), np.float32)}
    arrays = {"b": np.full((4, 2), step, np.float32)}
    return ClientReply(pid, Plan(rank=2), arrays, n, start)


def test_guards_clip_a_scaled_update_and_cap_a_lying_count() -> None:
    # Two honest clients; partition 2 scales its update x1e6 and claims 10**9 rows.
    replies = [_reply(0, 1.0), _reply(1, 1.5, 120), _reply(2, 1e6, 10**9)]

    kept, report = guard_replies(
        replies, weight_cap=4.0, norm_guard="clip", norm_factor=3.0
    )

    honest_median = update_norm(replies[1].arrays, replies[1].start)
    assert report.norm_bound == pytest.approx(3.0 * honest_median)
    assert update_norm(kept[2].arrays, kept[2].start) == pytest.approx(
        report.norm_bound, rel=1e-6
    )
    assert [r.num_examples for r in kept] == [100, 120, 480]
    assert (report.norm_clipped, report.weight_capped, report.norm_rejected) == (
        1,
        1,
        0,
    )
    assert any("partition 2" in w and "clipped" in w for w in report.warnings)
    assert any(
        "partition 2" in w and "10**9" not in w and "480" in w for w in report.warnings
    )
    # Honest replies pass untouched.
    for before, after in zip(replies[:2], kept[:2], strict=True):
        np.testing.assert_array_equal(before.arrays["b"], after.arrays["b"])


def test_unchanged_replies_do_not_set_the_norm_bound() -> None:
    # Two clients sent their start back (one class under logit_adjust): the scale
    # comes from the two that moved, so their updates pass whole.
    replies = [_reply(0, 0.0), _reply(1, 0.0), _reply(2, 1.0), _reply(3, 1.5)]
    kept, report = guard_replies(
        replies, weight_cap=0.0, norm_guard="clip", norm_factor=2.0
    )
    moved = update_norm(replies[2].arrays, replies[2].start)
    assert report.norm_bound == pytest.approx(2.0 * moved)
    assert report.norm_clipped == 0
    for before, after in zip(replies, kept, strict=True):
        np.testing.assert_array_equal(before.arrays["b"], after.arrays["b"])
    # An outlier among the movers is still clipped to 2 x their lower median.
    hostile = [*replies, _reply(4, 1e6)]
    kept, report = guard_replies(
        hostile, weight_cap=0.0, norm_guard="clip", norm_factor=2.0
    )
    assert report.norm_clipped == 1
    assert update_norm(kept[4].arrays, kept[4].start) == pytest.approx(
        2.0 * update_norm(replies[3].arrays, replies[3].start), rel=1e-6
    )


def test_one_moving_reply_has_no_scale_to_compare_with() -> None:
    replies = [_reply(0, 0.0), _reply(1, 0.0), _reply(2, 5.0)]
    kept, report = guard_replies(
        replies, weight_cap=0.0, norm_guard="clip", norm_factor=2.0
    )
    assert report.norm_bound is None and report.norm_clipped == 0
    np.testing.assert_array_equal(kept[2].arrays["b"], replies[2].arrays["b"])


def test_reject_mode_drops_the_outlier() -> None:
    replies = [_reply(0, 1.0), _reply(1, 1.5), _reply(2, 1e6)]
    kept, report = guard_replies(
        replies, weight_cap=0.0, norm_guard="reject", norm_factor=3.0
    )
    assert [r.partition for r in kept] == [0, 1]
    assert report.norm_rejected == 1
    assert "rejected the update of partition 2" in report.warnings[0]


def test_guards_off_change_nothing() -> None:
    replies = [_reply(0, 1.0), _reply(1, 1e6, 10**9)]
    kept, report = guard_replies(
        replies, weight_cap=0.0, norm_guard="off", norm_factor=3.0
    )
    assert kept == replies
    assert report.warnings == [] and report.norm_bound is None


@pytest.mark.parametrize("mode", ["cosine", "krum"])
def test_guard_filter_leaves_out_a_sign_flipped_update(mode: str) -> None:
    # Honest steps 1.0 and 1.2 (+ noise); partition 2 sends -1.9 x its honest step,
    # under 2 x the median norm, so only the filter can catch it.
    rng = np.random.default_rng(0)
    start = {"b": np.zeros((4, 2), np.float32)}

    def reply(pid: int, step: np.ndarray) -> ClientReply:
        return ClientReply(
            pid, Plan(rank=2), {"b": step.astype(np.float32)}, 100, start
        )

    base = np.ones((4, 2))
    replies = [
        reply(0, base + 0.1 * rng.normal(size=(4, 2))),
        reply(1, 1.2 * base + 0.1 * rng.normal(size=(4, 2))),
        reply(2, -1.9 * base),
    ]
    kept, report = guard_replies(
        replies,
        weight_cap=1.5,
        norm_guard="clip",
        norm_factor=2.0,
        update_filter=mode,  # type: ignore[arg-type]
    )
    assert [r.partition for r in kept] == [0, 1]
    assert report.filtered == 1 and report.norm_clipped == 0
    assert "partition 2" in report.warnings[-1]
    # Off, the flipped update stays in.
    kept, report = guard_replies(
        replies, weight_cap=1.5, norm_guard="clip", norm_factor=2.0
    )
    assert len(kept) == 3 and report.filtered == 0


def test_guard_filter_compares_only_arrays_every_reply_shares() -> None:
    # Rank tiers: "a" differs in shape, the head "h" is shared; the filter looks
    # at "h" alone and leaves out the client whose head moved the other way.
    def reply(pid: int, rank: int, head: float) -> ClientReply:
        start = {"a": np.zeros((rank, 3), np.float32), "h": np.zeros(4, np.float32)}
        arrays = {
            "a": np.full((rank, 3), -head, np.float32),
            "h": np.full(4, head, np.float32) + np.float32(pid) * 0.01,
        }
        return ClientReply(pid, Plan(rank=rank), arrays, 100, start)

    replies = [reply(0, 2, 1.0), reply(1, 4, 1.1), reply(2, 8, -1.0)]
    kept, report = guard_replies(
        replies, weight_cap=0, norm_guard="off", norm_factor=2.0, update_filter="cosine"
    )
    assert [r.partition for r in kept] == [0, 1] and report.filtered == 1
