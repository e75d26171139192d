"""Hostile-client defences: count cap, norm guard, robust means (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_flwr.aggregation import ClientReply, get_rule
from lora_flwr.aggregation.robust import (
    cap_counts,
    clip_update,
    cosine_outliers,
    krum_outliers,
    lower_median,
    most_outliers,
    norm_bound,
    robust_mean,
)
from lora_flwr.protocol import AdapterLayout, Plan
from lora_flwr.validation import update_norm

LAYOUT = AdapterLayout(("q.lora_A.weight", "q.lora_B.weight"), ((2, 3), (4, 2)))


def test_lower_median_takes_the_smaller_middle_value() -> None:
    assert lower_median([5.0]) == 5.0
    assert lower_median([1.0, 1e9]) == 1.0
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="no values"):
        lower_median([])


def test_cap_counts_stops_a_client_claiming_a_billion_examples() -> None:
    # Two honest clients with 100 and 120 examples, one liar with 10**9.
    assert cap_counts([100, 10**9, 120], 4.0) == [100, 480, 120]
    # Two clients: the honest one sets the median.
    assert cap_counts([100, 10**9], 4.0) == [100, 400]
    # Off, and honest rounds untouched.
    assert cap_counts([100, 10**9], 0.0) == [100, 10**9]
    assert cap_counts([988, 927, 1058, 971], 4.0) == [988, 927, 1058, 971]


def test_cap_counts_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cap"):
        cap_counts([1, 2], 0.5)
    with pytest.raises(ValueError, match="> 0"):
        cap_counts([1, 0], 4.0)


def test_norm_bound_is_factor_times_lower_median() -> None:
    assert norm_bound([1.0, 2.0, 1e6], 3.0) == 6.0
    with pytest.raises(ValueError, match=">= 1"):
        norm_bound([1.0], 0.5)


def test_clip_update_scales_the_update_to_the_bound_and_keeps_direction() -> None:
    rng = np.random.default_rng(0)
    start = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
    step = {"a": rng.normal(size=(3, 4)) * 1e6, "b": rng.normal(size=(5,)) * 1e6}
    reply = {n: (start[n] + step[n]).astype(np.float64) for n in start}
    reply["m"] = np.ones(2)  # not in start: passes unchanged

    clipped = clip_update(reply, start, 2.0)

    assert update_norm(clipped, start) == pytest.approx(2.0, rel=1e-9)
    factor = 2.0 / update_norm(reply, start)
    for n in start:
        np.testing.assert_allclose(clipped[n] - start[n], step[n] * factor, rtol=1e-6)
    np.testing.assert_array_equal(clipped["m"], reply["m"])
    # Inside the bound: returned as is.
    same = clip_update(reply, start, 1e12)
    for n in reply:
        np.testing.assert_array_equal(same[n], reply[n])


def test_robust_mean_hand_computed() -> None:
    values = [np.array([1.0, 10.0]), np.array([2.0, 20.0]), np.array([100.0, -5.0])]
    np.testing.assert_array_equal(robust_mean(values, "median"), [2.0, 10.0])
    # K = 3, trim 0.34 drops one value at each end: the middle one remains.
    np.testing.assert_array_equal(
        robust_mean(values, "trimmed_mean", 0.34), [2.0, 10.0]
    )
    # trim 0.2 of 3 drops nothing: the plain mean.
    np.testing.assert_allclose(
        robust_mean(values, "trimmed_mean", 0.2), [103 / 3, 25 / 3]
    )
    with pytest.raises(ValueError, match="one shape"):
        robust_mean([np.zeros(2), np.zeros(3)], "median")
    with pytest.raises(ValueError, match="trim"):
        robust_mean(values, "trimmed_mean", 0.5)


@settings(max_examples=50, deadline=None)
@given(
    k=st.integers(3, 9),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e3, 1e9),
)
def test_one_outlier_cannot_move_the_median_outside_the_honest_range(
    k: int, seed: int, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    honest = [rng.normal(size=(4, 3)) for _ in range(k - 1)]
    attacker = rng.normal(size=(4, 3)) * scale

    for mode, trim in (("median", 0.0), ("trimmed_mean", 1 / k + 1e-9)):
        out = robust_mean([*honest, attacker], mode, trim)  # type: ignore[arg-type]

        low, high = np.min(honest, axis=0), np.max(honest, axis=0)
        assert np.all(out >= low - 1e-12) and np.all(out <= high + 1e-12)


def _reply(pid: int, b: float, n: int = 1) -> ClientReply:
    plan = Plan(rank=2)
    arrays = {
        "q.lora_A.weight": np.full((2, 3), 1.0, np.float32),
        "q.lora_B.weight": np.full((4, 2), b, np.float32),
    }
    return ClientReply(pid, plan, arrays, n)


def test_fedit_with_a_median_ignores_one_hostile_client() -> None:
    rule = get_rule("fedit")(
        LAYOUT, {n: np.zeros(s, np.float32) for n, s in LAYOUT.items()}, 1.0
    )
    rule.use_robust("median")
    state = rule.init_state()

    new = rule.aggregate(
        state, [_reply(0, 1.0), _reply(1, 2.0), _reply(2, 1e6, 10**6)], 1
    )

    np.testing.assert_array_equal(new.arrays["q.lora_B.weight"], np.full((4, 2), 2.0))


@pytest.mark.parametrize("name", ["flora", "fedex", "flexlora", "hetlora"])
def test_robust_averaging_is_refused_where_the_aggregate_is_not_a_mean(
    name: str,
) -> None:
    wanted = r"`guards.robust`='median' cannot be combined"
    with pytest.raises(ValueError, match=wanted):
        get_rule(name).check_setup(
            rank_tiers=(), server_optimizer="none", robust="median"
        )


@pytest.mark.parametrize("name", ["fedit", "ffa", "fedsa", "rolora", "fedsvd"])
def test_robust_averaging_is_accepted_for_plain_average_rules(name: str) -> None:
    get_rule(name).check_setup(rank_tiers=(), server_optimizer="none", robust="median")


def _flipped_round(k: int, seed: int = 0) -> list[np.ndarray]:
    """``k - 1`` honest updates around one direction and a sign-flipped one."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=50)
    honest = [d + 0.5 * rng.normal(size=50) for _ in range(k - 1)]
    return [*honest, -1.9 * honest[0]]


