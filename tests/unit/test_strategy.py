"""FedLoRA: per-client plans, reply validation, bytes, sampling, handshake, history."""

from __future__ import annotations

import importlib.util
import logging
import math
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
from lora_flwr.compression import decode_reply, encode_reply, wire_nbytes
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
    ACCURACY,
    BASE_VERSION,
    COMPRESSION,
    LOCAL_STEPS,
    LR,
    PARTITION_ID,
    PERPLEXITY,
    PROX_MU,
    ROUND,
    SECONDS,
    TOPK_FRACTION,
    TRAIN_LOSS,
    AdapterLayout,
    Plan,
    group_of,
)
from lora_flwr.server.guards import RunAborted

Arrays = dict[str, np.ndarray]

R = 2
LAYOUT = AdapterLayout(
    ("q.lora_A.weight", "q.lora_B.weight", "classifier.bias"), ((R, 3), (4, R), (2,))
)
# Rank tiers: allocated rank 4, clients at 2 or 4.
TIER_LAYOUT = AdapterLayout(
    ("q.lora_A.weight", "q.lora_B.weight", "classifier.bias"), ((4, 3), (5, 4), (2,))
)
# Merging rules: a module wide enough that a stacked catch-up beats a dense one.
WIDE_LAYOUT = AdapterLayout(
    ("q.lora_A.weight", "q.lora_B.weight", "classifier.bias"), ((R, 16), (16, R), (2,))
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


def _global(strategy: FedLoRA) -> Arrays:
    return {n: a.copy() for n, a in strategy.global_arrays().items()}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


@pytest.fixture
def flwr_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the WARNINGs of Flower's logger (it propagates to the root)."""
    caplog.set_level(logging.WARNING, logger="flwr")
    return caplog


# ------------------------------------------------------------- aggregate_fit
def test_aggregate_fit_returns_the_example_weighted_mean() -> None:
    # Prepare: 1, 2 and 5 examples; the fourth sampled client sends nothing.
    strategy = _strategy()
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


def _nan() -> list[np.ndarray]:
    arrays = _full(9.0)
    arrays[1][2, 1] = np.nan
    return arrays


def _inf() -> list[np.ndarray]:
    arrays = _full(9.0)
    arrays[2][0] = np.inf
    return arrays


BAD_REPLIES: dict[str, tuple[Callable[[], list[Any]], int, str]] = {
    "wrong_count": (
        lambda: _full(9.0)[:2],
        100,
        "2 arrays but the plan expects 3 "
        "(q.lora_A.weight, q.lora_B.weight, classifier.bias)",
    ),
    "wrong_shape": (
        lambda: [np.full((3, 2), 9.0, np.float32), *_full(9.0)[1:]],
        100,
        "q.lora_A.weight: shape (3, 2), expected (2, 3)",
    ),
    "float64": (
        lambda: [a.astype(np.float64) for a in _full(9.0)],
        100,
        "q.lora_A.weight: dtype float64, expected float32",
    ),
    "nan": (_nan, 100, "q.lora_B.weight: contains NaN or Inf"),
    "inf": (_inf, 100, "classifier.bias: contains NaN or Inf"),
    "no_examples": (lambda: _full(9.0), 0, "num_examples=0 must be a positive integer"),
    "negative_examples": (
        lambda: _full(9.0),
        -3,
        "num_examples=-3 must be a positive integer",
    ),
}


@pytest.mark.parametrize("fault", sorted(BAD_REPLIES))
def test_aggregate_fit_drops_a_malformed_reply(
    fault: str, flwr_caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: partition 2 sends the bad reply in round 2.
    build, num_examples, message = BAD_REPLIES[fault]
    strategy = _strategy()
    sent = _configure(strategy, _manager(), server_round=2)
    results = [
        (sent[0][0], _res(_full(1.0), 1, pid=0)),
        (sent[2][0], _res(build(), num_examples, pid=2)),
        (sent[1][0], _res(_full(4.0), 3, pid=1)),
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(2, results, [])

    # Assert: only the valid replies count: (1*1 + 3*4) / 4 = 3.25.
    assert params is not None
    for got, shape in zip(parameters_to_ndarrays(params), LAYOUT.shapes, strict=True):
        np.testing.assert_allclose(got, np.full(shape, 3.25), rtol=1e-6)
    assert metrics["fit_ok"] == 2
    assert metrics["fit_dropped"] == 1
    assert metrics["train_loss"] == pytest.approx((1 * 1.0 + 3 * 2.0) / 4)
    warnings = _warnings(flwr_caplog)
    assert len(warnings) == 1
    assert "round 2: dropped reply of client node-2 (partition 2)" in warnings[0]
    assert message in warnings[0]


def test_aggregate_fit_drops_a_reply_from_a_node_it_did_not_instruct(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    strategy = _strategy()
    sent = _configure(strategy, _manager())
    results = [
        (sent[0][0], _res(_full(1.0), 1)),
        (_node("stranger", 0), _res(_full(50.0), 1)),
        (sent[1][0], _res(_full(3.0), 1)),
    ]

    # Execute
    _, metrics = strategy.aggregate_fit(1, results, [])

    # Assert
    np.testing.assert_array_equal(strategy.global_arrays()["q.lora_B.weight"], 2.0)
    assert metrics["fit_dropped"] == 1
    assert "client stranger (partition ?): this node was not sent a fit" in "".join(
        _warnings(flwr_caplog)
    )


def test_aggregate_fit_drops_an_update_above_the_norm_limit(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: updates are measured from the start the client was sent; client
    # 1 moved every one of 16 weights by 100 (norm 400), the others by 0.5, 1.5.
    strategy = _strategy(guards={"max_update_norm": 10.0})
    start = [_initial()[n] for n in LAYOUT.names]
    sent = _configure(strategy, _manager())
    results = [
        (sent[p][0], _res([a + d for a in start], 1, pid=p))
        for p, d in ((0, 0.5), (1, 100.0), (2, 1.5))
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: the mean of the two accepted updates is +1.
    assert params is not None
    got = strategy.global_arrays()
    for name, value in _initial().items():
        np.testing.assert_allclose(got[name], value + 1.0, rtol=1e-6)
    assert metrics["fit_dropped"] == 1
    assert "update norm 400 exceeds guards.max_update_norm=10" in "".join(
        _warnings(flwr_caplog)
    )


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


def test_aggregate_fit_keeps_the_global_on_too_few_valid_replies(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: min_fit_clients = 2, one valid reply, one NaN reply, one failure.
    strategy = _strategy()
    before = strategy.state
    sent = _configure(strategy, _manager(), server_round=3)
    results = [(sent[0][0], _res(_full(2.0), 1)), (sent[1][0], _res(_nan(), 1))]

    # Execute
    params, metrics = strategy.aggregate_fit(3, results, [RuntimeError("x")])

    # Assert
    assert params is None
    assert metrics == {}
    assert strategy.state is before
    for name, value in _initial().items():
        np.testing.assert_array_equal(strategy.global_arrays()[name], value)
    assert "round 3: 1 valid replies < sampling.min_replies=2" in "\n".join(
        _warnings(flwr_caplog)
    )


def test_a_round_whose_replies_are_all_rejected_leaves_the_state_unchanged() -> None:
    # Prepare: four replies, four different faults.
    strategy = _strategy()
    before = _global(strategy)
    sent = _configure(strategy, _manager())
    first_payloads = {p: ins.parameters.tensors for p, (_, ins) in sent.items()}
    results = [
        (sent[0][0], _res(_nan(), 1)),
        (sent[1][0], _res(_full(1.0)[:1], 1)),
        (sent[2][0], _res(_full(1.0), 0)),
        (sent[3][0], _res([a.astype(np.float64) for a in _full(1.0)], 1)),
    ]

    # Execute
    params, _ = strategy.aggregate_fit(1, results, [])
    again = _configure(strategy, _manager(), server_round=2)

    # Assert: same state, and the next round sends the same payloads.
    assert params is None
    assert strategy.state.round == 0
    after = strategy.global_arrays()
    assert after.keys() == before.keys()
    assert all(np.array_equal(after[n], before[n]) for n in before)
    assert strategy.history == []
    assert {p: ins.parameters.tensors for p, (_, ins) in again.items()} == (
        first_payloads
    )


def test_aggregate_fit_with_no_results_keeps_the_global() -> None:
    # Prepare
    strategy = _strategy()
    _configure(strategy, _manager())

    # Execute
    params, metrics = strategy.aggregate_fit(1, [], [])

    # Assert
    assert (params, metrics) == (None, {})
    assert not strategy.global_arrays()["q.lora_B.weight"].any()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_non_finite_aggregate_never_becomes_the_global(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: a huge server learning rate overflows float32.
    caplog.set_level(logging.ERROR, logger="flwr")
    strategy = _strategy(server_opt={"name": "fedavgm", "lr": 1e38, "beta1": 0.0})
    before = _global(strategy)
    sent = _configure(strategy, _manager())
    results = [(sent[p][0], _res(_full(10.0), 1, pid=p)) for p in (0, 1)]

    # Execute
    params, _ = strategy.aggregate_fit(1, results, [])

    # Assert
    assert params is None
    for name, value in before.items():
        np.testing.assert_array_equal(strategy.global_arrays()[name], value)
    assert (
        strategy.history == [] and strategy.core.record.to_dict()["aggregated"] is False
    )
    assert (
        "round 1: aggregation failed, global kept: q.lora_A.weight: contains NaN or Inf"
        in caplog.text
    )


def test_strategy_rejects_an_unknown_rule() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="'nope'"):
        _strategy(fed={"aggregation": "nope"})


def test_strategy_rejects_initial_arrays_that_do_not_match_the_layout() -> None:
    # Prepare
    initial = _initial()
    del initial["classifier.bias"]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"missing \['classifier.bias'\]"):
        FedLoRA(cfg=_cfg(), layout=LAYOUT, initial=initial)


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
def test_strategy_refuses_an_impossible_combination(
    sections: dict[str, dict[str, Any]], message: str
) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        _strategy(TIER_LAYOUT, **sections)


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
    strategy = _strategy(fed={"aggregation": rule})
    before = _global(strategy)
    sent = _configure(strategy, _manager(), server_round)
    results = [
        (sent[0][0], _res(_full(50.0), 1, pid=0)),
        (sent[1][0], _res(_full(1.0, groups=send), 1, pid=1)),
        (sent[2][0], _res(_full(3.0, groups=send), 3, pid=2)),
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(server_round, results, [])

    # Assert: the full reply is dropped, the sent groups are (1 + 9) / 4 = 2.5,
    # the groups nobody sent keep their value.
    assert params is not None
    assert (metrics["fit_ok"], metrics["fit_dropped"]) == (2, 1)
    assert "3 arrays but the plan expects 2" in "".join(_warnings(flwr_caplog))
    after = strategy.global_arrays()
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
    strategy = _strategy(fed={"aggregation": "fedsa"})
    sent = _configure(strategy, _manager())
    results = [
        (sent[0][0], _res(_full(7.0), 1, pid=0)),
        (sent[1][0], _res(_full(2.0, groups="AM"), 1, pid=1)),
        (sent[2][0], _res(_full(4.0, groups="AM"), 1, pid=2)),
    ]

    # Execute
    strategy.aggregate_fit(1, results, [])

    # Assert: B is still the zero init, A and M are the mean.
    after = strategy.global_arrays()
    assert not after["q.lora_B.weight"].any()
    np.testing.assert_allclose(after["q.lora_A.weight"], 3.0)
    np.testing.assert_allclose(after["classifier.bias"], 3.0)
    # No server-side product for FedSA: no aggregation error.
    assert strategy.core.record.to_dict()["agg_error"] is None


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


def test_rank_tiers_drop_a_reply_of_the_wrong_rank(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: each tier answers once at its rank; a rank-2 client also sends
    # rank-4 factors.
    strategy = _tier_strategy()
    sent = _configure(strategy, _manager())
    low = sorted(p for p, r in strategy.ranks.items() if r == 2)
    high = sorted(p for p, r in strategy.ranks.items() if r == 4)

    def at(rank: int, value: float) -> list[np.ndarray]:
        shapes = [(rank, 3), (5, rank), (2,)]
        return [np.full(s, value, np.float32) for s in shapes]

    results = [
        (sent[low[0]][0], _res(at(2, 1.0), 1, pid=low[0])),
        (sent[low[1]][0], _res(at(4, 9.0), 1, pid=low[1])),
        (sent[high[0]][0], _res(at(4, 3.0), 1, pid=high[0])),
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: A's first 2 rows average 1 and 3, the rest 0 (padding) and 3.
    assert params is not None
    assert (metrics["fit_ok"], metrics["fit_dropped"]) == (2, 1)
    assert f"(partition {low[1]}): q.lora_A.weight: shape (4, 3), expected (2, 3)" in (
        "".join(_warnings(flwr_caplog))
    )
    a = strategy.global_arrays()["q.lora_A.weight"]
    np.testing.assert_allclose(a[:2], 2.0)
    np.testing.assert_allclose(a[2:], 1.5)
    b = strategy.global_arrays()["q.lora_B.weight"]
    np.testing.assert_allclose(b[:, :2], 2.0)
    np.testing.assert_allclose(b[:, 2:], 1.5)


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
def test_a_failed_or_silent_node_gets_the_dense_delta_next_round() -> None:
    # Prepare: FLoRA, round 1: partitions 0, 1 reply (holding version 0),
    # 2 fails, 3 replies without saying which version it holds.
    strategy = _strategy(WIDE_LAYOUT, fed={"aggregation": "flora"})
    sent = _configure(strategy, _manager())
    rng = np.random.default_rng(5)

    def reply(pid: int, version: int | None) -> tuple[Any, FitRes]:
        arrays = [rng.normal(size=s).astype(np.float32) for s in WIDE_LAYOUT.shapes]
        return sent[pid][0], _res(arrays, 10 + pid, pid=pid, version=version)

    results = [reply(0, 0), reply(1, 0), reply(3, None)]
    failures: list[Any] = [(sent[2][0], _res([], 1))]

    # Execute
    params, _ = strategy.aggregate_fit(1, results, failures)
    again = _configure(strategy, _manager(), 2)

    # Assert: version 1 exists; 0 and 1 catch up with the stacked block of
    # width 3 * 2, the two unknown ones with the whole delta.
    assert params is not None
    assert strategy.state.base_version == 1
    assert strategy.versions == {0: 0, 1: 0, 2: None, 3: None}
    plans = {p: Plan.from_config(ins.config) for p, (_, ins) in again.items()}
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
        payload = parameters_to_ndarrays(again[pid][1].parameters)
        assert [a.shape for a in payload] == [(16, 16), (2,)]
        np.testing.assert_array_equal(payload[0], strategy.state.base_delta["q"])
    stacked = parameters_to_ndarrays(again[0][1].parameters)
    assert [a.shape for a in stacked] == [(16, 3 * R), (3 * R, 16), (2,)]


@pytest.mark.parametrize("rule", ["fedit", "ffa", "fedsa", "hetlora"])
def test_a_failed_node_of_a_rule_that_never_merges_gets_no_delta(rule: str) -> None:
    # Prepare: partition 3 fails in round 1; nothing was ever folded.
    strategy = _strategy(fed={"aggregation": rule})
    sent = _configure(strategy, _manager())
    plan = Plan.from_config(sent[0][1].config)
    results = [
        (sent[p][0], _res(_full(1.0, groups="".join(plan.send)), 1, pid=p))
        for p in (0, 1, 2)
    ]
    strategy.aggregate_fit(1, results, [(sent[3][0], _res([], 1))])

    # Execute
    again = _configure(strategy, _manager(), 2)

    # Assert: no dense zero delta for it, the same bytes as everyone else.
    assert strategy.versions[3] is None
    assert {Plan.from_config(ins.config).fold_mode for _, ins in again.values()} == {
        "none"
    }
    assert len({parameters_nbytes(ins.parameters) for _, ins in again.values()}) == 1


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


# ---------------------------------------------------------- server optimizer
def _two_rounds(strategy: FedLoRA) -> list[Arrays]:
    out = []
    for rnd, values in ((1, (1.0, 3.0)), (2, (2.0, 2.0))):
        sent = _configure(strategy, _manager(), rnd)
        results = [(sent[p][0], _res(_full(v), 1, pid=p)) for p, v in enumerate(values)]
        strategy.aggregate_fit(rnd, results, [])
        out.append(_global(strategy))
    return out


def test_fedavgm_with_lr_1_and_no_momentum_is_the_rule_itself() -> None:
    # Prepare
    plain = _strategy()
    avgm = _strategy(server_opt={"name": "fedavgm", "lr": 1.0, "beta1": 0.0})

    # Execute
    want = _two_rounds(plain)
    got = _two_rounds(avgm)

    # Assert
    assert avgm.optimizer is not None and plain.optimizer is None
    for w, g in zip(want, got, strict=True):
        for name in LAYOUT.names:
            np.testing.assert_array_equal(g[name], w[name])


def test_fedavgm_momentum_carries_over_between_rounds() -> None:
    # Prepare
    strategy = _strategy(server_opt={"name": "fedavgm", "lr": 1.0, "beta1": 0.5})

    # Execute: round 1 averages to 2, round 2 to 2 again.
    first, second = _two_rounds(strategy)

    # Assert: B starts at 0: m1 = 2, x1 = 2; m2 = 0.5 * 2 + 0, x2 = 3.
    np.testing.assert_allclose(first["q.lora_B.weight"], 2.0)
    np.testing.assert_allclose(second["q.lora_B.weight"], 3.0)
    np.testing.assert_allclose(
        strategy.state.extra["opt.m.q.lora_B.weight"], np.full((4, R), 1.0)
    )
    a0 = _initial()["q.lora_A.weight"].astype(np.float64)
    np.testing.assert_allclose(
        second["q.lora_A.weight"], 2.0 + 0.5 * (2.0 - a0), rtol=1e-6
    )


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


@pytest.mark.parametrize(
    ("eval_every", "expected"),
    [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4, 5]), (3, [0, 3, 5]), (0, [0, 5])],
)
def test_evaluate_cadence(eval_every: int, expected: list[int]) -> None:
    # Prepare
    strategy, calls = _evaluating(fed={"num_rounds": 5}, eval={"every": eval_every})

    # Execute
    results = {rnd: strategy.evaluate(rnd, NO_PARAMS) for rnd in range(6)}

    # Assert
    assert [c[0] for c in calls] == expected
    assert [rnd for rnd, res in results.items() if res is not None] == expected
    assert results[0] == (0.5, {"loss": 0.5, "accuracy": 0.25})
    _, arrays, base_delta = calls[0]
    assert base_delta == {}
    for name, value in _initial().items():
        np.testing.assert_array_equal(arrays[name], value)


def test_evaluate_without_evaluate_fn_returns_none() -> None:
    # Prepare
    strategy = _strategy()

    # Execute / Assert
    assert strategy.evaluate(0, NO_PARAMS) is None
    assert strategy.history == [{"round": 0}]


def test_central_evaluation_sees_the_base_delta_of_a_merging_rule() -> None:
    # Prepare
    strategy, calls = _evaluating(fed={"aggregation": "flora"})
    sent = _configure(strategy, _manager())
    results = [(sent[p][0], _res(_full(0.5 + p), 1, pid=p)) for p in (0, 1)]
    strategy.aggregate_fit(1, results, [])

    # Execute
    strategy.evaluate(1, NO_PARAMS)

    # Assert: FLoRA restarts A, B at init; the update is in the base delta.
    _, arrays, base_delta = calls[-1]
    np.testing.assert_array_equal(
        arrays["q.lora_A.weight"], _initial()["q.lora_A.weight"]
    )
    assert list(base_delta) == ["q"]
    # s * sum_k p_k B_k A_k with s = 2, p = 1/2, B_k A_k = 2 (0.5+k)^2 each.
    np.testing.assert_allclose(base_delta["q"], 2 * (0.5 * 0.5 + 0.5 * 4.5), rtol=1e-6)
    np.testing.assert_array_equal(base_delta["q"], strategy.state.base_delta["q"])
    assert strategy.core.record.to_dict()["base_version"] == 1


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


def test_aggregate_evaluate_weights_loss_and_accuracy() -> None:
    # Prepare
    strategy = _strategy(eval={"fraction": 1.0})
    results: list[tuple[Any, EvaluateRes]] = [
        (_node("a", 0), EvaluateRes(OK, 1.0, 1, {ACCURACY: 1.0})),
        (_node("b", 1), EvaluateRes(OK, 2.0, 3, {ACCURACY: 0.0})),
        (_node("c", 2), EvaluateRes(OK, 0.0, 0, {})),
        (_node("d", 3), EvaluateRes(OK, math.nan, 5, {ACCURACY: 1.0})),
    ]

    # Execute
    loss, metrics = strategy.aggregate_evaluate(1, results, [])

    # Assert
    assert loss == pytest.approx(1.75)
    assert metrics == {"fed_loss": pytest.approx(1.75), "fed_accuracy": 0.25}


def test_aggregate_evaluate_reports_perplexity_of_the_mean_loss() -> None:
    # Prepare
    strategy = _strategy(eval={"fraction": 1.0})
    results: list[tuple[Any, EvaluateRes]] = [
        (_node("a", 0), EvaluateRes(OK, 1.0, 1, {PERPLEXITY: 2.7})),
        (_node("b", 1), EvaluateRes(OK, 3.0, 1, {PERPLEXITY: 20.0})),
    ]

    # Execute
    loss, metrics = strategy.aggregate_evaluate(1, results, [])

    # Assert: exp of the weighted mean loss, not the mean of perplexities.
    assert loss == pytest.approx(2.0)
    assert metrics["fed_perplexity"] == pytest.approx(math.exp(2.0))


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


def test_fedsa_aggregate_evaluate_writes_personal_metrics() -> None:
    # Prepare
    records: list[dict[str, Any]] = []
    strategy = _strategy(fed={"aggregation": "fedsa"})
    strategy.on_round_end = lambda rec, s: records.append(rec)
    manager = _manager()
    strategy.configure_fit(1, NO_PARAMS, manager)
    instructions = strategy.configure_evaluate(1, NO_PARAMS, manager)
    results = [
        (p, EvaluateRes(OK, 0.5 * (i + 1), 1, {ACCURACY: i / 4, BASE_VERSION: 0}))
        for i, (p, _) in enumerate(instructions)
    ]

    # Execute
    loss, metrics = strategy.aggregate_evaluate(1, results, [])

    # Assert
    assert loss == pytest.approx((0.5 + 1.0 + 1.5 + 2.0) / 4)
    assert metrics["personal_loss"] == pytest.approx(loss)
    assert metrics["personal_accuracy"] == pytest.approx((0 + 1 + 2 + 3) / 16)
    assert "fed_loss" not in metrics and "fed_accuracy" not in metrics
    assert str(metrics["eval_kind"]).startswith("personalized")
    assert records[-1]["personal_accuracy"] == metrics["personal_accuracy"]
    assert records[-1]["eval_ok"] == 4


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
            "`train.lr` should be > 0 but the value passed is -1",
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


# ------------------------------------------------- hostile and broken clients
def test_a_malformed_fit_metric_is_dropped_not_fatal(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: partition 1 reports seconds="abc" and train_loss=NaN.
    strategy = _strategy()
    sent = _configure(strategy, _manager())
    bad = _res(_full(4.0), 1, pid=1)
    bad.metrics.update({SECONDS: "abc", TRAIN_LOSS: math.nan})
    results = [(sent[0][0], _res(_full(2.0), 1, pid=0)), (sent[1][0], bad)]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: both replies aggregated; the bad metrics are absent, not crashing.
    assert params is not None and metrics["fit_ok"] == 2
    np.testing.assert_allclose(strategy.global_arrays()["q.lora_B.weight"], 3.0)
    assert metrics["train_loss"] == pytest.approx(1.0)  # only partition 0's loss
    text = "\n".join(_warnings(flwr_caplog))
    assert "metric seconds='abc' should be a finite number" in text
    assert "metric train_loss=nan should be a finite number" in text


def test_a_malformed_evaluate_reply_is_dropped_not_fatal(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = _strategy(eval={"fraction": 1.0})
    results = [
        (_node("a", 0), EvaluateRes(OK, 1.0, 1, {ACCURACY: "abc"})),
        (_node("b", 1), EvaluateRes(OK, 2.0, 3, {ACCURACY: 0.5})),
        (_node("c", 2), EvaluateRes(OK, "x", 3, {ACCURACY: 0.5})),  # type: ignore[arg-type]
    ]

    loss, metrics = strategy.aggregate_evaluate(1, results, [])

    assert loss == pytest.approx((1.0 + 6.0) / 4)
    assert metrics["fed_accuracy"] == pytest.approx(0.5)
    text = "\n".join(_warnings(flwr_caplog))
    assert "metric accuracy='abc'" in text and "loss='x'" in text


def test_default_guards_bound_a_scaled_update_and_a_lying_count() -> None:
    # Prepare: the default guards on; partition 2 scales its update by 1e6 and
    # claims 10**9 examples (the reliability probes).
    strategy = _strategy(
        guards={"weight_cap": 4.0, "norm_guard": "clip", "norm_guard_factor": 3.0}
    )
    sent = _configure(strategy, _manager())
    honest = [
        (sent[0][0], _res(_full(1.0), 100, pid=0)),
        (sent[1][0], _res(_full(1.2), 120, pid=1)),
    ]
    attack = (sent[2][0], _res(_full(1e6), 10**9, pid=2))

    # Execute
    params, metrics = strategy.aggregate_fit(1, [*honest, attack], [])

    # Assert: the attacker moved the global by at most its bounded share.
    assert params is not None
    assert (metrics["norm_clipped"], metrics["weight_capped"]) == (1, 1)
    b = strategy.global_arrays()["q.lora_B.weight"]
    assert np.all(np.abs(b) < 10.0), b
    # Without the guards the attacker owns the model.
    naked = _strategy()
    sent = _configure(naked, _manager())
    naked.aggregate_fit(
        1,
        [
            (sent[0][0], honest[0][1]),
            (sent[1][0], honest[1][1]),
            (sent[2][0], attack[1]),
        ],
        [],
    )
    assert np.all(naked.global_arrays()["q.lora_B.weight"] > 9e5)


def _failed_round(strategy: FedLoRA, manager: Any, server_round: int) -> None:
    _configure(strategy, manager, server_round)
    strategy.aggregate_fit(server_round, [], [RuntimeError("bad data in row 3")])
    strategy.configure_evaluate(server_round, NO_PARAMS, manager)


def test_the_run_stops_after_too_many_failed_rounds() -> None:
    # Prepare: 10 rounds, at most 2 consecutive rounds without an aggregate.
    strategy = _strategy(fed={"num_rounds": 10, "max_failed_rounds": 2})
    manager = _manager()
    _failed_round(strategy, manager, 1)
    _failed_round(strategy, manager, 2)

    # Execute / Assert: the third failed round stops the run, naming the cause.
    with pytest.raises(
        RunAborted,
        match=r"run stopped at round 3: 3 consecutive "
        r"rounds without an aggregate .*bad data in row 3",
    ):
        _failed_round(strategy, manager, 3)
    assert len(strategy.history) == 3  # the round was recorded before stopping


def test_a_run_without_any_aggregate_does_not_finish_quietly() -> None:
    strategy = _strategy(fed={"num_rounds": 2, "max_failed_rounds": 5})
    manager = _manager()
    _failed_round(strategy, manager, 1)
    with pytest.raises(RunAborted, match="none of the 2 rounds produced an aggregate"):
        _failed_round(strategy, manager, 2)


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


def test_dp_clips_every_update_and_reports_epsilon() -> None:
    # Prepare: noise small enough to see the clipped mean; C = 1.
    strategy = _strategy(privacy={"noise_multiplier": 1e-9, "clip_norm": 1.0})
    start = _global(strategy)
    sent = _configure(strategy, _manager())
    results = [
        (sent[p][0], _res(_full(10.0 * (p + 1)), 1 + 99 * p, pid=p)) for p in (0, 1)
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: each update scaled to norm 1, then averaged with equal weights.
    assert params is not None and metrics["dp_clipped"] == 2
    expected = {}
    for p in (0, 1):
        update = {n: np.full(s, 10.0 * (p + 1)) - start[n] for n, s in LAYOUT.items()}
        norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
        for n, u in update.items():
            expected[n] = expected.get(n, 0) + (start[n] + u / norm) / 2
    for n, value in strategy.global_arrays().items():
        np.testing.assert_allclose(value, expected[n], atol=1e-6)
    assert metrics["dp_epsilon"] > 0
    assert metrics["dp_epsilon_unamplified"] >= metrics["dp_epsilon"]


def test_dp_noise_has_the_calibrated_std() -> None:
    # Prepare: wide layout, clients send back exactly what they got (zero update).
    layout = AdapterLayout(
        ("q.lora_A.weight", "q.lora_B.weight"), ((R, 4000), (4000, R))
    )
    strategy = _strategy(layout, privacy={"noise_multiplier": 2.0, "clip_norm": 0.5})
    start = _global(strategy)
    sent = _configure(strategy, _manager())
    same = [start[n] for n in layout.names]
    results = [(sent[p][0], _res(same, 5, pid=p)) for p in (0, 1, 2)]

    # Execute
    strategy.aggregate_fit(1, results, [])

    # Assert: std z C / m = 2 * 0.5 / 3, from fresh entropy (not the seed).
    noise = np.concatenate(
        [(strategy.global_arrays()[n] - start[n]).ravel() for n in layout.names]
    )
    assert noise.std() == pytest.approx(1.0 / 3.0, rel=0.05)
    assert abs(noise.mean()) < 0.01
    again = _strategy(layout, privacy={"noise_multiplier": 2.0, "clip_norm": 0.5})
    sent = _configure(again, _manager())
    again.aggregate_fit(1, [(sent[p][0], _res(same, 5, pid=p)) for p in (0, 1, 2)], [])
    assert not np.array_equal(
        again.global_arrays()["q.lora_B.weight"],
        strategy.global_arrays()["q.lora_B.weight"],
    )


# --------------------------------------------------------------- compression
def _encoded(
    ins: FitIns, reply: list[np.ndarray], codec: Any, fraction: float = 1.0
) -> list[np.ndarray]:
    """What a client sends: its reply coded against the payload it started from."""
    start = parameters_to_ndarrays(ins.parameters)  # fedit receives every group
    return encode_reply(codec, reply, start, fraction=fraction).arrays


@pytest.mark.parametrize(
    ("codec", "fraction"),
    [("fp16", 1.0), ("bf16", 1.0), ("int8", 1.0), ("topk", 1.0), ("topk", 0.25)],
)
def test_compressed_replies_are_decoded_then_averaged(
    codec: Any, fraction: float
) -> None:
    # Prepare: three clients move the start by different amounts.
    strategy = _strategy(compression={"codec": codec, "topk_fraction": fraction})
    sent = _configure(strategy, _manager())
    moves = {0: 0.5, 1: -0.25, 2: 0.125}
    weights = {0: 1, 1: 2, 2: 5}
    start = _global(strategy)
    replies = {
        pid: [
            start[n]
            + np.float32(m)
            * np.arange(1, a.size + 1, dtype=np.float32).reshape(a.shape)
            for n, a in start.items()
        ]
        for pid, m in moves.items()
    }
    results = [
        (sent[pid][0], _res(_encoded(sent[pid][1], replies[pid], codec, fraction), w))
        for pid, w in weights.items()
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: the rule averaged the decoded replies (float32 in, as without
    # compression), and bytes_up counted the encoded ones.
    assert params is not None
    assert (metrics["fit_ok"], metrics["fit_dropped"]) == (3, 0)
    decoded = {
        pid: decode_reply(
            codec,
            _encoded(sent[pid][1], replies[pid], codec, fraction),
            list(start.values()),
            fraction=fraction,
        )
        for pid in moves
    }
    for i, name in enumerate(LAYOUT.names):
        want = sum(w * decoded[p][i].astype(np.float64) for p, w in weights.items()) / 8
        np.testing.assert_allclose(strategy.global_arrays()[name], want, rtol=1e-6)
        exact = sum(w * replies[p][i].astype(np.float64) for p, w in weights.items())
        if codec != "topk" or fraction == 1.0:  # lossy within the codec's bound
            np.testing.assert_allclose(want, exact / 8, rtol=0, atol=2**-7 * 9)
    wire = wire_nbytes(codec, list(LAYOUT.shapes), fraction)
    assert metrics["bytes_up"] == 3 * wire
    assert metrics["bytes_up_max"] == wire


def test_compressed_bytes_up_is_below_the_float32_reply() -> None:
    # Prepare
    plain, coded = _strategy(), _strategy(compression={"codec": "int8"})
    reply = _full(0.5)

    # Execute
    metrics = {}
    for key, strategy in (("none", plain), ("int8", coded)):
        sent = _configure(strategy, _manager())
        arrays = reply if key == "none" else _encoded(sent[0][1], reply, "int8")
        results = [(sent[p][0], _res(arrays, 1, pid=p)) for p in (0, 1)]
        metrics[key] = strategy.aggregate_fit(1, results, [])[1]

    # Assert: each byte counted from what was serialized, and the same global up
    # to int8's half step (max|update| / 254 per tensor).
    shapes = list(LAYOUT.shapes)
    assert metrics["none"]["bytes_up"] == 2 * wire_nbytes("none", shapes, 1.0)
    assert metrics["int8"]["bytes_up"] == 2 * wire_nbytes("int8", shapes, 1.0)
    start = _initial()
    for name, value in zip(LAYOUT.names, reply, strict=True):
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
        lambda a: _full(9.0),
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
    strategy = _strategy(compression={"codec": "int8"})
    sent = _configure(strategy, _manager())
    results = [
        (sent[0][0], _res(_encoded(sent[0][1], _full(1.0), "int8"), 1, pid=0)),
        (sent[2][0], _res(build(_encoded(sent[2][1], _full(5.0), "int8")), 9, pid=2)),
        (sent[1][0], _res(_encoded(sent[1][1], _full(4.0), "int8"), 3, pid=1)),
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: the mean of the two decoded replies, (1*1 + 3*4) / 4 = 3.25 up to
    # int8's half step of A's update (B and the head start at 0: exact).
    assert params is not None
    assert (metrics["fit_ok"], metrics["fit_dropped"]) == (2, 1)
    start = [_initial()[n] for n in LAYOUT.names]
    decoded = [
        decode_reply("int8", _encoded(sent[p][1], _full(v), "int8"), start)
        for p, v in ((0, 1.0), (1, 4.0))
    ]
    out = parameters_to_ndarrays(params)
    for i, (got, shape) in enumerate(zip(out, LAYOUT.shapes, strict=True)):
        np.testing.assert_allclose(
            got, (decoded[0][i] + 3 * decoded[1][i]) / 4, rtol=1e-6
        )
        np.testing.assert_allclose(got, np.full(shape, 3.25), atol=0.05)
    warnings = _warnings(flwr_caplog)
    assert len(warnings) == 1
    assert "dropped reply of client node-2 (partition 2)" in warnings[0]
    assert message in warnings[0]


# ------------------------------------------------------------- eval overlap
def _legacy_rounds(
    strategy: FedLoRA, rounds: int, between: Callable[[int], None] = lambda r: None
) -> list[object]:
    """Drive ``strategy`` as Flower's legacy server loop does; return evaluate()s."""
    manager = _manager()
    returned = [strategy.evaluate(0, NO_PARAMS)]
    for rnd in range(1, rounds + 1):
        sent = _configure(strategy, manager, rnd)
        between(rnd)
        results = [
            (sent[p][0], _res(_full(float(rnd + p)), 1 + p, pid=p)) for p in sent
        ]
        strategy.aggregate_fit(rnd, results, [])
        returned.append(strategy.evaluate(rnd, NO_PARAMS))
        assert strategy.configure_evaluate(rnd, NO_PARAMS, manager) == []
    return returned


def _reports(
    strategy: FedLoRA,
) -> list[tuple[dict[str, Any], int, Arrays, dict[str, Any]]]:
    """Collect, per on_round_end, the record, history length, adapter, counters."""
    out: list[tuple[dict[str, Any], int, Arrays, dict[str, Any]]] = []

    def report(rec: dict[str, Any], view: Any) -> None:
        arrays = {n: a.copy() for n, a in view.global_arrays().items()}
        rnd = int(rec["round"])
        out.append((dict(rec), len(view.history), arrays, view.counters(rnd)))

    strategy.on_round_end = report
    return out


def test_overlapped_evaluation_reports_what_sequential_evaluation_does() -> None:
    # Prepare: the same three rounds, evaluation after each, off and on.
    plain, plain_calls = _evaluating(fed={"num_rounds": 3})
    overlapped, overlapped_calls = _evaluating(
        fed={"num_rounds": 3}, eval={"overlap": True}
    )
    assert overlapped.cfg.eval.overlap and not plain.cfg.eval.overlap
    want, got = _reports(plain), _reports(overlapped)

    # Execute
    plain_returns = _legacy_rounds(plain, 3)
    overlapped_returns = _legacy_rounds(overlapped, 3)

    # Assert: Flower gets metrics only for the last (synchronous) evaluation;
    # every record, its history position, adapter and counters are as without.
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
    import threading

    # Prepare: round 0's evaluation can only finish once round 1 was sent out.
    sent_round_1 = threading.Event()
    threads: dict[int, str] = {}

    def evaluate_fn(rnd: int, arrays: Arrays, base_delta: Arrays) -> dict[str, float]:
        threads[rnd] = threading.current_thread().name
        if rnd == 0 and not sent_round_1.wait(timeout=30):
            raise AssertionError("round 0's evaluation blocked round 1")
        return {"loss": 1.0, "accuracy": 0.5}

    strategy = _strategy(
        evaluate_fn=evaluate_fn, fed={"num_rounds": 2}, eval={"overlap": True}
    )
    reports = _reports(strategy)

    def between(rnd: int) -> None:
        if rnd == 1:
            assert reports == []  # round 0 is reported after its evaluation
            sent_round_1.set()

    # Execute
    _legacy_rounds(strategy, 2, between)

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

    strategy = _strategy(
        evaluate_fn=evaluate_fn, fed={"num_rounds": 3}, eval={"overlap": True}
    )
    reports = _reports(strategy)

    # Execute / Assert: named at the next evaluation; round 1 never reported.
    with pytest.raises(
        RuntimeError, match="evaluation of round 1 failed: the held-out file vanished"
    ):
        _legacy_rounds(strategy, 3)
    assert [r["round"] for r, *_ in reports] == [0]


def test_an_aborting_round_waits_for_its_evaluation() -> None:
    # Prepare: every client fails; the second failed round stops the run.
    strategy, _ = _evaluating(
        fed={"num_rounds": 5, "max_failed_rounds": 1}, eval={"overlap": True}
    )
    reports = _reports(strategy)
    manager = _manager()
    strategy.evaluate(0, NO_PARAMS)

    # Execute
    for rnd in (1, 2):
        _configure(strategy, manager, rnd)
        strategy.aggregate_fit(rnd, [], [RuntimeError("out of memory")])
        strategy.evaluate(rnd, NO_PARAMS)
        if rnd == 1:
            strategy.configure_evaluate(rnd, NO_PARAMS, manager)
    with pytest.raises(RunAborted, match="2 consecutive rounds"):
        strategy.configure_evaluate(2, NO_PARAMS, manager)

    # Assert: the aborted round is reported with its evaluation.
    assert [r["round"] for r, *_ in reports] == [0, 1, 2]
    assert reports[2][0]["test_loss"] == 2.5 and reports[2][0]["aborted"]
