"""The nine aggregation rules: exactness, plans, catch-up folds, setup checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_flwr.aggregation import (
    ClientInfo,
    ClientReply,
    Rule,
    ServerState,
    available_rules,
    example_weights,
    fold_block,
    get_rule,
    register,
)
from lora_flwr.aggregation import base as agg_base
from lora_flwr.protocol import (
    FOLD_A_SUFFIX,
    FOLD_B_SUFFIX,
    FOLD_DELTA_SUFFIX,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    AdapterLayout,
    Plan,
    group_of,
)

NINE = (
    "fedex",
    "fedit",
    "fedsa",
    "fedsvd",
    "ffa",
    "flexlora",
    "flora",
    "hetlora",
    "rolora",
)
F64 = np.ndarray


# ------------------------------------------------------------------- helpers
def make_layout(
    dims: Sequence[tuple[int, int]], rank: int, head: bool = True
) -> AdapterLayout:
    """Modules ``m0, m1, ...`` of ``(out, in)`` dims at ``rank``, plus a head."""
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for i, (out, inp) in enumerate(dims):
        names += [f"m{i}{LORA_A_SUFFIX}", f"m{i}{LORA_B_SUFFIX}"]
        shapes += [(rank, inp), (out, rank)]
    if head:
        names.append("head.weight")
        shapes.append((2, 3))
    return AdapterLayout(tuple(names), tuple(shapes))


def make_rule(
    name: str,
    layout: AdapterLayout,
    rng: np.random.Generator,
    scaling: float = 2.0,
    dtype: type = np.float64,
) -> Rule:
    """The rule with a seeded init: random A and head, zero B (as LoRA starts)."""
    initial = {
        n: np.zeros(s, dtype)
        if group_of(n) == "B"
        else rng.normal(size=s).astype(dtype)
        for n, s in layout.items()
    }
    return get_rule(name)(layout, initial, scaling)


def train(
    rule: Rule,
    state: ServerState,
    plan: Plan,
    partition: int,
    num_examples: int,
    rng: np.random.Generator,
) -> ClientReply:
    """A client's reply: what it started from plus random noise, per sent tensor."""
    start = rule.start_arrays(state, plan)
    arrays = {
        name: (
            start.get(name, np.zeros(shape, rule.dtype)) + rng.normal(size=shape)
        ).astype(rule.dtype)
        for name, shape in rule.reply_spec(plan)
    }
    return ClientReply(partition, plan, arrays, num_examples, start)


def run_round(
    rule: Rule,
    state: ServerState,
    server_round: int,
    ranks: Sequence[int],
    counts: Sequence[int],
    rng: np.random.Generator,
) -> tuple[ServerState, list[ClientReply]]:
    """Every client replies; return the new state and the replies."""
    replies = []
    for k, (rank, n) in enumerate(zip(ranks, counts, strict=True)):
        plan = rule.plan(state, ClientInfo(k, rank, state.base_version), server_round)
        replies.append(train(rule, state, plan, k, n, rng))
    return rule.aggregate(state, replies, server_round), replies


def client_factor(reply: ClientReply, name: str) -> F64:
    """The client's tensor after training: its reply, else what it started from."""
    value = reply.arrays[name] if name in reply.arrays else reply.start[name]
    return np.asarray(value, dtype=np.float64)


def weights_of(replies: Sequence[ClientReply]) -> F64:
    counts = np.array([r.num_examples for r in replies], dtype=np.float64)
    return counts / counts.sum()


def ideal_product(replies: Sequence[ClientReply], module: str, scaling: float) -> F64:
    """``sum_k p_k s B_k A_k`` computed from the replies and start arrays."""
    total = 0.0
    for p, reply in zip(weights_of(replies), replies, strict=True):
        b = client_factor(reply, module + LORA_B_SUFFIX)
        a = client_factor(reply, module + LORA_A_SUFFIX)
        total = total + p * scaling * (b @ a)
    return np.asarray(total)


def effective_update(
    old: ServerState, new: ServerState, module: str, scaling: float
) -> F64:
    """``(D' - D) + s B' A'`` of one module."""
    b = np.asarray(new.arrays[module + LORA_B_SUFFIX], dtype=np.float64)
    a = np.asarray(new.arrays[module + LORA_A_SUFFIX], dtype=np.float64)
    out = scaling * (b @ a)
    if module in new.base_delta:
        out = out + new.base_delta[module].astype(np.float64)
    if module in old.base_delta:
        out = out - old.base_delta[module].astype(np.float64)
    return out