@pytest.mark.parametrize("k", [3, 4, 10])
def test_cosine_filter_leaves_out_a_sign_flipped_update(k: int) -> None:
    updates = _flipped_round(k)
    assert cosine_outliers(updates, 0.0) == [k - 1]


def test_cosine_filter_hand_computed() -> None:
    # Unit vectors at 0, 60 and 180 degrees: mean cosines to the others are
    # (0.5 - 1) / 2, (0.5 - 0.5) / 2 and (-1 - 0.5) / 2.
    h = np.sqrt(3) / 2
    ups = [np.array([1.0, 0.0]), np.array([0.5, h]), np.array([-3.0, 0.0])]
    assert cosine_outliers(ups, 0.0) == [2]
    assert cosine_outliers(ups, -0.8) == []
    assert cosine_outliers(ups, 0.1) == [2]  # at most (3 - 1) // 2 = 1, lowest first
    assert cosine_outliers(ups[:2], 0.99) == []  # two cannot outvote each other
    # A zero update is neither scored nor compared with: two live ones remain.
    assert cosine_outliers([np.zeros(2), *ups[1:]], 0.0) == []
    assert cosine_outliers([*ups, np.zeros(2)], 0.0) == [2]


def test_cosine_filter_never_removes_a_majority() -> None:
    ups = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([-1.0, -1.0])]
    ups += [np.array([-1.0, -0.9]), np.array([-0.9, -1.0])]
    assert len(cosine_outliers(ups, 2.0)) == most_outliers(5) == 2


def test_krum_leaves_out_the_update_farthest_from_its_neighbours() -> None:
    ups = [np.array([0.0]), np.array([1.0]), np.array([10.0])]
    assert krum_outliers(ups) == [2]
    # Five updates: f = 2, each scored on its 5 - 2 - 2 = 1 nearest neighbour.
    five = [np.array([x]) for x in (0.0, 0.1, 0.3, 5.0, 9.0)]
    assert krum_outliers(five) == [3, 4]
    assert krum_outliers(ups[:2]) == []


@pytest.mark.parametrize("k", [3, 4, 10])
def test_krum_leaves_out_a_sign_flipped_update(k: int) -> None:
    out = krum_outliers(_flipped_round(k))
    assert k - 1 in out and len(out) == most_outliers(k)


def test_filters_refuse_updates_of_different_shapes() -> None:
    ups = [np.zeros(2), np.zeros(3), np.zeros(2)]
    with pytest.raises(ValueError, match="one shape"):
        cosine_outliers(ups, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        krum_outliers(ups)
