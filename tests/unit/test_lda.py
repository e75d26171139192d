"""The server-fitted LDA head (head.calibration = 'lda'): maths, wire, strategy."""

from __future__ import annotations

import dataclasses
from typing import Any
from unittest.mock import MagicMock

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, Status, parameters_to_ndarrays
from hypothesis import given, settings
from hypothesis import strategies as st
from test_strategy import R, _cfg, _manager, _node

from lora_flwr.aggregation.lda import (
    ClassStats,
    class_stats,
    decode_stats,
    encode_stats,
    head_weight_names,
    lda_head,
    merge_stats,
    stats_sample,
)
from lora_flwr.config import (
    HEAD_CALIBRATIONS,
    ExperimentConfig,
    HeadConfig,
    LoraConfig,
)
from lora_flwr.fl.strategy import FedLoRA
from lora_flwr.protocol import BASE_VERSION, HEAD_STATS, AdapterLayout, group_of

D = 4  # feature dimension of the test head
LDA_LAYOUT = AdapterLayout(
    ("q.lora_A.weight", "q.lora_B.weight", "classifier.weight", "classifier.bias"),
    ((R, 3), (4, R), (2, D), (2,)),
)
OK = Status(code=Code.OK, message="ok")


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes in D dimensions with a shared covariance."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    mix = rng.normal(size=(D, D))
    x = rng.normal(size=(n, D)) @ mix + np.where(y[:, None] == 1, 1.0, -0.5)
    return x, y


# --------------------------------------------------------------------- maths
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=8, max_value=60),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=4),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_summed_client_statistics_equal_the_pooled_ones(
    n: int, cuts: list[int], seed: int
) -> None:
    # Prepare: the examples split among clients at arbitrary points (some empty).
    x, y = _data(n, seed)
    bounds = [0, *sorted(min(c, n) for c in cuts), n]

    # Execute
    parts = [
        class_stats(x[a:b], y[a:b], 2) for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    merged = merge_stats(parts)
    pooled = class_stats(x, y, 2)

    # Assert: the sums, hence the head, are those of one party holding everything.
    np.testing.assert_allclose(merged.counts, pooled.counts)
    np.testing.assert_allclose(merged.sums, pooled.sums, atol=1e-9)
    np.testing.assert_allclose(merged.scatter, pooled.scatter, atol=1e-9)
    if min(pooled.counts) > 0:
        w1, b1 = lda_head(merged)
        w2, b2 = lda_head(pooled)
        np.testing.assert_allclose(w1, w2, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b1, b2, rtol=1e-6, atol=1e-6)


def test_the_head_is_the_textbook_discriminant() -> None:
    # Prepare
    x, y = _data(500)

    # Execute
    weight, bias = lda_head(class_stats(x, y, 2), shrinkage=0.0)

    # Assert: against the formula computed directly from the examples.
    mu = np.stack([x[y == c].mean(0) for c in (0, 1)])
    centred = x - mu[y]
    sigma = centred.T @ centred / (len(x) - 2)
    want_w = np.linalg.solve(sigma, mu.T).T
    prior = np.bincount(y) / len(y)
    want_b = -0.5 * np.einsum("cd,cd->c", want_w, mu) + np.log(prior)
    # The same logits up to a term common to both classes: same posterior.
    np.testing.assert_allclose(weight[1] - weight[0], want_w[1] - want_w[0], rtol=1e-8)
    np.testing.assert_allclose(bias[1] - bias[0], want_b[1] - want_b[0], rtol=1e-8)
    logits, want = x @ weight.T + bias, x @ want_w.T + want_b
    np.testing.assert_allclose(
        logits[:, 1] - logits[:, 0], want[:, 1] - want[:, 0], rtol=1e-6, atol=1e-9
    )


def test_a_common_offset_in_a_quiet_direction_does_not_blow_up_the_head() -> None:
    # Prepare: features far from zero along directions of tiny variance (as the
    # saturated tanh units of a pooler are): there the textbook head's common
    # terms m^T Sigma^-1 m are huge, and cancel in float32 logits.
    x, y = _data(400)
    rng = np.random.default_rng(2)
    quiet = 0.99 + 1e-5 * rng.normal(size=(len(x), 40))
    feats = np.concatenate([x, quiet], axis=1)
    stats = class_stats(feats, y, 2)

    # Execute
    weight, bias = lda_head(stats, shrinkage=1e-6)

    # Assert: the head stays on the scale of the class differences and predicts
    # what the textbook head predicts.
    assert np.abs(weight).max() < 1e3 and np.abs(bias).max() < 1e3
    mu = stats.sums / stats.counts[:, None]
    textbook = np.linalg.solve(
        np.cov((feats - mu[y]).T)
        + 1e-6 * np.trace(np.cov((feats - mu[y]).T)) / 44 * np.eye(44),
        mu.T,
    ).T
    assert np.abs(textbook).max() > 1e4
    logits = feats @ weight.T + bias
    assert ((logits.argmax(1) == y).mean()) > 0.8


def test_the_head_approaches_the_bayes_classifier() -> None:
    # Prepare: known means, covariance and prior; many samples.
    rng = np.random.default_rng(1)
    mu = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 0.0]])
    sigma = np.diag([1.0, 2.0, 0.5, 1.0])
    y = (rng.random(200_000) < 0.25).astype(np.int64)
    x = mu[y] + rng.normal(size=(len(y), D)) * np.sqrt(np.diag(sigma))

    # Execute
    weight, bias = lda_head(class_stats(x, y, 2), shrinkage=0.0)

    # Assert: the log-odds direction and offset of the true model.
    true_w = np.linalg.solve(sigma, mu[1] - mu[0])
    true_b = -0.5 * (mu[1] @ np.linalg.solve(sigma, mu[1])) + np.log(0.25 / 0.75)
    np.testing.assert_allclose(weight[1] - weight[0], true_w, atol=0.03)
    assert abs((bias[1] - bias[0]) - true_b) < 0.03


