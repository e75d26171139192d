"""RoundCore's rounds on plain arrays: replies dropped and why, guards, optimizer,
DP, compression, evaluation cadence and overlap, the record's fields.

Moved here from the Flower strategy's tests: the same rounds, values and
messages, with :class:`Incoming` replies instead of ``FitRes`` and mock proxies.
The core is driven the way the Flower translator drives it (see
:mod:`lora_flwr.fl.strategy`): ``settle`` before ``evaluate``, ``finish_round``
when no federated evaluation follows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from test_server_core import (
    LAYOUT,
    R,
    assert_arrays_equal,
    global_copy,
    make_cfg,
    node,
    open_fit,
)

from lora_flwr.compression import decode_reply, encode_reply
from lora_flwr.config import GuardsConfig
from lora_flwr.protocol import (
    ACCURACY,
    BASE_VERSION,
    PERPLEXITY,
    SECONDS,
    TRAIN_LOSS,
    AdapterLayout,
    group_of,
)
from lora_flwr.server.core import Outgoing, RoundCore
from lora_flwr.server.guards import RunAborted
from lora_flwr.server.replies import Incoming, Sent
from lora_flwr.server.rounds import EvalIncoming

Arrays = dict[str, np.ndarray]

# Rank tiers: allocated rank 4, clients at 2 or 4.
TIER_LAYOUT = AdapterLayout(
    ("q.lora_A.weight", "q.lora_B.weight", "classifier.bias"), ((4, 3), (5, 4), (2,))
)
# Merging rules: a module wide enough that a stacked catch-up beats a dense one.
WIDE_LAYOUT = AdapterLayout(
    ("q.lora_A.weight", "q.lora_B.weight", "classifier.bias"), ((R, 16), (16, R), (2,))
)
ALL = (0, 1, 2, 3)  # every partition is sampled (sampling.fraction = 1)


# ------------------------------------------------------------------- helpers
def initial_of(layout: AdapterLayout = LAYOUT) -> Arrays:
    """Seeded A, zero B and zero saved modules (as LoRA starts)."""
    rng = np.random.default_rng(0)
    return {
        n: rng.normal(size=s).astype(np.float32)
        if group_of(n) == "A"
        else np.zeros(s, np.float32)
        for n, s in layout.items()
    }


def core_on(
    layout: AdapterLayout = LAYOUT,
    *,
    rows: list[Any] | None = None,
    evaluate_fn: Callable[[int, Arrays, Arrays], dict[str, float]] | None = None,
    **sections: dict[str, Any],
) -> RoundCore:
    """A core on ``layout`` (its rank), four partitions and three rounds by default.

    Section dicts are merged over ``make_cfg``'s defaults; on_round_end appends
    ``(row, view)`` to ``rows``.
    """
    fed = {"num_clients": 4, "num_rounds": 3, **sections.pop("fed", {})}
    r = layout.rank
    lora = {"r": r, "lora_alpha": 2.0 * r, "lora_dropout": 0.0}
    return RoundCore(
        cfg=make_cfg(lora=lora, fed=fed, **sections),
        layout=layout,
        initial=initial_of(layout),
        evaluate_fn=evaluate_fn,
        on_round_end=None if rows is None else lambda *call: rows.append(call),
    )


def full(value: float, layout: AdapterLayout = LAYOUT, groups: str = "ABM") -> list:
    """Arrays of ``value`` for the groups in ``groups``, in wire order."""
    return [
        np.full(s, value, np.float32)
        for n, s in layout.items()
        if group_of(n) in groups
    ]


def reply(
    pid: int,
    arrays: Sequence[Any],
    num_examples: int,
    *,
    version: int | None = 0,
    who: str | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Incoming:
    """Partition ``pid``'s reply (from ``who``, its node by default), 100 bytes.

    Its metrics: train loss ``1 + pid``, the base version it holds, ``metrics``.
    """
    sent: dict[str, Any] = {TRAIN_LOSS: 1.0 + pid}
    if version is not None:
        sent[BASE_VERSION] = version
    sent.update(metrics or {})
    return Incoming(who or node(pid), list(arrays), num_examples, sent, 100)


def open_eval(core: RoundCore, rnd: int, pids: Sequence[int]) -> list[Outgoing]:
    """Plan a federated evaluation and record what each node was sent."""
    planned = core.plans(rnd, pids, evaluate=True)
    core.eval_sampled(
        {node(o.partition): Sent(o.partition, o.plan, o.start, 8) for o in planned}
    )
    return planned


def evaluating(
    **sections: dict[str, Any],
) -> tuple[RoundCore, list[tuple[int, Arrays, Arrays]]]:
    """A core whose centralised evaluation notes its calls; loss 0.5 + round."""
    calls: list[tuple[int, Arrays, Arrays]] = []

    def evaluate_fn(
        server_round: int, arrays: Arrays, base_delta: Arrays
    ) -> dict[str, float]:
        calls.append((server_round, arrays, base_delta))
        return {"loss": 0.5 + server_round, "accuracy": 0.25}

    return core_on(evaluate_fn=evaluate_fn, **sections), calls


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.fixture
def flwr_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the WARNINGs of the server's logger ("flwr", as Flower's)."""
    caplog.set_level(logging.WARNING, logger="flwr")
    return caplog


# ------------------------------------------------------------ dropped replies
def _nan() -> list[np.ndarray]:
    arrays = full(9.0)
    arrays[1][2, 1] = np.nan
    return arrays


def _inf() -> list[np.ndarray]:
    arrays = full(9.0)
    arrays[2][0] = np.inf
    return arrays


BAD_REPLIES: dict[str, tuple[Callable[[], list[Any]], int, str]] = {
    "wrong_count": (
        lambda: full(9.0)[:2],
        100,
        "2 arrays but the plan expects 3 "
        "(q.lora_A.weight, q.lora_B.weight, classifier.bias)",
    ),
    "wrong_shape": (
        lambda: [np.full((3, 2), 9.0, np.float32), *full(9.0)[1:]],
        100,
        "q.lora_A.weight: shape (3, 2), expected (2, 3)",
    ),
    "float64": (
        lambda: [a.astype(np.float64) for a in full(9.0)],
        100,
        "q.lora_A.weight: dtype float64, expected float32",
    ),
    "nan": (_nan, 100, "q.lora_B.weight: contains NaN or Inf"),
    "inf": (_inf, 100, "classifier.bias: contains NaN or Inf"),
    "no_examples": (lambda: full(9.0), 0, "num_examples=0 must be a positive integer"),
    "negative_examples": (
        lambda: full(9.0),
        -3,
        "num_examples=-3 must be a positive integer",
    ),
}


