"""The wire protocol (Plan, AdapterLayout) and the array check at trust boundaries."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_flwr import protocol
from lora_flwr.protocol import (
    PLAN_FOLD_FROM,
    PLAN_FOLD_MODE,
    PLAN_FOLD_RANKS,
    PLAN_FOLD_TO,
    PLAN_KEEP,
    PLAN_RANK,
    PLAN_RECEIVE,
    PLAN_SEND,
    PLAN_TRAIN,
    AdapterLayout,
    Plan,
    group_of,
    module_of,
    pair_names,
)
from lora_flwr.validation import check_arrays, update_norm

GROUP_SETS = st.sets(st.sampled_from("ABM")).map(frozenset)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    """Any valid plan: group subsets, ranks, the three fold modes."""
    receive = draw(GROUP_SETS)
    keep = draw(GROUP_SETS.map(lambda g: g - receive))
    mode = draw(st.sampled_from(["none", "stack", "dense"]))
    start = draw(st.integers(0, 50))
    ranks: tuple[int, ...] = ()
    end = start
    if mode == "stack":
        ranks = tuple(draw(st.lists(st.integers(1, 64), min_size=1, max_size=6)))
        end = start + len(ranks)
    elif mode == "dense":
        end = draw(st.integers(0, 60))
    return Plan(
        rank=draw(st.integers(1, 128)),
        receive=receive,
        train=draw(GROUP_SETS),
        send=draw(GROUP_SETS),
        keep=keep,
        fold_mode=mode,  # type: ignore[arg-type]
        fold_from=start,
        fold_to=end,
        fold_ranks=ranks,
    )


# --------------------------------------------------------------------- Plan
@settings(max_examples=100, deadline=None)
@given(plan=plans())
def test_plan_round_trips_through_config(plan: Plan) -> None:
    # Prepare / Execute
    config = plan.to_config()
    back = Plan.from_config(config)
    back_eval = Plan.from_config(plan.evaluation().to_config())

    # Assert: only scalars travel, and the plan comes back equal.
    assert all(isinstance(v, int | str) for v in config.values())
    assert all(k.startswith("plan.") for k in config)
    assert back == plan
    assert back_eval == plan.evaluation()
    assert back_eval.train == back_eval.send == frozenset()
    assert back_eval.receive == plan.receive and back_eval.keep == plan.keep


def test_plan_defaults_and_group_strings() -> None:
    # Prepare / Execute
    plan = Plan(rank=4, receive="BM", keep="A")  # type: ignore[arg-type]
    config = plan.to_config()

    # Assert: groups are sets, written in A, B, M order.
    assert plan.receive == frozenset({"B", "M"})
    assert plan.train == plan.send == frozenset("ABM")
    assert config[PLAN_RECEIVE] == "BM" and config[PLAN_KEEP] == "A"
    assert config[PLAN_FOLD_MODE] == "none" and config[PLAN_FOLD_RANKS] == ""


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"`plan\.rank` should be >= 1 but is 0"),
        ({"rank": -2}, r"`plan\.rank`"),
        ({"rank": 2.0}, r"`plan\.rank`"),
        ({"rank": 2, "receive": "AB", "keep": "B"}, r"`plan\.keep` B overlaps"),
        ({"rank": 2, "receive": "AX"}, r"`plan\.receive` holds 'X'"),
        ({"rank": 2, "send": ["C"]}, r"`plan\.send` holds 'C'"),
        ({"rank": 2, "fold_mode": "sparse"}, r"`plan\.fold_mode` is 'sparse'"),
        ({"rank": 2, "fold_mode": "dense", "fold_from": -1}, r"`plan\.fold_from`"),
        ({"rank": 2, "fold_mode": "stack", "fold_to": 1}, r"`plan\.fold_ranks`"),
        (
            {"rank": 2, "fold_mode": "stack", "fold_to": 2, "fold_ranks": (3,)},
            r"from version 0 to 2 needs 2 blocks, got 1",
        ),
        (
            {"rank": 2, "fold_mode": "stack", "fold_to": 1, "fold_ranks": (0,)},
            r"`plan\.fold_ranks` should be positive",
        ),
        (
            {"rank": 2, "fold_mode": "dense", "fold_to": 1, "fold_ranks": (2,)},
            r"only used by a stacked fold",
        ),
    ],
)
def test_bad_plans_raise(kwargs: dict[str, Any], match: str) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=match):
        Plan(**kwargs)


@pytest.mark.parametrize("key", [PLAN_RANK, PLAN_RECEIVE, PLAN_TRAIN, PLAN_SEND])
def test_from_config_names_a_missing_key(key: str) -> None:
    # Prepare
    config = Plan(rank=2).to_config()
    del config[key]

    # Execute / Assert
    with pytest.raises(ValueError, match=f"no '{key}'.*different versions"):
        Plan.from_config(config)


def test_from_config_defaults_the_optional_keys() -> None:
    # Prepare
    config = {PLAN_RANK: 3, PLAN_RECEIVE: "M", PLAN_TRAIN: "AB", PLAN_SEND: ""}

    # Execute
    plan = Plan.from_config(config)

    # Assert
    assert plan == Plan(rank=3, receive=frozenset("M"), train=frozenset("AB"), send=())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (PLAN_RANK, "2"),
        (PLAN_RANK, True),
        (PLAN_RANK, 2.0),
        (PLAN_FOLD_FROM, "0"),
        (PLAN_FOLD_TO, 1.5),
        (PLAN_RECEIVE, "AQ"),
        (PLAN_KEEP, "Z"),
        (PLAN_FOLD_MODE, "sparse"),
        (PLAN_FOLD_RANKS, "1,x"),
    ],
)
def test_from_config_names_a_bad_key(key: str, value: Any) -> None:
    # Prepare
    config: dict[str, Any] = Plan(rank=2).to_config()
    config[key] = value

    # Execute / Assert
    with pytest.raises(ValueError, match=f"`{key}`"):
        Plan.from_config(config)


# ------------------------------------------------------------ AdapterLayout
def layout() -> AdapterLayout:
    """Two LoRA modules at rank 4 (q: 6x5, v: 3x7) around a saved head."""
    return AdapterLayout(
        (
            "q.lora_A.weight",
            "q.lora_B.weight",
            "head.weight",
            "v.lora_A.weight",
            "v.lora_B.weight",
        ),
        ((4, 5), (6, 4), (2, 3), (4, 7), (3, 4)),
    )


def test_layout_knows_modules_ranks_and_dims() -> None:
    # Prepare / Execute
    lay = layout()

    # Assert
    assert lay.modules == ["q", "v"]
    assert lay.rank == 4
    assert lay.module_dims("q") == (6, 5) and lay.module_dims("v") == (3, 7)
    assert lay.weight_shape("q.lora_A.weight", 2) == (2, 5)
    assert lay.weight_shape("v.lora_B.weight", 1) == (3, 1)
    assert lay.weight_shape("head.weight", 1) == (2, 3)
    assert [group_of(n) for n in lay.names] == ["A", "B", "M", "A", "B"]
    assert module_of("v.lora_B.weight") == "v"
    with pytest.raises(ValueError, match="not a lora_A/lora_B weight name"):
        module_of("head.weight")


def test_payload_spec_puts_the_stacked_fold_first_then_the_adapter() -> None:
    # Prepare: two stacked blocks of widths 3 and 5; A and M at rank 2.
    plan = Plan(
        rank=2,
        receive=frozenset("AM"),
        fold_mode="stack",
        fold_from=1,
        fold_to=3,
        fold_ranks=(3, 5),
    )

    # Execute
    spec = layout().payload_spec(plan)

    # Assert
    assert spec == [
        ("q.fold_B", (6, 8)),
        ("q.fold_A", (8, 5)),
        ("v.fold_B", (3, 8)),
        ("v.fold_A", (8, 7)),
        ("q.lora_A.weight", (2, 5)),
        ("head.weight", (2, 3)),
        ("v.lora_A.weight", (2, 7)),
    ]


def test_payload_spec_with_a_dense_fold_and_without_a_fold() -> None:
    # Prepare
    dense = Plan(rank=3, receive=frozenset("B"), fold_mode="dense", fold_to=4)
    none = Plan(rank=3, receive=frozenset("B"))

    # Execute
    dense_spec = layout().payload_spec(dense)
    none_spec = layout().payload_spec(none)

    # Assert
    assert dense_spec == [
        ("q.fold_delta", (6, 5)),
        ("v.fold_delta", (3, 7)),
        ("q.lora_B.weight", (6, 3)),
        ("v.lora_B.weight", (3, 3)),
    ]
    assert none_spec == dense_spec[2:]


def test_reply_spec_is_the_send_groups_at_the_plan_rank() -> None:
    # Prepare
    plan = Plan(rank=1, receive=frozenset("M"), send=frozenset("BM"), fold_mode="dense")

    # Execute
    spec = layout().reply_spec(plan)

    # Assert: never a fold section in a reply.
    assert spec == [
        ("q.lora_B.weight", (6, 1)),
        ("head.weight", (2, 3)),
        ("v.lora_B.weight", (3, 1)),
    ]


def test_adapter_spec_refuses_a_rank_above_the_allocation() -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="rank 5 exceeds the allocated rank 4"):
        layout().reply_spec(Plan(rank=5))


@pytest.mark.parametrize(
    ("names", "shapes", "match"),
    [
        (("a.lora_A.weight",), ((2, 3), (3, 2)), "1 names for 2 shapes"),
        (("a.lora_A.weight", "h"), ((2, 3), (1,)), "lora_A and a lora_B"),
        (
            (
                "a.lora_A.weight",
                "a.lora_B.weight",
                "b.lora_A.weight",
                "b.lora_B.weight",
            ),
            ((2, 3), (4, 2), (3, 3), (3, 3)),
            r"several ranks \[2, 3\]",
        ),
    ],
)
def test_bad_layouts_raise(
    names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], match: str
) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match=match):
        AdapterLayout(names, shapes)


def test_pair_names_keys_arrays_by_the_spec_and_checks_the_count() -> None:
    # Prepare
    spec = layout().reply_spec(Plan(rank=2, send=frozenset("A")))
    arrays = [np.zeros(s) for _, s in spec]

    # Execute
    named = pair_names(spec, arrays)

    # Assert
    assert list(named) == ["q.lora_A.weight", "v.lora_A.weight"]
    assert named["v.lora_A.weight"] is arrays[1]
    with pytest.raises(ValueError, match="1 arrays but the plan expects 2"):
        pair_names(spec, arrays[:1])


def test_config_keys_are_distinct() -> None:
    # Prepare
    keys = [v for k, v in vars(protocol).items() if k.startswith("PLAN_")]

    # Execute / Assert
    assert len(keys) == len(set(keys)) == 9


# ------------------------------------------------------------- check_arrays
SPEC = [("l.lora_A.weight", (2, 3)), ("l.lora_B.weight", (4, 2))]


def good() -> dict[str, Any]:
    return {name: np.ones(shape, np.float32) for name, shape in SPEC}


def test_check_arrays_accepts_valid_arrays() -> None:
    # Prepare / Execute / Assert: no exception, list or mapping spec.
    check_arrays(good(), SPEC)
    check_arrays(good(), dict(SPEC))
    check_arrays({n: a.astype(np.float64) for n, a in good().items()}, SPEC, dtype=None)


def test_check_arrays_names_missing_and_unexpected_tensors() -> None:
    # Prepare
    missing = good()
    del missing["l.lora_B.weight"]
    extra = {**good(), "x.extra": np.ones(1, np.float32)}

    # Execute / Assert
    with pytest.raises(ValueError, match=r"reply: .*missing \['l\.lora_B\.weight'\]"):
        check_arrays(missing, SPEC, what="reply")
    with pytest.raises(ValueError, match=r"unexpected \['x\.extra'\] \(1\)"):
        check_arrays(extra, SPEC)


def test_check_arrays_shortens_a_long_list_of_names() -> None:
    # Prepare
    spec = [(f"t{i}", (1,)) for i in range(5)]

    # Execute / Assert
    with pytest.raises(ValueError, match=r"missing \['t0', 't1', 't2', \.\.\.\] \(5\)"):
        check_arrays({}, spec)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([[1.0, 1.0]] * 4, "not a numpy array \\(list\\)"),
        (np.float32(1.0), "not a numpy array \\(float32\\)"),
        (np.ones((4, 2), np.float64), "dtype float64, expected float32"),
        (np.ones((4, 2), np.float16), "dtype float16, expected float32"),
        (np.ones((2, 4), np.float32), r"shape \(2, 4\), expected \(4, 2\)"),
        (np.ones((8,), np.float32), r"shape \(8,\), expected \(4, 2\)"),
    ],
)
def test_check_arrays_names_a_bad_tensor(value: object, match: str) -> None:
    # Prepare
    arrays = good()
    arrays["l.lora_B.weight"] = value

    # Execute / Assert
    with pytest.raises(ValueError, match=r"l\.lora_B\.weight: " + match):
        check_arrays(arrays, SPEC)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_arrays_names_a_non_finite_tensor(bad: float) -> None:
    # Prepare
    arrays = good()
    arrays["l.lora_B.weight"][3, 1] = bad

    # Execute / Assert
    with pytest.raises(ValueError, match=r"l\.lora_B\.weight: contains NaN or Inf"):
        check_arrays(arrays, SPEC)


def test_check_arrays_without_dtype_still_wants_floats() -> None:
    # Prepare
    arrays = good()
    arrays["l.lora_A.weight"] = np.ones((2, 3), np.int64)

    # Execute / Assert
    with pytest.raises(
        ValueError, match=r"l\.lora_A\.weight: dtype int64 is not float"
    ):
        check_arrays(arrays, SPEC, dtype=None)


def test_update_norm_is_the_l2_norm_over_shared_names() -> None:
    # Prepare: 3 in one entry, 4 in another: norm 5; "new" has no reference.
    reference = {name: np.zeros(shape, np.float32) for name, shape in SPEC}
    arrays = {name: np.zeros(shape, np.float32) for name, shape in SPEC}
    arrays["l.lora_A.weight"][0, 0] = 3.0
    arrays["l.lora_B.weight"][1, 1] = -4.0
    arrays["new"] = np.full(3, 100.0, np.float32)

    # Execute
    norm = update_norm(arrays, reference)

    # Assert
    assert isinstance(norm, float) and norm == 5.0
    assert update_norm(reference, reference) == 0.0
