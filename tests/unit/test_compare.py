"""lora_flwr.compare: run planning, summaries, the table and the report block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lora_flwr.compare import (
    BEGIN,
    END,
    HOMOGENEOUS,
    TIERS,
    main,
    plan_runs,
    summarize,
    table,
    write_report,
)
from lora_flwr.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[2]


def _history(accs: list[float], seconds: float = 10.0, err: Any = 0.5) -> list[Any]:
    out: list[dict[str, Any]] = [{"round": 0, "test_accuracy": accs[0]}]
    for i, acc in enumerate(accs[1:], start=1):
        out.append(
            {
                "round": i,
                "test_accuracy": acc,
                "bytes_up": 100,
                "bytes_down": 300,
                "round_seconds": seconds,
                "agg_error": err,
            }
        )
    return out


def test_plan_runs_gives_every_rule_every_seed_and_the_tier_rules_tiers() -> None:
    # Prepare
    cfg = ExperimentConfig.from_toml(REPO / "configs" / "smoke.toml")

    # Execute
    specs = plan_runs(
        cfg,
        rules=["fedit", "flora", "hetlora"],
        seeds=[0, 1],
        tiers=[2, 4, 8],
        work=Path("/w"),
    )

    # Assert: 3 rules x 2 seeds, plus 2 tier rules x 2 seeds; seed 0 first.
    assert len(specs) == 10
    assert [s.seed for s in specs[:5]] == [0] * 5
    homo = [s for s in specs if s.setting == HOMOGENEOUS]
    tier = [s for s in specs if s.setting == TIERS]
    assert sorted({s.rule for s in tier}) == ["flora", "hetlora"]
    for spec in homo:
        assert spec.cfg.fed.aggregation == spec.rule
        assert spec.cfg.seed == spec.seed
        assert spec.cfg.fed.rank_tiers == ()
        assert spec.cfg.output_dir == "/w/homogeneous"
    for spec in tier:
        assert spec.cfg.fed.rank_tiers == (2, 4, 8)
        assert spec.cfg.lora.r == 8
    names = [(s.setting, s.cfg.name) for s in specs]
    assert len(set(names)) == len(names)


def test_summarize_means_stds_and_time_to_target() -> None:
    # Prepare: seed 0 reaches 0.75 in round 2 (20 s), seed 1 never.
    histories = [
        _history([0.5, 0.7, 0.8, 0.78], seconds=10.0),
        _history([0.5, 0.6, 0.7, 0.74], seconds=10.0, err=None),
    ]

    # Execute
    s = summarize("fedit", histories, [100.0, 120.0], target=0.75)

    # Assert
    assert s.metric == "test_accuracy"
    assert s.final[0] == pytest.approx(0.76)
    assert s.final[1] == pytest.approx(((0.02**2 + 0.02**2) / 1) ** 0.5)
    assert s.best[0] == pytest.approx(0.77)
    assert (s.reached, s.rounds_to_target, s.seconds_to_target) == (1, 2.0, 20.0)
    assert s.bytes_up == 100 and s.bytes_down == 300
    assert s.agg_error == pytest.approx(0.5)
    assert s.wall == pytest.approx(110.0)
    assert [r for r, _ in s.curve] == [0, 1, 2, 3]
    assert [v for _, v in s.curve] == pytest.approx([0.5, 0.65, 0.75, 0.76])
    assert s.cum_bytes == [0.0, 400.0, 800.0, 1200.0]


def test_a_head_refit_counts_in_the_bytes_and_the_time_to_target() -> None:
    # Prepare: a refit before round 1 (30 s) and after every round.
    history = _history([0.5, 0.7, 0.8], seconds=10.0)
    history[0]["calib_seconds"] = 30.0
    for r in history[1:]:
        r.update(bytes_up_calib=1000, bytes_down_calib=2000, calib_seconds=5.0)

    # Execute
    s = summarize("lda", [history], [100.0], target=0.75)

    # Assert: the statistics' uplink and payloads are communication; the round-0
    # refit is part of the time to the target (round seconds hold the later ones).
    assert s.bytes_up == 1100 and s.bytes_down == 2300
    assert s.cum_bytes == [0.0, 3400.0, 6800.0]
    assert (s.rounds_to_target, s.seconds_to_target) == (2.0, 50.0)


def test_summarize_uses_the_personal_accuracy_of_a_personalised_rule() -> None:
    # Prepare
    history = [{"round": 0}] + [
        {"round": 1, "personal_accuracy": 0.9, "bytes_up": 1, "bytes_down": 1}
    ]

    # Execute
    s = summarize("fedsa", [history], [1.0], target=0.75)

    # Assert
    assert s.metric == "personal_accuracy"
    assert s.final[0] == 0.9 and s.agg_error is None and s.reached == 1


def test_table_has_one_row_per_rule_and_marks_unreached_targets() -> None:
    # Prepare
    a = summarize("fedit", [_history([0.5, 0.8])], [5.0], target=0.75)
    b = summarize("ffa", [_history([0.5, 0.6])], [6.0], target=0.75)

    # Execute
    text = table([a, b], 0.75)

    # Assert
    lines = text.splitlines()
    assert len(lines) == 4
    assert all(line.count("|") == 11 for line in lines)
    assert lines[2].startswith("| fedit | 0.800 | 0.800 | 1.0 (1/1) | 10 |")
    assert "— (0/1)" in lines[3]


def test_write_report_replaces_only_the_generated_block(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Mine\n\nintro\n\n{BEGIN}\nold\n{END}\n\n## Findings\nkept\n")

    # Execute
    write_report(out, "new table\n")

    # Assert
    text = out.read_text()
    assert (
        text == f"# Mine\n\nintro\n\n{BEGIN}\nnew table\n{END}\n\n## Findings\nkept\n"
    )


def test_bad_arguments_exit_2_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    smoke = str(REPO / "configs" / "smoke.toml")

    # Execute / Assert
    for argv, message in (
        (["--rules", "nope"], "`fed.aggregation` should be one of"),
        (["--seeds", "0"], "`--seeds` should be >= 1"),
        (["--set", "lora.r=0"], "`lora.r` should be a positive integer"),
    ):
        code = main(["--config", smoke, "--work", str(tmp_path), *argv])
        assert code == 2
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_plan_runs_adds_every_rule_on_each_label_skew_split() -> None:
    # Prepare
    cfg = ExperimentConfig.from_toml(REPO / "configs" / "smoke.toml")

    # Execute
    specs = plan_runs(
        cfg,
        rules=["fedit", "fedsa"],
        seeds=[0],
        tiers=[],
        work=Path("/w"),
        skews=[0.1, 0.5],
    )

    # Assert: the homogeneous setting as configured, then each alpha, every rule.
    settings = [(s.setting, s.rule) for s in specs]
    assert settings == [
        (HOMOGENEOUS, "fedit"),
        (HOMOGENEOUS, "fedsa"),
        ("alpha0.1", "fedit"),
        ("alpha0.1", "fedsa"),
        ("alpha0.5", "fedit"),
        ("alpha0.5", "fedsa"),
    ]
    for spec in specs:
        if spec.setting == HOMOGENEOUS:
            assert spec.cfg.data.partitioner == cfg.data.partitioner
            continue
        assert spec.cfg.data.partitioner == "dirichlet"
        assert f"alpha{spec.cfg.data.dirichlet_alpha:g}" == spec.setting
        assert spec.cfg.output_dir == f"/w/{spec.setting}"
