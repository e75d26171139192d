"""Secure aggregation (secagg.enabled): config, rule and strategy sides, client checks.

The SecAgg+ protocol itself runs in Flower's workflow and client mod; the
integration test tests/integration/test_secagg_real.py runs it for real and compares
with a plain run. Here: what our code does around it.
"""

from __future__ import annotations

from typing import Any
from unittest.mock import MagicMock

import numpy as np
import pytest
from flwr.common import MessageType, ndarrays_to_parameters, parameters_to_ndarrays
from test_strategy import LAYOUT, _configure, _manager, _res, _strategy

from lora_flwr.aggregation import get_rule
from lora_flwr.config import ExperimentConfig, GuardsConfig, SecAggConfig
from lora_flwr.fl import client_app
from lora_flwr.fl.runner import check_secagg_range
from lora_flwr.fl.strategy import FedLoRA
from lora_flwr.protocol import Plan

# test_strategy's _cfg turns the guards off, as SecAgg+ requires.
SECAGG: dict[str, Any] = {"secagg": {"enabled": True}}

PLAIN_SUM_RULES = ("fedit", "ffa", "fedsa", "rolora", "fedsvd", "hetlora")


# -------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({}, "guards.norm_guard"),  # defaults: the norm guard is on
        ({"guards": {"norm_guard": "off"}}, "guards.weight_cap"),
        (
            {
                "guards": {"norm_guard": "off", "weight_cap": 0.0},
                "sampling": {"min_clients": 1},
            },
            "sampling.min_clients",
        ),
        (
            {
                "guards": {
                    "norm_guard": "off",
                    "weight_cap": 0.0,
                    "max_update_norm": 5.0,
                }
            },
            "guards.max_update_norm",
        ),
        (
            {"guards": {"norm_guard": "off", "weight_cap": 0.0, "robust": "median"}},
            "guards.robust",
        ),
        (
            {
                "guards": {"norm_guard": "off", "weight_cap": 0.0},
                "privacy": {"noise_multiplier": 1.0},
            },
            "privacy.noise_multiplier",
        ),
        (
            {
                "guards": {"norm_guard": "off", "weight_cap": 0.0},
                "compression": {"codec": "int8"},
            },
            "compression.codec",
        ),
        (
            {
                "guards": {"norm_guard": "off", "weight_cap": 0.0},
                "compression": {"codec": "topk"},
            },
            "compression.codec",
        ),
    ],
)
def test_secagg_refuses_server_side_checks_it_makes_impossible(
    sections: dict[str, dict[str, Any]], key: str
) -> None:
    # Prepare / Execute / Assert: one line naming the key and saying why.
    with pytest.raises(ValueError, match=rf"`{key}.*secagg.enabled = true"):
        ExperimentConfig.from_dict({"secagg": {"enabled": True}, **sections})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("clip", 0.0),
        ("max_weight", 0.5),
        ("shares", 0.0),
        ("shares", 1.5),
        ("threshold", 0.0),
    ],
)
def test_secagg_settings_are_checked(key: str, value: float) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=f"`secagg.{key}`"):
        SecAggConfig(**{key: value})


def test_a_secagg_config_round_trips_through_the_run_config() -> None:
    # Prepare
    cfg = ExperimentConfig(
        guards=GuardsConfig(norm_guard="off", weight_cap=0.0),
        secagg=SecAggConfig(enabled=True, clip=0.5),
    )

    # Execute
    back = ExperimentConfig.from_flat(cfg.to_flat())

    # Assert
    assert back.secagg.enabled is True
    assert back.secagg.clip == 0.5


# --------------------------------------------------------------------- rules
@pytest.mark.parametrize("name", ["fedex", "flora", "flexlora"])
def test_rules_that_need_each_reply_refuse_secagg(name: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=f"`secagg.enabled` = true cannot be.*{name}"):
        get_rule(name).check_setup(rank_tiers=(), server_optimizer="none", secagg=True)


def test_secagg_refuses_rank_tiers() -> None:
    # Prepare / Execute / Assert: SecAgg+ sums equally shaped vectors.
    with pytest.raises(ValueError, match="needs one rank for every client"):
        get_rule("hetlora").check_setup(
            rank_tiers=(4, 8), server_optimizer="none", secagg=True
        )


@pytest.mark.parametrize("name", PLAIN_SUM_RULES)
def test_plain_sum_rules_accept_secagg(name: str) -> None:
    # Prepare / Execute / Assert: no exception.
    get_rule(name).check_setup(rank_tiers=(), server_optimizer="none", secagg=True)


# ------------------------------------------------------------------ strategy
def _replies(
    strategy: FedLoRA, sent: dict[int, tuple[Any, Any]]
) -> list[tuple[Any, list[np.ndarray]]]:
    """Each sampled client's reply for its own plan: random values per client."""
    rng = np.random.default_rng(7)
    out = []
    for pid in sorted(sent):
        proxy, ins = sent[pid]
        spec = strategy.rule.reply_spec(Plan.from_config(ins.config))
        out.append((proxy, [rng.normal(size=s).astype(np.float32) for _, s in spec]))
    return out