def rel_err(approx: F64, exact: F64) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def named_payload(rule: Rule, state: ServerState, plan: Plan) -> dict[str, np.ndarray]:
    """The payload keyed by the names of the wire spec (shapes checked)."""
    spec = rule.layout.payload_spec(plan)
    arrays = rule.payload(state, plan)
    assert len(arrays) == len(spec)
    for (name, shape), array in zip(spec, arrays, strict=True):
        assert array.shape == shape, name
    return {name: a for (name, _), a in zip(spec, arrays, strict=True)}


@dataclass
class Setup:
    dims: list[tuple[int, int]]
    rank: int
    ranks: list[int]
    counts: list[int]
    scaling: float
    head: bool
    seed: int


@st.composite
def setups(draw: st.DrawFn, tiers: bool = False, out_ne_in: bool = False) -> Setup:
    """Random ranks, module shapes, client counts and example counts."""
    rank = draw(st.integers(1, 4))
    dim = st.tuples(st.integers(1, 6), st.integers(1, 6))
    if out_ne_in:
        dim = dim.filter(lambda d: d[0] != d[1])
    dims = draw(st.lists(dim, min_size=1, max_size=3))
    k = draw(st.integers(1, 4))
    client_rank = st.integers(1, rank) if tiers else st.just(rank)
    return Setup(
        dims=dims,
        rank=rank,
        ranks=draw(st.lists(client_rank, min_size=k, max_size=k)),
        counts=draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k)),
        scaling=draw(st.sampled_from([0.5, 1.0, 2.0, 16 / np.sqrt(8)])),
        head=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# ------------------------------------------------------------ exact rules
@pytest.mark.parametrize("name", ["ffa", "rolora", "flora", "fedex", "fedsvd"])
@settings(max_examples=12, deadline=None)
@given(setup=setups(tiers=True))
def test_exact_rules_reproduce_the_weighted_sum_of_products(
    name: str, setup: Setup
) -> None:
    # Prepare
    rng = np.random.default_rng(setup.seed)
    layout = make_layout(setup.dims, setup.rank, setup.head)
    rule = make_rule(name, layout, rng, setup.scaling)
    ranks = setup.ranks if rule.supports_rank_tiers else [setup.rank] * len(setup.ranks)
    state = rule.init_state()

    for server_round in (1, 2, 3):  # both RoLoRA parities, stacked fold versions
        # Execute
        new, replies = run_round(rule, state, server_round, ranks, setup.counts, rng)
        logged = rule.aggregation_error(state, new, replies)

        # Assert
        for module in layout.modules:
            ideal = ideal_product(replies, module, setup.scaling)
            effective = effective_update(state, new, module, setup.scaling)
            assert rel_err(effective, ideal) <= 1e-9, (module, server_round)
        assert logged is not None and logged <= 1e-9
        assert new.round == server_round
        state = new


@settings(max_examples=20, deadline=None)
@given(setup=setups())
def test_fedit_logs_the_error_of_averaging_factors_separately(setup: Setup) -> None:
    # Prepare
    rng = np.random.default_rng(setup.seed)
    layout = make_layout(setup.dims, setup.rank, setup.head)
    rule = make_rule("fedit", layout, rng, setup.scaling)
    state = rule.init_state()

    for server_round in (1, 2):
        # Execute
        new, replies = run_round(
            rule, state, server_round, setup.ranks, setup.counts, rng
        )
        logged = rule.aggregation_error(state, new, replies)

        # Assert: s B_bar A_bar against sum p_k s B_k A_k, from the replies alone.
        p = weights_of(replies)
        errors = []
        for module in layout.modules:
            a_bar = sum(
                w * client_factor(r, module + LORA_A_SUFFIX)
                for w, r in zip(p, replies, strict=True)
            )
            b_bar = sum(
                w * client_factor(r, module + LORA_B_SUFFIX)
                for w, r in zip(p, replies, strict=True)
            )
            np.testing.assert_allclose(
                new.arrays[module + LORA_A_SUFFIX], a_bar, rtol=1e-12, atol=1e-12
            )
            np.testing.assert_allclose(
                new.arrays[module + LORA_B_SUFFIX], b_bar, rtol=1e-12, atol=1e-12
            )
            ideal = ideal_product(replies, module, setup.scaling)
            errors.append(rel_err(setup.scaling * (b_bar @ a_bar), ideal))
        assert logged is not None
        assert logged == pytest.approx(float(np.mean(errors)), rel=1e-9, abs=1e-15)
        assert new.base_delta == {} and new.fold_log == ()
        state = new


