"""FedLoRA: reply validation, weighted aggregation, bytes, instructions, cadence."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import numpy as np
import pytest
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager

from lora_flwr.config import ExperimentConfig, FedConfig, TrainConfig
from lora_flwr.fl.client import LOCAL_STEPS, LR, PARTITION_ID, ROUND
from lora_flwr.fl.strategy import FedLoRA, parameters_nbytes

NAMES = ["q.lora_A.weight", "q.lora_B.weight", "classifier.bias"]
SHAPES = [(2, 3), (4, 2), (2,)]


def _cfg(**fed: Any) -> ExperimentConfig:
    fed_cfg: dict[str, Any] = {
        "num_rounds": 3,
        "num_clients": 4,
        "min_fit_clients": 2,
        "min_evaluate_clients": 2,
        "min_available_clients": 2,
    }
    fed_cfg.update(fed)
    return ExperimentConfig(
        train=TrainConfig(lr=0.01, local_steps=7), fed=FedConfig(**fed_cfg)
    )


def _initial() -> list[np.ndarray]:
    return [np.zeros(s, np.float32) for s in SHAPES]


def _arrays(value: float) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


def _strategy(**fed: Any) -> FedLoRA:
    return FedLoRA(cfg=_cfg(**fed), initial_arrays=_initial(), names=NAMES)


def _proxy(cid: str) -> MagicMock:
    proxy = MagicMock()
    proxy.cid = cid
    return proxy


def _reply(
    cid: str, arrays: list[Any], num_examples: int, pid: int = 0
) -> tuple[Any, FitRes]:
    res = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=num_examples,
        metrics={"train_loss": 1.0 + pid, PARTITION_ID: pid},
    )
    return _proxy(cid), res


@pytest.fixture
def flwr_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture the WARNINGs of Flower's logger (it propagates to the root)."""
    caplog.set_level(logging.WARNING, logger="flwr")
    return caplog


