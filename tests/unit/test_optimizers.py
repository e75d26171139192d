"""Server optimizers (FedAvgM, FedAdagrad, FedAdam, FedYogi) against hand numbers.

Every test uses ``x0 = [1, 2]``, a first pseudo-gradient ``Delta_1 = [1, 0.5]`` and
a second ``Delta_2 = [3, -1]``, with ``eta = 0.5``, ``beta_1 = 0.5``,
``beta_2 = 0.75`` and ``tau = 0.75`` (so ``v_{-1} = tau^2 = 0.5625``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_flwr.aggregation import OPTIMIZERS, ServerOptimizer
from lora_flwr.aggregation.optimizers import M_PREFIX, V_PREFIX

X0 = np.array([1.0, 2.0])
DELTA1 = np.array([1.0, 0.5])
DELTA2 = np.array([3.0, -1.0])
HYPER = {"lr": 0.5, "beta1": 0.5, "beta2": 0.75, "tau": 0.75}


def two_steps(name: str) -> tuple[list[np.ndarray], list[dict[str, np.ndarray]]]:
    """Run two steps on ``w``; return ``[x1, x2]`` and the two optimizer states."""
    opt = ServerOptimizer(name, **HYPER)  # type: ignore[arg-type]
    xs, states = [], []
    x, state = X0, {}
    for delta in (DELTA1, DELTA2):
        out, state = opt.step({"w": x}, {"w": x + delta}, ["w"], state)
        x = out["w"]
        xs.append(x)
        states.append(state)
    return xs, states


def test_fedavgm_two_steps_by_hand() -> None:
    # Prepare: m1 = D1 = [1, .5]; x1 = x0 + .5 m1 = [1.5, 2.25];
    # m2 = .5 m1 + D2 = [3.5, -.75]; x2 = x1 + .5 m2 = [3.25, 1.875].

    # Execute
    (x1, x2), (s1, s2) = two_steps("fedavgm")

    # Assert
    np.testing.assert_allclose(x1, [1.5, 2.25], rtol=0, atol=1e-15)
    np.testing.assert_allclose(x2, [3.25, 1.875], rtol=0, atol=1e-15)
    np.testing.assert_allclose(s1[M_PREFIX + "w"], [1.0, 0.5], atol=1e-15)
    np.testing.assert_allclose(s2[M_PREFIX + "w"], [3.5, -0.75], atol=1e-15)
    assert V_PREFIX + "w" not in s2


# m1 = .5 D1 = [.5, .25]; m2 = .5 m1 + .5 D2 = [1.75, -.375] for the adaptive three.
M1 = [0.5, 0.25]
M2 = [1.75, -0.375]
# v1 and v2 by hand from v0 = .5625, D1^2 = [1, .25], D2^2 = [9, 1]:
V_BY_HAND = {
    # v + D^2
    "fedadagrad": ([1.5625, 0.8125], [10.5625, 1.8125]),
    # .75 v + .25 D^2
    "fedadam": ([0.671875, 0.484375], [2.75390625, 0.61328125]),
    # v - .25 D^2 sign(v - D^2): signs [-, +] then [-, -]
    "fedyogi": ([0.8125, 0.5], [3.0625, 0.75]),
}


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_optimizers_two_steps_by_hand(name: str) -> None:
    # Prepare
    v1, v2 = (np.array(v) for v in V_BY_HAND[name])
    x1_expected = X0 + 0.5 * np.array(M1) / (np.sqrt(v1) + 0.75)
    x2_expected = x1_expected + 0.5 * np.array(M2) / (np.sqrt(v2) + 0.75)

    # Execute
    (x1, x2), (s1, s2) = two_steps(name)

    # Assert
    np.testing.assert_allclose(s1[M_PREFIX + "w"], M1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s2[M_PREFIX + "w"], M2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s1[V_PREFIX + "w"], v1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s2[V_PREFIX + "w"], v2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(x1, x1_expected, rtol=1e-14)
    np.testing.assert_allclose(x2, x2_expected, rtol=1e-14)


def test_fedadagrad_first_coordinate_is_exact_dyadic() -> None:
    # Prepare: sqrt(1.5625) = 1.25 and sqrt(10.5625) = 3.25, so the first
    # coordinate is x1 = 1 + .5 * .5 / 2 = 1.125, x2 = 1.125 + .5 * 1.75 / 4.

    # Execute
    (x1, x2), _ = two_steps("fedadagrad")

    # Assert
    assert x1[0] == 1.125
    assert x2[0] == 1.34375


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_fedavgm_with_lr_1_and_no_momentum_is_the_rule_itself(
    seed: int, shape: tuple[int, int], dtype: type
) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    opt = ServerOptimizer("fedavgm", lr=1.0, beta1=0.0)
    x = rng.normal(size=shape).astype(dtype)
    state: dict[str, Any] = {}

    for _ in range(3):
        aggregated = rng.normal(size=shape).astype(dtype)

        # Execute
        out, state = opt.step({"w": x}, {"w": aggregated}, ["w"], state)

        # Assert: x + (x_agg - x) in float64, cast back.
        assert out["w"].dtype == dtype
        np.testing.assert_allclose(out["w"], aggregated, rtol=1e-6, atol=1e-6)
        if dtype == np.float64:
            np.testing.assert_allclose(out["w"], aggregated, rtol=0, atol=1e-14)
        x = out["w"]


@pytest.mark.parametrize("name", OPTIMIZERS[1:])
def test_tensors_not_in_names_and_their_moments_are_untouched(name: str) -> None:
    # Prepare
    opt = ServerOptimizer(name, **HYPER)  # type: ignore[arg-type]
    old = {"w": X0.copy(), "frozen": np.array([5.0, 6.0])}
    aggregated = {"w": X0 + DELTA1, "frozen": np.array([50.0, 60.0])}
    before = {
        M_PREFIX + "frozen": np.array([0.1, 0.2]),
        V_PREFIX + "frozen": np.array([0.3, 0.4]),
    }
    snapshot = {k: v.copy() for k, v in before.items()}

    # Execute
    out, state = opt.step(old, aggregated, ["w"], before)

    # Assert
    assert set(out) == {"w"}
    np.testing.assert_array_equal(old["frozen"], [5.0, 6.0])
    np.testing.assert_array_equal(old["w"], X0)
    for key, value in snapshot.items():
        np.testing.assert_array_equal(state[key], value)
        np.testing.assert_array_equal(before[key], value)
    assert M_PREFIX + "w" in state and M_PREFIX + "w" not in before


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "none"}, "server_opt.name"),
        ({"name": "adam"}, "server_opt.name"),
        ({"name": "fedadam", "lr": 0.0}, "server_opt.lr"),
        ({"name": "fedadam", "lr": -1.0}, "server_opt.lr"),
        ({"name": "fedadam", "lr": math.nan}, "server_opt.lr"),
        ({"name": "fedavgm", "beta1": 1.0}, "server_opt.beta1"),
        ({"name": "fedavgm", "beta1": -0.1}, "server_opt.beta1"),
        ({"name": "fedyogi", "beta2": 1.0}, "server_opt.beta2"),
        ({"name": "fedyogi", "beta2": math.nan}, "server_opt.beta2"),
        ({"name": "fedadagrad", "tau": 0.0}, "server_opt.tau"),
        ({"name": "fedadagrad", "tau": -1e-3}, "server_opt.tau"),
    ],
)
def test_bad_hyper_parameters_name_the_config_key(
    kwargs: dict[str, Any], key: str
) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=f"`{key}`"):
        ServerOptimizer(**kwargs)