def test_fedit_equals_hand_computed_weighted_mean() -> None:
    # Prepare: two clients with 1 and 3 examples -> weights 1/4 and 3/4.
    layout = AdapterLayout(("l.lora_A.weight", "l.lora_B.weight"), ((1, 2), (2, 1)))
    initial = {
        "l.lora_A.weight": np.array([[9.0, 9.0]], np.float32),
        "l.lora_B.weight": np.zeros((2, 1), np.float32),
    }
    rule = get_rule("fedit")(layout, initial, 1.0)
    state = rule.init_state()
    plan = rule.plan(state, ClientInfo(0, 1), 1)
    replies = [
        ClientReply(
            0,
            plan,
            {
                "l.lora_A.weight": np.array([[1.0, 2.0]], np.float32),
                "l.lora_B.weight": np.array([[10.0], [-2.0]], np.float32),
            },
            1,
        ),
        ClientReply(
            1,
            plan,
            {
                "l.lora_A.weight": np.array([[5.0, 6.0]], np.float32),
                "l.lora_B.weight": np.array([[2.0], [2.0]], np.float32),
            },
            3,
        ),
    ]

    # Execute
    new = rule.aggregate(state, replies, 1)

    # Assert: 0.25 x1 + 0.75 x2 entry by entry, float32 kept, old global ignored.
    np.testing.assert_array_equal(
        new.arrays["l.lora_A.weight"], np.array([[4.0, 5.0]], np.float32)
    )
    np.testing.assert_array_equal(
        new.arrays["l.lora_B.weight"], np.array([[4.0], [1.0]], np.float32)
    )
    assert {a.dtype for a in new.arrays.values()} == {np.dtype(np.float32)}


def test_fedit_is_not_exact_for_the_product_of_factors() -> None:
    # Prepare: two rank-1 clients whose products B_k A_k are orthogonal.
    layout = AdapterLayout(("l.lora_A.weight", "l.lora_B.weight"), ((1, 2), (2, 1)))
    initial = {"l.lora_A.weight": np.ones((1, 2)), "l.lora_B.weight": np.zeros((2, 1))}
    rule = get_rule("fedit")(layout, initial, 1.0)
    state = rule.init_state()
    plan = rule.plan(state, ClientInfo(0, 1), 1)
    replies = [
        ClientReply(
            0,
            plan,
            {
                "l.lora_A.weight": np.array([[1.0, 0.0]]),
                "l.lora_B.weight": np.array([[1.0], [0.0]]),
            },
            1,
        ),
        ClientReply(
            1,
            plan,
            {
                "l.lora_A.weight": np.array([[0.0, 1.0]]),
                "l.lora_B.weight": np.array([[0.0], [1.0]]),
            },
            1,
        ),
    ]

    # Execute
    new = rule.aggregate(state, replies, 1)
    error = rule.aggregation_error(state, new, replies)

    # Assert: mean(B) mean(A) = 0.25 everywhere, mean(B A) = diag(0.5, 0.5).
    product = new.arrays["l.lora_B.weight"] @ new.arrays["l.lora_A.weight"]
    np.testing.assert_array_equal(product, np.full((2, 2), 0.25))
    assert error == pytest.approx(
        np.linalg.norm([[0.25, -0.25], [-0.25, 0.25]]) / np.linalg.norm([0.5, 0.5])
    )


@settings(max_examples=15, deadline=None)
@given(setup=setups())
def test_fedit_is_permutation_invariant_and_a_single_client_is_kept_bitwise(
    setup: Setup,
) -> None:
    # Prepare
    rng = np.random.default_rng(setup.seed)
    layout = make_layout(setup.dims, setup.rank, setup.head)
    rule = make_rule("fedit", layout, rng, setup.scaling, dtype=np.float32)
    state = rule.init_state()
    _, replies = run_round(rule, state, 1, setup.ranks, setup.counts, rng)
    order = rng.permutation(len(replies))

    # Execute
    forward = rule.aggregate(state, replies, 1)
    shuffled = rule.aggregate(state, [replies[i] for i in order], 1)
    single = rule.aggregate(state, replies[:1], 1)

    # Assert: float64 sums in another order differ by one float32 ulp at most.
    for name in layout.names:
        np.testing.assert_allclose(
            forward.arrays[name], shuffled.arrays[name], rtol=2.5e-7, atol=1e-9
        )
        np.testing.assert_array_equal(single.arrays[name], replies[0].arrays[name])
        assert single.arrays[name].dtype == np.float32


@pytest.mark.parametrize("name", NINE)
def test_aggregate_refuses_zero_replies(name: str) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    rule = make_rule(name, make_layout([(3, 2)], 2), rng)

    # Execute / Assert
    with pytest.raises(ValueError, match="zero client replies"):
        rule.aggregate(rule.init_state(), [], 1)


