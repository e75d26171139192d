"""prepare/finish: what a node does with a plan (groups, rank, folds, store)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lora_flwr.aggregation import (
    ClientInfo,
    ClientReply,
    Rule,
    ServerState,
    get_rule,
)
from lora_flwr.config import ExperimentConfig, LoraConfig
from lora_flwr.experiment import client_datasets, get_workspace
from lora_flwr.fl.runner import MemoryStore, finish, layout_of, prepare
from lora_flwr.lora import LoRAAdapter
from lora_flwr.protocol import GROUPS, AdapterLayout, Plan, group_of

Arrays = dict[str, np.ndarray]

R = 4
# lin0 (10 -> 20) gets LoRA, lin1 (20 -> 2) is a saved module: groups A, B, M.
SAVE_CFG = LoraConfig(
    r=R,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=("lin0",),
    modules_to_save=("lin1",),
)
# Two LoRA modules, rank 2: for the fold sections (one block per module).
FOLD_CFG = LoraConfig(
    r=2, lora_alpha=4, lora_dropout=0.0, target_modules=("lin0", "lin1")
)
SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.toml"


# ------------------------------------------------------------------- helpers
@pytest.fixture
def build(
    make_mlp: Callable[..., nn.Module],
) -> Callable[..., tuple[LoRAAdapter, Arrays]]:
    """Return ``build(config)``: an adapter on a fresh MLP and its seeded init."""

    def make(config: LoraConfig = SAVE_CFG) -> tuple[LoRAAdapter, Arrays]:
        adapter = LoRAAdapter(config, seed=0)
        adapter.apply(make_mlp())
        return adapter, adapter.get_named_weights()

    return make


def _random(spec: Sequence[tuple[str, tuple[int, ...]]], seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for _, s in spec]


def _scramble(adapter: LoRAAdapter, seed: int = 9) -> None:
    """What another client's call leaves in the process's shared adapter."""
    layout = layout_of(adapter)
    values = _random(layout.items(), seed)
    adapter.set_named_weights(dict(zip(layout.names, values, strict=True)))


def _plan(
    rank: int = R,
    receive: str = "ABM",
    train: str = "ABM",
    send: str = "ABM",
    **kw: Any,
) -> Plan:
    return Plan(
        rank=rank,
        receive=frozenset(receive),  # type: ignore[arg-type]
        train=frozenset(train),  # type: ignore[arg-type]
        send=frozenset(send),  # type: ignore[arg-type]
        **kw,
    )


def _base_weights(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    return {
        m: layer.base_layer.weight.detach().clone()
        for m, layer in adapter.layers.items()
    }


def _snapshot(adapter: LoRAAdapter, store: MemoryStore) -> dict[str, Any]:
    """Everything a call may change: adapter, base weights, rank, store."""
    return {
        "weights": adapter.get_named_weights(),
        "base": _base_weights(adapter),
        "rank": adapter.active_rank,
        "trainable": [t.requires_grad for _, t in adapter.named_tensors()],
        "version": store.base_version(),
        "delta": store.base_delta(),
        "private": store.private(),
    }


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key in ("weights", "delta", "private"):
        assert got[key].keys() == want[key].keys(), key
        for name in want[key]:
            np.testing.assert_array_equal(got[key][name], want[key][name])
    for module, weight in want["base"].items():
        assert torch.equal(got["base"][module], weight)
    for key in ("rank", "trainable", "version"):
        assert got[key] == want[key], key


def _trainable(adapter: LoRAAdapter) -> set[str]:
    return {n for n, t in adapter.named_tensors() if t.requires_grad}


# ---------------------------------------------------------- groups and store
@pytest.mark.parametrize(
    ("receive", "train"),
    [("M", "ABM"), ("BM", "BM"), ("AM", "AM"), ("ABM", "BM"), ("", "A")],
)
def test_groups_not_received_take_the_seeded_init(
    build: Callable[..., tuple[LoRAAdapter, Arrays]], receive: str, train: str
) -> None:
    # Prepare: the shared adapter holds another client's values.
    adapter, initial = build()
    layout = layout_of(adapter)
    _scramble(adapter)
    plan = _plan(receive=receive, train=train, send=train)
    payload = _random(layout.payload_spec(plan), seed=1)
    store = MemoryStore()

    # Execute
    prepare(adapter, initial, plan, payload, store)

    # Assert: received groups hold the payload, the others the seeded init.
    got = adapter.get_named_weights()
    sent = dict(zip([n for n, _ in layout.payload_spec(plan)], payload, strict=True))
    for name in layout.names:
        want = sent[name] if group_of(name) in receive else initial[name]
        np.testing.assert_array_equal(got[name], want)
    assert _trainable(adapter) == {n for n in layout.names if group_of(n) in train}
    assert (store.base_version(), store.base_delta(), store.private()) == (0, {}, {})


def test_a_kept_group_survives_between_calls_and_is_never_sent(
    build: Callable[..., tuple[LoRAAdapter, Arrays]],
) -> None:
    # Prepare: FedSA's plan: A and M travel, B is trained and kept.
    adapter, initial = build()
    layout = layout_of(adapter)
    plan = _plan(receive="AM", send="AM", keep=frozenset("B"))
    store = MemoryStore()
    b_name = "lin0.lora_B.weight"
    trained_b = np.random.default_rng(3).normal(size=(20, R)).astype(np.float32)

    # Execute: call 1, "training" moves B; another client scrambles the
    # process's adapter; call 2 with a new payload.
    prepare(adapter, initial, plan, _random(layout.payload_spec(plan), 1), store)
    first_b = adapter.get_named_weights()[b_name]
    adapter.set_named_weights({**adapter.get_named_weights(), b_name: trained_b})
    reply = finish(adapter, plan, store)
    _scramble(adapter)
    second_payload = _random(layout.payload_spec(plan), 2)
    prepare(adapter, initial, plan, second_payload, store)
    second = adapter.get_named_weights()
    fresh = MemoryStore()
    prepare(adapter, initial, plan, second_payload, fresh)

    # Assert
    np.testing.assert_array_equal(first_b, initial[b_name])  # nothing kept yet
    assert list(store.private()) == [b_name]
    np.testing.assert_array_equal(store.private()[b_name], trained_b)
    np.testing.assert_array_equal(second[b_name], trained_b)
    np.testing.assert_array_equal(second["lin0.lora_A.weight"], second_payload[0])
    # The reply: A and the saved module, never B.
    assert [a.shape for a in reply] == [(R, 10), (2, 20), (2,)]
    assert [a.shape for a in reply] == [s for _, s in layout.reply_spec(plan)]
    assert not any(a.shape == (20, R) for a in reply)
    # A node with an empty store starts B from the seeded init.
    np.testing.assert_array_equal(adapter.get_named_weights()[b_name], initial[b_name])


def test_finish_returns_the_send_groups_in_wire_order(
    build: Callable[..., tuple[LoRAAdapter, Arrays]],
) -> None:
    # Prepare
    adapter, initial = build()
    _scramble(adapter, seed=4)
    current = adapter.get_named_weights()
    store = MemoryStore()

    # Execute
    replies = {send: finish(adapter, _plan(send=send), store) for send in GROUPS}

    # Assert: no keep, so nothing is stored.
    names = {"A": ["lin0.lora_A.weight"], "B": ["lin0.lora_B.weight"]}
    names["M"] = ["lin1.weight", "lin1.bias"]
    for send, reply in replies.items():
        assert len(reply) == len(names[send])
        for array, name in zip(reply, names[send], strict=True):
            np.testing.assert_array_equal(array, current[name])
    assert store.private() == {}


# ------------------------------------------------------------------- rank
def test_a_rank_below_the_allocation_zeroes_the_rest_and_cuts_the_reply(
    build: Callable[..., tuple[LoRAAdapter, Arrays]],
) -> None:
    # Prepare: the adapter holds non-zero values in every row and column.
    adapter, initial = build()
    layout = layout_of(adapter)
    _scramble(adapter)
    plan = _plan(rank=2)
    payload = _random(layout.payload_spec(plan), seed=5)

    # Execute
    prepare(adapter, initial, plan, payload, MemoryStore())
    full = adapter.get_named_weights()
    reply = finish(adapter, plan, MemoryStore())

    # Assert
    assert [a.shape for a in payload] == [(2, 10), (20, 2), (2, 20), (2,)]
    assert adapter.active_rank == 2
    a, b = full["lin0.lora_A.weight"], full["lin0.lora_B.weight"]
    np.testing.assert_array_equal(a[:2], payload[0])
    np.testing.assert_array_equal(b[:, :2], payload[1])
    assert not a[2:].any() and not b[:, 2:].any()
    assert [x.shape for x in reply] == [(2, 10), (20, 2), (2, 20), (2,)]
    for got, want in zip(reply, payload, strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_plan_rank_above_the_allocation_is_refused(
    build: Callable[..., tuple[LoRAAdapter, Arrays]],
) -> None:
    # Prepare
    adapter, initial = build()
    before = adapter.get_named_weights()

    # Execute / Assert
    with pytest.raises(ValueError, match="rank 5 exceeds the allocated rank 4"):
        prepare(adapter, initial, _plan(rank=5), [], MemoryStore())
    for name, value in before.items():
        np.testing.assert_array_equal(adapter.get_named_weights()[name], value)


# ------------------------------------------------------------------- folds
def _flora_states(
    layout: AdapterLayout, initial: Arrays, scaling: float, rounds: int
) -> tuple[Rule, list[ServerState]]:
    """FLoRA states after 0..rounds rounds of two random client replies."""
    rule = get_rule("flora")(layout, initial, scaling)
    states = [rule.init_state()]
    rng = np.random.default_rng(11)
    for rnd in range(1, rounds + 1):
        state = states[-1]
        replies = []
        for pid in (0, 1):
            plan = rule.plan(state, ClientInfo(pid, layout.rank, 0), rnd)
            arrays = {
                n: rng.normal(size=s).astype(np.float32)
                for n, s in rule.reply_spec(plan)
            }
            replies.append(ClientReply(pid, plan, arrays, 3 + pid))
        states.append(rule.aggregate(state, replies, rnd))
    return rule, states


def _fold_plan(
    mode: str, start: int, end: int, states: Sequence[ServerState] = ()
) -> Plan:
    ranks = tuple(b.width for b in states[-1].fold_log[start:end]) if states else ()
    return Plan(
        rank=2,
        receive=frozenset(),
        fold_mode=mode,  # type: ignore[arg-type]
        fold_from=start,
        fold_to=end,
        fold_ranks=ranks if mode == "stack" else (),
    )


def _assert_holds(
    adapter: LoRAAdapter,
    store: MemoryStore,
    state: ServerState,
    pristine: Mapping[str, torch.Tensor],
) -> None:
    assert store.base_version() == state.base_version
    delta = store.base_delta()
    assert delta.keys() == state.base_delta.keys() == set(adapter.layers)
    for module, want in state.base_delta.items():
        np.testing.assert_array_equal(delta[module], want)
        weight = adapter.layers[module].base_layer.weight
        assert torch.equal(weight, pristine[module] + torch.from_numpy(want))


def test_stacked_and_dense_folds_give_the_node_the_servers_delta(
    build: Callable[..., tuple[LoRAAdapter, Arrays]],
) -> None:
    # Prepare: two FLoRA rounds on the server (versions 1 and 2).
    adapter, initial = build(FOLD_CFG)
    layout = layout_of(adapter)
    pristine = _base_weights(adapter)
    rule, states = _flora_states(layout, initial, FOLD_CFG.scaling, rounds=2)
    v2 = states[2]
    stack_0_2 = _fold_plan("stack", 0, 2, states)
    dense_0_2 = _fold_plan("dense", 0, 2)
    stores = {k: MemoryStore() for k in ("stack", "dense", "steps")}

    # Execute: one stacked catch-up, one dense, and two one-version steps.
    prepare(adapter, initial, stack_0_2, rule.payload(v2, stack_0_2), stores["stack"])
    after_stack = _snapshot(adapter, stores["stack"])
    prepare(adapter, initial, dense_0_2, rule.payload(v2, dense_0_2), stores["dense"])
    after_dense = _snapshot(adapter, stores["dense"])
    for start in (0, 1):
        step = _fold_plan("stack", start, start + 1, states)
        prepare(adapter, initial, step, rule.payload(v2, step), stores["steps"])

    # Assert: the payloads have the announced layout, and every node holds the
    # server's version-2 delta bit for bit, in its store and its base weights.
    assert stack_0_2.fold_ranks == (4, 4)  # two clients of rank 2 per round
    assert [a.shape for a in rule.payload(v2, stack_0_2)] == [
        (20, 8),
        (8, 10),
        (2, 8),
        (8, 20),
    ]
    assert [a.shape for a in rule.payload(v2, dense_0_2)] == [(20, 10), (2, 20)]
    for snap in (after_stack, after_dense):
        assert snap["version"] == 2
        for module, want in v2.base_delta.items():
            np.testing.assert_array_equal(snap["delta"][module], want)
            assert torch.equal(
                snap["base"][module], pristine[module] + torch.from_numpy(want)
            )
    _assert_holds(adapter, stores["steps"], v2, pristine)


def test_the_rules_own_catch_up_plan_reaches_the_servers_delta(
    build: Callable[..., tuple[LoRAAdapter, Arrays]],
) -> None:
    # Prepare: a node at version 1 (one block behind: stacked is smaller) and
    # one whose version is unknown (dense).
    adapter, initial = build(FOLD_CFG)
    layout = layout_of(adapter)
    pristine = _base_weights(adapter)
    rule, states = _flora_states(layout, initial, FOLD_CFG.scaling, rounds=2)
    behind = MemoryStore()
    one = _fold_plan("stack", 0, 1, states)
    prepare(adapter, initial, one, rule.payload(states[1], one), behind)

    for held, store in ((1, behind), (None, MemoryStore())):
        plan = rule.plan(states[2], ClientInfo(0, 2, held), 3)

        # Execute
        prepare(adapter, initial, plan, rule.payload(states[2], plan), store)

        # Assert
        assert plan.fold_mode == ("stack" if held == 1 else "dense")
        _assert_holds(adapter, store, states[2], pristine)


def test_no_fold_with_the_right_version_restores_the_held_delta(
    build: Callable[..., tuple[LoRAAdapter, Arrays]],
) -> None:
    # Prepare: node 1 holds version 1; then node 0 (version 0) and node 1 take
    # turns on the process's one adapter.
    adapter, initial = build(FOLD_CFG)
    pristine = _base_weights(adapter)
    rule, states = _flora_states(layout_of(adapter), initial, 2.0, rounds=1)
    node0, node1 = MemoryStore(), MemoryStore()
    one = _fold_plan("stack", 0, 1, states)
    prepare(adapter, initial, one, rule.payload(states[1], one), node1)
    at_0, at_1 = _fold_plan("none", 0, 0), _fold_plan("none", 1, 1)

    # Execute
    prepare(adapter, initial, at_0, [], node0)
    base_0, delta_0 = _base_weights(adapter), adapter.has_base_delta
    prepare(adapter, initial, at_1, [], node1)

    # Assert: each call runs on the base weights of the node it serves.
    for module, weight in pristine.items():
        assert torch.equal(base_0[module], weight)
    assert delta_0 is False and node0.base_version() == 0
    _assert_holds(adapter, node1, states[1], pristine)


@pytest.mark.parametrize(
    ("held", "mode", "start", "end", "message"),
    [
        (
            1,
            "stack",
            0,
            2,
            "this node holds base version 1 but the stacked update starts at 0",
        ),
        (0, "stack", 1, 2, "holds base version 0 but the stacked update starts at 1"),
        (1, "none", 2, 2, "holds base version 1 but the server expects 2"),
    ],
)
def test_a_fold_from_the_wrong_version_raises_and_changes_nothing(
    build: Callable[..., tuple[LoRAAdapter, Arrays]],
    held: int,
    mode: str,
    start: int,
    end: int,
    message: str,
) -> None:
    # Prepare
    adapter, initial = build(FOLD_CFG)
    rule, states = _flora_states(layout_of(adapter), initial, 2.0, rounds=2)
    store = MemoryStore()
    if held:
        one = _fold_plan("stack", 0, 1, states)
        prepare(adapter, initial, one, rule.payload(states[1], one), store)
    plan = _fold_plan(mode, start, end, states if mode == "stack" else ())
    payload = rule.payload(states[2], plan)
    before = _snapshot(adapter, store)

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        prepare(adapter, initial, plan, payload, store)
    _assert_same(_snapshot(adapter, store), before)


# ------------------------------------------------------- malformed payloads
def _malformed(payload: list[np.ndarray]) -> dict[str, tuple[list, str]]:
    nan_fold = [a.copy() for a in payload]
    nan_fold[0][3, 4] = np.nan
    inf_adapter = [a.copy() for a in payload]
    inf_adapter[-1][0] = np.inf
    shape = list(payload)
    shape[2] = np.zeros((2, 9), np.float32)
    float64 = list(payload)
    float64[2] = payload[2].astype(np.float64)
    return {
        "count": (payload[:-1], "3 arrays but the plan expects 4"),
        "nan_fold": (nan_fold, r"lin0\.fold_delta: contains NaN or Inf"),
        "inf_adapter": (inf_adapter, r"lin1\.lora_A\.weight: contains NaN or Inf"),
        "shape": (shape, r"lin0\.lora_A\.weight: shape \(2, 9\), expected \(2, 10\)"),
        "float64": (float64, r"lin0\.lora_A\.weight: dtype float64"),
    }


@pytest.mark.parametrize(
    "fault", ["count", "nan_fold", "inf_adapter", "shape", "float64"]
)
def test_a_malformed_payload_raises_before_anything_changes(
    build: Callable[..., tuple[LoRAAdapter, Arrays]], fault: str
) -> None:
    # Prepare: a node at version 1 with a kept B; a dense fold to version 2 and
    # A for both modules would change the store, base weights and adapter.
    adapter, initial = build(FOLD_CFG)
    rule, states = _flora_states(layout_of(adapter), initial, 2.0, rounds=2)
    store = MemoryStore()
    one = _fold_plan("stack", 0, 1, states)
    prepare(adapter, initial, one, rule.payload(states[1], one), store)
    store.set_private({"lin0.lora_B.weight": np.ones((20, 2), np.float32)})
    _scramble(adapter, seed=7)
    adapter.set_trainable(lora_A=False, lora_B=True, saved=True)
    plan = Plan(
        rank=2,
        receive=frozenset("A"),  # type: ignore[arg-type]
        keep=frozenset("B"),  # type: ignore[arg-type]
        fold_mode="dense",
        fold_from=1,
        fold_to=2,
    )
    good = rule.payload(states[2], plan)
    payload, message = _malformed(good)[fault]
    before = _snapshot(adapter, store)

    # Execute / Assert
    with pytest.raises(ValueError, match=message):
        prepare(adapter, initial, plan, payload, store)
    _assert_same(_snapshot(adapter, store), before)
    # The well-formed payload goes through.
    prepare(adapter, initial, plan, good, store)
    assert store.base_version() == 2


# ------------------------------------------- with the real trainer (smoke)
@pytest.mark.parametrize(
    ("rule_name", "server_round", "frozen", "sent"),
    [
        ("ffa", 1, "A", "BM"),
        ("fedsvd", 1, "A", "BM"),
        ("rolora", 1, "A", "BM"),
        ("rolora", 2, "B", "AM"),
        ("fedsa", 1, "", "AM"),
        ("hetlora", 1, "", "ABM"),
    ],
)
def test_training_moves_only_the_trained_groups_and_sends_only_send(
    rule_name: str, server_round: int, frozen: str, sent: str
) -> None:
    # Prepare: the smoke workspace; a global adapter whose B is non-zero (so A
    # has a gradient); hetlora runs a rank-2 client of the allocated rank 4.
    cfg = ExperimentConfig.from_toml(SMOKE).with_overrides(["train.local_steps=3"])
    ws = get_workspace(cfg)
    ws.reset_adapter()
    train, _ = client_datasets(ws, cfg, 0, 2)
    layout = layout_of(ws.adapter)
    rule = get_rule(rule_name)(layout, ws.initial, cfg.lora.scaling)
    rng = np.random.default_rng(2)
    arrays = {
        n: (0.1 * rng.normal(size=s)).astype(np.float32)
        if group_of(n) == "B"
        else ws.initial[n]
        for n, s in layout.items()
    }
    state = rule.init_state().replace(arrays=arrays)
    rank = 2 if rule_name == "hetlora" else cfg.lora.r
    plan = rule.plan(state, ClientInfo(0, rank, 0), server_round)
    store = MemoryStore()

    # Execute
    prepare(ws.adapter, ws.initial, plan, rule.payload(state, plan), store)
    start = ws.adapter.get_named_weights(plan.rank)
    ws.trainer.train(train, steps=3, lr=cfg.train.lr, seed=1, progress=False)
    after = ws.adapter.get_named_weights(plan.rank)
    reply = finish(ws.adapter, plan, store)
    full = ws.adapter.get_named_weights()

    # Assert: the reply is exactly the trained `sent` groups, cut to the rank.
    names = [n for n in layout.names if group_of(n) in sent]
    assert "".join(sorted(plan.send)) == sent
    assert [a.shape for a in reply] == [layout.weight_shape(n, rank) for n in names]
    for array, name in zip(reply, names, strict=True):
        np.testing.assert_array_equal(array, after[name])
    for name in layout.names:
        moved = not np.array_equal(after[name], start[name])
        if group_of(name) in frozen:
            assert not moved, f"{name} is frozen but changed"
        elif group_of(name) in plan.train:
            assert moved, f"{name} trained but did not change"
    # FedSA: B trained, kept in the store, never in the reply.
    if "B" in plan.keep:
        kept = store.private()
        assert kept.keys() == {n for n in layout.names if group_of(n) == "B"}
        for name, value in kept.items():
            np.testing.assert_array_equal(value, after[name])
            assert all(a.shape != value.shape for a in reply)
    else:
        assert store.private() == {}
    # Below the allocated rank the rest stays zero through training.
    for name, value in full.items():
        if group_of(name) == "A":
            assert not value[rank:].any()
        elif group_of(name) == "B":
            assert not value[:, rank:].any()
    ws.reset_adapter()
