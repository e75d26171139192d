"""FedLoRA, the Flower translator: Flower's types in and out, bytes, handshake.

FitIns/EvaluateIns contents, bytes counted from ``Parameters``, proxy sampling and
node ids, Flower's failures, the resume offset, run_simulation's exit codes and
real clients in process. What the round core computes (aggregates, dropped
replies, guards, optimizer, DP, compression, evaluation) is tested on plain
arrays in test_server_core.py, test_server_rounds.py and test_server_hooks.py.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import numpy as np
import pytest
from flwr.common import (
    Code,
    EvaluateRes,
    FitIns,
    FitRes,
    GetPropertiesRes,
    Parameters,
    RecordDict,
    Status,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager

from lora_flwr.aggregation import ClientInfo, available_rules, fold_block
from lora_flwr.compression import encode_reply, wire_nbytes
from lora_flwr.config import (
    ExperimentConfig,
    FedConfig,
    LoraConfig,
    SamplingConfig,
    TrainConfig,
)
from lora_flwr.experiment import get_workspace
from lora_flwr.fl.client import ContextStore, LoRAClient
from lora_flwr.fl.runner import layout_of
from lora_flwr.fl.strategy import FedLoRA, parameters_nbytes
from lora_flwr.protocol import (
    BASE_VERSION,
    COMPRESSION,
    LOCAL_STEPS,
    LR,
    PARTITION_ID,
    PROX_MU,
    ROUND,
    TOPK_FRACTION,
    TRAIN_LOSS,
    AdapterLayout,
    Plan,
    group_of,
)

Arrays = dict[str, np.ndarray]

R = 2
LAYOUT = AdapterLayout(
    ("q.lora_A.weight", "q.lora_B.weight", "classifier.bias"), ((R, 3), (4, R), (2,))
)
# Rank tiers: allocated rank 4, clients at 2 or 4.
TIER_LAYOUT = AdapterLayout(
    ("q.lora_A.weight", "q.lora_B.weight", "classifier.bias"), ((4, 3), (5, 4), (2,))
)
OK = Status(code=Code.OK, message="ok")


# ------------------------------------------------------------------- helpers
# The helpers' defaults, by section; a test's section dicts are merged over them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"lr": 0.01, "local_steps": 7},
    "fed": {"num_rounds": 3, "num_clients": 4, "max_failed_rounds": 100},
    "sampling": {"min_clients": 2, "min_available": 2, "min_replies": 2},
    "eval": {"min_clients": 2},
    # Exact-arithmetic tests: the hostile-client guards are tested on their own.
    "guards": {"weight_cap": 0.0, "norm_guard": "off"},
}


def _cfg(*, r: int = R, seed: int = 0, **sections: dict[str, Any]) -> ExperimentConfig:
    """Build the test config: each section dict merged over ``_DEFAULTS``.

    E.g. ``_cfg(sampling={"fraction": 0.5})``; ``r`` sets the LoRA rank.
    """
    tree: dict[str, Any] = {
        "seed": seed,
        "lora": {"r": r, "lora_alpha": 2.0 * r, "lora_dropout": 0.0},
    }
    for name in {**_DEFAULTS, **sections}:
        tree[name] = {**_DEFAULTS.get(name, {}), **sections.get(name, {})}
    return ExperimentConfig.from_dict(tree)


def _initial(layout: AdapterLayout = LAYOUT) -> Arrays:
    """Seeded A, zero B and zero saved modules (as LoRA starts)."""
    rng = np.random.default_rng(0)
    return {
        n: rng.normal(size=s).astype(np.float32)
        if group_of(n) == "A"
        else np.zeros(s, np.float32)
        for n, s in layout.items()
    }


def _strategy(
    layout: AdapterLayout = LAYOUT,
    *,
    seed: int = 0,
    evaluate_fn: Callable[[int, Arrays, Arrays], dict[str, float]] | None = None,
    **sections: dict[str, Any],
) -> FedLoRA:
    """A FedLoRA on ``layout`` built from ``_cfg(seed=seed, **sections)``."""
    return FedLoRA(
        cfg=_cfg(r=layout.rank, seed=seed, **sections),
        layout=layout,
        initial=_initial(layout),
        evaluate_fn=evaluate_fn,
    )


def _node(cid: str, pid: object) -> MagicMock:
    """A client proxy whose get_properties claims partition ``pid``."""
    proxy = MagicMock()
    proxy.cid = cid
    proxy.get_properties.return_value = GetPropertiesRes(
        status=OK, properties={PARTITION_ID: pid}
    )
    return proxy


def _manager(*nodes: MagicMock, num: int = 4) -> SimpleClientManager:
    manager = SimpleClientManager()
    for node in nodes or [_node(f"node-{i}", i) for i in range(num)]:
        assert manager.register(node)
    return manager


NO_PARAMS = Parameters(tensors=[], tensor_type="numpy.ndarray")


def _configure(
    strategy: FedLoRA, manager: SimpleClientManager, server_round: int = 1
) -> dict[int, tuple[Any, FitIns]]:
    """Run configure_fit; return each sampled client's (proxy, FitIns) by partition."""
    instructions = strategy.configure_fit(server_round, NO_PARAMS, manager)
    return {strategy.partition_of[p.cid]: (p, ins) for p, ins in instructions}


