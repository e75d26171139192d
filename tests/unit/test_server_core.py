"""RoundCore on plain arrays: plans, replies -> outcome, evaluation, rows, resume.

No Flower here: the core is driven the way the Flower translator drives it,
with :class:`Sent` built from the plans and :class:`Incoming` replies.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora_flwr.config import ExperimentConfig
from lora_flwr.protocol import (
    ACCURACY,
    LOCAL_STEPS,
    LR,
    PARTITION_ID,
    PERPLEXITY,
    ROUND,
    TRAIN_LOSS,
    AdapterLayout,
    group_of,
)
from lora_flwr.server.core import Outgoing, RoundCore
from lora_flwr.server.guards import RunAborted
from lora_flwr.server.replies import Incoming, Sent
from lora_flwr.server.rounds import EvalIncoming

Arrays = dict[str, np.ndarray]
R = 2
LAYOUT = AdapterLayout(
    ("q.lora_A.weight", "q.lora_B.weight", "classifier.bias"), ((R, 3), (4, R), (2,))
)
ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------- helpers
# The helpers' defaults, by section: three partitions, every guard off unless a
# test turns it on. A test's section dicts are merged over them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"lr": 0.01, "local_steps": 7},
    "fed": {"num_clients": 3, "max_failed_rounds": 100},
    "sampling": {"min_replies": 2},
    "guards": {
        "weight_cap": 0.0,
        "norm_guard": "off",
        "filter": "none",
        "eval_weight_cap": 0.0,
    },
}


def make_cfg(**sections: dict[str, Any]) -> ExperimentConfig:
    """Build the test config: each section dict (``eval={"every": 2}``) on DEFAULTS."""
    tree: dict[str, Any] = {
        "seed": 0,
        "lora": {"r": R, "lora_alpha": 2.0 * R, "lora_dropout": 0.0},
    }
    for name in {**DEFAULTS, **sections}:
        tree[name] = {**DEFAULTS.get(name, {}), **sections.get(name, {})}
    return ExperimentConfig.from_dict(tree)


def make_initial() -> Arrays:
    """Seeded A, zero B and zero head, as LoRA starts."""
    rng = np.random.default_rng(0)
    return {
        n: rng.normal(size=s).astype(np.float32)
        if group_of(n) == "A"
        else np.zeros(s, np.float32)
        for n, s in LAYOUT.items()
    }


def make_core(
    rows: list[Any] | None = None,
    evaluate_fn: Any = None,
    **sections: dict[str, Any],
) -> RoundCore:
    """A core whose on_round_end appends ``(row, view)`` to ``rows``."""
    return RoundCore(
        cfg=make_cfg(**sections),
        layout=LAYOUT,
        initial=make_initial(),
        evaluate_fn=evaluate_fn,
        on_round_end=None if rows is None else lambda *call: rows.append(call),
    )


def node(pid: int) -> str:
    return f"node-{pid}"


def open_fit(
    core: RoundCore, rnd: int, pids: Sequence[int] = (0, 1, 2)
) -> dict[int, Outgoing]:
    """Begin a round, plan it and record what each partition's node was sent."""
    core.begin_round(rnd)
    planned = core.plans(rnd, pids, evaluate=False)
    sent = {
        node(o.partition): Sent(
            o.partition, o.plan, o.start, sum(a.nbytes for a in o.payload)
        )
        for o in planned
    }
    core.fit_sampled(rnd, sent, (0.25, 0))
    return {o.partition: o for o in planned}


def reply_arrays(core: RoundCore, out: Outgoing, update: Arrays) -> list[np.ndarray]:
    """The reply in wire order: the start plus a known update."""
    return [
        (out.start[n] + update[n]).astype(np.float32)
        for n, _ in core.rule.reply_spec(out.plan)
    ]


