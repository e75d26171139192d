"""Client-level DP: the accountant's epsilon and the strategy's clip + noise."""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest

from lora_flwr.aggregation import get_rule
from lora_flwr.config import ExperimentConfig, GuardsConfig, PrivacyConfig
from lora_flwr.privacy import (
    INSTALL_DP,
    AccountantMissingError,
    epsilon,
    require_accountant,
)


def _eps(**kw: object) -> float:
    args: dict[str, object] = {
        "noise_multiplier": 2.0,
        "num_clients": 10,
        "sampled": 4,
        "rounds": 8,
        "delta": 1e-5,
    }
    args.update(kw)
    return epsilon(**args)  # type: ignore[arg-type]


def test_epsilon_moves_the_right_way() -> None:
    assert _eps(rounds=0) == 0.0
    assert _eps(noise_multiplier=3.0) < _eps(noise_multiplier=2.0)
    assert _eps(rounds=16) > _eps(rounds=8)
    assert _eps(sampled=2) < _eps(sampled=4)
    assert _eps() < _eps(amplified=False)
    assert _eps(sampled=10) == pytest.approx(_eps(amplified=False))


def test_unamplified_epsilon_is_within_the_classic_rdp_bound() -> None:
    # Gaussian mechanism, sensitivity 2C under replace-one: sigma = z / 2.
    # RDP T * alpha / (2 sigma^2), converted with eps = rdp + log(1/delta)/(alpha-1);
    # the accountant's conversion is tighter, never looser.
    z, rounds, delta = 4.0, 8, 1e-5
    sigma = z / 2
    classic = min(
        rounds * a / (2 * sigma**2) + math.log(1 / delta) / (a - 1)
        for a in np.linspace(1.01, 200, 20000)
    )
    got = _eps(noise_multiplier=z, rounds=rounds, delta=delta, amplified=False)
    assert 0.7 * classic < got <= classic + 1e-9


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"sampled": 11}, "sampled=11"),
        ({"delta": 1.0}, "delta"),
    ],
)
def test_epsilon_refuses_bad_arguments(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _eps(**kw)


@pytest.mark.parametrize("rule", ["flora", "fedex", "flexlora", "hetlora"])
def test_dp_is_refused_for_rules_that_are_not_a_mean(rule: str) -> None:
    with pytest.raises(ValueError, match="differential privacy .* cannot be combined"):
        get_rule(rule).check_setup(rank_tiers=(), server_optimizer="none", dp=True)


def test_dp_with_a_robust_mean_is_refused_by_the_schema() -> None:
    with pytest.raises(ValueError, match="`guards.robust` should be 'none' with"):
        ExperimentConfig(
            privacy=PrivacyConfig(noise_multiplier=1.0),
            guards=GuardsConfig(robust="median"),
        )


def _hide_accountant(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail, as without the `dp` extra.
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    monkeypatch.setitem(sys.modules, "dp_accounting.rdp", None)


def test_a_missing_accountant_is_refused_in_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    _hide_accountant(monkeypatch)

    # Execute
    with pytest.raises(AccountantMissingError) as info:
        require_accountant()

    # Assert: one line, the key, the install command; caught like a config error
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("`privacy.noise_multiplier` > 0 needs ")
    assert message.endswith("install it with: pip install 'lora_flwr[dp]'")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ImportError)


def test_epsilon_without_the_accountant_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    _hide_accountant(monkeypatch)

    # Execute / Assert: round 0 needs no accountant; any later round does
    assert _eps(rounds=0) == 0.0
    with pytest.raises(AccountantMissingError, match=re.escape(INSTALL_DP)):
        _eps()


def test_the_accountant_is_accepted_when_installed() -> None:
    # Execute / Assert
    require_accountant()
    assert "dp_accounting.rdp" in sys.modules