def _full(value: float, layout: AdapterLayout = LAYOUT, groups: str = "ABM") -> list:
    return [
        np.full(s, value, np.float32)
        for n, s in layout.items()
        if group_of(n) in groups
    ]


def _res(
    arrays: Sequence[Any], num_examples: int, pid: int = 0, version: int | None = 0
) -> FitRes:
    metrics: dict[str, Any] = {TRAIN_LOSS: 1.0 + pid}
    if version is not None:
        metrics[BASE_VERSION] = version
    return FitRes(
        status=OK,
        parameters=ndarrays_to_parameters(list(arrays)),
        num_examples=num_examples,
        metrics=metrics,
    )


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.fixture
def flwr_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the WARNINGs of Flower's logger (it propagates to the root)."""
    caplog.set_level(logging.WARNING, logger="flwr")
    return caplog


# ------------------------------------------------------------- aggregate_fit
def test_aggregate_fit_returns_the_example_weighted_mean() -> None:
    # Prepare: 1, 2 and 5 examples; the fourth sampled client sends nothing. The
    # third moves against the others: no update filter, the mean is under test.
    strategy = _strategy(guards={"filter": "none"})
    sent = _configure(strategy, _manager())
    results = [
        (sent[0][0], _res(_full(8.0), 1, pid=0)),
        (sent[1][0], _res(_full(4.0), 2, pid=1)),
        (sent[2][0], _res(_full(-0.8), 5, pid=2)),
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: (8 + 8 - 4) / 8 = 1.5 everywhere, returned in wire order.
    assert params is not None
    out = parameters_to_ndarrays(params)
    for got, (name, shape) in zip(out, LAYOUT.items(), strict=True):
        np.testing.assert_allclose(got, np.full(shape, 1.5), rtol=1e-6)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, strategy.global_arrays()[name])
    assert strategy.state.round == 1
    assert metrics["fit_ok"] == 3
    assert metrics["fit_dropped"] == 0
    assert metrics["fit_failed"] == 0
    assert metrics["aggregated"] is True
    # Weighted train loss: (1*1 + 2*2 + 5*3) / 8 = 2.5.
    assert metrics["train_loss"] == pytest.approx(2.5)


def test_aggregate_fit_counts_bytes_up_exactly() -> None:
    # Prepare: one malformed reply; its bytes still arrived.
    strategy = _strategy()
    sent = _configure(strategy, _manager())
    results = [
        (sent[0][0], _res(_full(1.0), 1)),
        (sent[1][0], _res(_full(2.0), 1)),
        (sent[2][0], _res(_full(3.0)[:2], 1)),
    ]
    expected = sum(len(t) for _, res in results for t in res.parameters.tensors)

    # Execute
    _, metrics = strategy.aggregate_fit(1, results, [])

    # Assert
    assert metrics["bytes_up"] == expected
    assert metrics["bytes_up_max"] == max(
        parameters_nbytes(res.parameters) for _, res in results
    )
    assert expected > 4 * (6 + 8 + 2) * 2 + 4 * (6 + 8)