@pytest.mark.parametrize("fault", sorted(BAD_REPLIES))
def test_a_malformed_reply_is_dropped_with_its_reason(
    fault: str, flwr_caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: partition 2 sends the bad reply in round 2.
    build, num_examples, message = BAD_REPLIES[fault]
    core = core_on()
    open_fit(core, 2, ALL)
    replies = [
        reply(0, full(1.0), 1),
        reply(2, build(), num_examples),
        reply(1, full(4.0), 3),
    ]

    # Execute
    ok = core.fit_outcome(2, replies, [])

    # Assert: only the valid replies count: (1*1 + 3*4) / 4 = 3.25.
    assert ok is True
    for name, shape in LAYOUT.items():
        np.testing.assert_allclose(
            core.global_arrays()[name], np.full(shape, 3.25), rtol=1e-6
        )
    assert core.record is not None
    row = core.record.to_dict()
    assert (row["fit_ok"], row["fit_dropped"]) == (2, 1)
    assert row["train_loss"] == pytest.approx((1 * 1.0 + 3 * 2.0) / 4)
    warnings = warnings_of(flwr_caplog)
    assert len(warnings) == 1
    assert "round 2: dropped reply of client node-2 (partition 2)" in warnings[0]
    assert message in warnings[0]


def test_a_reply_from_a_node_that_was_not_sent_a_fit_is_dropped(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    core = core_on()
    open_fit(core, 1, ALL)
    replies = [
        reply(0, full(1.0), 1),
        reply(0, full(50.0), 1, who="stranger"),
        reply(1, full(3.0), 1),
    ]

    # Execute
    core.fit_outcome(1, replies, [])

    # Assert
    np.testing.assert_array_equal(core.global_arrays()["q.lora_B.weight"], 2.0)
    assert core.record is not None and core.record.fit_dropped == 1
    assert "client stranger (partition ?): this node was not sent a fit" in "".join(
        warnings_of(flwr_caplog)
    )


def test_an_update_above_the_norm_limit_is_dropped(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: updates are measured from the start the client was sent; client
    # 1 moved every one of 16 weights by 100 (norm 400), the others by 0.5, 1.5.
    core = core_on(guards={"max_update_norm": 10.0})
    start = [initial_of()[n] for n in LAYOUT.names]
    open_fit(core, 1, ALL)
    replies = [
        reply(p, [a + d for a in start], 1) for p, d in ((0, 0.5), (1, 100.0), (2, 1.5))
    ]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert: the mean of the two accepted updates is +1.
    assert ok is True
    got = core.global_arrays()
    for name, value in initial_of().items():
        np.testing.assert_allclose(got[name], value + 1.0, rtol=1e-6)
    assert core.record is not None and core.record.fit_dropped == 1
    assert "update norm 400 exceeds guards.max_update_norm=10" in "".join(
        warnings_of(flwr_caplog)
    )


def test_too_few_valid_replies_keep_the_global_and_say_why(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: min_replies = 2, one valid reply, one NaN reply, one failure.
    core = core_on()
    before = core.state
    open_fit(core, 3, ALL)
    replies = [reply(0, full(2.0), 1), reply(1, _nan(), 1)]

    # Execute
    ok = core.fit_outcome(3, replies, [("?", "RuntimeError: x")])

    # Assert
    assert ok is False
    assert core.state is before
    for name, value in initial_of().items():
        np.testing.assert_array_equal(core.global_arrays()[name], value)
    assert "round 3: 1 valid replies < sampling.min_replies=2" in "\n".join(
        warnings_of(flwr_caplog)
    )


def test_a_round_whose_replies_are_all_rejected_leaves_the_state_unchanged() -> None:
    # Prepare: four replies, four different faults.
    core = core_on()
    before = global_copy(core)
    first = open_fit(core, 1, ALL)
    replies = [
        reply(0, _nan(), 1),
        reply(1, full(1.0)[:1], 1),
        reply(2, full(1.0), 0),
        reply(3, [a.astype(np.float64) for a in full(1.0)], 1),
    ]

    # Execute
    ok = core.fit_outcome(1, replies, [])
    again = open_fit(core, 2, ALL)

    # Assert: same state, and the next round sends the same payloads.
    assert ok is False
    assert core.state.round == 0
    assert_arrays_equal(core.global_arrays(), before)
    assert core.history == []
    assert sorted(again) == sorted(first) == list(ALL)
    for pid, out in again.items():
        assert len(out.payload) == len(first[pid].payload)
        for got, want in zip(out.payload, first[pid].payload, strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_non_finite_aggregate_never_becomes_the_global(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the largest server learning rate times a huge update overflows float32.
    caplog.set_level(logging.ERROR, logger="flwr")
    core = core_on(server_opt={"name": "fedavgm", "lr": 100.0, "beta1": 0.0})
    before = global_copy(core)
    open_fit(core, 1, ALL)
    replies = [reply(p, full(1e37), 1) for p in (0, 1)]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert
    assert ok is False
    assert_arrays_equal(core.global_arrays(), before)
    assert core.record is not None
    assert core.history == [] and core.record.to_dict()["aggregated"] is False
    assert (
        "round 1: aggregation failed, global kept: q.lora_A.weight: contains NaN or Inf"
        in caplog.text
    )


# --------------------------------------------------------------- construction
def test_the_core_rejects_an_unknown_rule() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="'nope'"):
        core_on(fed={"aggregation": "nope"})


def test_the_core_rejects_initial_arrays_that_do_not_match_the_layout() -> None:
    # Prepare
    initial = initial_of()
    del initial["classifier.bias"]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"missing \['classifier.bias'\]"):
        RoundCore(cfg=make_cfg(), layout=LAYOUT, initial=initial)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"fed": {"aggregation": "flora"}, "server_opt": {"name": "fedadam"}},
            "`server_opt.name`='fedadam' cannot be combined with "
            "`fed.aggregation`='flora'",
        ),
        (
            {"fed": {"aggregation": "fedsvd"}, "server_opt": {"name": "fedavgm"}},
            "`server_opt.name`='fedavgm' cannot be combined with "
            "`fed.aggregation`='fedsvd'",
        ),
        (
            {"fed": {"aggregation": "fedit", "rank_tiers": (2, 4)}},
            "`fed.aggregation`='fedit' needs one rank for every client but "
            "`fed.rank_tiers` is '2,4'",
        ),
    ],
)
def test_the_core_refuses_an_impossible_combination(
    sections: dict[str, dict[str, Any]], message: str
) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        core_on(TIER_LAYOUT, **sections)