def incoming(
    core: RoundCore,
    out: Outgoing,
    update: Arrays,
    n: int,
    *,
    loss: float = 1.0,
    arrays: Any = None,
) -> Incoming:
    """A reply of ``out``'s node (100 bytes); ``arrays`` replaces the computed ones."""
    sent = reply_arrays(core, out, update) if arrays is None else arrays
    metrics = {PARTITION_ID: out.partition, TRAIN_LOSS: loss}
    return Incoming(node(out.partition), sent, n, metrics, 100)


def const_update(value: float) -> Arrays:
    return {n: np.full(s, value, np.float32) for n, s in LAYOUT.items()}


def random_update(seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in LAYOUT.items()}


def global_copy(core: RoundCore) -> Arrays:
    return {n: a.copy() for n, a in core.global_arrays().items()}


def assert_arrays_equal(a: Arrays, b: Arrays) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --------------------------------------------------------------------- plans
def test_plans_carry_the_global_payload_and_the_round_settings() -> None:
    # Prepare
    core = make_core(fed={"lr_decay": 0.5})

    # Execute
    fit = core.plans(3, [2, 0], evaluate=False)
    ev = core.plans(3, [1], evaluate=True)

    # Assert: in the order asked; lr decayed twice; evaluation sends no lr.
    assert [o.partition for o in fit] == [2, 0]
    initial = make_initial()
    for got, name in zip(fit[0].payload, LAYOUT.names, strict=True):
        np.testing.assert_array_equal(got, initial[name])
    assert_arrays_equal(fit[0].start, initial)
    assert fit[0].config[ROUND] == 3
    assert fit[0].config[LR] == pytest.approx(0.01 * 0.25)
    assert fit[0].config[LOCAL_STEPS] == 7
    assert LR not in ev[0].config
    assert ev[0].config[ROUND] == 3


# ----------------------------------------------------------------------- fit
def test_one_round_gives_the_fedit_example_weighted_mean() -> None:
    # Prepare
    rows: list[Any] = []
    core = make_core(rows)
    counts = [10, 20, 30]
    updates = [random_update(seed) for seed in range(3)]
    outs = open_fit(core, 1)
    replies = [
        incoming(core, outs[k], updates[k], counts[k], loss=float(k)) for k in range(3)
    ]

    # Execute
    ok = core.fit_outcome(1, replies, [])
    core.finish_round()
    core.finish_round()  # no round open: nothing more happens

    # Assert: sum_k n_k (start + u_k) / sum_k n_k, per tensor; one row reported.
    assert ok is True
    initial = make_initial()
    for name in LAYOUT.names:
        expected = sum(
            n * (initial[name].astype(np.float64) + u[name])
            for n, u in zip(counts, updates, strict=True)
        ) / sum(counts)
        np.testing.assert_allclose(core.global_arrays()[name], expected, rtol=1e-6)
    ((row, view),) = rows
    assert view is core
    assert row["fit_ok"] == 3
    assert (row["fit_failed"], row["fit_dropped"]) == (0, 0)
    assert row["aggregated"] is True
    assert row["train_loss"] == pytest.approx((0 * 10 + 1 * 20 + 2 * 30) / 60)
    assert (row["bytes_up"], row["bytes_up_max"]) == (300, 100)
    assert row["bytes_down"] == 3 * row["bytes_down_fit_max"] > 0
    assert (row["fit_sampled"], row["fit_partitions"], row["lr"]) == (3, "0,1,2", 0.01)
    assert row["agg_error"] >= 0.0
    assert "weight_cap_moved" not in row  # the cap is off: absent, not null
    assert row["round_seconds"] >= 0.0
    assert core.history == [row] and core.record is None


def _bad(kind: str, core: RoundCore, out: Outgoing) -> Incoming:
    """A reply of partition ``out`` that must be dropped."""
    good = reply_arrays(core, out, const_update(1.0))
    if kind == "shape":
        return incoming(core, out, {}, 5, arrays=[good[0][:, :2], *good[1:]])
    if kind == "nan":
        good[1][0, 0] = np.nan
        return incoming(core, out, {}, 5, arrays=good)
    if kind == "partition":
        return Incoming(node(out.partition), good, 5, {PARTITION_ID: 0}, 100)
    if kind == "decode":
        return incoming(core, out, {}, 5, arrays=ValueError("truncated tensor"))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["shape", "nan", "partition", "decode"])
