"""Aggregation: FedIT's weighted mean, the rule registry and reply validation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lora_flwr.aggregation import (
    ClientUpdate,
    available_rules,
    check_update,
    example_weights,
    fedit,
    get_rule,
    register,
)
from lora_flwr.aggregation import base as agg_base
from lora_flwr.aggregation.base import NDArray

NAMES = ["layer.lora_A.weight", "layer.lora_B.weight"]
SHAPES = [(2, 3), (4, 2)]


def _f32(values: object) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


# --------------------------------------------------------------------- FedIT
def test_fedit_equals_hand_computed_weighted_mean() -> None:
    # Prepare: two clients with 1 and 3 examples -> weights 1/4 and 3/4.
    a1, b1 = _f32([[1.0, 2.0], [3.0, 4.0]]), _f32([10.0, -2.0])
    a2, b2 = _f32([[5.0, 6.0], [7.0, 8.0]]), _f32([2.0, 2.0])
    updates = [ClientUpdate([a1, b1], 1, "c1"), ClientUpdate([a2, b2], 3, "c2")]

    # Execute
    out = fedit([np.zeros((2, 2), np.float32), np.zeros(2, np.float32)], updates, [])

    # Assert: 0.25 * x1 + 0.75 * x2, entry by entry.
    np.testing.assert_array_equal(out[0], _f32([[4.0, 5.0], [6.0, 7.0]]))
    np.testing.assert_array_equal(out[1], _f32([4.0, 1.0]))
    assert [o.dtype for o in out] == [np.float32, np.float32]


def test_fedit_ignores_the_current_global() -> None:
    # Prepare
    updates = [ClientUpdate([_f32([1.0, 3.0])], 2), ClientUpdate([_f32([3.0, 5.0])], 2)]

    # Execute
    from_zero = fedit([_f32([0.0, 0.0])], updates, ["x"])
    from_other = fedit([_f32([100.0, -100.0])], updates, ["x"])

    # Assert
    np.testing.assert_array_equal(from_zero[0], _f32([2.0, 4.0]))
    np.testing.assert_array_equal(from_other[0], from_zero[0])


@st.composite
def _client_updates(
    draw: st.DrawFn,
) -> tuple[list[tuple[int, ...]], list[ClientUpdate]]:
    """Between 1 and 5 clients, 1 to 3 tensors of random shapes, counts 1..1000."""
    shapes = draw(
        st.lists(
            hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5),
            min_size=1,
            max_size=3,
        )
    )
    num_clients = draw(st.integers(1, 5))
    elements = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False)
    updates = []
    for k in range(num_clients):
        arrays = [draw(hnp.arrays(np.float32, s, elements=elements)) for s in shapes]
        updates.append(ClientUpdate(arrays, draw(st.integers(1, 1000)), f"c{k}"))
    return shapes, updates


@settings(max_examples=30, deadline=None)
@given(data=_client_updates())
def test_fedit_matches_numpy_weighted_average(
    data: tuple[list[tuple[int, ...]], list[ClientUpdate]],
) -> None:
    # Prepare
    shapes, updates = data
    current = [np.zeros(s, np.float32) for s in shapes]
    counts = [u.num_examples for u in updates]

    # Execute
    out = fedit(current, updates, [f"t{i}" for i in range(len(shapes))])

    # Assert
    assert len(out) == len(shapes)
    for i, shape in enumerate(shapes):
        stacked = np.stack([u.arrays[i].astype(np.float64) for u in updates])
        expected = np.average(stacked, axis=0, weights=counts)
        assert out[i].shape == shape
        assert out[i].dtype == np.float32
        np.testing.assert_allclose(out[i], expected, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(data=_client_updates(), seed=st.integers(0, 2**32 - 1))
def test_fedit_is_permutation_invariant(
    data: tuple[list[tuple[int, ...]], list[ClientUpdate]], seed: int
) -> None:
    # Prepare
    shapes, updates = data
    order = np.random.default_rng(seed).permutation(len(updates))
    shuffled = [updates[i] for i in order]
    current = [np.zeros(s, np.float32) for s in shapes]

    # Execute
    out = fedit(current, updates, [])
    out_shuffled = fedit(current, shuffled, [])

    # Assert: float64 sums in another order may differ by one float32 ulp at most.
    for x, y in zip(out, out_shuffled, strict=True):
        np.testing.assert_allclose(x, y, rtol=2.5e-7, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(data=_client_updates())
def test_fedit_single_client_returns_its_arrays(
    data: tuple[list[tuple[int, ...]], list[ClientUpdate]],
) -> None:
    # Prepare
    shapes, updates = data
    only = updates[0]

    # Execute
    out = fedit([np.zeros(s, np.float32) for s in shapes], [only], [])

    # Assert: bit-identical (weight 1.0, exact float32 -> float64 -> float32).
    for x, y in zip(out, only.arrays, strict=True):
        np.testing.assert_array_equal(x, y)


def test_fedit_is_not_exact_for_the_product_of_factors() -> None:
    # Prepare: two rank-1 clients whose updates B_k @ A_k are orthogonal.
    a1, b1 = _f32([[1.0, 0.0]]), _f32([[1.0], [0.0]])
    a2, b2 = _f32([[0.0, 1.0]]), _f32([[0.0], [1.0]])
    updates = [ClientUpdate([a1, b1], 1), ClientUpdate([a2, b2], 1)]

    # Execute
    mean_a, mean_b = fedit([a1, b1], updates, ["lora_A", "lora_B"])
    product_of_means = mean_b @ mean_a
    mean_of_products = 0.5 * (b1 @ a1) + 0.5 * (b2 @ a2)

    # Assert: FedIT averages A and B separately, so the global update
    # mean(B) @ mean(A) is NOT the average of the clients' updates mean(B @ A).
    np.testing.assert_array_equal(mean_of_products, _f32([[0.5, 0.0], [0.0, 0.5]]))
    np.testing.assert_array_equal(product_of_means, np.full((2, 2), 0.25, np.float32))
    assert not np.allclose(product_of_means, mean_of_products)


def test_fedit_rejects_zero_updates() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="zero client updates"):
        fedit([_f32([0.0])], [], ["x"])


# ------------------------------------------------------------ example weights
def test_example_weights_normalise_counts() -> None:
    # Prepare
    updates = [ClientUpdate([], 1), ClientUpdate([], 3), ClientUpdate([], 0)]

    # Execute
    weights = example_weights(updates)

    # Assert
    assert weights.dtype == np.float64
    np.testing.assert_array_equal(weights, [0.25, 0.75, 0.0])


@pytest.mark.parametrize("counts", [[0, 0], [-1, 3]])
def test_example_weights_reject_bad_counts(counts: list[int]) -> None:
    # Prepare
    updates = [ClientUpdate([], n) for n in counts]

    # Execute / Assert
    with pytest.raises(ValueError, match="example counts"):
        example_weights(updates)


# ------------------------------------------------------------------ registry
def test_get_rule_returns_fedit() -> None:
    # Prepare / Execute
    rule = get_rule("fedit")

    # Assert
    assert rule is fedit
    assert "fedit" in available_rules()


def test_get_rule_unknown_name_lists_known_ones() -> None:
    # Prepare / Execute
    with pytest.raises(ValueError) as info:
        get_rule("nope")

    # Assert
    message = str(info.value)
    assert "`fed.aggregation`" in message
    assert "'nope'" in message
    assert "fedit" in message


def test_register_adds_a_rule_and_rejects_duplicates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a private copy of the registry, restored after the test.
    monkeypatch.setattr(agg_base, "_RULES", dict(agg_base._RULES))

    def first(
        current: Sequence[NDArray],
        updates: Sequence[ClientUpdate],
        names: Sequence[str],
    ) -> list[NDArray]:
        return list(current)

    # Execute
    register("first_for_test")(first)

    # Assert
    assert get_rule("first_for_test") is first
    assert available_rules() == sorted(available_rules())
    assert "first_for_test" in available_rules()
    with pytest.raises(ValueError, match="'first_for_test' is already registered"):
        register("first_for_test")(first)
    with pytest.raises(ValueError, match="'fedit' is already registered"):
        register("fedit")(first)
    assert get_rule("fedit") is fedit


# -------------------------------------------------------------- check_update
def _good() -> list[np.ndarray]:
    return [np.ones(s, np.float32) for s in SHAPES]


def test_check_update_accepts_a_valid_reply() -> None:
    # Prepare / Execute / Assert: no exception.
    check_update(_good(), SHAPES, NAMES)
    check_update(_good(), SHAPES, NAMES, reference=_good(), max_update_norm=1e-9)


def test_check_update_rejects_wrong_count() -> None:
    # Prepare
    arrays = _good()[:1]

    # Execute / Assert
    with pytest.raises(ValueError, match="1 arrays but the adapter has 2"):
        check_update(arrays, SHAPES, NAMES)


def test_check_update_rejects_non_arrays() -> None:
    # Prepare
    arrays: list[object] = [_good()[0], [[1.0, 1.0]] * 4]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"layer\.lora_B\.weight: not a numpy array"):
        check_update(arrays, SHAPES, NAMES)


def test_check_update_rejects_float64() -> None:
    # Prepare
    arrays = _good()
    arrays[1] = arrays[1].astype(np.float64)

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"layer\.lora_B\.weight: dtype float64, expected float32"
    ):
        check_update(arrays, SHAPES, NAMES)


def test_check_update_rejects_wrong_shape() -> None:
    # Prepare
    arrays = _good()
    arrays[0] = np.ones((3, 2), np.float32)

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"layer\.lora_A\.weight: shape \(3, 2\), expected \(2, 3\)"
    ):
        check_update(arrays, SHAPES, NAMES)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_update_rejects_non_finite(bad: float) -> None:
    # Prepare
    arrays = _good()
    arrays[1][3, 1] = bad

    # Execute / Assert
    with pytest.raises(ValueError, match=r"layer\.lora_B\.weight: contains NaN or Inf"):
        check_update(arrays, SHAPES, NAMES)


def test_check_update_rejects_a_large_update_norm() -> None:
    # Prepare: the update is 3 in one entry and 4 in another: norm 5.
    reference = [np.zeros(s, np.float32) for s in SHAPES]
    arrays = [np.zeros(s, np.float32) for s in SHAPES]
    arrays[0][0, 0] = 3.0
    arrays[1][0, 0] = 4.0

    # Execute / Assert
    check_update(arrays, SHAPES, NAMES, reference=reference, max_update_norm=5.0)
    check_update(arrays, SHAPES, NAMES, reference=reference, max_update_norm=0.0)
    with pytest.raises(
        ValueError, match=r"update norm 5 exceeds fed\.max_update_norm=4\.9"
    ):
        check_update(arrays, SHAPES, NAMES, reference=reference, max_update_norm=4.9)