def test_shrinkage_pulls_the_covariance_toward_a_scaled_identity() -> None:
    # Prepare: collinear features: the plain covariance is singular.
    x, y = _data(50)
    x = np.concatenate([x, x[:, :1]], axis=1)
    stats = class_stats(x, y, 2)

    # Execute / Assert
    with pytest.raises(ValueError, match="lda_shrinkage"):
        lda_head(stats, shrinkage=0.0)
    weight, bias = lda_head(stats, shrinkage=1e-3)
    assert np.isfinite(weight).all() and np.isfinite(bias).all()


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ([10, 0], r"class\(es\) \[1\] have no examples"),
        ([1, 1], "more examples than classes"),
    ],
)
def test_lda_refuses_statistics_it_cannot_fit(counts: list[int], match: str) -> None:
    stats = ClassStats(np.array(counts, float), np.ones((2, D)), np.eye(D))
    with pytest.raises(ValueError, match=match):
        lda_head(stats)


def test_lda_refuses_negative_shrinkage() -> None:
    x, y = _data(20)
    with pytest.raises(ValueError, match="shrinkage"):
        lda_head(class_stats(x, y, 2), shrinkage=-1.0)


def test_class_stats_refuses_bad_input() -> None:
    x, y = _data(10)
    with pytest.raises(ValueError, match="labels should lie"):
        class_stats(x, y + 1, 2)
    with pytest.raises(ValueError, match="NaN"):
        class_stats(np.full_like(x, np.nan), y, 2)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        class_stats(x, y[:-1], 2)


def test_a_stratified_sample_keeps_every_class_and_about_cap_examples() -> None:
    # Prepare: 1,000 examples, one class rare.
    y = np.array([0] * 990 + [1] * 10)

    # Execute
    keep = stats_sample(y, 100, seed=3)

    # Assert: 99 of class 0, and the rare class keeps one; cap >= n keeps all.
    assert np.bincount(y[keep]).tolist() == [99, 1]
    assert len(set(keep.tolist())) == len(keep)
    np.testing.assert_array_equal(stats_sample(y, 1000, 0), np.arange(1000))
    np.testing.assert_array_equal(stats_sample(y, 0, 0), np.arange(1000))


def test_sampled_statistics_are_unbiased_with_exact_counts() -> None:
    # Prepare
    x, y = _data(300, seed=5)
    full = class_stats(x, y, 2)
    counts = np.bincount(y, minlength=2)

    # Execute: the mean of the scaled estimates over many draws.
    draws = []
    for seed in range(400):
        keep = stats_sample(y, 60, seed)
        draws.append(class_stats(x[keep], y[keep], 2, counts=counts))

    # Assert: counts exact every time; sums and scatter right on average.
    assert all(np.array_equal(d.counts, counts) for d in draws)
    mean_sums = np.mean([d.sums for d in draws], axis=0)
    mean_scatter = np.mean([d.scatter for d in draws], axis=0)
    scale = np.abs(full.sums).max()
    np.testing.assert_allclose(mean_sums, full.sums, atol=0.05 * scale)
    np.testing.assert_allclose(
        mean_scatter, full.scatter, atol=0.05 * np.abs(full.scatter).max()
    )