def test_aggregate_fit_tolerates_failures(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: one exception and one failed (proxy, FitRes) pair.
    strategy = _strategy()
    sent = _configure(strategy, _manager())
    results = [
        (sent[0][0], _res(_full(2.0), 1, pid=0)),
        (sent[1][0], _res(_full(4.0), 1, pid=1)),
    ]
    failures: list[Any] = [
        RuntimeError("client crashed"),
        (sent[3][0], _res(_full(0.0), 1)),
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, failures)

    # Assert
    assert params is not None
    np.testing.assert_array_equal(strategy.global_arrays()["classifier.bias"], 3.0)
    assert metrics["fit_failed"] == 2
    assert metrics["fit_ok"] == 2
    text = "\n".join(_warnings(flwr_caplog))
    assert "client crashed" in text
    assert "round 1: client node-3 failed" in text
    # The failed node may have folded before failing: its version is unknown.
    assert strategy.versions == {0: 0, 1: 0, 3: None}


def test_aggregate_fit_with_no_results_keeps_the_global() -> None:
    # Prepare
    strategy = _strategy()
    _configure(strategy, _manager())

    # Execute
    params, metrics = strategy.aggregate_fit(1, [], [])

    # Assert
    assert (params, metrics) == (None, {})
    assert not strategy.global_arrays()["q.lora_B.weight"].any()


# ------------------------------------------------------------- configure_fit
def test_initialize_parameters_sends_the_initial_adapter() -> None:
    # Prepare
    strategy = _strategy()

    # Execute
    params = strategy.initialize_parameters(_manager())

    # Assert
    assert params is not None
    got = parameters_to_ndarrays(params)
    for array, name in zip(got, LAYOUT.names, strict=True):
        np.testing.assert_array_equal(array, _initial()[name])


@pytest.mark.parametrize(
    ("rule", "server_round", "receive", "send", "keep"),
    [
        ("fedit", 3, "ABM", "ABM", ""),
        ("ffa", 3, "BM", "BM", ""),
        ("fedsa", 3, "AM", "AM", "B"),
        ("fedsvd", 3, "ABM", "BM", ""),
        ("rolora", 3, "ABM", "BM", ""),
        ("rolora", 2, "ABM", "AM", ""),
        ("flora", 3, "M", "ABM", ""),
        ("hetlora", 3, "ABM", "ABM", ""),
    ],
)
def test_each_client_gets_its_own_plan_and_payload(
    rule: str, server_round: int, receive: str, send: str, keep: str
) -> None:
    # Prepare: lr 0.01 decayed by 0.5 per round.
    strategy = _strategy(fed={"aggregation": rule, "lr_decay": 0.5, "prox_mu": 0.25})
    lr = 0.01 * 0.5 ** (server_round - 1)

    # Execute
    sent = _configure(strategy, _manager(), server_round)

    # Assert: one FitIns per client, each decoding to the rule's plan for it.
    assert sorted(sent) == [0, 1, 2, 3]
    assert len({id(ins) for _, ins in sent.values()}) == 4
    for pid, (_, ins) in sent.items():
        plan = Plan.from_config(ins.config)
        info = ClientInfo(pid, R, 0)
        assert plan == strategy.rule.plan(strategy.state, info, server_round)
        assert (plan.rank, plan.fold_mode) == (R, "none")
        assert "".join(sorted(plan.receive)) == receive
        assert "".join(sorted(plan.send)) == send
        assert "".join(sorted(plan.keep)) == keep
        assert ins.config == {
            ROUND: server_round,
            LR: pytest.approx(lr),
            PROX_MU: 0.25,
            LOCAL_STEPS: 7,
            COMPRESSION: "none",
            TOPK_FRACTION: 0.1,
            **plan.to_config(),
        }
        payload = parameters_to_ndarrays(ins.parameters)
        spec = LAYOUT.payload_spec(plan)
        assert [(n, a.shape) for (n, _), a in zip(spec, payload, strict=True)] == spec
        assert [n for n, _ in spec] == [
            n for n in LAYOUT.names if group_of(n) in receive
        ]
        for (name, _), array in zip(spec, payload, strict=True):
            assert array.dtype == np.float32
            np.testing.assert_array_equal(array, _initial()[name])


def test_configure_fit_samples_at_least_min_fit_clients() -> None:
    # Prepare: fraction 0.25 of 4 is 1 client, but min_fit_clients is 3.
    strategy = _strategy(sampling={"fraction": 0.25, "min_clients": 3})

    # Execute
    sent = _configure(strategy, _manager())

    # Assert
    assert len(sent) == 3
    assert len({proxy.cid for proxy, _ in sent.values()}) == 3


def test_configure_fit_omits_steps_when_training_by_epochs() -> None:
    # Prepare
    cfg = ExperimentConfig(
        lora=LoraConfig(r=R),
        train=TrainConfig(local_epochs=1.0),
        fed=FedConfig(num_clients=2),
        sampling=SamplingConfig(min_clients=1, min_available=2),
    )
    strategy = FedLoRA(cfg=cfg, layout=LAYOUT, initial=_initial())

    # Execute
    sent = _configure(strategy, _manager(num=2))

    # Assert
    assert len(sent) == 2
    assert all(LOCAL_STEPS not in ins.config for _, ins in sent.values())


def _payload_bytes(arrays: Sequence[np.ndarray]) -> int:
    return sum(len(ndarray_to_bytes(a)) for a in arrays)


@pytest.mark.parametrize("rule", ["fedit", "ffa", "fedsa", "flora"])
def test_bytes_down_is_the_sum_of_each_clients_payload(rule: str) -> None:
    # Prepare
    strategy = _strategy(fed={"aggregation": rule}, sampling={"fraction": 0.75})
    plan = strategy.rule.plan(strategy.state, ClientInfo(0, R, 0), 1)
    per_client = _payload_bytes(strategy.rule.payload(strategy.state, plan))
    received = [n for n in LAYOUT.names if group_of(n) in plan.receive]

    # Execute
    sent = _configure(strategy, _manager())
    _, metrics = strategy.aggregate_fit(1, [], [])

    # Assert: 3 sampled clients, each sent exactly its serialized payload.
    assert per_client == _payload_bytes([_initial()[n] for n in received])
    assert [parameters_nbytes(ins.parameters) for _, ins in sent.values()] == [
        per_client
    ] * 3
    record = strategy.core.record.to_dict()
    assert record["bytes_down"] == 3 * per_client
    assert record["bytes_down_fit_max"] == per_client
    assert record["fit_sampled"] == 3
    assert record["round"] == 1
    assert metrics == {}


def test_bytes_down_adds_the_evaluate_payloads() -> None:
    # Prepare: FFA, every client fits and evaluates.
    strategy = _strategy(fed={"aggregation": "ffa"}, eval={"fraction": 1.0})
    manager = _manager()
    sent = _configure(strategy, manager)
    fit = sum(parameters_nbytes(ins.parameters) for _, ins in sent.values())
    results = [(sent[p][0], _res(_full(1.0, groups="BM"), 1, pid=p)) for p in (0, 1)]
    strategy.aggregate_fit(1, results, [])

    # Execute
    instructions = strategy.configure_evaluate(1, NO_PARAMS, manager)
    evaluate = sum(parameters_nbytes(ins.parameters) for _, ins in instructions)
    strategy.aggregate_evaluate(1, [], [])

    # Assert
    assert len(instructions) == 4 and evaluate > 0
    record = strategy.history[-1]
    assert record["bytes_down"] == fit + evaluate
    assert record["bytes_down_fit_max"] == fit // 4


def test_the_uplink_of_ffa_and_fedsa_leaves_out_a_and_b() -> None:
    # Prepare
    ups: dict[str, int] = {}

    # Execute: each rule's reply spec, serialized.
    for rule in ("fedit", "ffa", "fedsa"):
        strategy = _strategy(fed={"aggregation": rule})
        plan = strategy.rule.plan(strategy.state, ClientInfo(0, R, 0), 1)
        spec = strategy.rule.reply_spec(plan)
        ups[rule] = _payload_bytes([np.zeros(s, np.float32) for _, s in spec])

    # Assert: ffa saves exactly the bytes of A, fedsa those of B.
    a, b, _ = (np.zeros(s, np.float32) for s in LAYOUT.shapes)
    assert ups["fedit"] - ups["ffa"] == len(ndarray_to_bytes(a))
    assert ups["fedit"] - ups["fedsa"] == len(ndarray_to_bytes(b))


# ----------------------------------------------------------------- rank tiers
def _tier_strategy(**sections: dict[str, Any]) -> FedLoRA:
    fed = {"aggregation": "hetlora", "rank_tiers": (2, 4), **sections.pop("fed", {})}
    return _strategy(TIER_LAYOUT, fed=fed, **sections)


def test_rank_tiers_cut_each_payload_to_the_clients_rank() -> None:
    # Prepare
    strategy = _tier_strategy()

    # Execute
    sent = _configure(strategy, _manager())

    # Assert: two clients at rank 2, two at 4, each with its own cut payload.
    ranks = {pid: Plan.from_config(ins.config).rank for pid, (_, ins) in sent.items()}
    assert ranks == strategy.ranks
    assert sorted(ranks.values()) == [2, 2, 4, 4]
    initial = _initial(TIER_LAYOUT)
    sizes = []
    for pid, (_, ins) in sent.items():
        r = ranks[pid]
        a, b, m = parameters_to_ndarrays(ins.parameters)
        assert (a.shape, b.shape, m.shape) == ((r, 3), (5, r), (2,))
        np.testing.assert_array_equal(a, initial["q.lora_A.weight"][:r])
        sizes.append(parameters_nbytes(ins.parameters))
    assert strategy.core.record.to_dict()["bytes_down"] == sum(sizes)
    assert strategy.core.record.to_dict()["bytes_down_fit_max"] == max(sizes)
    assert len(set(sizes)) == 2


# ------------------------------------------------------------------ sampling
def _sampled(strategy: FedLoRA, manager: SimpleClientManager, rounds: int) -> list:
    out = []
    for rnd in range(1, rounds + 1):
        sent = _configure(strategy, manager, rnd)
        out.append(sorted(sent))
        assert strategy.core.record.to_dict()["fit_partitions"] == ",".join(
            map(str, sorted(sent))
        )
    return out


def test_sampling_is_seeded_by_partition_not_by_node_id_or_order() -> None:
    # Prepare: the same six partitions behind other node ids, registered in
    # another order.
    rounds = 6
    first = _strategy(seed=3, fed={"num_clients": 6}, sampling={"fraction": 0.5})
    second = _strategy(seed=3, fed={"num_clients": 6}, sampling={"fraction": 0.5})
    other = _strategy(seed=4, fed={"num_clients": 6}, sampling={"fraction": 0.5})
    nodes = [_node(f"node-{i}", i) for i in range(6)]
    shuffled = [_node(f"x{(7 * i) % 11}", i) for i in (4, 1, 5, 0, 3, 2)]

    # Execute
    a = _sampled(first, _manager(*nodes), rounds)
    b = _sampled(second, _manager(*shuffled), rounds)
    c = _sampled(other, _manager(*nodes), rounds)

    # Assert: 3 of 6 each round, identical for one seed, not for another.
    assert all(len(s) == 3 for s in a)
    assert a == b
    assert a != c
    assert len({tuple(s) for s in a}) > 1  # not the same clients every round


def test_evaluate_sampling_is_seeded_and_separate_from_fit() -> None:
    # Prepare
    samples = []
    for _ in range(2):
        strategy = _strategy(seed=1, fed={"num_clients": 6}, eval={"fraction": 0.5})
        manager = _manager(num=6)
        strategy.configure_fit(1, NO_PARAMS, manager)

        # Execute
        ins = strategy.configure_evaluate(1, NO_PARAMS, manager)
        samples.append(sorted(strategy.partition_of[p.cid] for p, _ in ins))

    # Assert
    assert samples[0] == samples[1]
    assert len(samples[0]) == 3


def test_the_handshake_asks_each_node_once_and_ignores_bad_claims(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: four good nodes, one out of range, one claiming partition 0 again,
    # one claiming a non-integer and one that cannot answer.
    good = [_node(f"node-{i}", i) for i in range(4)]
    out_of_range = _node("x-range", 9)
    negative = _node("x-negative", -1)
    duplicate = _node("z-dup", 0)
    text = _node("x-text", "2")
    broken = _node("x-broken", 1)
    broken.get_properties.side_effect = RuntimeError("unreachable")
    manager = _manager(*good, out_of_range, negative, duplicate, text, broken)
    strategy = _strategy(eval={"fraction": 1.0})

    # Execute: three rounds of fit and evaluate.
    used = set()
    for rnd in (1, 2, 3):
        used |= {p.cid for p, _ in strategy.configure_fit(rnd, NO_PARAMS, manager)}
        used |= {p.cid for p, _ in strategy.configure_evaluate(rnd, NO_PARAMS, manager)}

    # Assert
    assert strategy.partition_of == {f"node-{i}": i for i in range(4)}
    assert used == {f"node-{i}" for i in range(4)}
    for node in good:
        assert node.get_properties.call_count == 1
    text_log = "\n".join(_warnings(flwr_caplog))
    assert "node x-range claims partition 9 of 4; ignored" in text_log
    assert "node x-negative claims partition -1 of 4; ignored" in text_log
    assert "node z-dup claims partition 0, already owned; ignored" in text_log
    assert (
        "node x-broken did not report its partition: RuntimeError('unreachable')"
        in (text_log)
    )


def test_a_node_that_reconnects_under_a_new_id_gets_its_partition_back() -> None:
    # Prepare: round 1 with node-0..3; node-0 leaves and comes back as node-0b.
    strategy = _strategy()
    nodes = [_node(f"node-{i}", i) for i in range(4)]
    manager = _manager(*nodes)
    _configure(strategy, manager, 1)
    manager.unregister(nodes[0])
    assert manager.register(_node("node-0b", 0))

    # Execute
    sent = _configure(strategy, manager, 2)

    # Assert: fraction_fit = 1: every partition trains, partition 0 included.
    assert sorted(sent) == [0, 1, 2, 3]
    assert sent[0][0].cid == "node-0b"


# ------------------------------------------------- base versions and catch-up
def test_an_evaluate_failure_also_makes_the_version_unknown() -> None:
    # Prepare
    strategy = _strategy(eval={"fraction": 1.0})
    manager = _manager()
    ins = strategy.configure_evaluate(1, NO_PARAMS, manager)
    by_pid = {strategy.partition_of[p.cid]: p for p, _ in ins}
    ok = EvaluateRes(OK, 1.0, 2, {BASE_VERSION: 0})

    # Execute
    strategy.aggregate_evaluate(1, [(by_pid[0], ok)], [(by_pid[1], ok)])

    # Assert
    assert strategy.versions == {0: 0, 1: None}


# ------------------------------------------------------------------ evaluate
def _evaluating(
    **sections: dict[str, Any],
) -> tuple[FedLoRA, list[tuple[int, Arrays, Arrays]]]:
    calls: list[tuple[int, Arrays, Arrays]] = []

    def evaluate_fn(
        server_round: int, arrays: Arrays, base_delta: Arrays
    ) -> dict[str, float]:
        calls.append((server_round, arrays, base_delta))
        return {"loss": 0.5 + server_round, "accuracy": 0.25}

    return _strategy(evaluate_fn=evaluate_fn, **sections), calls


def test_round_record_holds_test_and_fit_metrics() -> None:
    # Prepare: no federated evaluation, so configure_evaluate closes the round.
    records: list[dict[str, Any]] = []
    strategy, _ = _evaluating(fed={"num_rounds": 1})
    strategy.on_round_end = lambda rec, s: records.append(dict(rec, strategy=s))
    manager = _manager(num=2)

    # Execute
    strategy.evaluate(0, NO_PARAMS)
    sent = _configure(strategy, manager)
    new, fit_metrics = strategy.aggregate_fit(
        1,
        [
            (sent[0][0], _res(_full(1.0), 1, pid=0)),
            (sent[1][0], _res(_full(3.0), 1, pid=1)),
        ],
        [],
    )
    assert new is not None
    strategy.evaluate(1, new)
    assert strategy.configure_evaluate(1, new, manager) == []

    # Assert
    assert [r["round"] for r in records] == [0, 1]
    assert all(r.pop("strategy") is strategy for r in records)
    assert records[0]["test_loss"] == 0.5
    rec = records[1]
    assert rec["test_loss"] == 1.5
    assert rec["test_accuracy"] == 0.25
    assert (rec["fit_ok"], rec["fit_failed"], rec["fit_dropped"]) == (2, 0, 0)
    assert (rec["fit_sampled"], rec["fit_partitions"]) == (2, "0,1")
    assert rec["lr"] == pytest.approx(0.01)
    assert rec["aggregated"] is True and rec["base_version"] == 0
    assert rec["train_loss"] == pytest.approx(1.5)
    assert rec["bytes_down"] == sum(
        parameters_nbytes(ins.parameters) for _, ins in sent.values()
    )
    assert rec["bytes_up"] > 0 and rec["round_seconds"] >= 0
    assert isinstance(rec["agg_error"], float) and rec["agg_error"] > 0
    assert {"eval_seconds", "client_seconds_max", "tokens", "workers"} <= set(rec)
    assert fit_metrics["fit_ok"] == 2 and "agg_error" in fit_metrics
    assert strategy.history == records


def test_fedsa_has_no_central_evaluation_and_evaluates_every_client() -> None:
    # Prepare
    strategy, calls = _evaluating(fed={"aggregation": "fedsa"}, eval={"fraction": 0.0})
    manager = _manager()
    strategy.configure_fit(1, NO_PARAMS, manager)

    # Execute
    central = [strategy.evaluate(rnd, NO_PARAMS) for rnd in (0, 1)]
    instructions = strategy.configure_evaluate(1, NO_PARAMS, manager)

    # Assert: no global model: the clients' personal models are evaluated.
    assert central == [None, None]
    assert calls == []
    assert strategy.history == [{"round": 0}]
    assert sorted(strategy.partition_of[p.cid] for p, _ in instructions) == [
        0,
        1,
        2,
        3,
    ]
    for _, ins in instructions:
        plan = Plan.from_config(ins.config)
        assert plan.keep == {"B"} and plan.receive == {"A", "M"}
        assert plan.train == frozenset() and plan.send == frozenset()
        assert [a.shape for a in parameters_to_ndarrays(ins.parameters)] == [
            (R, 3),
            (2,),
        ]
        assert LR not in ins.config and LOCAL_STEPS not in ins.config


def test_on_round_end_sees_every_history_record_once() -> None:
    # Prepare: FedSA has no central evaluation, yet round 0 opens the table.
    seen: list[tuple[int, int]] = []
    strategy = _strategy(
        fed={"aggregation": "fedsa"}, eval={"fraction": 0.0, "every": 2}
    )
    strategy.on_round_end = lambda rec, s: seen.append((rec["round"], len(s.history)))
    manager = _manager()

    # Execute
    strategy.evaluate(0, NO_PARAMS)
    for rnd in (1, 2):
        sent = _configure(strategy, manager, rnd)
        results = [
            (sent[p][0], _res(_full(1.0, groups="AM"), 1, pid=p)) for p in (0, 1)
        ]
        strategy.aggregate_fit(rnd, results, [])
        strategy.evaluate(rnd, NO_PARAMS)
        ins = strategy.configure_evaluate(rnd, NO_PARAMS, manager)
        if ins:
            evals = [(p, EvaluateRes(OK, 1.0, 1, {})) for p, _ in ins]
            strategy.aggregate_evaluate(rnd, evals, [])

    # Assert: called once per record, right after it joins the history.
    assert seen == [(0, 1), (1, 2), (2, 3)]
    assert [r["round"] for r in strategy.history] == [0, 1, 2]
    assert "personal_loss" in strategy.history[2]
    assert "personal_loss" not in strategy.history[1]


def test_fedsa_skips_personal_evaluation_between_eval_rounds() -> None:
    # Prepare: eval_every = 2: round 1 is not an evaluation round.
    records: list[dict[str, Any]] = []
    strategy = _strategy(fed={"aggregation": "fedsa"}, eval={"every": 2})
    strategy.on_round_end = lambda rec, s: records.append(rec)
    manager = _manager()
    strategy.configure_fit(1, NO_PARAMS, manager)

    # Execute
    instructions = strategy.configure_evaluate(1, NO_PARAMS, manager)

    # Assert: the round is closed without evaluation.
    assert instructions == []
    assert [r["round"] for r in records] == [1]


def test_parameters_nbytes_sums_tensor_lengths() -> None:
    # Prepare
    params = Parameters(tensors=[b"abc", b"", b"12345"], tensor_type="numpy.ndarray")

    # Execute / Assert
    assert parameters_nbytes(params) == 8


# ------------------------------------------- in process, with real LoRAClients
REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"


class _Federation:
    """FedLoRA driving real LoRAClients in-process, as Flower's server loop does."""

    def __init__(self, overrides: Sequence[str]) -> None:
        self.cfg = ExperimentConfig.from_toml(SMOKE).with_overrides(
            ["fed.num_clients=3", "sampling.min_available=3", "train.local_steps=2"]
            + list(overrides)
        )
        ws = get_workspace(self.cfg)
        ws.reset_adapter()
        self.strategy = FedLoRA(
            cfg=self.cfg, layout=layout_of(ws.adapter), initial=ws.initial
        )
        num = self.cfg.fed.num_clients
        self.states = [RecordDict() for _ in range(num)]
        self.manager = _manager(*[_node(f"n{i}", i) for i in range(num)])
        self.fit_plans: list[dict[int, Plan]] = []

    def client(self, cid: str) -> LoRAClient:
        """A new client object per call, on the node's persistent state."""
        pid = int(cid[1:])
        return LoRAClient(self.cfg, pid, self.cfg.fed.num_clients, self.states[pid])

    def round(self, rnd: int) -> dict[str, Any]:
        s = self.strategy
        results = []
        instructions = s.configure_fit(rnd, NO_PARAMS, self.manager)
        self.fit_plans.append(
            {int(p.cid[1:]): Plan.from_config(ins.config) for p, ins in instructions}
        )
        for proxy, ins in instructions:
            arrays, n, m = self.client(proxy.cid).fit(
                parameters_to_ndarrays(ins.parameters), ins.config
            )
            results.append((proxy, FitRes(OK, ndarrays_to_parameters(arrays), n, m)))
        s.aggregate_fit(rnd, results, [])
        evaluations = []
        for proxy, ins in s.configure_evaluate(rnd, NO_PARAMS, self.manager):
            loss, n, m = self.client(proxy.cid).evaluate(
                parameters_to_ndarrays(ins.parameters), ins.config
            )
            evaluations.append((proxy, EvaluateRes(OK, loss, n, m)))
        if evaluations:
            s.aggregate_evaluate(rnd, evaluations, [])
        return s.history[-1]


def test_flora_with_rank_tiers_keeps_every_node_on_the_servers_base_weights() -> None:
    # Prepare: FLoRA, ranks 2 and 4, 2 of 3 clients per round (seed 0 samples
    # 1,2 / 0,1 / 1,2 / 0,2), so nodes miss rounds and catch up when sampled.
    fed = _Federation(
        [
            "fed.aggregation=flora",
            "fed.rank_tiers=2,4",
            "sampling.fraction=0.6",
            "sampling.min_clients=2",
            "eval.fraction=0.0",
            "fed.num_rounds=4",
        ]
    )

    # Execute
    records = [fed.round(rnd) for rnd in (1, 2, 3, 4)]

    # Assert: every reply valid and the update exact.
    server = fed.strategy.state
    assert [r["fit_partitions"] for r in records] == ["1,2", "0,1", "1,2", "0,2"]
    assert [r["fit_ok"] for r in records] == [2, 2, 2, 2]
    assert [r["fit_dropped"] for r in records] == [0, 0, 0, 0]
    assert [r["base_version"] for r in records] == [1, 2, 3, 4]
    assert all(r["agg_error"] < 1e-5 for r in records)
    # Node 2 skipped round 2: in round 3 it folds versions 1 and 2 at once.
    late = fed.fit_plans[2][2]
    assert (late.fold_mode, late.fold_from, late.fold_to) == ("stack", 0, 2)
    assert late.fold_ranks == tuple(server.fold_log[v].width for v in (0, 1))
    # Each node holds, bitwise, the server's delta of the version it reports.
    assert fed.strategy.versions == {0: 3, 1: 2, 2: 3}
    for pid, state in enumerate(fed.states):
        store = ContextStore(state)
        version = store.base_version()
        assert version == fed.strategy.versions[pid]
        delta = store.base_delta()
        for module in server.base_delta:
            want = None
            for block in server.fold_log[:version]:
                want = fold_block(want, *block.factors[module])
            assert want is not None
            np.testing.assert_array_equal(delta[module], want)


def test_fedsa_keeps_each_nodes_b_private_and_reports_personal_accuracy() -> None:
    # Prepare
    fed = _Federation(
        [
            "fed.aggregation=fedsa",
            "eval.fraction=0.0",
            "sampling.min_clients=3",
            "fed.num_rounds=2",
            "guards.filter=none",  # synthetic clients that disagree by design
        ]
    )

    # Execute
    records = [fed.round(rnd) for rnd in (1, 2)]

    # Assert: B never reaches the server; each node keeps its own, trained B.
    assert [r["fit_ok"] for r in records] == [3, 3]
    assert all("personal_accuracy" in r and r["eval_ok"] == 3 for r in records)
    assert all("agg_error" not in r or r["agg_error"] is None for r in records)
    initial_b = {
        n: a for n, a in fed.strategy.rule.initial.items() if group_of(n) == "B"
    }
    assert all(
        np.array_equal(fed.strategy.global_arrays()[n], a) for n, a in initial_b.items()
    )
    privates = [ContextStore(state).private() for state in fed.states]
    for private in privates:
        assert private.keys() == initial_b.keys()
        assert any(np.abs(b).sum() > 0 for b in private.values())
    name = next(iter(initial_b))
    assert not np.array_equal(privates[0][name], privates[1][name])


# ------------------------------------- run_simulation.py: bad configs fail early
@pytest.fixture
def run_simulation_main(monkeypatch: pytest.MonkeyPatch) -> Any:
    """run_simulation.main, with ``run`` replaced so no engine can start."""
    spec = importlib.util.spec_from_file_location(
        "run_simulation_under_test", REPO / "run_simulation.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    started: list[ExperimentConfig] = []
    monkeypatch.setattr(module, "run", lambda cfg, verbose=False: started.append(cfg))
    # main() sets the package logger to INFO; put it back afterwards.
    level = logging.getLogger("lora_flwr").level
    yield module.main, started
    logging.getLogger("lora_flwr").setLevel(level)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "lora.r=0"],
            "`lora.r` should be a positive integer value but the value passed is 0",
        ),
        (
            ["--set", "train.lr=-1"],
            "`train.lr` should be in (0, 10] (a rate above 10 diverges) but the value "
            "passed is -1",
        ),
        (["--set", "lora.nope=1"], "Unknown config key: lora.nope"),
        (["--set", "train.lr"], "should look like section.key=value"),
        (
            ["--set", "fed.aggregation=nope"],
            f"`fed.aggregation` should be one of {available_rules()} but the value "
            "passed is 'nope'",
        ),
        (
            ["--set", "fed.rank_tiers=2,8"],
            "ranks whose largest equals lora.r=4",
        ),
        (["--config", "no/such/file.toml"], "Config file not found: no/such/file.toml"),
    ],
)
def test_run_simulation_rejects_a_bad_config_with_exit_code_2(
    run_simulation_main: Any,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    # Prepare
    main, started = run_simulation_main
    argv = ["--config", str(SMOKE), *args] if "--config" not in args else args

    # Execute
    code = main(argv)

    # Assert
    assert code == 2
    assert started == []
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["fed.aggregation=flora", "server_opt.name=fedadam"],
            "error: `server_opt.name`='fedadam' cannot be combined with "
            "`fed.aggregation`='flora'",
        ),
        (
            ["fed.aggregation=fedit", "fed.rank_tiers=2,4"],
            "error: `fed.aggregation`='fedit' needs one rank for every client but "
            "`fed.rank_tiers` is '2,4'",
        ),
        (
            ["fed.aggregation=flora", "privacy.noise_multiplier=1.0"],
            "error: differential privacy (`privacy.noise_multiplier` > 0) cannot be "
            "combined with `fed.aggregation`='flora'",
        ),
    ],
)
def test_run_simulation_rejects_an_impossible_combination_before_starting(
    run_simulation_main: Any,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    message: str,
) -> None:
    # Prepare
    main, started = run_simulation_main
    argv = ["--config", str(SMOKE)]
    for item in overrides:
        argv += ["--set", item]

    # Execute
    code = main(argv)

    # Assert
    assert (code, started) == (2, [])
    assert capsys.readouterr().err.startswith(message)


