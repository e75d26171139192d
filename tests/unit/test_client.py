"""LoRAClient: what travels, shared per-process model, Context.state, exactness."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from flwr.common import (
    Code,
    Context,
    FitIns,
    RecordDict,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from lora_flwr.config import (
    DataConfig,
    ExperimentConfig,
    FedConfig,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)
from lora_flwr.data import client_data
from lora_flwr.experiment import (
    centralized_train_data,
    clear_caches,
    get_workspace,
)
from lora_flwr.fl.client import (
    FIT_CALLS,
    LOCAL_STEPS,
    LR,
    PARTITION_ID,
    ROUND,
    LoRAClient,
    client_train_seed,
    make_client_fn,
    node_partition,
)
from lora_flwr.models import model_load_count
from lora_flwr.training import NUM_STEPS, NUM_TOKENS, SECONDS, TRAIN_LOSS


def _cfg(
    *, num_clients: int = 2, local_test_fraction: float = 0.1, local_steps: int = 3
) -> ExperimentConfig:
    return ExperimentConfig(
        name="client-test",
        seed=3,
        model=ModelConfig(name="tiny-bert", max_length=32),
        lora=LoraConfig(
            r=4,
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
        fed=FedConfig(
            num_clients=num_clients,
            min_fit_clients=1,
            min_evaluate_clients=1,
            min_available_clients=1,
        ),
    )


def _context(node_config: dict[str, Any]) -> Context:
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={}
    )


def _fit_config(cfg: ExperimentConfig, server_round: int = 1) -> dict[str, Any]:
    return {ROUND: server_round, LR: cfg.train.lr, LOCAL_STEPS: cfg.train.local_steps}


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
    } <= set(metrics)
    assert all(
        isinstance(v, bool | bytes | float | int | str) for v in metrics.values()
    )
    assert metrics[NUM_STEPS] == cfg.train.local_steps
    assert metrics[PARTITION_ID] == 1
    assert metrics[FIT_CALLS] == 1
    assert 0.0 < float(metrics[TRAIN_LOSS]) < 5.0
    # 3 steps of 8 examples, each at least [CLS] x [SEP].
    assert int(metrics[NUM_TOKENS]) >= 3 * 8 * 3


def test_fit_follows_the_instructions() -> None:
    # Prepare
    cfg = _cfg()
    client = LoRAClient(cfg, 0, 2)
    start = client.ws.initial_weights

    # Execute
    _, _, metrics = client.fit(start, {ROUND: 2, LR: 1e-3, LOCAL_STEPS: 2})
    _, _, defaults = client.fit(start, {})

    # Assert
    assert metrics[NUM_STEPS] == 2
    assert defaults[NUM_STEPS] == cfg.train.local_steps


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
        "count": (start[:-1], "Expected 10 adapter arrays"),
        "shape": (
            wrong_shape,
            r"bert\.encoder\.layer\.0\.attention\.self\.value\.lora_A\.weight: shape "
            r"\(5, 5\)",
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
    # Prepare
    cfg = _cfg()
    client = LoRAClient(cfg, 0, 2)
    start = client.ws.initial_weights
    parameters, message = _malformed(start)[fault]
    before = client.get_parameters({})

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        client.fit(parameters, _fit_config(cfg))
    # The rejected call changed nothing.
    for got, want in zip(client.get_parameters({}), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_evaluate_reports_local_test_metrics() -> None:
    # Prepare
    cfg = _cfg()
    client = LoRAClient(cfg, 0, 2)
    start = client.ws.initial_weights

    # Execute
    loss, num_examples, metrics = client.evaluate(start, {ROUND: 1})

    # Assert: two balanced-ish classes and a fresh head: loss near ln 2.
    assert num_examples == len(client.test_data) > 0
    assert 0.5 < loss < 1.0
    assert set(metrics) == {PARTITION_ID, "accuracy"}
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_evaluate_without_local_test_data_reports_nothing() -> None:
    # Prepare
    client = LoRAClient(_cfg(local_test_fraction=0.0), 1, 2)

    # Execute
    result = client.evaluate(client.get_parameters({}), {})

    # Assert
    assert result == (0.0, 0, {PARTITION_ID: 1})


# ---------------------------------------------------- one model per process
def test_clients_share_one_model_per_process() -> None:
    # Prepare: an empty process cache, then one client builds the model.
    clear_caches()
    cfg = _cfg()
    before = model_load_count()
    first = LoRAClient(cfg, 0, 2)
    loads = model_load_count()
    start = first.ws.initial_weights

    # Execute: another partition, then fits over two rounds on both.
    second = LoRAClient(cfg, 1, 2)
    for rnd in (1, 2):
        for client in (first, second):
            client.fit(start, _fit_config(cfg, rnd))

    # Assert
    assert loads == before + 1
    assert model_load_count() == loads
    assert second.ws is first.ws
    assert second.ws.bundle.model is first.ws.bundle.model
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
    assert context.state.config_records["lora_flwr"][FIT_CALLS] == 2


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