def test_a_malformed_reply_is_dropped_and_counted(kind: str) -> None:
    # Prepare: partitions 0 and 1 are honest; 2 sends a bad reply.
    core = make_core()
    core.nodes.assign([(node(p), p) for p in range(3)])
    outs = open_fit(core, 1)
    replies = [
        incoming(core, outs[0], const_update(2.0), 1),
        incoming(core, outs[1], const_update(-2.0), 3),
        _bad(kind, core, outs[2]),
    ]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert: the mean of the two honest ones: start + (2 - 6) / 4.
    assert ok is True
    assert core.record is not None
    assert (core.record.fit_ok, core.record.fit_dropped) == (2, 1)
    for name, value in make_initial().items():
        np.testing.assert_allclose(core.global_arrays()[name], value - 1.0, rtol=1e-6)
    contradicted = kind == "partition"
    assert (node(2) in core.nodes.ask_only) is contradicted
    assert (node(2) in core.nodes.partition_of) is not contradicted


def test_too_few_valid_replies_keep_the_state_unchanged() -> None:
    # Prepare: two of three replies are bad; two valid ones are needed.
    core = make_core()
    before = core.state
    outs = open_fit(core, 1)
    replies = [
        incoming(core, outs[0], const_update(1.0), 4),
        _bad("nan", core, outs[1]),
        _bad("decode", core, outs[2]),
    ]

    # Execute
    ok = core.fit_outcome(1, replies, [])
    core.finish_round()

    # Assert
    assert ok is False
    assert core.state is before
    assert_arrays_equal(core.global_arrays(), make_initial())
    row = core.history[-1]
    assert (row["fit_ok"], row["fit_dropped"], row["aggregated"]) == (1, 2, False)
    assert "agg_error" not in row
    assert core.counters(1)["failed_rounds"] == 1


def test_a_client_failure_sets_last_failure_and_forgets_its_version() -> None:
    # Prepare: partition 1's node fails after the server knew its version.
    core = make_core()
    core.nodes.note_version(1, 0)
    outs = open_fit(core, 1)
    replies = [incoming(core, outs[p], const_update(1.0), 2) for p in (0, 2)]

    # Execute
    ok = core.fit_outcome(1, replies, [(node(1), "RuntimeError: CUDA out of memory")])

    # Assert
    assert ok is True
    assert core.record is not None and core.record.fit_failed == 1
    assert core.runlog.last_failure == "RuntimeError: CUDA out of memory"
    assert core.counters(1)["last_failure"] == "RuntimeError: CUDA out of memory"
    assert core.nodes.versions[1] is None


def test_weight_cap_moved_is_half_the_l1_distance_of_the_weights() -> None:
    # Prepare: the cap is 1.5 x the lower median count 10 = 15.
    core = make_core(guards={"weight_cap": 1.5})
    counts, capped = [10, 10, 1000], [10, 10, 15]
    outs = open_fit(core, 1)
    values = [1.0, 2.0, 7.0]
    replies = [
        incoming(core, outs[k], const_update(values[k]), counts[k]) for k in range(3)
    ]

    # Execute
    ok = core.fit_outcome(1, replies, [])

    # Assert
    p = [n / sum(counts) for n in counts]
    q = [c / sum(capped) for c in capped]
    moved = 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))
    assert ok is True
    assert core.record is not None
    assert core.record.weight_capped == 1
    assert core.record.weight_cap_moved == pytest.approx(moved, rel=1e-12)
    assert moved == pytest.approx(1000 / 1020 - 15 / 35)
    shift = sum(c * v for c, v in zip(capped, values, strict=True)) / sum(capped)
    for name, value in make_initial().items():
        np.testing.assert_allclose(core.global_arrays()[name], value + shift, rtol=1e-6)