def test_run_simulation_runs_a_good_config(run_simulation_main: Any) -> None:
    # Prepare
    main, started = run_simulation_main

    # Execute
    code = main(["--config", str(SMOKE), "--set", "fed.num_rounds=3"])

    # Assert
    assert code == 0
    assert len(started) == 1
    assert started[0].fed.num_rounds == 3
    assert started[0] == ExperimentConfig.from_toml(SMOKE).with_overrides(
        ["fed.num_rounds=3"]
    )


# -------------------------------------------------------------------- resume
def test_a_resumed_strategy_continues_the_round_numbers() -> None:
    from lora_flwr.fl.checkpoint import Checkpoint

    # Prepare: a checkpoint after round 2 of 3 and its history.
    first = _strategy()
    state = first.state.replace(round=2)
    history = [{"round": 0}, {"round": 1}, {"round": 2}, {"round": 3}]  # 3: stale
    counters = {"round": 2, "failed_rounds": 0, "aggregated_rounds": 2}

    resumed = _strategy()
    resumed._restore(Checkpoint(state, counters), history)

    # Execute: Flower's first round after the restart is its round 1.
    assert resumed.evaluate(0, NO_PARAMS) is None  # round 0 is in the history
    sent = _configure(resumed, _manager(), server_round=1)

    # Assert
    assert [r["round"] for r in resumed.history] == [0, 1, 2]
    for _, ins in sent.values():
        assert ins.config[ROUND] == 3
    assert resumed.versions == {0: None, 1: None, 2: None, 3: None}