@pytest.mark.parametrize("rule", PLAIN_SUM_RULES)
def test_the_unmasked_mean_gives_the_global_of_the_plain_run(rule: str) -> None:
    # Prepare: the same replies, once per client (plain) and once as Flower's
    # SecAgg+ workflow hands them over: every result carries the float64
    # example-weighted mean.
    counts = [3, 5, 8, 2]
    plain = _strategy(fed={"aggregation": rule})
    secure = _strategy(fed={"aggregation": rule}, **SECAGG)
    sent_plain = _configure(plain, _manager())
    sent_secure = _configure(secure, _manager())
    replies = _replies(plain, sent_plain)
    plain_results = [
        (proxy, _res(arrays, counts[i], pid=i))
        for i, (proxy, arrays) in enumerate(replies)
    ]
    weights = np.array(counts, np.float64) / sum(counts)
    mean = [
        sum(
            w * a[j].astype(np.float64)
            for w, (_, a) in zip(weights, replies, strict=True)
        )
        for j in range(len(replies[0][1]))
    ]
    masked = ndarrays_to_parameters(mean)
    secure_results = []
    for i, pid in enumerate(sorted(sent_secure)):
        res = _res([], counts[i], pid=i)
        res.parameters = masked
        secure_results.append((sent_secure[pid][0], res))

    # Execute
    p_plain, _ = plain.aggregate_fit(1, plain_results, [])
    p_secure, metrics = secure.aggregate_fit(1, secure_results, [])

    # Assert: equal up to float32 rounding of the mean; all four counted.
    assert p_plain is not None and p_secure is not None
    for a, b in zip(
        parameters_to_ndarrays(p_plain), parameters_to_ndarrays(p_secure), strict=True
    ):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert metrics["fit_ok"] == 4
    assert "bytes_up" not in metrics  # masked uploads are not visible here
    assert "agg_error" not in metrics


def test_an_invalid_reply_inside_the_sum_keeps_the_global() -> None:
    # Prepare: one client reports a non-integer example count; its masked
    # vector is already inside the sum and cannot be taken out.
    strategy = _strategy(**SECAGG)
    sent = _configure(strategy, _manager())
    before = {n: a.copy() for n, a in strategy.global_arrays().items()}
    masked = ndarrays_to_parameters([np.ones(s, np.float64) for _, s in LAYOUT.items()])
    results = []
    for i, pid in enumerate(sorted(sent)):
        res = _res([], 0 if i == 2 else 4, pid=i)
        res.parameters = masked
        results.append((sent[pid][0], res))

    # Execute
    params, _ = strategy.aggregate_fit(1, results, [])

    # Assert
    assert params is None
    for name, value in strategy.global_arrays().items():
        np.testing.assert_array_equal(value, before[name])


def test_per_client_parameters_mean_the_workflow_did_not_run() -> None:
    # Prepare: results as a plain fit round delivers them.
    strategy = _strategy(**SECAGG)
    sent = _configure(strategy, _manager())
    results = [
        (
            sent[pid][0],
            _res([np.full(s, float(i), np.float32) for _, s in LAYOUT.items()], 4),
        )
        for i, pid in enumerate(sorted(sent))
    ]

    # Execute / Assert: never silently treated as a secure aggregate.
    with pytest.raises(RuntimeError, match="SecAgg\\+ workflow did not run"):
        strategy.aggregate_fit(1, results, [])


# -------------------------------------------------------------------- client
def test_values_within_the_range_pass() -> None:
    # Prepare / Execute / Assert: 1.9 x 900/1000 = 1.71 <= 2.
    check_secagg_range([np.array([1.9, -0.5], np.float32)], 900, 2.0, 1000.0)


@pytest.mark.parametrize(
    ("value", "n", "match"),
    [
        (2.5, 900, r"magnitude 2\.5 x weight 0\.9 exceeds secagg.clip=2"),
        (0.1, 1001, "1001 training examples, more than secagg.max_weight=1000"),
        (float("nan"), 10, "exceeds secagg.clip"),
    ],
)
def test_a_value_secagg_would_clip_is_refused(value: float, n: int, match: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=match):
        check_secagg_range([np.array([value, 0.0], np.float32)], n, 2.0, 1000.0)


@pytest.mark.parametrize("secagg", [False, True])
def test_the_client_mod_runs_secagg_only_when_the_run_asks(
    secagg: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    calls: list[str] = []
    monkeypatch.setattr(
        client_app,
        "secaggplus_mod",
        lambda msg, ctx, nxt: calls.append("secagg") or nxt(msg, ctx),
    )
    cfg = ExperimentConfig(
        guards=GuardsConfig(norm_guard="off", weight_cap=0.0),
        secagg=SecAggConfig(enabled=secagg),
    )
    mod = client_app.make_secagg_mod(cfg)
    msg = MagicMock()
    msg.metadata.message_type = MessageType.TRAIN

    # Execute
    out = mod(msg, MagicMock(), lambda m, c: calls.append("client") or m)

    # Assert
    assert out is msg
    assert calls == (["secagg", "client"] if secagg else ["client"])


def test_the_client_mod_reads_secagg_from_the_run_config() -> None:
    # Prepare: the deployed app has no closure config; a plain run's messages
    # must reach the client untouched.
    mod = client_app.make_secagg_mod(None)
    context = MagicMock()
    context.run_config = ExperimentConfig().to_flat()
    seen = []

    # Execute
    mod("message", context, lambda m, c: seen.append(m) or m)

    # Assert
    assert seen == ["message"]