# ----------------------------------------------------------------- FlexLoRA
@settings(max_examples=20, deadline=None)
@given(
    client_ranks=st.lists(st.integers(1, 2), min_size=1, max_size=3),
    spare=st.integers(0, 2),
    dims=st.lists(
        st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=2
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_flexlora_at_full_rank_is_exact(
    client_ranks: list[int], spare: int, dims: list[tuple[int, int]], seed: int
) -> None:
    # Prepare: allocated rank >= sum of client ranks, so nothing is truncated.
    rng = np.random.default_rng(seed)
    rank = sum(client_ranks) + spare
    layout = make_layout(dims, rank)
    rule = make_rule("flexlora", layout, rng, scaling=1.5)
    counts = [int(n) for n in rng.integers(1, 100, size=len(client_ranks))]
    state = rule.init_state()

    for server_round in (1, 2):
        # Execute
        new, replies = run_round(rule, state, server_round, client_ranks, counts, rng)

        # Assert
        for module in layout.modules:
            ideal = ideal_product(replies, module, 1.5)
            effective = effective_update(state, new, module, 1.5)
            assert rel_err(effective, ideal) <= 1e-9
        error = rule.aggregation_error(state, new, replies)
        assert error is not None and error <= 1e-9
        state = new


@settings(max_examples=20, deadline=None)
@given(
    rank=st.integers(1, 3),
    num_clients=st.integers(2, 4),
    dims=st.lists(
        st.tuples(st.integers(2, 8), st.integers(2, 8)), min_size=1, max_size=2
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_flexlora_below_full_rank_is_the_best_rank_r_approximation(
    rank: int, num_clients: int, dims: list[tuple[int, int]], seed: int
) -> None:
    # Prepare: every client at the allocated rank, so sum r_k > r.
    rng = np.random.default_rng(seed)
    layout = make_layout(dims, rank)
    scaling = 2.0
    rule = make_rule("flexlora", layout, rng, scaling)
    counts = [int(n) for n in rng.integers(1, 100, size=num_clients)]
    ranks = [rank] * num_clients
    ranks[0] = max(1, rank - 1)  # one lower tier, served by a cut of the global
    state = rule.init_state()

    # Execute
    new, replies = run_round(rule, state, 1, ranks, counts, rng)

    # Assert: Eckart-Young, against the SVD of the dense weighted sum.
    for module in layout.modules:
        dense = ideal_product(replies, module, scaling)
        sigma = np.linalg.svd(dense, compute_uv=False)
        product = effective_update(state, new, module, scaling)
        got = np.linalg.svd(product, compute_uv=False)
        tol = 1e-9 * sigma[0]
        k = min(rank, sigma.size)
        np.testing.assert_allclose(got[:k], sigma[:k], rtol=1e-9, atol=tol)
        np.testing.assert_allclose(got[k:], 0.0, atol=tol)
        residual = np.linalg.norm(dense - product)
        assert residual == pytest.approx(
            np.sqrt(np.sum(sigma[k:] ** 2)), rel=1e-7, abs=tol
        )
        # A lower tier gets the best rank-r_0 part: the leading columns/rows.
        plan = rule.plan(new, ClientInfo(0, ranks[0], 0), 2)
        payload = named_payload(rule, new, plan)
        part = scaling * (
            payload[module + LORA_B_SUFFIX] @ payload[module + LORA_A_SUFFIX]
        )
        k0 = min(ranks[0], sigma.size)
        got0 = np.linalg.svd(part, compute_uv=False)
        np.testing.assert_allclose(got0[:k0], sigma[:k0], rtol=1e-9, atol=tol)


# ------------------------------------------------------------------- FedSVD
@settings(max_examples=20, deadline=None)
@given(setup=setups(out_ne_in=True))
def test_fedsvd_refactors_without_changing_the_product(setup: Setup) -> None:
    # Prepare
    rng = np.random.default_rng(setup.seed)
    layout = make_layout(setup.dims, setup.rank, setup.head)
    rule = make_rule("fedsvd", layout, rng, setup.scaling)
    s = setup.scaling
    state = rule.init_state()

    for server_round in (1, 2):
        # Execute
        new, replies = run_round(
            rule, state, server_round, setup.ranks, setup.counts, rng
        )

        # Assert
        p = weights_of(replies)
        for module, (out, inp) in zip(layout.modules, setup.dims, strict=True):
            a_old = state.arrays[module + LORA_A_SUFFIX]
            b_bar = sum(
                w * r.arrays[module + LORA_B_SUFFIX]
                for w, r in zip(p, replies, strict=True)
            )
            a_new = new.arrays[module + LORA_A_SUFFIX]
            b_new = new.arrays[module + LORA_B_SUFFIX]
            assert a_new.shape == (setup.rank, inp)
            assert b_new.shape == (out, setup.rank)
            assert rel_err(s * b_new @ a_new, s * b_bar @ a_old) <= 1e-9
            k = min(setup.rank, out, inp)
            gram = np.diag([1.0] * k + [0.0] * (setup.rank - k))
            np.testing.assert_allclose(a_new @ a_new.T, gram, atol=1e-12)
        state = new


# ------------------------------------------------------------------ HetLoRA
@settings(max_examples=20, deadline=None)
@given(setup=setups(tiers=True))
def test_hetlora_pads_averages_and_cuts(setup: Setup) -> None:
    # Prepare
    rng = np.random.default_rng(setup.seed)
    layout = make_layout(setup.dims, setup.rank, setup.head)
    rule = make_rule("hetlora", layout, rng, setup.scaling)
    state = rule.init_state()

    for server_round in (1, 2):
        # Execute
        new, replies = run_round(
            rule, state, server_round, setup.ranks, setup.counts, rng
        )

        # Assert: global = p-weighted mean of the zero-padded factors.
        p = weights_of(replies)
        for name, shape in layout.items():
            padded = []
            for reply in replies:
                x = reply.arrays[name]
                padded.append(
                    np.pad(x, [(0, a - b) for a, b in zip(shape, x.shape, strict=True)])
                )
            expected = sum(w * x for w, x in zip(p, padded, strict=True))
            np.testing.assert_allclose(new.arrays[name], expected, atol=1e-12)
        # A client of rank r_k gets the first r_k rows of A and columns of B.
        for k, rank in enumerate(setup.ranks):
            plan = rule.plan(new, ClientInfo(k, rank, 0), server_round + 1)
            payload = named_payload(rule, new, plan)
            for module in layout.modules:
                a_name, b_name = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
                np.testing.assert_array_equal(
                    payload[a_name], new.arrays[a_name][:rank]
                )
                np.testing.assert_array_equal(
                    payload[b_name], new.arrays[b_name][:, :rank]
                )
        state = new


@settings(max_examples=15, deadline=None)
@given(setup=setups(tiers=True))
def test_hetlora_pad_then_cut_gives_a_factor_back(setup: Setup) -> None:
    # Prepare: a single client of rank r_k, so the global is its padded factors.
    rng = np.random.default_rng(setup.seed)
    layout = make_layout(setup.dims, setup.rank, setup.head)
    rule = make_rule("hetlora", layout, rng, setup.scaling, dtype=np.float32)
    rank = setup.ranks[0]
    state = rule.init_state()
    new, (reply,) = run_round(rule, state, 1, [rank], [7], rng)

    # Execute
    plan = rule.plan(new, ClientInfo(0, rank, 0), 2)
    payload = named_payload(rule, new, plan)

    # Assert: bitwise round trip, zeros beyond r_k in the global.
    for name in layout.names:
        np.testing.assert_array_equal(payload[name], reply.arrays[name])
        if group_of(name) == "A":
            assert not new.arrays[name][rank:].any()
        if group_of(name) == "B":
            assert not new.arrays[name][:, rank:].any()


# ------------------------------------------------------ catch-up (FLoRA, FedEx)
@dataclass
class EmulatedClient:
    """A client's side of the base-weight delta: what it folded so far."""

    version: int = 0
    delta: dict[str, np.ndarray] = field(default_factory=dict)

    def fold(
        self, layout: AdapterLayout, plan: Plan, payload: dict[str, np.ndarray]
    ) -> None:
        if plan.fold_mode == "dense":
            self.delta = {
                m: payload[m + FOLD_DELTA_SUFFIX].copy() for m in layout.modules
            }
        elif plan.fold_mode == "stack":
            assert plan.fold_from == self.version
            edges = np.cumsum((0, *plan.fold_ranks))
            for m in layout.modules:
                fb, fa = payload[m + FOLD_B_SUFFIX], payload[m + FOLD_A_SUFFIX]
                for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                    self.delta[m] = fold_block(
                        self.delta.get(m), fb[:, lo:hi], fa[lo:hi]
                    )
        else:
            assert plan.fold_to == self.version
        self.version = plan.fold_to


def fold_bytes(layout: AdapterLayout, widths: Sequence[int], mode: str) -> int:
    """Elements of a fold section carrying ``widths`` blocks, sent as ``mode``."""
    plan = Plan(
        rank=1,
        fold_mode=mode,  # type: ignore[arg-type]
        fold_from=0,
        fold_to=len(widths),
        fold_ranks=tuple(widths) if mode == "stack" else (),
    )
    return sum(int(np.prod(s)) for _, s in layout.fold_spec(plan))


def run_with_absences(
    name: str,
    dims: Sequence[tuple[int, int]],
    schedule: Sequence[Sequence[int]],
    dtype: type,
    seed: int,
    rank: int = 2,
    unknown: Sequence[int] = (),
) -> dict[tuple[int, int], str]:
    """Run rounds where only ``schedule[t]`` replies; check every client's delta.

    Returns the fold mode of every plan sent to a client that was behind, keyed
    by ``(round, client)``. A client in ``unknown`` reports no base version after
    round 1.
    """
    rng = np.random.default_rng(seed)
    layout = make_layout(dims, rank)
    rule = make_rule(name, layout, rng, 2.0, dtype)
    num_clients = 1 + max(max(s) for s in schedule)
    clients = [EmulatedClient() for _ in range(num_clients)]
    if rule.supports_rank_tiers:
        tiers = [1 + k % rank for k in range(num_clients)]
    else:
        tiers = [rank] * num_clients
    widths: list[int] = []  # width of every version's block, known independently
    modes: dict[tuple[int, int], str] = {}
    state = rule.init_state()
    for server_round, present in enumerate(schedule, start=1):
        replies = []
        for k in present:
            held = None if (k in unknown and server_round > 1) else clients[k].version
            plan = rule.plan(state, ClientInfo(k, tiers[k], held), server_round)
            payload = named_payload(rule, state, plan)
            if held is None or held != state.base_version:
                modes[server_round, k] = plan.fold_mode
                if held is not None:
                    missed = widths[held:]
                    stack, dense = (
                        fold_bytes(layout, missed, m) for m in ("stack", "dense")
                    )
                    assert plan.fold_mode == ("stack" if stack <= dense else "dense")
            clients[k].fold(layout, plan, payload)
            assert clients[k].version == state.base_version
            assert set(clients[k].delta) == set(state.base_delta)
            for m, d in state.base_delta.items():
                assert clients[k].delta[m].dtype == d.dtype == dtype
                np.testing.assert_array_equal(clients[k].delta[m], d)
            for g_name, value in rule.start_arrays(state, plan).items():
                if group_of(g_name) in plan.receive:
                    np.testing.assert_array_equal(payload[g_name], value)
            replies.append(train(rule, state, plan, k, 10 + k, rng))
        state = rule.aggregate(state, replies, server_round)
        assert state.base_version == server_round
        sent = sum(r.plan.rank for r in replies)
        widths.append(sent if name == "flora" else sent + rank)
    return modes


SCHEDULE = [[0, 1], [0, 2], [0, 1], [0], [0, 1, 2, 3]]


@pytest.mark.parametrize("name", ["flora", "fedex"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_returning_clients_catch_up_with_stacked_blocks(name: str, dtype: type) -> None:
    # Prepare: large modules, so the missed blocks take fewer bytes than dense.
    dims = [(60, 50), (40, 70)]

    # Execute
    modes = run_with_absences(name, dims, SCHEDULE, dtype, seed=1)

    # Assert: client 3 first comes in round 5 and catches up on four blocks.
    assert set(modes.values()) == {"stack"}
    assert (5, 3) in modes and (5, 2) in modes


@pytest.mark.parametrize("name", ["flora", "fedex"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_returning_clients_catch_up_with_the_dense_delta(
    name: str, dtype: type
) -> None:
    # Prepare: tiny modules, so one dense delta is cheaper than any stack.
    dims = [(1, 3), (2, 1)]

    # Execute
    modes = run_with_absences(name, dims, SCHEDULE, dtype, seed=2)

    # Assert
    assert set(modes.values()) == {"dense"}
    assert (5, 3) in modes


@pytest.mark.parametrize("name", ["flora", "fedex"])
def test_catch_up_switches_to_dense_after_many_missed_rounds(name: str) -> None:
    # Prepare: one missed block is cheaper stacked, five are cheaper dense.
    dims = [(8, 8)]
    schedule = [[0, 1], [0, 1], [0], [0], [0], [0], [0, 1], [0, 1]]

    # Execute
    modes = run_with_absences(name, dims, schedule, np.float32, seed=3, rank=2)

    # Assert: client 0 is one block behind in round 4, client 1 five in round 7.
    assert modes[4, 0] == "stack"
    assert modes[7, 1] == "dense"


@pytest.mark.parametrize("name", ["flora", "fedex"])
def test_a_client_of_unknown_version_gets_the_dense_delta(name: str) -> None:
    # Prepare / Execute: client 1 reports no version from round 2 on.
    modes = run_with_absences(
        name, [(60, 50)], [[0, 1], [0, 1], [1]], np.float32, seed=4, unknown=[1]
    )

    # Assert
    assert modes[2, 1] == modes[3, 1] == "dense"
    assert modes[2, 0] == "stack"


@pytest.mark.parametrize("name", ["flora", "fedex"])
@settings(max_examples=10, deadline=None)
@given(
    dims=st.lists(
        st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=2
    ),
    schedule=st.lists(
        st.sets(st.integers(0, 3), min_size=1).map(sorted), min_size=2, max_size=5
    ),
    rank=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_catch_up_property_client_delta_equals_server_delta(
    name: str,
    dims: list[tuple[int, int]],
    schedule: list[list[int]],
    rank: int,
    seed: int,
) -> None:
    # Prepare / Execute / Assert (inside: bitwise equality and the cheaper mode).
    run_with_absences(name, dims, schedule, np.float32, seed=seed, rank=rank)


@pytest.mark.parametrize("name", NINE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_payload_keeps_the_adapter_dtype_even_before_any_fold(
    name: str, dtype: type
) -> None:
    # Prepare: a client whose version is unknown before anything was folded.
    rng = np.random.default_rng(0)
    rule = make_rule(name, make_layout([(3, 2), (2, 4)], 2), rng, dtype=dtype)
    state = rule.init_state()
    plan = rule.plan(state, ClientInfo(0, 2, None), 1)

    # Execute
    payload = named_payload(rule, state, plan)

    # Assert: nothing was ever folded, so no node can hold a delta: no fold
    # section (no wasted zeros), and the adapter part in the adapter's dtype.
    assert plan.fold_mode == "none"
    assert not any(n.endswith(FOLD_DELTA_SUFFIX) for n in payload)
    for array_name, array in payload.items():
        assert array.dtype == dtype, array_name


# ------------------------------------------------------------- group plans
def test_fedsa_keeps_b_on_the_client() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    layout = make_layout([(3, 2), (4, 5)], 2)
    rule = make_rule("fedsa", layout, rng)
    state = rule.init_state()

    for server_round in (1, 2, 3):
        # Execute
        plan = rule.plan(state, ClientInfo(0, 2), server_round)
        spec = [n for n, _ in rule.reply_spec(plan)]
        payload = named_payload(rule, state, plan)
        new, replies = run_round(rule, state, server_round, [2, 2], [3, 5], rng)

        # Assert
        assert plan.keep == frozenset("B") and "B" in plan.train
        assert "B" not in plan.receive and "B" not in plan.send
        assert spec and not any(n.endswith(LORA_B_SUFFIX) for n in spec)
        assert not any(n.endswith(LORA_B_SUFFIX) for n in payload)
        assert not any(n.endswith(LORA_B_SUFFIX) for n in replies[0].start)
        assert rule.aggregation_error(state, new, replies) is None
        assert rule.personalized
        state = new


def test_ffa_never_moves_a() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    layout = make_layout([(3, 2), (4, 5)], 2)
    rule = make_rule("ffa", layout, rng)
    state = rule.init_state()

    for server_round in (1, 2):
        # Execute
        plan = rule.plan(state, ClientInfo(0, 2), server_round)
        payload = named_payload(rule, state, plan)
        spec = [n for n, _ in rule.reply_spec(plan)]
        new, _ = run_round(rule, state, server_round, [2, 2], [3, 5], rng)

        # Assert
        assert payload and spec
        assert not any(n.endswith(LORA_A_SUFFIX) for n in [*payload, *spec])
        for name in layout.names:
            if group_of(name) == "A":
                np.testing.assert_array_equal(new.arrays[name], rule.initial[name])
        state = new


def test_rolora_alternates_b_and_a() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    layout = make_layout([(3, 2)], 2)
    rule = make_rule("rolora", layout, rng)
    state = rule.init_state()

    for server_round in (1, 2, 3, 4):
        # Execute
        plan = rule.plan(state, ClientInfo(0, 2), server_round)
        new, replies = run_round(rule, state, server_round, [2, 2], [1, 2], rng)

        # Assert: odd rounds send B, even rounds A; the other factor is unchanged.
        sent, frozen = ("B", "A") if server_round % 2 else ("A", "B")
        assert plan.send == plan.train == frozenset({sent, "M"})
        assert plan.receive == frozenset("ABM")
        assert set(rule.averaged_names(replies)) == {
            n for n in layout.names if group_of(n) in (sent, "M")
        }
        for name in layout.names:
            if group_of(name) == frozen:
                np.testing.assert_array_equal(new.arrays[name], state.arrays[name])
        state = new


def test_flora_receives_only_saved_modules() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    layout = make_layout([(3, 2)], 2)
    rule = make_rule("flora", layout, rng)
    state = rule.init_state()

    for server_round in (1, 2):
        # Execute
        plan = rule.plan(state, ClientInfo(0, 2, state.base_version), server_round)
        payload = named_payload(rule, state, plan)
        new, _ = run_round(rule, state, server_round, [1, 2], [1, 2], rng)

        # Assert: A and B restart from the seeded init every round.
        assert plan.receive == frozenset("M") and plan.send == frozenset("ABM")
        assert list(payload) == ["head.weight"]
        for name in layout.names:
            if group_of(name) != "M":
                np.testing.assert_array_equal(new.arrays[name], rule.initial[name])
        state = new


# ------------------------------------------------------------------ setup
TIER_REFUSED = ["fedit", "ffa", "fedsa", "rolora", "fedex", "fedsvd"]
OPTIMIZER_REFUSED = ["flora", "fedex", "flexlora", "fedsvd"]


@pytest.mark.parametrize("name", NINE)
def test_check_setup_refuses_heterogeneous_tiers(name: str) -> None:
    # Prepare
    rule = make_rule(name, make_layout([(3, 2)], 4), np.random.default_rng(0))

    # Execute / Assert
    rule.check_setup(rank_tiers=[4, 4], server_optimizer="none")
    if name in TIER_REFUSED:
        with pytest.raises(ValueError, match=r"`fed\.rank_tiers`") as info:
            rule.check_setup(rank_tiers=[2, 4], server_optimizer="none")
        assert repr(name) in str(info.value)
    else:
        rule.check_setup(rank_tiers=[2, 4], server_optimizer="none")


@pytest.mark.parametrize("name", NINE)
def test_check_setup_refuses_a_server_optimizer(name: str) -> None:
    # Prepare
    rule = make_rule(name, make_layout([(3, 2)], 4), np.random.default_rng(0))

    # Execute / Assert
    if name in OPTIMIZER_REFUSED:
        with pytest.raises(ValueError, match=r"`server_opt\.name`") as info:
            rule.check_setup(rank_tiers=[4], server_optimizer="fedadam")
        assert repr(name) in str(info.value)
    else:
        rule.check_setup(rank_tiers=[4], server_optimizer="fedadam")


# ---------------------------------------------------------------- registry
def test_available_rules_lists_the_nine() -> None:
    # Prepare / Execute
    names = available_rules()

    # Assert
    assert names == sorted(NINE)
    for name in names:
        assert get_rule(name).name == name


def test_get_rule_unknown_name_lists_the_known_ones() -> None:
    # Prepare / Execute
    with pytest.raises(ValueError) as info:
        get_rule("nope")

    # Assert
    message = str(info.value)
    assert "`fed.aggregation`" in message and "'nope'" in message
    assert all(name in message for name in NINE)


def test_register_rejects_duplicates_and_nameless_rules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a private copy of the registry, restored after the test.
    monkeypatch.setattr(agg_base, "_RULES", dict(agg_base._RULES))

    class Mine(Rule):
        name = "mine_for_test"

    class Nameless(Rule):
        pass

    # Execute
    register(Mine)

    # Assert
    assert get_rule("mine_for_test") is Mine
    with pytest.raises(ValueError, match="'mine_for_test' is already registered"):
        register(Mine)
    with pytest.raises(ValueError, match="has no `name`"):
        register(Nameless)


# ---------------------------------------------------------- example weights
def _replies(counts: Sequence[int]) -> list[ClientReply]:
    plan = Plan(rank=1)
    return [ClientReply(k, plan, {}, n) for k, n in enumerate(counts)]


def test_example_weights_normalise_counts() -> None:
    # Prepare / Execute
    weights = example_weights(_replies([1, 3, 4]))

    # Assert
    assert weights.dtype == np.float64
    np.testing.assert_array_equal(weights, [0.125, 0.375, 0.5])


@pytest.mark.parametrize("counts", [[0, 2], [-1, 3]])
def test_example_weights_reject_bad_counts(counts: list[int]) -> None:
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="example counts"):
        example_weights(_replies(counts))
