"""One hostile client out of three in the real Ray simulation (the reliability probes).

The probes live in ``benchmarks/reliability_probes.py`` (which prints the table in
docs/RELIABILITY.md); this test runs them and asserts on the outcome.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from probes import load_probes

ROOT = Path(__file__).resolve().parents[2]


_probes = load_probes


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return dict(_probes().run_probe(tmp_path_factory.mktemp("honest"), "honest"))


@pytest.mark.slow
def test_a_scaled_update_is_clipped_and_the_model_survives(
    tmp_path: Path, honest: dict[str, float]
) -> None:
    last = _probes().run_probe(tmp_path, "scale_1e6")

    # Without the guard this run ends at test loss ~5.8e5 (docs/RELIABILITY.md).
    assert last["norm_clipped_total"] == 2  # the attacker, both rounds
    assert math.isfinite(last["test_loss"])
    assert last["test_loss"] < honest["test_loss"] + 0.1


@pytest.mark.slow
def test_a_random_adapter_with_a_billion_examples_loses_to_the_median(
    tmp_path: Path, honest: dict[str, float]
) -> None:
    last = _probes().run_probe(tmp_path, "random_1e9", robust="median")

    # Each round either the update filter left it out or its count was capped.
    assert last["weight_capped_total"] + last["filtered_total"] == 2
    assert last["test_loss"] < honest["test_loss"] + 0.1


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["fit_metric_abc", "eval_metric_abc"])
def test_malformed_metrics_change_nothing_but_the_metric(
    tmp_path: Path, honest: dict[str, float], probe: str
) -> None:
    last = _probes().run_probe(tmp_path, probe)

    assert last["round"] == 2 and last["aggregated"] is True
    assert last["test_loss"] == pytest.approx(honest["test_loss"], abs=1e-6)


@pytest.mark.slow
def test_a_sign_flipping_client_is_left_out_by_default(
    tmp_path: Path, honest: dict[str, float]
) -> None:
    # start - 1.9 x its honest update, 10**9 examples: under the norm guard's bound,
    # so only the update filter can see it. With guards.filter = "none" this run
    # ends at 0.776 / 0.562 (docs/RELIABILITY.md).
    last = _probes().run_probe(tmp_path, "sign_flip")

    assert last["filtered_total"] == 2  # the attacker, both rounds
    assert last["test_loss"] < honest["test_loss"] + 0.05
    assert honest["filtered_total"] == 0  # the filter costs an honest run nothing


@pytest.mark.slow
def test_a_huge_evaluate_reply_cannot_own_the_federated_loss(
    tmp_path: Path, honest: dict[str, float]
) -> None:
    last = _probes().run_probe(tmp_path, "eval_huge")

    # Unguarded, fed_loss is 1e30 * 1e9 / (1e9 + ~20) ~ 1e30 (docs/RELIABILITY.md).
    assert (last["eval_clipped"], last["eval_capped"]) == (1, 1)
    assert last["fed_loss"] < 5 * honest["fed_loss"]
    assert 0 <= last["fed_accuracy"] <= 1
    assert last["test_loss"] == pytest.approx(honest["test_loss"], abs=1e-6)


@pytest.mark.slow
def test_a_run_with_30_percent_dropouts_completes(
    tmp_path: Path, honest: dict[str, float]
) -> None:
    last = _probes().run_probe(tmp_path, "dropout_30")

    # Seeded draws: 2 of the 6 fit calls fail; both rounds still aggregate.
    assert last["round"] == 2 and last["aggregated"] is True
    assert (last["fit_failed_total"], last["fit_ok_total"]) == (2, 4)
    assert last["test_loss"] < honest["test_loss"] + 0.1


@pytest.mark.slow
def test_a_run_in_which_every_fit_fails_stops_without_an_adapter(
    tmp_path: Path,
) -> None:
    from lora_flwr.results import read_history
    from lora_flwr.server.guards import RunAborted

    with pytest.raises(
        RunAborted,
        match="none of the 2 rounds produced an aggregate.*"
        "RuntimeError: dropout probe: partition",
    ):
        _probes().run_probe(tmp_path, "dropout_100")

    run_dir = tmp_path / "smoke-dropout_100"
    history = read_history(run_dir)
    assert (
        history[-1]["round"] == 2 and "none of the 2 rounds" in history[-1]["aborted"]
    )
    assert not (run_dir / "adapter").exists()
