"""The cross-feature refusal table: each row refuses its combination and no more."""

from __future__ import annotations

import types
from typing import Any

import pytest

from lora_flwr.config import (
    REFUSALS,
    ExperimentConfig,
    HeadConfig,
    Refusal,
    check_cross_feature,
    cross_feature_errors,
    unflatten,
)
from lora_flwr.config.fields import field_types
from lora_flwr.config.load import build

HEAD = {"lora.modules_to_save": "classifier"}
SECAGG = {"secagg.enabled": True, "guards.norm_guard": "off", "guards.weight_cap": 0.0}
LDA = {**HEAD, "head.calibration": "lda"}

# Row keys -> (flat settings that trigger the row, nearby settings that do not).
CASES: dict[tuple[str, ...], tuple[dict[str, Any], dict[str, Any]]] = {
    ("model.implementation", "model.name"): (
        {"model.name": "tiny-bert", "model.implementation": "native"},
        {"model.name": "minilm", "model.implementation": "native"},
    ),
    ("model.quantization", "fed.aggregation"): (
        {"model.quantization": "nf4", "fed.aggregation": "flora"},
        {"model.quantization": "nf4", "fed.aggregation": "flexlora"},
    ),
    ("train.local_steps", "train.local_epochs"): (
        {"train.local_steps": 0},
        {"train.local_steps": 0, "train.local_epochs": 1.0},
    ),
    ("train.weight_decay", "train.lr"): (
        {"train.lr": 1e-2, "train.weight_decay": 100.0},
        {"train.lr": 1e-2, "train.weight_decay": 99.0},
    ),
    ("train.momentum", "train.optimizer"): (
        {"train.momentum": 0.9},
        {"train.momentum": 0.9, "train.optimizer": "sgd"},
    ),
    ("sampling.min_clients", "fed.num_clients"): (
        {"fed.num_clients": 3, "sampling.min_clients": 4},
        {"fed.num_clients": 4, "sampling.min_clients": 4},
    ),
    ("sampling.min_available", "fed.num_clients"): (
        {"fed.num_clients": 3, "sampling.min_available": 4},
        {"fed.num_clients": 4, "sampling.min_available": 4},
    ),
    ("sampling.min_replies", "fed.num_clients"): (
        {"fed.num_clients": 3, "sampling.min_replies": 4},
        {"fed.num_clients": 4, "sampling.min_replies": 4},
    ),
    ("eval.min_clients", "fed.num_clients"): (
        {"fed.num_clients": 3, "eval.min_clients": 4},
        {"fed.num_clients": 4, "eval.min_clients": 4},
    ),
    ("guards.robust", "privacy.noise_multiplier"): (
        {"privacy.noise_multiplier": 1.0, "guards.robust": "median"},
        {"privacy.noise_multiplier": 1.0},
    ),
    ("guards.filter", "privacy.noise_multiplier"): (
        {"privacy.noise_multiplier": 1.0, "guards.filter": "cosine"},
        {"privacy.noise_multiplier": 1.0, "guards.filter": "none"},
    ),
    ("head.mode", "head.calibration"): (
        {**LDA, "head.mode": "local"},
        {**LDA, "head.mode": "frozen"},
    ),
    ("head.calibration", "secagg.enabled", "privacy.noise_multiplier"): (
        {**LDA, "privacy.noise_multiplier": 1.0},
        {**HEAD, "privacy.noise_multiplier": 1.0},
    ),
    ("head.calibration", "guards.robust"): (
        {**LDA, "guards.robust": "median"},
        {**HEAD, "guards.robust": "median"},
    ),
    ("head.warmup_rounds", "head.mode"): (
        {**HEAD, "head.mode": "local", "head.warmup_rounds": 2},
        {**HEAD, "head.mode": "frozen", "head.warmup_rounds": 2},
    ),
    ("sampling.min_clients", "secagg.enabled"): (
        {**SECAGG, "sampling.min_clients": 1},
        SECAGG,
    ),
    ("guards.norm_guard", "secagg.enabled"): (
        {**SECAGG, "guards.norm_guard": "clip"},
        SECAGG,
    ),
    ("guards.weight_cap", "secagg.enabled"): (
        {**SECAGG, "guards.weight_cap": 1.5},
        SECAGG,
    ),
    ("guards.max_update_norm", "secagg.enabled"): (
        {**SECAGG, "guards.max_update_norm": 5.0},
        {"guards.max_update_norm": 5.0},
    ),
    ("guards.robust", "secagg.enabled"): (
        {**SECAGG, "guards.robust": "median"},
        SECAGG,
    ),
    ("guards.filter", "secagg.enabled"): (
        {**SECAGG, "guards.filter": "krum"},
        SECAGG,
    ),
    ("compression.codec", "secagg.enabled"): (
        {**SECAGG, "compression.codec": "int8"},
        {"compression.codec": "int8"},
    ),
    ("privacy.noise_multiplier", "secagg.enabled"): (
        {**SECAGG, "privacy.noise_multiplier": 1.0},
        SECAGG,
    ),
    ("fed.rank_tiers", "secagg.enabled"): (
        {**SECAGG, "fed.rank_tiers": "4,8"},
        {**SECAGG, "fed.rank_tiers": "8"},
    ),
    ("fed.rank_tiers", "lora.r"): (
        {"fed.rank_tiers": "4,16"},
        {"fed.rank_tiers": "4,8"},
    ),
    ("lora.lora_alpha", "lora.r", "lora.use_rslora"): (
        {"lora.r": 4, "lora.lora_alpha": 4e4 + 4},
        {"lora.r": 4, "lora.lora_alpha": 2e4, "lora.use_rslora": True},
    ),
    ("head.calibration", "lora.modules_to_save"): (
        {"head.calibration": "lda"},
        LDA,
    ),
    ("head.mode", "lora.modules_to_save"): (
        {"head.mode": "reinit"},
        {**HEAD, "head.mode": "reinit"},
    ),
    ("loss.name", "model.task"): (
        {"model.task": "causal_lm", "loss.name": "fedlc"},
        {"model.task": "seq_cls", "loss.name": "fedlc"},
    ),
}


