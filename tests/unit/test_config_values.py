"""Finite values no run needs are refused; merely unusual ones are warned about."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from lora_flwr.config import ExperimentConfig, unusual_values

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))
VARIANTS = REPO / "configs" / "variants" / "label_skew.toml"


# ----------------------------------------------------------------- refused
@pytest.mark.parametrize(
    ("flat", "start"),
    [
        ({"train.lr": 1e6}, "`train.lr` should be in (0, 10]"),
        ({"train.lr": 10.5}, "`train.lr` should be in (0, 10]"),
        ({"server_opt.lr": 1e6}, "`server_opt.lr` should be in (0, 100]"),
        ({"lora.lora_alpha": 1e30}, "`lora.lora_alpha` should be "),
        ({"lora.r": 1, "lora.lora_alpha": 2e4}, "`lora.lora_alpha` should be "),
        ({"train.weight_decay": 1e4}, "`train.weight_decay` should be "),
    ],
)
def test_a_finite_value_no_run_needs_is_refused_by_name(
    flat: dict[str, Any], start: str
) -> None:
    # Execute
    with pytest.raises(ValueError) as info:
        ExperimentConfig.from_flat(flat)

    # Assert: the key and the value are named
    message = str(info.value)
    assert message.startswith(start), message
    key = next(iter(flat)) if len(flat) == 1 else "lora.lora_alpha"
    assert repr(flat[key]) in message, message


@pytest.mark.parametrize(
    "flat",
    [
        {"train.lr": 10.0, "train.optimizer": "sgd"},
        {"server_opt.lr": 100.0},
        {"lora.r": 1, "lora.lora_alpha": 1e4},
        {"lora.r": 4, "lora.lora_alpha": 2e4, "lora.use_rslora": True},
        {"train.lr": 1e-3, "train.weight_decay": 100.0},
    ],
)
def test_the_largest_accepted_values_still_build(flat: dict[str, Any]) -> None:
    # Execute
    cfg = ExperimentConfig.from_flat(flat)

    # Assert
    assert {k: cfg.to_flat()[k] for k in flat} == flat


# ------------------------------------------------------------------ warned
@pytest.mark.parametrize(
    ("flat", "words"),
    [
        ({"train.lr": 0.5}, ["train.lr = 0.5", "1e-5..1e-2", "AdamW"]),
        ({"train.lr": 1e-8}, ["train.lr = 1e-08", "1e-5..1e-2"]),
        ({"train.lr": 5.0, "train.optimizer": "sgd"}, ["train.lr = 5", "SGD"]),
        ({"lora.lora_alpha": 1024.0}, ["lora.lora_alpha = 1024", "scaling 128"]),
        (
            {"server_opt.name": "fedadam", "server_opt.lr": 5.0},
            ["server_opt.lr = 5", "fedadam"],
        ),
        (
            {"server_opt.name": "fedavgm", "server_opt.lr": 50.0},
            ["server_opt.lr = 50", "fedavgm"],
        ),
        ({"fed.prox_mu": 100.0}, ["fed.prox_mu = 100", "0.001..1"]),
        ({"loss.name": "fedlc", "loss.tau": 50.0}, ["loss.tau = 50", "fedlc"]),
        ({"train.weight_decay": 5.0}, ["train.weight_decay = 5", "0..0.1"]),
    ],
)
def test_an_unusual_value_gets_one_warning_naming_key_value_and_range(
    flat: dict[str, Any], words: list[str]
) -> None:
    # Execute
    lines = unusual_values(ExperimentConfig.from_flat(flat))

    # Assert
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert lines[0].endswith("; continuing")


@pytest.mark.parametrize(
    "flat",
    [
        # Settings a rule does not use are not warned about.
        {"server_opt.lr": 50.0},  # server_opt.name = "none": no server step
        {"loss.tau": 50.0},  # loss.name = "ce" has no tau
        {"train.lr": 0.05},
        {"train.lr": 0.5, "train.optimizer": "sgd"},
        {"fed.prox_mu": 1.0},
        {"lora.r": 64, "lora.lora_alpha": 128.0},
    ],
)
def test_usual_or_unused_values_get_no_warning(flat: dict[str, Any]) -> None:
    # Execute / Assert
    assert unusual_values(ExperimentConfig.from_flat(flat)) == []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_the_shipped_configs_are_warning_free(path: Path) -> None:
    # Execute / Assert
    assert unusual_values(ExperimentConfig.from_toml(path)) == []


def test_the_shipped_variants_are_warning_free() -> None:
    # Prepare
    base = ExperimentConfig.from_toml(REPO / "configs" / "default.toml")
    variants = tomllib.loads(VARIANTS.read_text(encoding="utf-8"))

    for name, variant in variants.items():
        # Execute
        cfg = base.with_overrides(variant["overrides"])

        # Assert
        assert unusual_values(cfg) == [], name


def test_the_default_config_is_warning_free() -> None:
    # Execute / Assert
    assert unusual_values(ExperimentConfig()) == []