def test_class_stats_refuses_counts_the_sample_contradicts() -> None:
    x, y = _data(20)
    with pytest.raises(ValueError, match="at least the sample"):
        class_stats(x, y, 2, counts=[1, 1])
    with pytest.raises(ValueError, match="misses a class"):
        class_stats(x[y == 0], y[y == 0], 2, counts=[30, 5])


# ---------------------------------------------------------------------- wire
def test_statistics_survive_the_wire_exactly() -> None:
    x, y = _data(30)
    stats = class_stats(x, y, 2)
    back = decode_stats(encode_stats(stats), 2, D)
    np.testing.assert_array_equal(back.counts, stats.counts)
    np.testing.assert_array_equal(back.sums, stats.sums)
    # The upper triangle travels; the lower is its mirror.
    np.testing.assert_array_equal(np.triu(back.scatter), np.triu(stats.scatter))
    np.testing.assert_array_equal(back.scatter, back.scatter.T)


def _encoded(**change: Any) -> bytes:
    x, y = _data(30)
    stats = class_stats(x, y, 2)
    return encode_stats(dataclasses.replace(stats, **change))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ("not bytes", "should be bytes"),
        (b"garbage", "unreadable"),
        (_encoded(sums=np.ones((3, D))), r"`sums` has shape \(3, 4\)"),
        (_encoded(counts=np.array([np.nan, 3.0])), "`counts` contains NaN"),
        (_encoded(counts=np.array([-1.0, 31.0])), "non-negative integers"),
        (_encoded(counts=np.array([0.5, 29.5])), "non-negative integers"),
        (_encoded(scatter=-np.eye(D)), "negative diagonal"),
        (_encoded(scatter=np.zeros((D, D))), "negative eigenvalue"),
        (_encoded(counts=np.array([0.0, 30.0])), "no examples has non-zero sums"),
    ],
)
def test_malformed_statistics_are_refused(payload: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_stats(payload, 2, D)


def test_the_head_layer_is_found_by_its_shape() -> None:
    names = ["q.lora_A.weight", "classifier.dense.weight", "classifier.dense.bias"]
    names += ["classifier.out_proj.weight", "classifier.out_proj.bias"]
    shapes = [(2, 3), (D, D), (D,), (2, D), (2,)]
    assert head_weight_names(names, shapes, 2) == (
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    )
    with pytest.raises(ValueError, match="exactly one saved linear layer"):
        head_weight_names(names[:3], shapes[:3], 2)


# ------------------------------------------------------------------- config
def test_the_config_lists_the_calibrations() -> None:
    assert HEAD_CALIBRATIONS == ("none", "lda")


LDA = {"calibration": "lda"}


@pytest.mark.parametrize(
    ("sections", "match"),
    [
        ({"head": {"calibration": "bayes"}}, "head.calibration"),
        ({"head": {**LDA, "mode": "local"}}, "head.mode"),
        ({"head": {**LDA, "mode": "reinit"}}, "head.mode"),
        ({"head": LDA, "secagg": {"enabled": True}}, "secagg"),
        ({"head": LDA, "privacy": {"noise_multiplier": 1.0}}, "privacy"),
        ({"head": LDA, "guards": {"robust": "median"}}, "guards.robust"),
        ({"head": {"lda_shrinkage": -0.1}}, "head.lda_shrinkage"),
        ({"head": {"lda_every": 0}}, "head.lda_every"),
        ({"head": {"lda_max_examples": -1}}, "head.lda_max_examples"),
    ],
)
def test_config_refuses_a_calibration_that_cannot_work(
    sections: dict[str, dict[str, Any]], match: str
) -> None:
    # A head to refit, so that only the setting under test is refused.
    with pytest.raises(ValueError, match=match):
        ExperimentConfig.from_dict(
            {"lora": {"modules_to_save": ["classifier"]}, **sections}
        )


def test_config_refuses_lda_without_a_head() -> None:
    with pytest.raises(ValueError, match="modules_to_save is empty"):
        ExperimentConfig(
            lora=LoraConfig(modules_to_save=()),
            head=HeadConfig(calibration="lda"),
        )


# ----------------------------------------------------------------- strategy
def _lda_strategy(**sections: dict[str, Any]) -> FedLoRA:
    cfg = _cfg(**sections)
    cfg = dataclasses.replace(
        cfg,
        lora=dataclasses.replace(cfg.lora, modules_to_save=("classifier",)),
        head=dataclasses.replace(cfg.head, calibration="lda"),
    )
    rng = np.random.default_rng(0)
    initial = {
        n: rng.normal(size=s).astype(np.float32)
        if group_of(n) != "B"
        else np.zeros(s, np.float32)
        for n, s in LDA_LAYOUT.items()
    }
    return FedLoRA(cfg=cfg, layout=LDA_LAYOUT, initial=initial)


def _stats_node(cid: str, pid: int, reply: Any) -> MagicMock:
    """A node that answers a head_stats instruction with ``reply``."""
    node = _node(cid, pid)

    def evaluate(ins: Any, timeout: Any, group_id: Any) -> EvaluateRes:
        assert ins.config[HEAD_STATS] is True
        if isinstance(reply, BaseException):
            raise reply
        return reply

    node.evaluate.side_effect = evaluate
    return node


def _stats_res(stats: ClassStats, num: int | None = None) -> EvaluateRes:
    return EvaluateRes(
        status=OK,
        loss=0.0,
        num_examples=stats.total if num is None else num,
        metrics={HEAD_STATS: encode_stats(stats), BASE_VERSION: 0},
    )


def test_the_server_sets_the_head_to_the_lda_of_all_clients() -> None:
    # Prepare: four clients with skewed shares of one pool.
    x, y = _data(200)
    order = np.argsort(y, kind="stable")  # client 0 all class 0, client 3 mostly 1
    shares = np.array_split(order, 4)
    parts = [class_stats(x[i], y[i], 2) for i in shares]
    nodes = [_stats_node(f"n{k}", k, _stats_res(p)) for k, p in enumerate(parts)]
    strategy = _lda_strategy(sampling={"min_available": 4})
    manager = _manager(*nodes)
    strategy.initialize_parameters(manager)
    before = strategy.global_arrays()

    # Execute: the round-0 evaluation refits before anything trains.
    strategy.evaluate(0, strategy.initialize_parameters(manager))

    # Assert: every node was asked; the head is the pooled LDA; nothing else moved.
    assert all(n.evaluate.call_count == 1 for n in nodes)
    weight, bias = lda_head(class_stats(x, y, 2), 1e-3)
    after = strategy.global_arrays()
    np.testing.assert_allclose(after["classifier.weight"], weight, rtol=1e-5)
    np.testing.assert_allclose(after["classifier.bias"], bias, rtol=1e-5, atol=1e-6)
    assert after["classifier.weight"].dtype == np.float32
    for name in ("q.lora_A.weight", "q.lora_B.weight"):
        np.testing.assert_array_equal(after[name], before[name])
    record = strategy.history[0]
    assert record["calib_clients"] == 4 and record["calib_examples"] == 200
    assert record["bytes_up_calib"] == sum(len(encode_stats(p)) for p in parts)
    # The next round's clients receive the refitted head.
    instructions = strategy.configure_fit(
        1, strategy.initialize_parameters(manager), manager
    )
    payload = parameters_to_ndarrays(instructions[0][1].parameters)
    assert any(
        a.shape == weight.shape and np.allclose(a, weight, rtol=1e-5) for a in payload
    )


def test_a_malformed_or_missing_reply_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: two honest clients, one with a count that contradicts its reply,
    # one with NaN statistics, one that fails.
    x, y = _data(120)
    good = [class_stats(x[:60], y[:60], 2), class_stats(x[60:], y[60:], 2)]
    nan = ClassStats(good[0].counts, np.full((2, D), np.nan), good[0].scatter)
    nan_bytes = encode_stats(nan)
    nodes = [
        _stats_node("a", 0, _stats_res(good[0])),
        _stats_node("b", 1, _stats_res(good[1])),
        _stats_node("c", 2, _stats_res(good[0], num=5)),
        _stats_node(
            "d",
            3,
            EvaluateRes(
                status=OK, loss=0.0, num_examples=60, metrics={HEAD_STATS: nan_bytes}
            ),
        ),
        _stats_node("e", 4, RuntimeError("node gone")),
    ]
    strategy = _lda_strategy(fed={"num_clients": 5}, sampling={"min_available": 5})
    manager = _manager(*nodes)
    strategy.initialize_parameters(manager)

    # Execute
    strategy.evaluate(0, strategy.initialize_parameters(manager))

    # Assert: the head comes from the two honest clients only; each fault logged.
    weight, _ = lda_head(merge_stats(good), 1e-3)
    np.testing.assert_allclose(
        strategy.global_arrays()["classifier.weight"], weight, rtol=1e-5
    )
    assert strategy.history[0]["calib_clients"] == 2
    text = caplog.text
    assert "counts add up to 60 but the reply says num_examples=5" in text
    assert "contains NaN" in text and "node gone" in text


def test_without_usable_statistics_the_head_stays_as_it_was() -> None:
    # Prepare: only one class anywhere: the LDA is undefined.
    x, y = _data(40)
    one = class_stats(x[y == 0], y[y == 0], 2)
    nodes = [_stats_node(f"n{k}", k, _stats_res(one)) for k in range(2)]
    strategy = _lda_strategy()
    manager = _manager(*nodes)
    strategy.initialize_parameters(manager)
    before = strategy.global_arrays()

    # Execute
    strategy.evaluate(0, strategy.initialize_parameters(manager))

    # Assert
    after = strategy.global_arrays()
    for name, value in before.items():
        np.testing.assert_array_equal(after[name], value)
    assert "have no examples" in strategy.history[0]["calib_error"]


def test_lda_every_sets_which_rounds_refit() -> None:
    # Prepare: 5 rounds, a refit every 2nd.
    x, y = _data(40)
    nodes = [
        _stats_node(f"n{k}", k, _stats_res(class_stats(x[k::2], y[k::2], 2)))
        for k in range(2)
    ]
    strategy = _lda_strategy(fed={"num_rounds": 5}, head={"lda_every": 2})
    manager = _manager(*nodes)
    strategy.initialize_parameters(manager)

    # Execute: Flower's evaluate after each round (0: before the first).
    asked = []
    for server_round in range(6):
        before = nodes[0].evaluate.call_count
        strategy.evaluate(server_round, strategy.initialize_parameters(manager))
        asked.append(nodes[0].evaluate.call_count - before)

    # Assert: before round 1, after rounds 2 and 4, and after the last.
    assert asked == [1, 0, 1, 0, 1, 1]


def test_a_personalised_rule_cannot_take_the_lda_head() -> None:
    with pytest.raises(ValueError, match="needs a global model"):
        _lda_strategy(fed={"aggregation": "fedsa"})


# ------------------------------------------------------------------ client
@pytest.mark.parametrize("cap", [0, 5])
def test_a_client_sends_the_statistics_of_its_heads_inputs(cap: int) -> None:
    # Prepare: the tiny classifier and one client's training split.
    from test_client import FULL
    from test_client import _cfg as client_cfg

    from lora_flwr.fl.client import LoRAClient
    from lora_flwr.protocol import ROUND

    cfg = client_cfg()
    cfg = dataclasses.replace(
        cfg,
        lora=dataclasses.replace(cfg.lora, modules_to_save=("classifier",)),
        head=dataclasses.replace(cfg.head, calibration="lda", lda_max_examples=cap),
    )
    client = LoRAClient(cfg, 0, 2)
    name, layer = client.ws.adapter.head_layer(2)
    config = {ROUND: 1, HEAD_STATS: True, **FULL.evaluation().to_config()}

    # Execute
    _, num, metrics = client.evaluate(client.get_parameters({}), config)

    # Assert: the counts are the split's labels, the sums those of the inputs the
    # head layer receives (with a cap: exact counts, sums estimated).
    stats = decode_stats(metrics[HEAD_STATS], 2, layer.in_features)
    labels = client.train_data.labels
    assert labels is not None
    assert name == "classifier" and num == len(client.train_data)
    np.testing.assert_array_equal(
        stats.counts, np.bincount(np.asarray(labels), minlength=2)
    )
    x, y = client.ws.trainer.head_inputs(client.train_data, layer)
    assert x.shape == (num, layer.in_features)
    got = class_stats(x, y, 2)
    np.testing.assert_array_equal(got.counts, stats.counts)
    if cap == 0:
        np.testing.assert_allclose(stats.sums, got.sums, rtol=1e-6)
    else:
        assert not np.allclose(stats.sums, got.sums)
        assert np.isfinite(stats.scatter).all()