# ------------------------------------------------------------------ evaluate
def _open_eval(core: RoundCore, rnd: int, pids: Sequence[int]) -> None:
    planned = core.plans(rnd, pids, evaluate=True)
    core.eval_sampled(
        {node(o.partition): Sent(o.partition, o.plan, o.start, 8) for o in planned}
    )


def test_eval_outcome_returns_example_weighted_means() -> None:
    # Prepare: three valid replies and one with a NaN loss.
    core = make_core(eval={"fraction": 1.0})
    open_fit(core, 1)
    _open_eval(core, 1, [0, 1, 2])
    results = [
        EvalIncoming(node(0), 1.0, 1, {ACCURACY: 0.5}),
        EvalIncoming(node(1), 3.0, 3, {ACCURACY: 0.9, PERPLEXITY: 20.0}),
        EvalIncoming(node(2), 2.0, 4, {}),
        EvalIncoming(node(2), math.nan, 100, {ACCURACY: 0.0}),
    ]

    # Execute
    loss, out = core.eval_outcome(1, results, [])

    # Assert: loss over all valid, accuracy over those that reported one.
    assert loss == pytest.approx((1.0 * 1 + 3.0 * 3 + 2.0 * 4) / 8)
    assert out["fed_loss"] == loss
    assert out["fed_accuracy"] == pytest.approx((0.5 * 1 + 0.9 * 3) / 4)
    assert out["fed_perplexity"] == pytest.approx(math.exp(loss))
    assert core.record is not None
    row = core.record.to_dict()
    assert row["eval_ok"] == 3
    assert row["bytes_down_eval"] == 24
    assert row["bytes_down"] == row["bytes_down_fit_max"] * 3 + 24


@pytest.mark.parametrize(
    ("rule", "fraction", "expected"),
    [("fedit", 0.0, 0.0), ("fedit", 0.5, 0.5), ("fedsa", 0.0, 1.0)],
)
def test_eval_fraction(rule: str, fraction: float, expected: float) -> None:
    # Prepare: a personalised rule (FedSA) is evaluated on every client.
    core = make_core(fed={"aggregation": rule}, eval={"fraction": fraction})

    # Execute / Assert
    assert core.eval_fraction(1) == expected


def test_centralised_evaluation_of_round_zero_is_a_row_of_its_own() -> None:
    # Prepare
    seen: list[tuple[int, Arrays]] = []

    def evaluate_fn(rnd: int, arrays: Arrays, base: Arrays) -> dict[str, float]:
        seen.append((rnd, arrays))
        return {"loss": 0.5, "accuracy": 0.75}

    rows: list[Any] = []
    core = make_core(rows, evaluate_fn, eval={"every": 2})

    # Execute
    first = core.evaluate(0, {})
    core.begin_round(1)
    skipped = core.evaluate(1, {})

    # Assert: round 1 is not an evaluation round (every 2).
    assert first == (0.5, {"loss": 0.5, "accuracy": 0.75})
    assert skipped is None
    assert [r for r, _ in seen] == [0]
    assert_arrays_equal(seen[0][1], make_initial())
    ((row, _),) = rows
    assert list(row) == ["round", "test_loss", "test_accuracy", "eval_seconds"]
    assert row["test_loss"] == 0.5


# ------------------------------------------------------------------- closing
def _failed_round(core: RoundCore, rnd: int) -> None:
    open_fit(core, rnd)
    core.fit_outcome(rnd, [], [(node(0), "ValueError: no data")])
    core.finish_round()


