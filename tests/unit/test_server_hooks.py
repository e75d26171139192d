"""Side protocols of the round core: DPHook, SecAggHook and the RoundHook seam."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from test_server_core import (
    LAYOUT,
    assert_arrays_equal,
    const_update,
    incoming,
    make_core,
    make_initial,
    open_fit,
)

from lora_flwr.aggregation import ClientReply, ServerState
from lora_flwr.server.dp import DPHook
from lora_flwr.server.hooks import FitRound
from lora_flwr.server.record import RoundRecord
from lora_flwr.server.secagg import SecAggHook
from lora_flwr.validation import update_norm

Arrays = dict[str, np.ndarray]


def _fit_round(rnd: int = 1, incoming: Any = (), dropped: int = 0) -> FitRound:
    return FitRound(rnd, RoundRecord(round=rnd), list(incoming), dropped)


def _replies(updates: list[float], counts: list[int]) -> list[ClientReply]:
    """Replies ``start + u`` (a constant u per client) on the initial adapter."""
    core = make_core()
    start = make_initial()
    out = []
    for pid, (u, n) in enumerate(zip(updates, counts, strict=True)):
        plan = core.plans(1, [pid], evaluate=False)[0].plan
        arrays = {k: v + np.float32(u) for k, v in start.items()}
        out.append(ClientReply(pid, plan, arrays, n, start))
    return out


# ------------------------------------------------------------------------ DP
def test_dp_clips_an_update_above_the_bound_to_exactly_the_bound() -> None:
    # Prepare: 16 weights; update norms 3 * 4 = 12 and 0.1 * 4 = 0.4.
    hook = DPHook(make_core(privacy={"noise_multiplier": 1.0, "clip_norm": 1.0}).cfg)
    big, small = _replies([3.0, 0.1], [1, 1])
    fit = _fit_round()

    # Execute
    out = hook.on_replies(fit, [big, small])

    # Assert: the big one scaled to norm 1 along its direction; the small kept.
    assert fit.record.dp_clipped == 1
    assert fit.record.to_dict()["dp_clipped"] == 1
    assert update_norm(out[0].arrays, big.start) == pytest.approx(1.0, rel=1e-6)
    for name, value in big.start.items():
        np.testing.assert_allclose(out[0].arrays[name], value + 3.0 / 12, rtol=1e-6)
    assert out[1] is small
    assert (out[0].partition, out[0].num_examples) == (0, 1)


def test_dp_epsilon_grows_with_the_noisy_rounds() -> None:
    # Prepare
    pytest.importorskip("dp_accounting")
    cfg = make_core(privacy={"noise_multiplier": 1.0, "clip_norm": 0.5}).cfg
    hook = DPHook(cfg)
    state = ServerState(round=1, arrays=make_initial())
    fits = [_fit_round(rnd) for rnd in (1, 2, 3)]
    for fit in fits:
        fit.record.fit_ok = 2

    # Execute
    for fit in fits:
        hook.on_aggregated(fit, state)

    # Assert: the std is the multiplier x the clip norm over the replies kept.
    eps = [fit.record.dp_epsilon for fit in fits]
    assert eps[0] is not None and eps[0] > 0
    assert eps[0] < eps[1] < eps[2]
    for fit in fits:
        assert fit.record.dp_noise_std == pytest.approx(1.0 * 0.5 / 2)
        unamplified = fit.record.dp_epsilon_unamplified
        assert unamplified is not None and unamplified >= fit.record.dp_epsilon
    assert hook.counters() == {"dp_rounds": 3}
    again = DPHook(cfg)
    again.restore(hook.counters())
    assert again.rounds == 3


def test_a_dp_round_in_the_core_clips_and_counts() -> None:
    # Prepare
    pytest.importorskip("dp_accounting")
    core = make_core(privacy={"noise_multiplier": 1.0, "clip_norm": 0.5})
    outs = open_fit(core, 1)
    updates = [3.0, 3.0, 0.01]  # norms 12, 12 and 0.04
    replies = [incoming(core, outs[k], const_update(updates[k]), 2) for k in range(3)]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert
    assert [type(h) for h in core.hooks] == [DPHook]
    assert ok is True
    assert core.record is not None
    assert core.record.dp_clipped == 2
    assert core.record.dp_noise_std == pytest.approx(1.0 * 0.5 / 3)
    assert core.record.dp_epsilon is not None and core.record.dp_epsilon > 0
    assert core.counters(1)["dp_rounds"] == 1


# -------------------------------------------------------------------- SecAgg
def _secagg_round(
    counts: list[int], *, differ: bool = False, bad: int | None = None
) -> tuple[Any, Arrays, Any]:
    """A SecAgg+ round: every result carries the same unmasked float64 mean."""
    core = make_core(secagg={"enabled": True})
    outs = open_fit(core, 1)
    rng = np.random.default_rng(1)
    mean = {n: rng.normal(size=s) for n, s in LAYOUT.items()}
    replies = []
    for k, n in enumerate(counts):
        arrays = [mean[name].copy() for name, _ in core.rule.reply_spec(outs[k].plan)]
        if differ and k == 1:
            arrays[0][0, 0] += 1.0
        count = 0 if k == bad else n  # num_examples = 0: dropped
        replies.append(incoming(core, outs[k], {}, count, arrays=arrays))
    return core, mean, replies


def test_secagg_collapses_identical_replies_into_one_with_the_summed_count() -> None:
    # Prepare: the workflow unmasked one mean; each result carries it.
    core, mean, replies = _secagg_round([1, 2, 3])
    fit = _fit_round(1, replies)
    valid = [
        ClientReply(k, core.fit_sent[f"node-{k}"].plan, dict(mean), n)
        for k, n in enumerate([1, 2, 3])
    ]

    # Execute
    out = SecAggHook().on_replies(fit, valid)

    # Assert: one reply, float32, the count of all three.
    (one,) = out
    assert (one.partition, one.num_examples) == (0, 6)
    for name, value in mean.items():
        assert one.arrays[name].dtype == np.float32
        np.testing.assert_array_equal(one.arrays[name], value.astype(np.float32))
    assert "bytes_up" not in fit.record.to_dict()


def test_a_secagg_round_in_the_core_makes_the_mean_the_global() -> None:
    # Prepare: three sampled, two replied (one node failed).
    core, mean, replies = _secagg_round([1, 2, 3])
    replies = replies[:2]

    # Execute
    ok = core.fit_outcome(1, replies, [])
    core.finish_round()

    # Assert: the global is the mean; uploads and the per-client error absent.
    assert ok is True
    assert_arrays_equal(
        core.global_arrays(), {n: v.astype(np.float32) for n, v in mean.items()}
    )
    row = core.history[-1]
    assert (row["fit_ok"], row["fit_failed"], row["aggregated"]) == (2, 1, True)
    assert not {"bytes_up", "bytes_up_max", "agg_error"} & set(row)


def test_secagg_refuses_replies_with_different_arrays() -> None:
    # Prepare: one result carries other arrays: the workflow did not run.
    core, _, replies = _secagg_round([1, 2, 3], differ=True)

    # Execute / Assert
    with pytest.raises(RuntimeError, match="results carry different parameters"):
        core.fit_outcome(1, replies, [])


def test_secagg_keeps_the_global_when_a_reply_was_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: one reply is invalid; it cannot be taken out of the sum.
    caplog.set_level(logging.WARNING, logger="flwr")
    core, _, replies = _secagg_round([1, 2, 3], bad=2)
    before = core.state

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert
    assert ok is False
    assert core.state is before
    assert core.record is not None
    assert (core.record.fit_ok, core.record.fit_dropped) == (0, 1)
    assert core.record.aggregated is False
    assert any("inside the SecAgg+ sum" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ the seam
class Spy:
    """A RoundHook that keeps only the first reply and notes what it saw."""

    collapses = False

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_replies(
        self, fit: FitRound, replies: list[ClientReply]
    ) -> list[ClientReply]:
        self.seen.append(("replies", fit.server_round, len(replies), fit.dropped))
        fit.record.update({"spy_seen": len(replies)})
        return replies[:1]

    def on_aggregated(self, fit: FitRound, state: ServerState) -> None:
        self.seen.append(("aggregated", state.round))

    def counters(self) -> dict[str, Any]:
        return {"spy": len(self.seen)}

    def restore(self, counters: dict[str, Any]) -> None:
        self.seen = [None] * int(counters["spy"])


def test_a_hook_sees_the_replies_and_the_new_state_and_checkpoints() -> None:
    # Prepare: the spy keeps only the first reply (partition 0, update +1).
    core = make_core(sampling={"min_replies": 1})
    spy = Spy()
    core.hooks.append(spy)
    outs = open_fit(core, 1)
    replies = [incoming(core, outs[k], const_update(k + 1.0), 1) for k in range(3)]

    # Execute
    ok = core.fit_outcome(1, replies, [])
    seen, counters = list(spy.seen), core.counters(1)
    core.restore(core.state, counters, [{"round": 0}, {"round": 1}])

    # Assert: its counters go into the checkpoint's and come back on restore.
    assert ok is True
    assert seen == [("replies", 1, 3, 0), ("aggregated", 1)]
    assert counters["spy"] == 2
    assert spy.seen == [None, None]
    assert core.record is not None and core.record.extra == {"spy_seen": 3}
    for name, value in make_initial().items():
        np.testing.assert_allclose(core.global_arrays()[name], value + 1.0, rtol=1e-6)