# ------------------------------------------------------------- aggregate_fit
def test_aggregate_fit_returns_the_example_weighted_mean() -> None:
    # Prepare: 1, 2 and 5 examples.
    strategy = _strategy()
    results = [
        _reply("a", _arrays(8.0), 1, pid=0),
        _reply("b", _arrays(4.0), 2, pid=1),
        _reply("c", _arrays(-0.8), 5, pid=2),
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert: (8 + 8 - 4) / 8 = 1.5 everywhere.
    assert params is not None
    out = parameters_to_ndarrays(params)
    for got, shape in zip(out, SHAPES, strict=True):
        np.testing.assert_allclose(got, np.full(shape, 1.5, np.float32), rtol=1e-6)
        assert got.dtype == np.float32
    for got, glob in zip(out, strategy.global_arrays, strict=True):
        np.testing.assert_array_equal(got, glob)
    assert metrics["fit_ok"] == 3
    assert metrics["fit_dropped"] == 0
    assert metrics["fit_failed"] == 0
    assert metrics["aggregated"] is True
    # Weighted train loss: (1*1 + 2*2 + 5*3) / 8 = 2.5.
    assert metrics["train_loss"] == pytest.approx(2.5)


def test_aggregate_fit_counts_bytes_up_exactly() -> None:
    # Prepare: one malformed reply; its bytes still arrived.
    strategy = _strategy()
    results = [
        _reply("a", _arrays(1.0), 1),
        _reply("b", _arrays(2.0), 1),
        _reply("c", _arrays(3.0)[:2], 1),
    ]
    expected = sum(len(t) for _, res in results for t in res.parameters.tensors)

    # Execute
    _, metrics = strategy.aggregate_fit(1, results, [])

    # Assert
    assert metrics["bytes_up"] == expected
    assert expected == sum(parameters_nbytes(res.parameters) for _, res in results)
    assert expected > 3 * 4 * sum(int(np.prod(s)) for s in SHAPES[:2])


def _with_bad(bad: list[Any]) -> list[tuple[Any, FitRes]]:
    return [
        _reply("good-1", _arrays(1.0), 1, pid=0),
        _reply("bad", bad, 100, pid=7),
        _reply("good-2", _arrays(4.0), 3, pid=1),
    ]


def _nan_arrays() -> list[np.ndarray]:
    arrays = _arrays(1.0)
    arrays[1][2, 1] = np.nan
    return arrays


def _inf_arrays() -> list[np.ndarray]:
    arrays = _arrays(1.0)
    arrays[2][0] = np.inf
    return arrays


BAD_REPLIES: dict[str, tuple[list[Any], str]] = {
    "wrong_count": (_arrays(9.0)[:2], "2 arrays but the adapter has 3"),
    "wrong_shape": (
        [np.full((3, 2), 9.0, np.float32), *_arrays(9.0)[1:]],
        "q.lora_A.weight: shape (3, 2), expected (2, 3)",
    ),
    "float64": (
        [a.astype(np.float64) for a in _arrays(9.0)],
        "q.lora_A.weight: dtype float64, expected float32",
    ),
    "nan": (_nan_arrays(), "q.lora_B.weight: contains NaN or Inf"),
    "inf": (_inf_arrays(), "classifier.bias: contains NaN or Inf"),
}


@pytest.mark.parametrize("fault", sorted(BAD_REPLIES))
def test_aggregate_fit_drops_a_malformed_reply(
    fault: str, flwr_caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    bad, message = BAD_REPLIES[fault]
    strategy = _strategy()

    # Execute
    params, metrics = strategy.aggregate_fit(2, _with_bad(bad), [])

    # Assert: only the valid replies count: (1*1 + 3*4) / 4 = 3.25.
    assert params is not None
    for got, shape in zip(parameters_to_ndarrays(params), SHAPES, strict=True):
        np.testing.assert_allclose(got, np.full(shape, 3.25, np.float32), rtol=1e-6)
    assert metrics["fit_ok"] == 2
    assert metrics["fit_dropped"] == 1
    assert metrics["train_loss"] == pytest.approx((1 * 1.0 + 3 * 2.0) / 4)
    warnings = [r.getMessage() for r in flwr_caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "round 2: dropped reply of client bad (partition 7)" in warnings[0]
    assert message in warnings[0]


def test_aggregate_fit_drops_a_reply_with_no_examples() -> None:
    # Prepare
    strategy = _strategy()
    results = [
        _reply("a", _arrays(1.0), 1),
        _reply("b", _arrays(50.0), 0),
        _reply("c", _arrays(3.0), 1),
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert
    assert params is not None
    np.testing.assert_array_equal(strategy.global_arrays[0], np.full((2, 3), 2.0))
    assert metrics["fit_dropped"] == 1


def test_aggregate_fit_drops_an_update_above_the_norm_limit() -> None:
    # Prepare: the update of client "big" has norm 100 * sqrt(20) ~ 447.
    strategy = _strategy(max_update_norm=10.0)
    results = [
        _reply("a", _arrays(0.5), 1),
        _reply("big", _arrays(100.0), 1),
        _reply("c", _arrays(1.5), 1),
    ]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, [])

    # Assert
    assert params is not None
    np.testing.assert_array_equal(strategy.global_arrays[1], np.full((4, 2), 1.0))
    assert metrics["fit_dropped"] == 1


def test_aggregate_fit_tolerates_failures(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: one exception and one failed (proxy, FitRes) pair.
    strategy = _strategy()
    results = [_reply("a", _arrays(2.0), 1), _reply("b", _arrays(4.0), 1)]
    failed_pair = _reply("broken", _arrays(0.0), 1)
    failures: list[Any] = [RuntimeError("client crashed"), failed_pair]

    # Execute
    params, metrics = strategy.aggregate_fit(1, results, failures)

    # Assert
    assert params is not None
    np.testing.assert_array_equal(strategy.global_arrays[2], np.full(2, 3.0))
    assert metrics["fit_failed"] == 2
    assert metrics["fit_ok"] == 2
    text = "\n".join(r.getMessage() for r in flwr_caplog.records)
    assert "client crashed" in text
    assert "client broken failed" in text


def test_aggregate_fit_keeps_the_global_on_too_few_valid_replies(
    flwr_caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: min_fit_clients = 2, one valid reply, one NaN reply, one failure.
    strategy = _strategy()
    before = [a.copy() for a in strategy.global_arrays]
    results = [_reply("a", _arrays(2.0), 1), _reply("b", _nan_arrays(), 1)]

    # Execute
    params, metrics = strategy.aggregate_fit(3, results, [RuntimeError("x")])

    # Assert
    assert params is None
    assert metrics == {}
    for got, want in zip(strategy.global_arrays, before, strict=True):
        np.testing.assert_array_equal(got, want)
    text = "\n".join(r.getMessage() for r in flwr_caplog.records)
    assert "round 3: 1 valid replies < fed.min_fit_clients=2" in text


def test_aggregate_fit_with_no_results_keeps_the_global() -> None:
    # Prepare
    strategy = _strategy()

    # Execute
    params, metrics = strategy.aggregate_fit(1, [], [])

    # Assert
    assert (params, metrics) == (None, {})
    for got in strategy.global_arrays:
        assert not got.any()


def test_strategy_rejects_names_that_do_not_match_arrays() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="2 names for 3 arrays"):
        FedLoRA(cfg=_cfg(), initial_arrays=_initial(), names=NAMES[:2])


def test_strategy_rejects_an_unknown_rule() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="'nope'"):
        FedLoRA(cfg=_cfg(aggregation="nope"), initial_arrays=_initial(), names=NAMES)


# ------------------------------------------------------------- configure_fit
def _manager(num: int) -> SimpleClientManager:
    manager = SimpleClientManager()
    for i in range(num):
        assert manager.register(_proxy(f"node-{i}"))
    return manager


def test_initialize_parameters_sends_the_initial_adapter() -> None:
    # Prepare
    strategy = _strategy()

    # Execute
    params = strategy.initialize_parameters(_manager(2))

    # Assert
    assert params is not None
    for got, want in zip(parameters_to_ndarrays(params), _initial(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_configure_fit_sends_round_lr_and_steps() -> None:
    # Prepare: lr 0.01 decayed by 0.5 per round; round 3 -> 0.0025.
    strategy = _strategy(lr_decay=0.5, fraction_fit=0.5)
    params = ndarrays_to_parameters(_arrays(1.0))

    # Execute
    instructions = strategy.configure_fit(3, params, _manager(4))

    # Assert: ceil(0.5 * 4) = 2 distinct clients.
    assert len(instructions) == 2
    assert len({proxy.cid for proxy, _ in instructions}) == 2
    for _, ins in instructions:
        assert ins.config == {ROUND: 3, LR: pytest.approx(0.0025), LOCAL_STEPS: 7}
        assert ins.parameters is params
    assert strategy.round_lr(1) == pytest.approx(0.01)


def test_configure_fit_samples_at_least_min_fit_clients() -> None:
    # Prepare: fraction 0.25 of 4 is 1 client, but min_fit_clients is 3.
    strategy = _strategy(fraction_fit=0.25, min_fit_clients=3)

    # Execute
    instructions = strategy.configure_fit(
        1, ndarrays_to_parameters(_initial()), _manager(4)
    )

    # Assert
    assert len(instructions) == 3


def test_configure_fit_counts_bytes_down() -> None:
    # Prepare
    strategy = _strategy(fraction_fit=0.75)
    params = ndarrays_to_parameters(_arrays(2.0))
    per_client = sum(len(t) for t in params.tensors)

    # Execute
    strategy.configure_fit(1, params, _manager(4))
    _, metrics = strategy.aggregate_fit(
        1, [_reply("a", _arrays(1.0), 1), _reply("b", _arrays(1.0), 1)], []
    )

    # Assert: 3 sampled clients, each sent the whole adapter.
    assert metrics["bytes_down"] == 3 * per_client
    assert metrics["fit_sampled"] == 3
    assert metrics["round"] == 1


def test_configure_fit_omits_steps_when_training_by_epochs() -> None:
    # Prepare
    cfg = ExperimentConfig(
        train=TrainConfig(local_epochs=1.0),
        fed=FedConfig(num_clients=2, min_fit_clients=1, min_available_clients=2),
    )
    strategy = FedLoRA(cfg=cfg, initial_arrays=_initial(), names=NAMES)

    # Execute
    instructions = strategy.configure_fit(
        1, ndarrays_to_parameters(_initial()), _manager(2)
    )

    # Assert
    assert all(LOCAL_STEPS not in ins.config for _, ins in instructions)


# ------------------------------------------------------------------ evaluate
def _evaluating(**fed: Any) -> tuple[FedLoRA, list[int]]:
    calls: list[int] = []

    def evaluate_fn(server_round: int, arrays: list[np.ndarray]) -> dict[str, float]:
        calls.append(server_round)
        return {"loss": 0.5 + server_round, "accuracy": 0.25}

    strategy = FedLoRA(
        cfg=_cfg(**fed), initial_arrays=_initial(), names=NAMES, evaluate_fn=evaluate_fn
    )
    return strategy, calls


@pytest.mark.parametrize(
    ("eval_every", "expected"),
    [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4, 5]), (3, [0, 3, 5]), (0, [0, 5])],
)
def test_evaluate_cadence(eval_every: int, expected: list[int]) -> None:
    # Prepare
    strategy, calls = _evaluating(num_rounds=5, eval_every=eval_every)
    params = ndarrays_to_parameters(_initial())

    # Execute
    results = {rnd: strategy.evaluate(rnd, params) for rnd in range(6)}

    # Assert
    assert calls == expected
    assert [rnd for rnd, res in results.items() if res is not None] == expected
    assert results[0] == (0.5, {"loss": 0.5, "accuracy": 0.25})


def test_evaluate_without_evaluate_fn_returns_none() -> None:
    # Prepare
    strategy = _strategy()

    # Execute / Assert
    assert strategy.evaluate(0, ndarrays_to_parameters(_initial())) is None


def test_round_record_holds_test_and_fit_metrics() -> None:
    # Prepare: no federated evaluation, so configure_evaluate closes the round.
    records: list[dict[str, Any]] = []
    strategy, _ = _evaluating(num_rounds=1)
    strategy.on_round_end = lambda rec, arrays: records.append(dict(rec))
    manager = _manager(2)
    params = ndarrays_to_parameters(_initial())

    # Execute
    strategy.evaluate(0, params)
    strategy.configure_fit(1, params, manager)
    new, _ = strategy.aggregate_fit(
        1, [_reply("a", _arrays(1.0), 1), _reply("b", _arrays(3.0), 1)], []
    )
    assert new is not None
    strategy.evaluate(1, new)
    assert strategy.configure_evaluate(1, new, manager) == []

    # Assert
    assert [r["round"] for r in records] == [0, 1]
    assert records[0]["test_loss"] == 0.5
    assert records[1]["test_loss"] == 1.5
    assert records[1]["test_accuracy"] == 0.25
    assert records[1]["fit_ok"] == 2
    assert strategy.history == records


def test_aggregate_evaluate_weights_loss_and_accuracy() -> None:
    # Prepare
    strategy = _strategy(fraction_evaluate=1.0)
    results: list[tuple[Any, EvaluateRes]] = [
        (_proxy("a"), EvaluateRes(Status(Code.OK, ""), 1.0, 1, {"accuracy": 1.0})),
        (_proxy("b"), EvaluateRes(Status(Code.OK, ""), 2.0, 3, {"accuracy": 0.0})),
        (_proxy("c"), EvaluateRes(Status(Code.OK, ""), 0.0, 0, {})),
    ]

    # Execute
    loss, metrics = strategy.aggregate_evaluate(1, results, [])

    # Assert
    assert loss == pytest.approx(1.75)
    assert metrics == {"fed_loss": pytest.approx(1.75), "fed_accuracy": 0.25}


def test_parameters_nbytes_sums_tensor_lengths() -> None:
    # Prepare
    params = Parameters(tensors=[b"abc", b"", b"12345"], tensor_type="numpy.ndarray")

    # Execute / Assert
    assert parameters_nbytes(params) == 8


# ------------------------------------- run_simulation.py: bad configs fail early
REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"


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
            "`fed.aggregation` should be one of ['fedit'] but the value passed is "
            "'nope'",
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