def test_the_run_aborts_after_max_failed_rounds() -> None:
    # Prepare
    rows: list[Any] = []
    core = make_core(rows, fed={"max_failed_rounds": 1})
    _failed_round(core, 1)

    # Execute: the second consecutive failed round is one too many.
    with pytest.raises(RunAborted) as raised:
        _failed_round(core, 2)

    # Assert: the row is written and reported first, with the reason.
    assert [r["round"] for r, _ in rows] == [1, 2]
    assert "aborted" not in rows[0][0]
    reason = rows[1][0]["aborted"]
    assert str(raised.value) == reason
    assert reason.startswith(
        "run stopped at round 2: 2 consecutive rounds without an aggregate "
        "(fed.max_failed_rounds=1); last round: 0 valid replies, "
        "1 client failures, 0 dropped"
    )
    assert reason.endswith("; last client error: ValueError: no data")


def test_the_run_aborts_at_the_last_round_when_none_aggregated() -> None:
    # Prepare
    core = make_core(fed={"num_rounds": 2, "max_failed_rounds": 5})
    _failed_round(core, 1)

    # Execute / Assert
    with pytest.raises(RunAborted, match="none of the 2 rounds produced an aggregate"):
        _failed_round(core, 2)


# -------------------------------------------------------------------- resume
def _two_rounds(core: RoundCore) -> None:
    """Round 0's row, an aggregated round 1, a failed round 2."""
    core.evaluate(0, {})
    outs = open_fit(core, 1)
    replies = [incoming(core, outs[k], const_update(k + 1.0), k + 1) for k in range(3)]
    assert core.fit_outcome(1, replies, [])
    core.finish_round()
    _failed_round(core, 2)


def test_counters_and_restore_round_trip_and_rounds_continue() -> None:
    # Prepare
    first = make_core()
    _two_rounds(first)
    counters = first.counters(2)
    second = make_core()

    # Execute: restore, then run round done + 1 there.
    done = second.restore(first.state, counters, first.history)
    restored = (second.counters(done), list(second.history), global_copy(second))
    outs = open_fit(second, done + 1)
    replies = [incoming(second, outs[k], const_update(1.0), 2) for k in range(3)]
    second.fit_outcome(done + 1, replies, [])
    second.finish_round()

    # Assert: the same counters, rows and state; versions unknown (new nodes).
    assert done == 2
    assert counters == {
        "round": 2,
        "failed_rounds": 1,
        "aggregated_rounds": 1,
        "last_failure": "ValueError: no data",
        "dp_rounds": 0,
    }
    assert restored[0] == counters
    assert restored[1] == first.history
    assert_arrays_equal(restored[2], first.global_arrays())
    assert [r["round"] for r in second.history] == [0, 1, 2, 3]
    assert second.counters(3)["failed_rounds"] == 0
    assert second.counters(3)["aggregated_rounds"] == 2


def test_restore_refuses_a_history_with_gaps_or_a_round_out_of_range() -> None:
    # Prepare
    first = make_core()
    _two_rounds(first)
    gappy = [r for r in first.history if r["round"] != 1]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"holds rounds \[0, 2\]; expected 0\.\.2"):
        make_core().restore(first.state, first.counters(2), gappy)
    with pytest.raises(ValueError, match="cannot resume after round 5"):
        make_core().restore(first.state, first.counters(5), first.history)


# -------------------------------------------------------------- no Flower
# A fresh interpreter where any import of Flower fails: the core and these four
# test modules import without it, and two of the tests above run there.
NO_FLOWER = """
import sys
sys.modules["flwr"] = None
sys.path.insert(0, "tests/unit")
import lora_flwr.server.core
import test_node_book, test_round_record, test_server_core, test_server_hooks
test_server_core.test_one_round_gives_the_fedit_example_weighted_mean()
test_server_core.test_the_run_aborts_after_max_failed_rounds()
print(sorted(m for m in sys.modules if m.split(".")[0] == "flwr"))
"""


def test_the_core_imports_and_runs_rounds_without_flower() -> None:
    # Prepare / Execute
    done = subprocess.run(
        [sys.executable, "-c", NO_FLOWER],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    # Assert: only the blocking stub is in sys.modules.
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['flwr']"]