def _id(row: Refusal) -> str:
    return "+".join(row.keys)


def test_every_row_has_a_case_and_rows_are_distinct() -> None:
    # Prepare
    keys = [row.keys for row in REFUSALS]

    # Execute / Assert
    assert len(set(keys)) == len(keys)
    assert set(keys) == set(CASES)


@pytest.mark.parametrize("row", REFUSALS, ids=_id)
def test_row_refuses_its_combination_naming_every_key(row: Refusal) -> None:
    # Prepare
    trigger, _ = CASES[row.keys]

    # Execute
    with pytest.raises(ValueError) as info:
        ExperimentConfig.from_flat(trigger)

    # Assert: this row's message (first key, what would work), naming every key
    message = str(info.value)
    fixed = row.fix.split("{")[0]  # the words before any value filled in
    assert message.startswith(f"`{row.keys[0]}` should be {fixed}")
    assert " but the value passed is " in message
    for key in row.keys:
        assert key in message, key


@pytest.mark.parametrize("row", REFUSALS, ids=_id)
def test_a_nearby_config_is_accepted(row: Refusal) -> None:
    # Prepare
    _, nearby = CASES[row.keys]

    # Execute
    cfg = ExperimentConfig.from_flat(nearby)

    # Assert: built as asked, and no row objects to it
    assert {key: cfg.to_flat()[key] for key in nearby} == nearby
    assert cross_feature_errors(cfg) == []


@pytest.mark.parametrize("row", [r for r in REFUSALS if r.section], ids=_id)
def test_a_row_within_one_section_refuses_that_section_alone(row: Refusal) -> None:
    # Prepare: only the row's own section of the triggering settings
    trigger, _ = CASES[row.keys]
    section = unflatten(trigger)[row.section]
    cls = field_types(ExperimentConfig)[row.section]

    # Execute / Assert
    with pytest.raises(ValueError, match=f"^`{row.keys[0]}` should be"):
        build(cls, section, prefix=f"{row.section}.")


def test_rows_across_sections_are_applied_to_the_whole_config() -> None:
    # Prepare: valid alone, refused together with an empty lora.modules_to_save
    head = HeadConfig(mode="local")

    # Execute / Assert
    with pytest.raises(ValueError, match="`head.mode` should be 'averaged' when"):
        ExperimentConfig(head=head)


def _unchecked(**sections: dict[str, Any]) -> Any:
    """A stand-in config with the defaults and changes no check has seen."""
    plain = ExperimentConfig().to_dict()
    for name, changes in sections.items():
        plain[name] = {**plain[name], **changes}
    return types.SimpleNamespace(
        **{
            k: types.SimpleNamespace(**v) if isinstance(v, dict) else v
            for k, v in plain.items()
        }
    )


def test_cross_feature_errors_lists_every_refusal_in_table_order() -> None:
    # Prepare: two refusals at once (building a config would stop at the first)
    cfg = _unchecked(
        secagg={"enabled": True},
        guards={"norm_guard": "off", "weight_cap": 1.5},
        head={"mode": "local"},
    )

    # Execute
    errors = cross_feature_errors(cfg)

    # Assert
    assert [e.split("`")[1] for e in errors] == ["guards.weight_cap", "head.mode"]
    assert "(with secagg.enabled = true)" in errors[0]
    assert "(with lora.modules_to_save = [])" in errors[1]
    with pytest.raises(ValueError) as info:
        check_cross_feature(cfg)
    assert str(info.value).splitlines() == errors


def test_the_default_config_triggers_no_refusal() -> None:
    # Prepare / Execute / Assert
    assert cross_feature_errors(ExperimentConfig()) == []
    check_cross_feature(ExperimentConfig())


def test_the_update_filter_is_cosine_by_default_and_off_where_it_cannot_act() -> None:
    assert ExperimentConfig().guards.filter == "auto"
    assert ExperimentConfig().update_filter() == "cosine"
    dp = ExperimentConfig.from_flat({"privacy.noise_multiplier": 1.0})
    assert dp.update_filter() == "none"
    secagg = ExperimentConfig.from_flat(SECAGG)
    assert secagg.update_filter() == "none"
    krum = ExperimentConfig.from_flat({"guards.filter": "krum"})
    assert krum.update_filter() == "krum"
    off = ExperimentConfig.from_flat({"guards.filter": "none"})
    assert off.update_filter() == "none"