# --------------------------------------------------------------- compression
def _encoded(
    ins: FitIns, reply: list[np.ndarray], codec: Any, fraction: float = 1.0
) -> list[np.ndarray]:
    """What a client sends: its reply coded against the payload it started from."""
    start = parameters_to_ndarrays(ins.parameters)  # fedit receives every group
    return encode_reply(codec, reply, start, fraction=fraction).arrays


@pytest.mark.parametrize(
    ("codec", "fraction"),
    [
        ("none", 1.0),
        ("fp16", 1.0),
        ("bf16", 1.0),
        ("int8", 1.0),
        ("topk", 1.0),
        ("topk", 0.25),
    ],
)
def test_bytes_up_counts_the_encoded_replies(codec: Any, fraction: float) -> None:
    # Prepare: three clients, each reply coded against the payload it was sent.
    strategy = _strategy(compression={"codec": codec, "topk_fraction": fraction})
    sent = _configure(strategy, _manager())
    results = []
    for pid, weight in ((0, 1), (1, 2), (2, 5)):
        reply = _full(0.5 * (pid + 1))
        if codec != "none":
            reply = _encoded(sent[pid][1], reply, codec, fraction)
        results.append((sent[pid][0], _res(reply, weight, pid=pid)))

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: every byte counted from what was serialized (the encoded replies).
    assert params is not None
    assert (metrics["fit_ok"], metrics["fit_dropped"]) == (3, 0)
    wire = wire_nbytes(codec, list(LAYOUT.shapes), fraction)
    assert metrics["bytes_up"] == 3 * wire
    assert metrics["bytes_up_max"] == wire
