"""Tests of ``head.mode``: how the saved modules (a new classifier head) are treated."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays
from test_runner import SAVE_CFG, _plan, _random
from test_strategy import (
    LAYOUT,
    NO_PARAMS,
    R,
    _cfg,
    _full,
    _initial,
    _manager,
    _res,
)
from torch import nn

from lora_flwr.aggregation import available_rules, get_rule
from lora_flwr.aggregation.base import HEAD_MODES
from lora_flwr.config import HEAD_MODES as CONFIG_HEAD_MODES
from lora_flwr.config import ExperimentConfig, LoraConfig
from lora_flwr.fl.checkpoint import resume_checkpoint
from lora_flwr.fl.runner import MemoryStore, finish, layout_of, prepare
from lora_flwr.fl.strategy import FedLoRA
from lora_flwr.lora import LoRAAdapter
from lora_flwr.protocol import AdapterLayout, Plan, group_of

HEAD = "classifier.bias"


def _head_cfg(**sections: dict[str, Any]) -> ExperimentConfig:
    """``_cfg(**sections)`` with the classifier as a saved module."""
    cfg = _cfg()
    lora = LoraConfig(
        r=R, lora_alpha=2.0 * R, lora_dropout=0.0, modules_to_save=("classifier",)
    )
    changed = {
        name: dataclasses.replace(getattr(cfg, name), **fields)
        for name, fields in sections.items()
    }
    return dataclasses.replace(cfg, lora=lora, **changed)


def _head_strategy(
    evaluate_fn: Callable[[int, Any, Any], dict[str, float]] | None = None,
    **sections: dict[str, Any],
) -> FedLoRA:
    initial = _initial()
    initial[HEAD] = np.array([0.5, -0.5], np.float32)  # a seeded, non-zero head
    return FedLoRA(
        cfg=_head_cfg(**sections),
        layout=LAYOUT,
        initial=initial,
        evaluate_fn=evaluate_fn,
    )


def _plans(strategy: FedLoRA, server_round: int) -> dict[int, Plan]:
    instructions = strategy.configure_fit(server_round, NO_PARAMS, _manager())
    return {
        strategy.partition_of[p.cid]: Plan.from_config(ins.config)
        for p, ins in instructions
    }


def _groups(plan: Plan) -> tuple[str, str, str, str]:
    return tuple(  # type: ignore[return-value]
        "".join(sorted(g)) for g in (plan.receive, plan.train, plan.send, plan.keep)
    )


def test_the_two_lists_of_head_modes_agree() -> None:
    assert HEAD_MODES == CONFIG_HEAD_MODES


@pytest.mark.parametrize(
    ("head", "warmup", "server_round", "want"),
    [
        ("averaged", 0, 1, ("ABM", "ABM", "ABM", "")),
        ("frozen", 0, 1, ("ABM", "AB", "AB", "")),
        ("frozen", 2, 2, ("ABM", "ABM", "ABM", "")),
        ("frozen", 2, 3, ("ABM", "AB", "AB", "")),
        ("local", 0, 1, ("AB", "ABM", "AB", "M")),
        ("reinit", 0, 2, ("AB", "ABM", "ABM", "")),
    ],
)
def test_each_head_mode_gives_its_plan(
    head: str, warmup: int, server_round: int, want: tuple[str, ...]
) -> None:
    # Prepare
    strategy = _head_strategy(head={"mode": head, "warmup_rounds": warmup})

    # Execute
    plans = _plans(strategy, server_round)

    # Assert: every client gets the same groups; the payload holds the received.
    assert {_groups(p) for p in plans.values()} == {want}


@pytest.mark.parametrize("rule", ["ffa", "fedsa", "rolora", "flora"])
def test_head_modes_apply_on_top_of_any_rule(rule: str) -> None:
    # Prepare
    strategy = _head_strategy(fed={"aggregation": rule}, head={"mode": "local"})

    # Execute
    plans = _plans(strategy, 1)

    # Assert: M is kept, never received or sent; the rule's factor groups stay.
    own = strategy.rule.round_groups(1)
    for plan in plans.values():
        assert "M" in plan.keep and "M" not in plan.receive | plan.send
        assert plan.send == own.send - {"M"}
        assert plan.train == own.train


@pytest.mark.parametrize("head", ["frozen", "local"])
@pytest.mark.parametrize("optimizer", ["none", "fedavgm"])
def test_a_head_nobody_sent_stays_exactly_as_it_was(head: str, optimizer: str) -> None:
    # Prepare: two rounds, so that FedAvgM's momentum would move an averaged M.
    strategy = _head_strategy(head={"mode": head}, server_opt={"name": optimizer})
    head_before = strategy.global_arrays()[HEAD].copy()
    means = []
    for server_round, (x, y) in enumerate([(1.0, 3.0), (5.0, 7.0)], start=1):
        instructions = strategy.configure_fit(server_round, NO_PARAMS, _manager())
        proxies = {strategy.partition_of[p.cid]: p for p, _ in instructions}
        results = [
            (proxies[0], _res(_full(x, groups="AB"), 1, pid=0)),
            (proxies[1], _res(_full(y, groups="AB"), 1, pid=1)),
        ]

        # Execute
        params, metrics = strategy.aggregate_fit(server_round, results, [])
        assert params is not None and metrics["fit_ok"] == 2
        means.append(strategy.global_arrays()["q.lora_A.weight"].copy())

    # Assert: the factors moved (mean 2, then 6 or with momentum beyond), M never.
    np.testing.assert_array_equal(strategy.global_arrays()[HEAD], head_before)
    np.testing.assert_allclose(means[0], 2.0, rtol=1e-6)
    assert float(means[1].mean()) >= 6.0 - 1e-5


def test_reinit_starts_every_client_from_the_seeded_head_and_averages_it() -> None:
    # Prepare: round 1 moves the global head away from its init.
    strategy = _head_strategy(head={"mode": "reinit"})
    seeded = strategy.global_arrays()[HEAD].copy()
    for server_round, values in ((1, (1.0, 3.0)), (2, (2.0, 4.0))):
        instructions = strategy.configure_fit(server_round, NO_PARAMS, _manager())
        proxies = {strategy.partition_of[p.cid]: p for p, _ in instructions}
        payloads = [parameters_to_ndarrays(ins.parameters) for _, ins in instructions]
        starts = [s.start for s in strategy.core.fit_sent.values()]

        # Execute
        strategy.aggregate_fit(
            server_round,
            [
                (proxies[0], _res(_full(values[0]), 1, pid=0)),
                (proxies[1], _res(_full(values[1]), 1, pid=1)),
            ],
            [],
        )

        # Assert: no head in the payload (A and B only); the server knows each
        # client started from the seeded head; the new global is the mean.
        assert all(len(p) == 2 for p in payloads)
        for start in starts:
            np.testing.assert_array_equal(start[HEAD], seeded)
        np.testing.assert_allclose(
            strategy.global_arrays()[HEAD], np.mean(values), rtol=1e-6
        )


def test_a_local_head_is_evaluated_per_client_and_globally(tmp_path: Path) -> None:
    # Prepare: a global evaluation function that records its calls.
    calls: list[int] = []

    def evaluate_fn(server_round: int, arrays: Any, delta: Any) -> dict[str, float]:
        calls.append(server_round)
        return {"loss": 0.5, "accuracy": 0.5}

    strategy = _head_strategy(head={"mode": "local"}, evaluate_fn=evaluate_fn)

    # Execute
    strategy.evaluate(0, NO_PARAMS)
    instructions = strategy.configure_evaluate(1, NO_PARAMS, _manager())

    # Assert: the held-out split with the global (seeded) head, and every client on
    # its own split with its own head (kept, not received).
    assert calls == [0]
    assert len(instructions) == 4
    for _, ins in instructions:
        plan = Plan.from_config(ins.config)
        assert plan.keep == frozenset("M") and "M" not in plan.receive
        assert not plan.train and not plan.send


def test_a_local_head_survives_on_the_client_and_is_never_sent(
    build: Callable[..., tuple[LoRAAdapter, dict[str, np.ndarray]]],
) -> None:
    # Prepare: the plan of head.mode = 'local' on the tiny adapter.
    adapter, initial = build()
    layout = layout_of(adapter)
    plan = _plan(receive="AB", train="ABM", send="AB", keep=frozenset("M"))
    store = MemoryStore()
    heads = [n for n in layout.names if group_of(n) == "M"]
    trained = {n: np.full(initial[n].shape, 0.25, np.float32) for n in heads}

    # Execute: call 1 "trains" the head; call 2 starts from what was kept.
    prepare(adapter, initial, plan, _random(layout.payload_spec(plan), 1), store)
    adapter.set_named_weights({**adapter.get_named_weights(), **trained})
    reply = finish(adapter, plan, store)
    prepare(adapter, initial, plan, _random(layout.payload_spec(plan), 2), store)

    # Assert
    assert heads and sorted(store.private()) == sorted(heads)
    assert len(reply) == len(layout.reply_spec(plan))
    assert not any(group_of(n) == "M" for n, _ in layout.reply_spec(plan))
    for name in heads:
        np.testing.assert_array_equal(adapter.get_named_weights()[name], trained[name])


@pytest.mark.parametrize(
    ("head", "lora_saved", "match"),
    [
        ({"mode": "sideways"}, True, "head.mode"),
        ({"mode": "local"}, False, "modules_to_save"),
        ({"mode": "reinit", "warmup_rounds": 2}, True, "unless head.mode"),
        ({"mode": "frozen", "warmup_rounds": -1}, True, ">= 0"),
    ],
)
def test_bad_head_settings_are_clear_errors(
    head: dict[str, Any], lora_saved: bool, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        cfg = _head_cfg(head=head) if lora_saved else _cfg(head=head)
        ExperimentConfig.from_dict(cfg.to_dict())


def test_the_rule_refuses_a_head_mode_without_saved_modules() -> None:
    rule = get_rule("fedit")(LAYOUT, _initial(), 1.0)
    no_head = {n: a for n, a in _initial().items() if group_of(n) != "M"}
    bare = AdapterLayout(tuple(no_head), tuple(a.shape for a in no_head.values()))
    with pytest.raises(ValueError, match="needs saved modules"):
        get_rule("fedit")(bare, no_head, 1.0).use_head("frozen")
    with pytest.raises(ValueError, match="should be one of"):
        rule.use_head("sideways")


def test_a_run_with_local_heads_cannot_be_resumed(tmp_path: Path) -> None:
    cfg = dataclasses.replace(_head_cfg(head={"mode": "local"}), on_existing="resume")
    with pytest.raises(ValueError, match="cannot be resumed"):
        resume_checkpoint(cfg, tmp_path)


def test_every_rule_accepts_every_head_mode() -> None:
    for name in available_rules():
        for mode in HEAD_MODES:
            rule = get_rule(name)(LAYOUT, _initial(), 1.0)
            rule.use_head(mode)
            assert rule.head == mode


@pytest.fixture
def build(
    make_mlp: Callable[..., nn.Module],
) -> Callable[..., tuple[LoRAAdapter, dict[str, np.ndarray]]]:
    """An adapter with a saved module on a fresh MLP, and its seeded init."""

    def make() -> tuple[LoRAAdapter, dict[str, np.ndarray]]:
        adapter = LoRAAdapter(SAVE_CFG, seed=0)
        adapter.apply(make_mlp())
        return adapter, adapter.get_named_weights()

    return make
