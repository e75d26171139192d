"""LoRAClient: the plan on the wire, shared per-process model, Context.state."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from flwr.common import (
    Code,
    Context,
    FitIns,
    GetPropertiesIns,
    RecordDict,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from lora_flwr.aggregation import ClientInfo, ClientReply, get_rule
from lora_flwr.compression import decode_reply
from lora_flwr.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    FedConfig,
    LoraConfig,
    ModelConfig,
    SamplingConfig,
    TrainConfig,
)
from lora_flwr.data import client_data
from lora_flwr.experiment import (
    centralized_train_data,
    clear_caches,
    get_workspace,
)
from lora_flwr.fl.client import (
    PRIVATE_KEY,
    STATE_KEY,
    ContextStore,
    LoRAClient,
    client_train_seed,
    make_client_fn,
    node_partition,
    node_threads,
)
from lora_flwr.fl.runner import layout_of
from lora_flwr.models import model_load_count
from lora_flwr.protocol import (
    ACCURACY,
    BASE_VERSION,
    COMPRESSION,
    FIT_CALLS,
    LOCAL_STEPS,
    LR,
    MODEL_LOADS,
    NUM_STEPS,
    NUM_TOKENS,
    PARTITION_ID,
    ROUND,
    SECONDS,
    TOPK_FRACTION,
    TRAIN_LOSS,
    WORKER_PID,
    Plan,
    group_of,
)

R = 4
FULL = Plan(rank=R)


def _cfg(
    *, num_clients: int = 2, local_test_fraction: float = 0.1, local_steps: int = 3
) -> ExperimentConfig:
    return ExperimentConfig(
        name="client-test",
        seed=3,
        model=ModelConfig(name="tiny-bert", max_length=32),
        lora=LoraConfig(
            r=R,
            lora_alpha=8.0,
            lora_dropout=0.0,
            target_modules=("query", "value"),
            modules_to_save=("classifier",),
        ),
        data=DataConfig(
            name="synthetic",
            partitioner="iid",
            local_test_fraction=local_test_fraction,
        ),
        train=TrainConfig(lr=1e-2, batch_size=8, local_steps=local_steps),
        eval=EvalConfig(min_clients=1),
        fed=FedConfig(num_clients=num_clients),
        sampling=SamplingConfig(min_clients=1, min_available=1),
    )


def _context(node_config: dict[str, Any], state: RecordDict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=state if state is not None else RecordDict(),
        run_config={},
    )


def _fit_config(
    cfg: ExperimentConfig, server_round: int = 1, plan: Plan = FULL
) -> dict[str, Any]:
    return {
        ROUND: server_round,
        LR: cfg.train.lr,
        LOCAL_STEPS: cfg.train.local_steps,
        **plan.to_config(),
    }


@pytest.fixture(scope="module", autouse=True)
def _fresh_caches() -> Any:
    clear_caches()
    yield
    clear_caches()


# ------------------------------------------------------------ what travels
def test_get_parameters_are_the_adapter_arrays() -> None:
    # Prepare
    client = LoRAClient(_cfg(), 0, 2)
    adapter = client.ws.adapter

    # Execute
    arrays = client.get_parameters({})

    # Assert
    assert [a.shape for a in arrays] == adapter.weight_shapes()
    # r = 4 on query and value of 2 layers (hidden 32), then the 2-class head.
    assert [a.shape for a in arrays] == [(4, 32), (32, 4)] * 4 + [(2, 32), (2,)]
    names = adapter.weight_names()
    assert names[:2] == [
        "bert.encoder.layer.0.attention.self.query.lora_A.weight",
        "bert.encoder.layer.0.attention.self.query.lora_B.weight",
    ]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    for got, want in zip(arrays, adapter.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_get_properties_returns_the_partition_without_loading_a_model() -> None:
    # Prepare: an empty process cache.
    clear_caches()
    before = model_load_count()
    client_fn = make_client_fn(_cfg(num_clients=4))
    context = _context({"partition-id": 3, "num-partitions": 4})

    # Execute
    direct = LoRAClient(_cfg(num_clients=4), 3, 4)
    answer = direct.get_properties({})
    res = client_fn(context).get_properties(GetPropertiesIns(config={}))

    # Assert: the handshake builds no model, no data and no workspace.
    assert answer == {PARTITION_ID: 3}
    assert res.status.code == Code.OK
    assert res.properties == {PARTITION_ID: 3}
    assert model_load_count() == before
    assert "ws" not in vars(direct) and "_data" not in vars(direct)


def test_fit_returns_exactly_the_trained_adapter() -> None:
    # Prepare
    cfg = _cfg()
    client = LoRAClient(cfg, 1, 2)
    adapter = client.ws.adapter
    start = client.ws.initial_weights
    local_train, local_test = client_data(cfg.data, 1, 2, seed=cfg.seed)

    # Execute
    arrays, num_examples, metrics = client.fit(start, _fit_config(cfg))

    # Assert: only the adapter travels, as float32.
    assert len(arrays) == len(start)
    assert [a.shape for a in arrays] == adapter.weight_shapes()
    assert all(a.dtype == np.float32 for a in arrays)
    assert sum(a.nbytes for a in arrays) == adapter.num_parameters() * 4
    for got, want in zip(arrays, adapter.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    # It trained: every B moved away from zero, the head changed.
    b_arrays = [
        a for n, a in zip(adapter.weight_names(), arrays, strict=True) if "lora_B" in n
    ]
    assert all(np.abs(b).sum() > 0 for b in b_arrays)
    assert not np.array_equal(arrays[-2], start[-2])
    # Weight for FedAvg: the local training examples of partition 1.
    assert num_examples == len(local_train) == len(client.train_data)
    assert len(local_test) == int(0.1 * (len(local_train) + len(local_test)))
    assert {
        TRAIN_LOSS,
        SECONDS,
        NUM_TOKENS,
        NUM_STEPS,
        FIT_CALLS,
        PARTITION_ID,
        BASE_VERSION,
        WORKER_PID,
        MODEL_LOADS,
    } <= set(metrics)
    assert all(
        isinstance(v, bool | bytes | float | int | str) for v in metrics.values()
    )
    assert metrics[NUM_STEPS] == cfg.train.local_steps
    assert metrics[PARTITION_ID] == 1
    assert metrics[FIT_CALLS] == 1
    assert metrics[BASE_VERSION] == 0
    assert 0.0 < float(metrics[TRAIN_LOSS]) < 5.0
    # 3 steps of 8 examples, each at least [CLS] x [SEP].
    assert int(metrics[NUM_TOKENS]) >= 3 * 8 * 3


def test_fit_follows_the_round_instructions() -> None:
    # Prepare
    cfg = _cfg()
    client = LoRAClient(cfg, 0, 2)
    start = client.ws.initial_weights

    # Execute
    _, _, metrics = client.fit(
        start, {ROUND: 2, LR: 1e-3, LOCAL_STEPS: 2, **FULL.to_config()}
    )
    _, _, defaults = client.fit(start, FULL.to_config())

    # Assert: without local_steps the client trains its epochs' worth of steps.
    assert metrics[NUM_STEPS] == 2
    assert defaults[NUM_STEPS] == client.ws.trainer.num_steps_for(client.train_data)


def test_fit_without_a_plan_is_a_clear_error() -> None:
    # Prepare
    cfg = _cfg()
    client = LoRAClient(cfg, 0, 2)
    start = client.ws.initial_weights

    # Execute / Assert
    with pytest.raises(ValueError, match=r"no 'plan\.rank'.* different versions"):
        client.fit(start, {ROUND: 1, LR: 1e-3, LOCAL_STEPS: 1})


def test_fit_is_deterministic_for_the_same_round_and_partition() -> None:
    # Prepare
    cfg = _cfg()
    client = LoRAClient(cfg, 0, 2)
    start = client.ws.initial_weights

    # Execute
    first, _, _ = client.fit(start, _fit_config(cfg, server_round=1))
    again, _, _ = client.fit(start, _fit_config(cfg, server_round=1))
    other, _, _ = client.fit(start, _fit_config(cfg, server_round=2))

    # Assert: same start + same round -> same batches -> identical arrays.
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def _malformed(start: list[np.ndarray]) -> dict[str, tuple[list[np.ndarray], str]]:
    wrong_shape = list(start)
    wrong_shape[2] = np.zeros((5, 5), np.float32)
    float64 = list(start)
    float64[0] = start[0].astype(np.float64)
    nan = [a.copy() for a in start]
    nan[-1][0] = np.nan
    return {
        "count": (start[:-1], "9 arrays but the plan expects 10"),
        "shape": (
            wrong_shape,
            r"bert\.encoder\.layer\.0\.attention\.self\.value\.lora_A\.weight: shape "
            r"\(5, 5\), expected \(4, 32\)",
        ),
        "dtype": (
            float64,
            r"bert\.encoder\.layer\.0\.attention\.self\.query\.lora_A\.weight: dtype "
            r"float64",
        ),
        "nan": (nan, r"classifier\.bias: contains NaN"),
    }


@pytest.mark.parametrize("fault", ["count", "shape", "dtype", "nan"])
def test_fit_with_malformed_parameters_raises(fault: str) -> None:
    # Prepare: the adapter holds a trained state, the node one fit call.
    cfg = _cfg()
    state = RecordDict()
    client = LoRAClient(cfg, 0, 2, state)
    start = client.ws.initial_weights
    client.fit(start, _fit_config(cfg))
    parameters, message = _malformed(start)[fault]
    before = client.get_parameters({})

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        client.fit(parameters, _fit_config(cfg))
    # The rejected call changed nothing, not even the fit count.
    for got, want in zip(client.get_parameters({}), before, strict=True):
        np.testing.assert_array_equal(got, want)
    assert state.config_records[STATE_KEY][FIT_CALLS] == 1


def test_evaluate_reports_local_test_metrics() -> None:
    # Prepare
    cfg = _cfg()
    client = LoRAClient(cfg, 0, 2)
    start = client.ws.initial_weights

    # Execute
    loss, num_examples, metrics = client.evaluate(
        start, {ROUND: 1, **FULL.evaluation().to_config()}
    )

    # Assert: two balanced-ish classes and a fresh head: loss near ln 2.
    assert num_examples == len(client.test_data) > 0
    assert 0.5 < loss < 1.0
    assert set(metrics) == {PARTITION_ID, BASE_VERSION, ACCURACY}
    assert 0.0 <= float(metrics[ACCURACY]) <= 1.0


def test_evaluate_without_local_test_data_reports_nothing() -> None:
    # Prepare
    client = LoRAClient(_cfg(local_test_fraction=0.0), 1, 2)

    # Execute
    result = client.evaluate(client.get_parameters({}), FULL.evaluation().to_config())

    # Assert
    assert result == (0.0, 0, {PARTITION_ID: 1, BASE_VERSION: 0})


# ------------------------------------------------------- following the plan
def _rule_call(
    cfg: ExperimentConfig, rule_name: str, server_round: int = 1
) -> tuple[list[np.ndarray], dict[str, Any], Plan]:
    """The payload and fit config the strategy sends under ``rule_name``."""
    ws = get_workspace(cfg)
    rule = get_rule(rule_name)(layout_of(ws.adapter), ws.initial, cfg.lora.scaling)
    state = rule.init_state()
    plan = rule.plan(state, ClientInfo(0, R, 0), server_round)
    return rule.payload(state, plan), _fit_config(cfg, server_round, plan), plan


def test_ffa_fit_sends_b_and_the_head_and_leaves_a_at_the_seeded_init() -> None:
    # Prepare
    cfg = _cfg()
    payload, config, plan = _rule_call(cfg, "ffa")
    client = LoRAClient(cfg, 0, 2)
    names = client.ws.adapter.weight_names()

    # Execute
    reply, _, _ = client.fit(payload, config)

    # Assert: 4 B arrays and the 2 head arrays; A did not move in training.
    assert (plan.receive, plan.train, plan.send) == ({"B", "M"},) * 3
    sent = [n for n in names if group_of(n) in "BM"]
    assert [a.shape for a in reply] == [(32, 4)] * 4 + [(2, 32), (2,)]
    after = client.ws.adapter.get_named_weights()
    for name, array in zip(sent, reply, strict=True):
        np.testing.assert_array_equal(array, after[name])
    for name in names:
        if group_of(name) == "A":
            np.testing.assert_array_equal(after[name], client.ws.initial[name])
    assert all(np.abs(a).sum() > 0 for a in reply[:4])


def test_fedsa_b_persists_in_context_state_across_client_objects() -> None:
    # Prepare: FedSA; node 0 and node 1 share the process's adapter.
    cfg = _cfg()
    payload, config, plan = _rule_call(cfg, "fedsa")
    state0, state1 = RecordDict(), RecordDict()
    b_names = [n for n in get_workspace(cfg).adapter.weight_names() if "lora_B" in n]

    # Execute: node 0 fits, node 1 fits (overwriting the shared adapter), then
    # a new client object of node 0 (as client_fn builds each round) evaluates.
    reply0, _, _ = LoRAClient(cfg, 0, 2, state0).fit(payload, config)
    kept0 = ContextStore(state0).private()
    LoRAClient(cfg, 1, 2, state1).fit(payload, config)
    kept1 = ContextStore(state1).private()
    evaluation = plan.evaluation().to_config()
    again = LoRAClient(cfg, 0, 2, state0)
    again.evaluate(payload, {ROUND: 1, **evaluation})
    restored = again.ws.adapter.get_named_weights()
    fresh = LoRAClient(cfg, 0, 2, RecordDict())
    fresh.evaluate(payload, {ROUND: 1, **evaluation})
    initial = fresh.ws.adapter.get_named_weights()

    # Assert: B never left node 0 (4 A + 2 head arrays went up) ...
    assert [a.shape for a in reply0] == [(4, 32)] * 4 + [(2, 32), (2,)]
    assert sorted(state0.array_records[PRIVATE_KEY]) == sorted(b_names)
    # ... it is the node's own trained B, and it comes back in the next call.
    for name in b_names:
        assert np.abs(kept0[name]).sum() > 0
        assert not np.array_equal(kept0[name], kept1[name])
        np.testing.assert_array_equal(restored[name], kept0[name])
        np.testing.assert_array_equal(initial[name], get_workspace(cfg).initial[name])


def test_a_rank_tier_client_trains_and_replies_at_its_rank() -> None:
    # Prepare: a rank-2 client of the allocated rank 4.
    cfg = _cfg()
    client = LoRAClient(cfg, 0, 2)
    plan = Plan(rank=2)
    ws = client.ws
    payload = [
        a[:2] if "lora_A" in n else a[:, :2] if "lora_B" in n else a
        for n, a in ws.initial.items()
    ]

    # Execute
    reply, _, _ = client.fit(payload, _fit_config(cfg, plan=plan))

    # Assert
    assert [a.shape for a in reply[:2]] == [(2, 32), (32, 2)]
    full = ws.adapter.get_named_weights()
    for name, value in full.items():
        if "lora_A" in name:
            assert not value[2:].any()
        if "lora_B" in name:
            assert not value[:, 2:].any() and value[:, :2].any()


def test_a_dense_fold_is_kept_in_context_state_and_reported() -> None:
    # Prepare: FLoRA after one round; the node missed it (dense catch-up).
    cfg = _cfg()
    ws = get_workspace(cfg)
    layout = layout_of(ws.adapter)
    rule = get_rule("flora")(layout, ws.initial, cfg.lora.scaling)
    rng = np.random.default_rng(0)
    state = rule.init_state()
    replies = []
    for pid in (1, 2):
        plan = rule.plan(state, ClientInfo(pid, R, 0), 1)
        arrays = {
            n: (0.1 * rng.normal(size=s)).astype(np.float32)
            for n, s in rule.reply_spec(plan)
        }
        replies.append(ClientReply(pid, plan, arrays, 5))
    state = rule.aggregate(state, replies, 1)
    plan = rule.plan(state, ClientInfo(0, R, None), 2)
    node = RecordDict()

    # Execute: fit, then a new client object on the same Context.state.
    _, _, metrics = LoRAClient(cfg, 0, 2, node).fit(
        rule.payload(state, plan), _fit_config(cfg, 2, plan)
    )
    store = ContextStore(node)

    # Assert
    assert plan.fold_mode == "dense"
    assert metrics[BASE_VERSION] == 1 == store.base_version()
    for module, delta in state.base_delta.items():
        np.testing.assert_array_equal(store.base_delta()[module], delta)


# ---------------------------------------------------- one model per process
def test_clients_share_one_model_per_process() -> None:
    # Prepare: an empty process cache, then one client builds the model.
    clear_caches()
    cfg = _cfg()
    before = model_load_count()
    first = LoRAClient(cfg, 0, 2)
    start = first.ws.initial_weights
    loads = model_load_count()

    # Execute: another partition, then fits over two rounds on both.
    second = LoRAClient(cfg, 1, 2)
    for rnd in (1, 2):
        for client in (first, second):
            _, _, metrics = client.fit(start, _fit_config(cfg, rnd))

    # Assert
    assert loads == before + 1
    assert model_load_count() == loads
    assert metrics[MODEL_LOADS] == loads
    assert second.ws.bundle.model is first.ws.bundle.model
    assert second.ws.adapter is first.ws.adapter
    # The partitions are different data.
    assert (
        len(first.train_data)
        + len(second.train_data)
        + len(first.test_data)
        + len(second.test_data)
        == 320
    )


def test_client_train_seed_differs_per_round_and_partition() -> None:
    # Prepare
    pairs = [(rnd, pid) for rnd in range(1, 50) for pid in range(50)]

    # Execute
    seeds = {client_train_seed(0, rnd, pid) for rnd, pid in pairs}

    # Assert
    assert len(seeds) == len(pairs)
    assert client_train_seed(1, 1, 0) != client_train_seed(0, 1, 0)


# ------------------------------------------------------ federated == central
def test_one_client_one_round_equals_centralized_training() -> None:
    # Prepare: one partition holding all the training data, no local test split.
    cfg = _cfg(num_clients=1, local_test_fraction=0.0, local_steps=6)
    clear_caches()
    client = make_client_fn(cfg)(_context({"partition-id": 0, "num-partitions": 1}))
    initial = get_workspace(cfg).initial_weights
    ins = FitIns(ndarrays_to_parameters(initial), _fit_config(cfg, server_round=1))

    # Execute: the federated side, through Flower's (de)serialisation.
    res = client.fit(ins)
    federated = parameters_to_ndarrays(res.parameters)
    # The centralised side: a freshly built model in a cleared process cache.
    clear_caches()
    ws = get_workspace(cfg)
    fresh = ws.adapter.get_weights()
    train = centralized_train_data(ws, cfg)
    ws.trainer.train(
        train,
        steps=cfg.train.local_steps,
        lr=cfg.train.lr,
        seed=client_train_seed(cfg.seed, 1, 0),
    )
    centralized = ws.adapter.get_weights()

    # Assert
    assert res.status.code == Code.OK
    assert res.num_examples == len(train) == 320
    for x, y in zip(fresh, initial, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(centralized[1], initial[1])  # B moved from zero
    for x, y in zip(federated, centralized, strict=True):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------- Context.state
def test_context_state_persists_across_client_fn_calls() -> None:
    # Prepare
    cfg = _cfg()
    client_fn = make_client_fn(cfg)
    context = _context({"partition-id": 0, "num-partitions": 2})
    params = ndarrays_to_parameters(get_workspace(cfg).initial_weights)
    ins = FitIns(params, _fit_config(cfg))

    # Execute: Flower builds a new client object for every message.
    first = client_fn(context).fit(ins)
    second = client_fn(context).fit(ins)
    other = client_fn(_context({"partition-id": 0, "num-partitions": 2})).fit(ins)

    # Assert
    assert first.metrics[FIT_CALLS] == 1
    assert second.metrics[FIT_CALLS] == 2
    assert other.metrics[FIT_CALLS] == 1
    assert context.state.config_records[STATE_KEY][FIT_CALLS] == 2


def test_client_fn_without_partition_id_is_a_clear_error() -> None:
    # Prepare
    client_fn = make_client_fn(_cfg())

    # Execute / Assert
    with pytest.raises(ValueError, match=r"no `partition-id` in its node config"):
        client_fn(_context({"num-partitions": 2}))


@pytest.mark.parametrize("pid", [-1, 2, 5])
def test_node_partition_out_of_range_is_a_clear_error(pid: int) -> None:
    # Prepare
    context = _context({"partition-id": pid, "num-partitions": 2})

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"`partition-id`={pid} is outside \[0, "):
        node_partition(context, 2)


def test_node_partition_defaults_to_the_configured_client_count() -> None:
    # Prepare
    context = _context({"partition-id": 3})

    # Execute / Assert
    assert node_partition(context, 10) == (3, 10)


@pytest.mark.parametrize(("value", "expected"), [(3, 3), ("2", 2), (None, None)])
def test_node_threads_reads_the_node_config(value: Any, expected: int | None) -> None:
    # Prepare
    node: dict[str, Any] = {"partition-id": 0}
    if value is not None:
        node["num-threads"] = value

    # Execute / Assert
    assert node_threads(_context(node)) == expected


@pytest.mark.parametrize("value", [0, -2, "two", 1.5, True])
def test_node_threads_refuses_what_is_not_a_positive_integer(value: Any) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="`num-threads`=.* should be a positive"):
        node_threads(_context({"partition-id": 0, "num-threads": value}))


def test_client_fn_gives_the_node_its_thread_count() -> None:
    # Prepare
    client_fn = make_client_fn(_cfg())

    # Execute
    client = client_fn(_context({"partition-id": 1, "num-threads": 1}))

    # Assert: the trainer of this client runs torch with one thread.
    numpy_client = client.numpy_client  # type: ignore[attr-defined]
    assert numpy_client.cfg.compute.num_threads == 1


def test_client_fn_reads_the_run_config_without_a_closure() -> None:
    # Prepare: what `flwr run` hands the app.
    cfg = dataclasses.replace(_cfg(), name="from-run-config")
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 1, "num-partitions": 2},
        state=RecordDict(),
        run_config=cfg.to_flat(),
    )
    params = ndarrays_to_parameters(get_workspace(cfg).initial_weights)

    # Execute
    res = make_client_fn()(context).fit(FitIns(params, _fit_config(cfg)))

    # Assert
    assert res.metrics[PARTITION_ID] == 1
    assert res.metrics[NUM_STEPS] == cfg.train.local_steps


# --------------------------------------------------------------- compression
@pytest.mark.parametrize("rule_name", ["fedit", "ffa", "flora", "fedsa", "rolora"])
def test_a_compressed_reply_decodes_against_the_servers_start(rule_name: str) -> None:
    # Prepare: the same call plain and int8-coded (fit is deterministic).
    cfg = _cfg()
    ws = get_workspace(cfg)
    rule = get_rule(rule_name)(layout_of(ws.adapter), ws.initial, cfg.lora.scaling)
    state = rule.init_state()
    plan = rule.plan(state, ClientInfo(0, R, 0), 1)
    payload, config = rule.payload(state, plan), _fit_config(cfg, 1, plan)
    spec = rule.reply_spec(plan)
    start = rule.start_arrays(state, plan)
    reference = [start[n] if n in start else np.zeros(s, np.float32) for n, s in spec]

    # Execute
    plain, _, _ = LoRAClient(cfg, 0, 2).fit(payload, config)
    coded, _, _ = LoRAClient(cfg, 0, 2).fit(payload, {**config, COMPRESSION: "int8"})
    got = decode_reply("int8", coded, reference)

    # Assert: the client coded against exactly the server's start (CRC), and the
    # decoded reply is the plain one within int8's half step per tensor.
    assert [a.dtype for a in coded] == [np.uint32, np.float32, np.int8]
    for (name, _), g, want, ref in zip(spec, got, plain, reference, strict=True):
        step = float(np.abs(want - ref).max()) / 127
        assert np.abs(g - want).max() <= step / 2 * 1.001 + 1e-7, name


def test_topk_error_feedback_lives_in_the_nodes_context_state() -> None:
    # Prepare: one node, two rounds from the same start; plain replies to compare.
    cfg = _cfg()
    start = get_workspace(cfg).initial_weights
    config = {**_fit_config(cfg), COMPRESSION: "topk", TOPK_FRACTION: 0.05}
    plain, _, _ = LoRAClient(cfg, 0, 2).fit(start, _fit_config(cfg))
    state = RecordDict()

    # Execute: client_fn builds a new client object every round.
    first, _, _ = LoRAClient(cfg, 0, 2, state).fit(start, config)
    residual1 = ContextStore(state).residual()
    second, _, _ = LoRAClient(cfg, 0, 2, state).fit(start, config)
    residual2 = ContextStore(state).residual()

    # Assert: round 1 sent 5% of the update, the residual holds exactly the rest;
    # round 2 sent the top 5% of (update + residual), and keeps the remainder.
    names = get_workspace(cfg).adapter.weight_names()
    sent1 = decode_reply("topk", first, start, fraction=0.05)
    sent2 = decode_reply("topk", second, start, fraction=0.05)
    total = sum(a.size for a in start)
    assert first[1].size == second[1].size == round(0.05 * total)
    for i, name in enumerate(names):
        update = plain[i] - start[i]
        np.testing.assert_allclose(
            (sent1[i] - start[i]) + residual1[name], update, rtol=0, atol=1e-6
        )
        np.testing.assert_allclose(
            (sent2[i] - start[i]) + residual2[name],
            update + residual1[name],
            rtol=0,
            atol=1e-6,
        )
    assert not np.array_equal(first[1], second[1])  # the residual changed the pick