# -------------------------------------------- replies checked against the plan
@pytest.mark.parametrize(
    ("rule", "server_round", "send"),
    [
        ("ffa", 1, "BM"),
        ("fedsa", 1, "AM"),
        ("fedsvd", 1, "BM"),
        ("rolora", 1, "BM"),
        ("rolora", 2, "AM"),
    ],
)
def test_a_reply_is_checked_against_that_clients_plan(
    rule: str, server_round: int, send: str, flwr_caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: client 0 sends the whole adapter, clients 1 and 2 only `send`.
    core = core_on(fed={"aggregation": rule})
    before = global_copy(core)
    open_fit(core, server_round, ALL)
    replies = [
        reply(0, full(50.0), 1),
        reply(1, full(1.0, groups=send), 1),
        reply(2, full(3.0, groups=send), 3),
    ]

    # Execute
    ok = core.fit_outcome(server_round, replies, [])

    # Assert: the full reply is dropped, the sent groups are (1 + 9) / 4 = 2.5,
    # the groups nobody sent keep their value.
    assert ok is True
    assert core.record is not None
    assert (core.record.fit_ok, core.record.fit_dropped) == (2, 1)
    assert "3 arrays but the plan expects 2" in "".join(warnings_of(flwr_caplog))
    after = core.global_arrays()
    if rule == "fedsvd":  # B A is re-factored by SVD: the product is the mean's
        b_mean = np.full((4, R), 2.5)
        np.testing.assert_allclose(
            after["q.lora_B.weight"] @ after["q.lora_A.weight"],
            b_mean @ before["q.lora_A.weight"],
            rtol=1e-5,
        )
        np.testing.assert_allclose(after["classifier.bias"], 2.5, rtol=1e-6)
        return
    for name in LAYOUT.names:
        if group_of(name) in send:
            np.testing.assert_allclose(after[name], 2.5, rtol=1e-6)
        else:
            np.testing.assert_array_equal(after[name], before[name])


def test_fedsa_never_takes_a_b_from_a_client() -> None:
    # Prepare: a reply of A, B, M is the wrong count; A + M is accepted.
    core = core_on(fed={"aggregation": "fedsa"})
    open_fit(core, 1, ALL)
    replies = [
        reply(0, full(7.0), 1),
        reply(1, full(2.0, groups="AM"), 1),
        reply(2, full(4.0, groups="AM"), 1),
    ]

    # Execute
    core.fit_outcome(1, replies, [])

    # Assert: B is still the zero init, A and M are the mean.
    after = core.global_arrays()
    assert not after["q.lora_B.weight"].any()
    np.testing.assert_allclose(after["q.lora_A.weight"], 3.0)
    np.testing.assert_allclose(after["classifier.bias"], 3.0)
    # No server-side product for FedSA: no aggregation error.
    assert core.record is not None
    assert core.record.to_dict()["agg_error"] is None


def test_rank_tiers_drop_a_reply_of_the_wrong_rank(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: each tier answers once at its rank; a rank-2 client also sends
    # rank-4 factors.
    core = core_on(TIER_LAYOUT, fed={"aggregation": "hetlora", "rank_tiers": (2, 4)})
    open_fit(core, 1, ALL)
    low = sorted(p for p, r in core.ranks.items() if r == 2)
    high = sorted(p for p, r in core.ranks.items() if r == 4)

    def at(rank: int, value: float) -> list[np.ndarray]:
        shapes = [(rank, 3), (5, rank), (2,)]
        return [np.full(s, value, np.float32) for s in shapes]

    replies = [
        reply(low[0], at(2, 1.0), 1),
        reply(low[1], at(4, 9.0), 1),
        reply(high[0], at(4, 3.0), 1),
    ]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert: A's first 2 rows average 1 and 3, the rest 0 (padding) and 3.
    assert ok is True
    assert core.record is not None
    assert (core.record.fit_ok, core.record.fit_dropped) == (2, 1)
    assert f"(partition {low[1]}): q.lora_A.weight: shape (4, 3), expected (2, 3)" in (
        "".join(warnings_of(flwr_caplog))
    )
    a = core.global_arrays()["q.lora_A.weight"]
    np.testing.assert_allclose(a[:2], 2.0)
    np.testing.assert_allclose(a[2:], 1.5)
    b = core.global_arrays()["q.lora_B.weight"]
    np.testing.assert_allclose(b[:, :2], 2.0)
    np.testing.assert_allclose(b[:, 2:], 1.5)


# ------------------------------------------------- base versions and catch-up
def test_a_failed_or_silent_node_gets_the_dense_delta_next_round() -> None:
    # Prepare: FLoRA, round 1: partitions 0, 1 reply (holding version 0),
    # 2 fails, 3 replies without saying which version it holds.
    core = core_on(WIDE_LAYOUT, fed={"aggregation": "flora"})
    open_fit(core, 1, ALL)
    rng = np.random.default_rng(5)

    def answer(pid: int, version: int | None) -> Incoming:
        arrays = [rng.normal(size=s).astype(np.float32) for s in WIDE_LAYOUT.shapes]
        return reply(pid, arrays, 10 + pid, version=version)

    replies = [answer(0, 0), answer(1, 0), answer(3, None)]

    # Execute
    ok = core.fit_outcome(1, replies, [(node(2), "RuntimeError: node lost")])
    again = open_fit(core, 2, ALL)

    # Assert: version 1 exists; 0 and 1 catch up with the stacked block of
    # width 3 * 2, the two unknown ones with the whole delta.
    assert ok is True
    assert core.state.base_version == 1
    assert core.nodes.versions == {0: 0, 1: 0, 2: None, 3: None}
    plans = {p: out.plan for p, out in again.items()}
    for pid in (0, 1):
        assert (plans[pid].fold_mode, plans[pid].fold_from, plans[pid].fold_to) == (
            "stack",
            0,
            1,
        )
        assert plans[pid].fold_ranks == (3 * R,)
    for pid in (2, 3):
        assert (plans[pid].fold_mode, plans[pid].fold_from, plans[pid].fold_to) == (
            "dense",
            0,
            1,
        )
        payload = again[pid].payload
        assert [a.shape for a in payload] == [(16, 16), (2,)]
        np.testing.assert_array_equal(payload[0], core.state.base_delta["q"])
    stacked = again[0].payload
    assert [a.shape for a in stacked] == [(16, 3 * R), (3 * R, 16), (2,)]


@pytest.mark.parametrize("rule", ["fedit", "ffa", "fedsa", "hetlora"])
def test_a_failed_node_of_a_rule_that_never_merges_gets_no_delta(rule: str) -> None:
    # Prepare: partition 3 fails in round 1; nothing was ever folded.
    core = core_on(fed={"aggregation": rule})
    outs = open_fit(core, 1, ALL)
    send = "".join(outs[0].plan.send)
    replies = [reply(p, full(1.0, groups=send), 1) for p in (0, 1, 2)]
    core.fit_outcome(1, replies, [(node(3), "RuntimeError: node lost")])

    # Execute
    again = open_fit(core, 2, ALL)

    # Assert: no dense zero delta for it, the same bytes as everyone else.
    assert core.nodes.versions[3] is None
    assert {out.plan.fold_mode for out in again.values()} == {"none"}
    assert len({sum(a.nbytes for a in out.payload) for out in again.values()}) == 1


# ---------------------------------------------------------- server optimizer
def _opt_rounds(core: RoundCore) -> list[Arrays]:
    out = []
    for rnd, values in ((1, (1.0, 3.0)), (2, (2.0, 2.0))):
        open_fit(core, rnd, ALL)
        core.fit_outcome(rnd, [reply(p, full(v), 1) for p, v in enumerate(values)], [])
        out.append(global_copy(core))
    return out


def test_fedavgm_with_lr_1_and_no_momentum_is_the_rule_itself() -> None:
    # Prepare
    plain = core_on()
    avgm = core_on(server_opt={"name": "fedavgm", "lr": 1.0, "beta1": 0.0})

    # Execute
    want = _opt_rounds(plain)
    got = _opt_rounds(avgm)

    # Assert
    assert avgm.optimizer is not None and plain.optimizer is None
    for w, g in zip(want, got, strict=True):
        for name in LAYOUT.names:
            np.testing.assert_array_equal(g[name], w[name])


def test_fedavgm_momentum_carries_over_between_rounds() -> None:
    # Prepare
    core = core_on(server_opt={"name": "fedavgm", "lr": 1.0, "beta1": 0.5})

    # Execute: round 1 averages to 2, round 2 to 2 again.
    first, second = _opt_rounds(core)

    # Assert: B starts at 0: m1 = 2, x1 = 2; m2 = 0.5 * 2 + 0, x2 = 3.
    np.testing.assert_allclose(first["q.lora_B.weight"], 2.0)
    np.testing.assert_allclose(second["q.lora_B.weight"], 3.0)
    np.testing.assert_allclose(
        core.state.extra["opt.m.q.lora_B.weight"], np.full((4, R), 1.0)
    )
    a0 = initial_of()["q.lora_A.weight"].astype(np.float64)
    np.testing.assert_allclose(
        second["q.lora_A.weight"], 2.0 + 0.5 * (2.0 - a0), rtol=1e-6
    )


# -------------------------------------------------------- hostile clients
def test_a_malformed_fit_metric_is_dropped_not_fatal(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: partition 1 reports seconds="abc" and train_loss=NaN.
    core = core_on()
    open_fit(core, 1, ALL)
    bad = reply(1, full(4.0), 1, metrics={SECONDS: "abc", TRAIN_LOSS: math.nan})
    replies = [reply(0, full(2.0), 1), bad]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert: both replies aggregated; the bad metrics are absent, not crashing.
    assert ok is True
    assert core.record is not None and core.record.fit_ok == 2
    np.testing.assert_allclose(core.global_arrays()["q.lora_B.weight"], 3.0)
    # Only partition 0's loss.
    assert core.record.to_dict()["train_loss"] == pytest.approx(1.0)
    text = "\n".join(warnings_of(flwr_caplog))
    assert "metric seconds='abc' should be a finite number" in text
    assert "metric train_loss=nan should be a finite number" in text


def test_default_guards_bound_a_scaled_update_and_a_lying_count() -> None:
    # Prepare: the default guards on; partition 2 scales its update by 1e6 and
    # claims 10**9 examples (the reliability probes).
    def replies() -> list[Incoming]:
        honest = [reply(0, full(1.0), 100), reply(1, full(1.2), 120)]
        return [*honest, reply(2, full(1e6), 10**9)]

    core = core_on(
        guards={"weight_cap": 4.0, "norm_guard": "clip", "norm_guard_factor": 3.0}
    )
    naked = core_on()
    open_fit(core, 1, ALL)
    open_fit(naked, 1, ALL)

    # Execute
    ok = core.fit_outcome(1, replies(), [])
    naked.fit_outcome(1, replies(), [])

    # Assert: the attacker moved the global by at most its bounded share.
    assert ok is True
    assert core.record is not None
    assert (core.record.norm_clipped, core.record.weight_capped) == (1, 1)
    b = core.global_arrays()["q.lora_B.weight"]
    assert np.all(np.abs(b) < 10.0), b
    # Without the guards the attacker owns the model.
    assert np.all(naked.global_arrays()["q.lora_B.weight"] > 9e5)


def _failed_round(core: RoundCore, server_round: int) -> None:
    open_fit(core, server_round, ALL)
    core.fit_outcome(server_round, [], [("?", "RuntimeError: bad data in row 3")])
    core.finish_round()  # no federated evaluation follows


def test_the_run_stops_after_too_many_failed_rounds() -> None:
    # Prepare: 10 rounds, at most 2 consecutive rounds without an aggregate.
    core = core_on(fed={"num_rounds": 10, "max_failed_rounds": 2})
    _failed_round(core, 1)
    _failed_round(core, 2)

    # Execute / Assert: the third failed round stops the run, naming the cause.
    with pytest.raises(
        RunAborted,
        match=r"run stopped at round 3: 3 consecutive "
        r"rounds without an aggregate .*bad data in row 3",
    ):
        _failed_round(core, 3)
    assert len(core.history) == 3  # the round was recorded before stopping


# ------------------------------------------------------------------------ DP
def test_dp_clips_every_update_and_reports_epsilon() -> None:
    # Prepare: noise small enough to see the clipped mean; C = 1.
    core = core_on(privacy={"noise_multiplier": 1e-9, "clip_norm": 1.0})
    start = global_copy(core)
    open_fit(core, 1, ALL)
    replies = [reply(p, full(10.0 * (p + 1)), 1 + 99 * p) for p in (0, 1)]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert: each update scaled to norm 1, then averaged with equal weights.
    assert core.record is not None
    row = core.record.to_dict()
    assert ok is True and row["dp_clipped"] == 2
    expected: dict[str, Any] = {}
    for p in (0, 1):
        update = {n: np.full(s, 10.0 * (p + 1)) - start[n] for n, s in LAYOUT.items()}
        norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
        for n, u in update.items():
            expected[n] = expected.get(n, 0) + (start[n] + u / norm) / 2
    for n, value in core.global_arrays().items():
        np.testing.assert_allclose(value, expected[n], atol=1e-6)
    assert row["dp_epsilon"] > 0
    assert row["dp_epsilon_unamplified"] >= row["dp_epsilon"]


def test_dp_noise_has_the_calibrated_std() -> None:
    # Prepare: wide layout, clients send back exactly what they got (zero update).
    layout = AdapterLayout(
        ("q.lora_A.weight", "q.lora_B.weight"), ((R, 4000), (4000, R))
    )
    privacy = {"noise_multiplier": 2.0, "clip_norm": 0.5}
    core, again = core_on(layout, privacy=privacy), core_on(layout, privacy=privacy)
    start = global_copy(core)
    same = [start[n] for n in layout.names]

    # Execute
    for each in (core, again):
        open_fit(each, 1, ALL)
        each.fit_outcome(1, [reply(p, same, 5) for p in (0, 1, 2)], [])

    # Assert: std z C / m = 2 * 0.5 / 3, from fresh entropy (not the seed).
    noise = np.concatenate(
        [(core.global_arrays()[n] - start[n]).ravel() for n in layout.names]
    )
    assert noise.std() == pytest.approx(1.0 / 3.0, rel=0.05)
    assert abs(noise.mean()) < 0.01
    assert not np.array_equal(
        again.global_arrays()["q.lora_B.weight"],
        core.global_arrays()["q.lora_B.weight"],
    )


# --------------------------------------------------------------- compression
def encoded(
    out: Outgoing, arrays: list[np.ndarray], codec: Any, fraction: float = 1.0
) -> list[np.ndarray]:
    """What a client sends: its reply coded against the payload it started from."""
    start = list(out.payload)  # fedit receives every group
    return encode_reply(codec, arrays, start, fraction=fraction).arrays


@pytest.mark.parametrize(
    ("codec", "fraction"),
    [("fp16", 1.0), ("bf16", 1.0), ("int8", 1.0), ("topk", 1.0), ("topk", 0.25)],
)
def test_compressed_replies_are_decoded_then_averaged(
    codec: Any, fraction: float
) -> None:
    # Prepare: three clients move the start by different amounts (one the other
    # way: no update filter, the decoding is under test).
    core = core_on(
        compression={"codec": codec, "topk_fraction": fraction},
        guards={"filter": "none"},
    )
    outs = open_fit(core, 1, ALL)
    moves = {0: 0.5, 1: -0.25, 2: 0.125}
    weights = {0: 1, 1: 2, 2: 5}
    start = global_copy(core)
    sent = {
        pid: [
            start[n]
            + np.float32(m)
            * np.arange(1, a.size + 1, dtype=np.float32).reshape(a.shape)
            for n, a in start.items()
        ]
        for pid, m in moves.items()
    }
    replies = [
        reply(pid, encoded(outs[pid], sent[pid], codec, fraction), w)
        for pid, w in weights.items()
    ]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert: the rule averaged the decoded replies (float32 in, as without
    # compression).
    assert ok is True
    assert core.record is not None
    assert (core.record.fit_ok, core.record.fit_dropped) == (3, 0)
    decoded = {
        pid: decode_reply(
            codec,
            encoded(outs[pid], sent[pid], codec, fraction),
            list(start.values()),
            fraction=fraction,
        )
        for pid in moves
    }
    for i, name in enumerate(LAYOUT.names):
        want = sum(w * decoded[p][i].astype(np.float64) for p, w in weights.items()) / 8
        np.testing.assert_allclose(core.global_arrays()[name], want, rtol=1e-6)
        exact = sum(w * sent[p][i].astype(np.float64) for p, w in weights.items())
        if codec != "topk" or fraction == 1.0:  # lossy within the codec's bound
            np.testing.assert_allclose(want, exact / 8, rtol=0, atol=2**-7 * 9)


def test_an_int8_round_is_within_half_a_step_of_the_float32_one() -> None:
    # Prepare
    plain, coded = core_on(), core_on(compression={"codec": "int8"})
    arrays = full(0.5)

    # Execute
    for key, core in (("none", plain), ("int8", coded)):
        outs = open_fit(core, 1, ALL)
        sent = arrays if key == "none" else encoded(outs[0], arrays, "int8")
        core.fit_outcome(1, [reply(p, sent, 1) for p in (0, 1)], [])

    # Assert: the same global up to int8's half step (max|update| / 254 per
    # tensor).
    start = initial_of()
    for name, value in zip(LAYOUT.names, arrays, strict=True):
        step = float(np.abs(value - start[name]).max()) / 127
        got, want = coded.global_arrays()[name], plain.global_arrays()[name]
        assert np.abs(got - want).max() <= step / 2 * 1.001 + 1e-7
        assert not np.array_equal(got, want) or group_of(name) != "A"


def _nan_scale(arrays: list[np.ndarray]) -> list[np.ndarray]:
    scales = arrays[1].copy()
    scales[0] = np.nan
    return [arrays[0], scales, arrays[2]]


def _shifted_start(arrays: list[np.ndarray]) -> list[np.ndarray]:
    header = arrays[0].copy()
    header[2] ^= 1  # the reference CRC of another start
    return [header, *arrays[1:]]


BAD_ENCODINGS: dict[str, tuple[Callable[[list[np.ndarray]], list[Any]], str]] = {
    "float32 reply": (
        lambda a: full(9.0),
        "int8 header: dtype float32, expected uint32",
    ),
    "nan scale": (_nan_scale, "int8 scales: every scale must be finite and >= 0"),
    "short values": (
        lambda a: [a[0], a[1], a[2][:-1]],
        "int8 values: shape (15,), expected (16,)",
    ),
    "other start": (_shifted_start, "int8 header: the update was coded against"),
}


@pytest.mark.parametrize("fault", sorted(BAD_ENCODINGS))
def test_a_malformed_encoded_reply_is_dropped_and_the_rest_aggregated(
    fault: str, flwr_caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: partition 2's encoding is broken; 0 and 1 are fine.
    build, message = BAD_ENCODINGS[fault]
    core = core_on(compression={"codec": "int8"})
    outs = open_fit(core, 1, ALL)
    replies = [
        reply(0, encoded(outs[0], full(1.0), "int8"), 1),
        reply(2, build(encoded(outs[2], full(5.0), "int8")), 9),
        reply(1, encoded(outs[1], full(4.0), "int8"), 3),
    ]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert: the mean of the two decoded replies, (1*1 + 3*4) / 4 = 3.25 up to
    # int8's half step of A's update (B and the head start at 0: exact).
    assert ok is True
    assert core.record is not None
    assert (core.record.fit_ok, core.record.fit_dropped) == (2, 1)
    start = [initial_of()[n] for n in LAYOUT.names]
    decoded = [
        decode_reply("int8", encoded(outs[p], full(v), "int8"), start)
        for p, v in ((0, 1.0), (1, 4.0))
    ]
    for i, (name, shape) in enumerate(LAYOUT.items()):
        got = core.global_arrays()[name]
        np.testing.assert_allclose(
            got, (decoded[0][i] + 3 * decoded[1][i]) / 4, rtol=1e-6
        )
        np.testing.assert_allclose(got, np.full(shape, 3.25), atol=0.05)
    warnings = warnings_of(flwr_caplog)
    assert len(warnings) == 1
    assert "dropped reply of client node-2 (partition 2)" in warnings[0]
    assert message in warnings[0]


# ------------------------------------------------- centralised evaluation
@pytest.mark.parametrize(
    ("eval_every", "expected"),
    [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4, 5]), (3, [0, 3, 5]), (0, [0, 5])],
)
def test_evaluate_cadence(eval_every: int, expected: list[int]) -> None:
    # Prepare
    core, calls = evaluating(fed={"num_rounds": 5}, eval={"every": eval_every})

    # Execute
    results = {rnd: core.evaluate(rnd, {}) for rnd in range(6)}

    # Assert
    assert [c[0] for c in calls] == expected
    assert [rnd for rnd, res in results.items() if res is not None] == expected
    assert results[0] == (0.5, {"loss": 0.5, "accuracy": 0.25})
    _, arrays, base_delta = calls[0]
    assert base_delta == {}
    for name, value in initial_of().items():
        np.testing.assert_array_equal(arrays[name], value)


def test_evaluate_without_evaluate_fn_returns_none() -> None:
    # Prepare
    core = core_on()

    # Execute / Assert
    assert core.evaluate(0, {}) is None
    assert core.history == [{"round": 0}]


def test_central_evaluation_sees_the_base_delta_of_a_merging_rule() -> None:
    # Prepare
    core, calls = evaluating(fed={"aggregation": "flora"})
    open_fit(core, 1, ALL)
    core.fit_outcome(1, [reply(p, full(0.5 + p), 1) for p in (0, 1)], [])

    # Execute
    core.evaluate(1, {})

    # Assert: FLoRA restarts A, B at init; the update is in the base delta.
    _, arrays, base_delta = calls[-1]
    np.testing.assert_array_equal(
        arrays["q.lora_A.weight"], initial_of()["q.lora_A.weight"]
    )
    assert list(base_delta) == ["q"]
    # s * sum_k p_k B_k A_k with s = 2, p = 1/2, B_k A_k = 2 (0.5+k)^2 each.
    np.testing.assert_allclose(base_delta["q"], 2 * (0.5 * 0.5 + 0.5 * 4.5), rtol=1e-6)
    np.testing.assert_array_equal(base_delta["q"], core.state.base_delta["q"])
    assert core.record is not None
    assert core.record.to_dict()["base_version"] == 1


# -------------------------------------------------- federated evaluation
def test_eval_outcome_weights_loss_and_accuracy() -> None:
    # Prepare: no examples and a NaN loss are left out.
    core = core_on(eval={"fraction": 1.0})
    results = [
        EvalIncoming("a", 1.0, 1, {ACCURACY: 1.0}),
        EvalIncoming("b", 2.0, 3, {ACCURACY: 0.0}),
        EvalIncoming("c", 0.0, 0, {}),
        EvalIncoming("d", math.nan, 5, {ACCURACY: 1.0}),
    ]

    # Execute
    loss, metrics = core.eval_outcome(1, results, [])

    # Assert
    assert loss == pytest.approx(1.75)
    assert metrics == {"fed_loss": pytest.approx(1.75), "fed_accuracy": 0.25}


def test_fedsa_eval_outcome_writes_personal_metrics() -> None:
    # Prepare: every partition evaluates its personal model.
    rows: list[Any] = []
    core = core_on(rows=rows, fed={"aggregation": "fedsa"})
    open_fit(core, 1, ALL)
    planned = open_eval(core, 1, ALL)
    results = [
        EvalIncoming(
            node(o.partition), 0.5 * (i + 1), 1, {ACCURACY: i / 4, BASE_VERSION: 0}
        )
        for i, o in enumerate(planned)
    ]

    # Execute
    loss, metrics = core.eval_outcome(1, results, [])
    core.finish_round()

    # Assert
    assert loss == pytest.approx((0.5 + 1.0 + 1.5 + 2.0) / 4)
    assert metrics["personal_loss"] == pytest.approx(loss)
    assert metrics["personal_accuracy"] == pytest.approx((0 + 1 + 2 + 3) / 16)
    assert "fed_loss" not in metrics and "fed_accuracy" not in metrics
    assert str(metrics["eval_kind"]).startswith("personalized")
    row = rows[-1][0]
    assert row["personal_accuracy"] == metrics["personal_accuracy"]
    assert row["eval_ok"] == 4


def test_a_malformed_evaluate_reply_is_dropped_not_fatal(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a text accuracy and a text loss.
    core = core_on(eval={"fraction": 1.0})
    results = [
        EvalIncoming("a", 1.0, 1, {ACCURACY: "abc"}),
        EvalIncoming("b", 2.0, 3, {ACCURACY: 0.5}),
        EvalIncoming("c", "x", 3, {ACCURACY: 0.5}),
    ]

    # Execute
    loss, metrics = core.eval_outcome(1, results, [])

    # Assert
    assert loss == pytest.approx((1.0 + 6.0) / 4)
    assert metrics["fed_accuracy"] == pytest.approx(0.5)
    text = "\n".join(warnings_of(flwr_caplog))
    assert "metric accuracy='abc'" in text and "loss='x'" in text


# Four honest evaluations (loss, examples, accuracy) for the eval-guard tests:
# lower-median count 11 (cap 1.5 x 11 -> 16), lower-median loss 0.6 (bound 1.2).
HONEST_EVAL = [("a", 0.5, 10, 0.75), ("b", 0.7, 12, 0.75), ("c", 0.6, 11, 0.75)]
SHIPPED_GUARDS = dataclasses.asdict(GuardsConfig())


def _evals(*extra: tuple[str, Any, Any, Any]) -> list[EvalIncoming]:
    """The honest evaluations and ``extra`` ones, as they arrive."""
    return [
        EvalIncoming(who, loss, n, {ACCURACY: acc})
        for who, loss, n, acc in (*HONEST_EVAL, *extra)
    ]


def _eval_row(core: RoundCore) -> dict[str, Any]:
    assert core.record is not None
    return core.record.to_dict()


def test_a_huge_evaluate_reply_cannot_own_the_federated_loss() -> None:
    # Prepare: the shipped guards; one client claims loss 1e30 over 10**9 examples.
    core = core_on(guards=SHIPPED_GUARDS)
    results = _evals(("x", 1e30, 10**9, 1.0))

    # Execute
    loss, metrics = core.eval_outcome(1, results, [])

    # Assert: its loss clipped to 10 x 0.6, its count capped to floor(1.5 x 11).
    assert loss == pytest.approx((10 * 0.5 + 12 * 0.7 + 11 * 0.6 + 16 * 6.0) / 49)
    assert metrics["fed_loss"] == loss
    assert metrics["fed_accuracy"] == pytest.approx((33 * 0.75 + 16 * 1.0) / 49)
    row = _eval_row(core)
    assert row["fed_loss"] == loss
    assert (row["eval_ok"], row["eval_dropped"]) == (4, 0)
    assert (row["eval_capped"], row["eval_clipped"], row["eval_rejected"]) == (1, 1, 0)
    assert row["eval_loss_bound"] == pytest.approx(6.0)


def test_the_eval_count_cap_alone_bounds_a_lying_count(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a plausible loss, a count of 10**9; only the count cap on.
    core = core_on(guards={"eval_weight_cap": 1.5, "norm_guard": "off"})
    results = _evals(("x", 2.0, 10**9, 0.0))

    # Execute
    loss, metrics = core.eval_outcome(1, results, [])

    # Assert: its count is 16, so it weighs 16/49 and not all of the mean.
    assert loss == pytest.approx((10 * 0.5 + 12 * 0.7 + 11 * 0.6 + 16 * 2.0) / 49)
    assert metrics["fed_accuracy"] == pytest.approx(33 * 0.75 / 49)
    row = _eval_row(core)
    assert (row["eval_capped"], row["eval_clipped"], row["eval_rejected"]) == (1, 0, 0)
    assert "eval_loss_bound" not in row
    assert (
        "capped the evaluation example count of client x: 1000000000 -> 16"
        in "\n".join(warnings_of(flwr_caplog))
    )


def test_the_eval_loss_guard_clips_a_huge_loss(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: an honest count, a loss of 1e30; only the loss guard (clip) on.
    core = core_on(guards={"eval_weight_cap": 0.0, "norm_guard": "clip"})
    results = _evals(("x", 1e30, 11, 0.75))

    # Execute
    loss, _ = core.eval_outcome(1, results, [])

    # Assert: its loss counts as 10 x the lower-median loss 0.6.
    assert loss == pytest.approx((10 * 0.5 + 12 * 0.7 + 11 * 0.6 + 11 * 6.0) / 44)
    row = _eval_row(core)
    assert (row["eval_ok"], row["eval_capped"], row["eval_clipped"]) == (4, 0, 1)
    assert row["eval_rejected"] == 0
    assert "clipped the evaluation loss of client x: 1e+30 -> 6" in "\n".join(
        warnings_of(flwr_caplog)
    )


def test_the_eval_loss_guard_rejects_a_huge_loss() -> None:
    # Prepare: the loss guard set to reject.
    core = core_on(guards={"eval_weight_cap": 0.0, "norm_guard": "reject"})
    results = _evals(("x", 1e30, 11, 1.0))

    # Execute
    loss, metrics = core.eval_outcome(1, results, [])

    # Assert: the reply is out of both means.
    assert loss == pytest.approx((10 * 0.5 + 12 * 0.7 + 11 * 0.6) / 33)
    assert metrics["fed_accuracy"] == pytest.approx(0.75)
    row = _eval_row(core)
    assert (row["eval_ok"], row["eval_clipped"], row["eval_rejected"]) == (3, 0, 1)


def test_eval_guards_off_leave_a_huge_reply_alone() -> None:
    # Prepare: weight_cap = 0 and norm_guard = "off".
    core = core_on(guards={"eval_weight_cap": 0.0, "norm_guard": "off"})
    results = _evals(("x", 1e30, 11, 0.75))

    # Execute
    loss, _ = core.eval_outcome(1, results, [])

    # Assert: the plain example-weighted mean, as before the guards.
    assert loss == pytest.approx(11e30 / 44)
    row = _eval_row(core)
    assert (row["eval_capped"], row["eval_clipped"], row["eval_rejected"]) == (0, 0, 0)


def test_malformed_evaluate_replies_are_dropped_with_a_reason(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: accuracy out of [0, 1], a negative / infinite / too large loss,
    # no examples; a text accuracy only loses the metric.
    core = core_on(guards=SHIPPED_GUARDS)
    results = [
        EvalIncoming("good", 0.5, 10, {ACCURACY: 0.75}),
        EvalIncoming("text", 0.7, 10, {ACCURACY: "abc"}),
        EvalIncoming("acc-high", 0.6, 10, {ACCURACY: 1.5}),
        EvalIncoming("acc-low", 0.6, 10, {ACCURACY: -0.25}),
        EvalIncoming("neg", -1.0, 10, {ACCURACY: 0.5}),
        EvalIncoming("inf", math.inf, 10, {ACCURACY: 0.5}),
        EvalIncoming("big", 10**400, 10, {ACCURACY: 0.5}),
        EvalIncoming("none", 0.6, 0, {ACCURACY: 0.5}),
    ]

    # Execute
    loss, metrics = core.eval_outcome(1, results, [])

    # Assert
    assert loss == pytest.approx((0.5 + 0.7) / 2)
    assert metrics["fed_accuracy"] == 0.75
    row = _eval_row(core)
    assert (row["eval_ok"], row["eval_dropped"]) == (2, 6)
    text = "\n".join(warnings_of(flwr_caplog))
    assert "client text: metric accuracy='abc' should be a finite number" in text
    for expected in (
        "client acc-high: accuracy=1.5 should be in [0, 1]",
        "client acc-low: accuracy=-0.25 should be in [0, 1]",
        "client neg: loss=-1.0 should be a finite number >= 0",
        "client inf: loss=inf should be a finite number >= 0",
        "client none: num_examples=0 should be a positive integer",
    ):
        assert f"dropped the evaluation reply of {expected}" in text
    assert "dropped the evaluation reply of client big: loss=1000" in text


@pytest.mark.parametrize(
    ("robust", "expected_loss", "expected_accuracy"),
    [
        ("median", 0.7, 0.7),
        ("trimmed_mean", (0.6 + 0.7 + 0.9) / 3, (0.6 + 0.7 + 0.8) / 3),
    ],
)
def test_robust_guards_take_the_eval_means_unweighted(
    robust: str, expected_loss: float, expected_accuracy: float
) -> None:
    # Prepare: five replies, one far off with a huge count; only guards.robust on
    # (trim_fraction 0.2 of 5: one reply off each end).
    core = core_on(
        guards={"eval_weight_cap": 0.0, "norm_guard": "off", "robust": robust}
    )
    results = [
        EvalIncoming(who, loss, n, {ACCURACY: acc, PERPLEXITY: 1.0})
        for who, loss, n, acc in [
            ("a", 0.5, 10, 0.5),
            ("b", 0.7, 12, 0.6),
            ("c", 0.6, 11, 0.7),
            ("d", 0.9, 10, 0.8),
            ("x", 30.0, 10**9, 1.0),
        ]
    ]

    # Execute
    loss, metrics = core.eval_outcome(1, results, [])

    # Assert
    assert loss == pytest.approx(expected_loss)
    assert metrics["fed_accuracy"] == pytest.approx(expected_accuracy)
    assert metrics["fed_perplexity"] == pytest.approx(math.exp(expected_loss))


def test_honest_evaluations_are_bit_identical_under_the_shipped_guards() -> None:
    # Prepare: counts within 1.5 x and losses within 2 x the lower medians, so no
    # guard fires; the old example-weighted mean computed here in the same order.
    replies = [
        ("a", 0.41234567891, 10, 0.7123),
        ("b", 0.6789012345, 12, 0.80001),
        ("c", 0.5555555557, 11, 0.7777),
        ("d", 0.6543210987, 13, 0.9),
    ]
    results = [EvalIncoming(who, lo, n, {ACCURACY: acc}) for who, lo, n, acc in replies]
    total = sum(n for _, _, n, _ in replies)
    old_loss = sum(n * lo for _, lo, n, _ in replies) / total
    old_accuracy = sum(n * float(acc) for _, _, n, acc in replies) / total
    guarded = core_on(guards=SHIPPED_GUARDS)
    unguarded = core_on(guards={"eval_weight_cap": 0.0, "norm_guard": "off"})

    # Execute
    loss, metrics = guarded.eval_outcome(1, results, [])
    loss_off, metrics_off = unguarded.eval_outcome(1, results, [])

    # Assert: the same bits, and nothing counted.
    assert loss == loss_off == old_loss
    assert metrics == metrics_off
    assert metrics["fed_accuracy"] == old_accuracy
    row = _eval_row(guarded)
    assert (row["eval_capped"], row["eval_clipped"], row["eval_rejected"]) == (0, 0, 0)
    assert (row["eval_ok"], row["eval_dropped"]) == (4, 0)


# ------------------------------------------------------------- eval overlap
def _legacy_rounds(
    core: RoundCore, rounds: int, between: Callable[[int], None] = lambda r: None
) -> list[object]:
    """Drive ``core`` as the translator does in Flower's legacy loop.

    Returns what each ``evaluate`` returned; no federated evaluation, so each
    round is closed after its centralised evaluation.
    """
    core.settle()
    returned = [core.evaluate(0, {})]
    for rnd in range(1, rounds + 1):
        outs = open_fit(core, rnd, ALL)
        between(rnd)
        replies = [reply(p, full(float(rnd + p)), 1 + p) for p in outs]
        core.fit_outcome(rnd, replies, [])
        core.settle()
        returned.append(core.evaluate(rnd, {}))
        assert core.eval_fraction(rnd) == 0
        core.finish_round()
    return returned


def _reports(
    core: RoundCore,
) -> list[tuple[dict[str, Any], int, Arrays, dict[str, Any]]]:
    """Collect, per on_round_end, the row, history length, adapter, counters."""
    out: list[tuple[dict[str, Any], int, Arrays, dict[str, Any]]] = []

    def report(row: dict[str, Any], view: Any) -> None:
        arrays = {n: a.copy() for n, a in view.global_arrays().items()}
        rnd = int(row["round"])
        out.append((dict(row), len(view.history), arrays, view.counters(rnd)))

    core.runlog.on_round_end = report
    return out


def test_overlapped_evaluation_reports_what_sequential_evaluation_does() -> None:
    # Prepare: the same three rounds, evaluation after each, off and on.
    plain, plain_calls = evaluating(fed={"num_rounds": 3})
    overlapped, overlapped_calls = evaluating(
        fed={"num_rounds": 3}, eval={"overlap": True}
    )
    assert overlapped.cfg.eval.overlap and not plain.cfg.eval.overlap
    want, got = _reports(plain), _reports(overlapped)

    # Execute
    plain_returns = _legacy_rounds(plain, 3)
    overlapped_returns = _legacy_rounds(overlapped, 3)

    # Assert: the caller gets metrics only for the last (synchronous) evaluation;
    # every row, its history position, adapter and counters are as without.
    assert all(r is not None for r in plain_returns)
    assert overlapped_returns[:3] == [None, None, None]
    assert overlapped_returns[3] == plain_returns[3]
    assert [c[0] for c in overlapped_calls] == [c[0] for c in plain_calls]
    assert len(got) == len(want) == 4
    timing = {"round_seconds", "eval_seconds", "started_at", "fit_done_at"}
    for (rec_w, len_w, arr_w, cnt_w), (rec_g, len_g, arr_g, cnt_g) in zip(
        want, got, strict=True
    ):
        assert {
            k: v for k, v in rec_g.items() if k not in timing and "seconds" not in k
        } == {k: v for k, v in rec_w.items() if k not in timing and "seconds" not in k}
        assert rec_g["test_loss"] == 0.5 + rec_g["round"]
        assert len_g == len_w == rec_g["round"] + 1
        assert cnt_g == cnt_w
        for name in LAYOUT.names:
            np.testing.assert_array_equal(arr_g[name], arr_w[name])
    assert overlapped.history == [r for r, *_ in got]


def test_overlapped_evaluation_runs_while_the_next_round_trains() -> None:
    # Prepare: round 0's evaluation can only finish once round 1 was sent out.
    sent_round_1 = threading.Event()
    threads: dict[int, str] = {}

    def evaluate_fn(rnd: int, arrays: Arrays, base_delta: Arrays) -> dict[str, float]:
        threads[rnd] = threading.current_thread().name
        if rnd == 0 and not sent_round_1.wait(timeout=30):
            raise AssertionError("round 0's evaluation blocked round 1")
        return {"loss": 1.0, "accuracy": 0.5}

    core = core_on(
        evaluate_fn=evaluate_fn, fed={"num_rounds": 2}, eval={"overlap": True}
    )
    reports = _reports(core)

    def between(rnd: int) -> None:
        if rnd == 1:
            assert reports == []  # round 0 is reported after its evaluation
            sent_round_1.set()

    # Execute
    _legacy_rounds(core, 2, between)

    # Assert: rounds 0 and 1 in the background, the last in the caller's thread.
    assert threads[0].startswith("lora-flwr-eval")
    assert threads[1].startswith("lora-flwr-eval")
    assert threads[2] == threading.current_thread().name
    assert [r["round"] for r, *_ in reports] == [0, 1, 2]
    assert all(r["test_accuracy"] == 0.5 for r, *_ in reports)


def test_a_failed_background_evaluation_stops_the_next_round() -> None:
    # Prepare: round 1's evaluation raises in the background thread.
    def evaluate_fn(rnd: int, arrays: Arrays, base_delta: Arrays) -> dict[str, float]:
        if rnd == 1:
            raise ValueError("the held-out file vanished")
        return {"loss": 1.0}

    core = core_on(
        evaluate_fn=evaluate_fn, fed={"num_rounds": 3}, eval={"overlap": True}
    )
    reports = _reports(core)

    # Execute / Assert: named at the next evaluation; round 1 never reported.
    with pytest.raises(
        RuntimeError, match="evaluation of round 1 failed: the held-out file vanished"
    ):
        _legacy_rounds(core, 3)
    assert [r["round"] for r, *_ in reports] == [0]


def test_an_aborting_round_waits_for_its_evaluation() -> None:
    # Prepare: every client fails; the second failed round stops the run.
    core, _ = evaluating(
        fed={"num_rounds": 5, "max_failed_rounds": 1}, eval={"overlap": True}
    )
    reports = _reports(core)
    core.settle()
    core.evaluate(0, {})

    # Execute
    for rnd in (1, 2):
        open_fit(core, rnd, ALL)
        core.fit_outcome(rnd, [], [("?", "RuntimeError: out of memory")])
        core.settle()
        core.evaluate(rnd, {})
        if rnd == 1:
            core.finish_round()
    with pytest.raises(RunAborted, match="2 consecutive rounds"):
        core.finish_round()

    # Assert: the aborted round is reported with its evaluation.
    assert [r["round"] for r, *_ in reports] == [0, 1, 2]
    assert reports[2][0]["test_loss"] == 2.5 and reports[2][0]["aborted"]


def test_the_shipped_filter_leaves_a_sign_flipped_update_out_of_the_aggregate() -> None:
    # Prepare: the shipped guards; two honest clients step along one direction
    # (plus noise), partition 2 sends start - 1.9 x such a step.
    core = core_on(guards=SHIPPED_GUARDS)
    outs = open_fit(core, 1, (0, 1, 2))
    start = global_copy(core)
    rng = np.random.default_rng(0)
    direction = {n: rng.normal(size=a.shape) for n, a in start.items()}
    steps = {
        pid: {
            n: 0.01 * (direction[n] + 0.5 * rng.normal(size=a.shape))
            for n, a in start.items()
        }
        for pid in (0, 1, 2)
    }
    steps[2] = {n: -1.9 * s for n, s in steps[2].items()}
    replies = [
        reply(pid, [(start[n] + steps[pid][n]).astype(np.float32) for n in start], 10)
        for pid in (0, 1, 2)
    ]
    assert set(outs) == {0, 1, 2}

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert: the mean of the two honest replies; the filter counted one.
    assert ok is True
    assert core.record is not None
    row = core.record.to_dict()
    assert (row["fit_ok"], row["filtered"], row["norm_clipped"]) == (2, 1, 0)
    for n, value in core.global_arrays().items():
        expected = start[n] + (steps[0][n] + steps[1][n]) / 2
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=n)
