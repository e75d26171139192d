"""A resumed run is the same run: its config is checked against the one it ran with."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora_flwr import simulation
from lora_flwr.aggregation import ServerState
from lora_flwr.config import ExperimentConfig
from lora_flwr.config.identity import IDENTITY_EXEMPT, fingerprint, run_identity
from lora_flwr.fl.checkpoint import (
    META_FILE,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"


def _smoke(*overrides: str) -> ExperimentConfig:
    return ExperimentConfig.from_toml(SMOKE).with_overrides(list(overrides))


def _state() -> ServerState:
    return ServerState(
        round=2,
        arrays={"q.lora_A.weight": np.ones((2, 3), dtype=np.float32)},
        base_delta={},
        fold_log=(),
        extra={},
    )


def _interrupted_run(run_dir: Path, cfg: ExperimentConfig) -> None:
    """What a run of ``cfg`` killed after round 2 of 4 leaves in ``run_dir``."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    (run_dir / "history.json").write_text("[]")
    save_checkpoint(run_dir, 2, _state(), {}, cfg)


def _edit_toml(path: Path, section: str, key: str, value: str) -> None:
    """Set ``[section] key = value`` (a top-level key when ``section`` is empty)."""
    lines = path.read_text().splitlines()
    table = ""
    for i, line in enumerate(lines):
        if line.startswith("["):
            table = line.strip("[]")
        elif table == section and line.startswith(f"{key} = "):
            lines[i] = f"{key} = {value}"
            break
    else:
        raise AssertionError(f"no {section}.{key} in {path}")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- identity
def test_the_identity_leaves_out_only_where_a_run_is_written_and_how_it_shows() -> None:
    # Prepare
    cfg = _smoke()
    moved = cfg.with_overrides(
        [
            "name=other",
            "output_dir=/elsewhere",
            "on_existing=resume",
            "compute.profile=true",
            "compute.gradient_checkpointing=true",
            "compute.progress_every=0",
        ]
    )
    other_lr = cfg.with_overrides(["train.lr=0.5"])

    # Execute
    keys = run_identity(cfg).keys()

    # Assert
    assert IDENTITY_EXEMPT == (
        "name",
        "output_dir",
        "on_existing",
        "compute.profile",
        "compute.gradient_checkpointing",
        "compute.progress_every",
        "eval.benchmark",
        "eval.benchmark_split",
        "eval.benchmark_per_subject",
        "eval.samples",
        "eval.sample_tokens",
    )
    assert set(keys) == set(cfg.to_flat()) - set(IDENTITY_EXEMPT)
    assert fingerprint(run_identity(moved)) == fingerprint(run_identity(cfg))
    assert fingerprint(run_identity(other_lr)) != fingerprint(run_identity(cfg))
    assert len(fingerprint(run_identity(cfg))) == 64  # sha256, hex


def test_a_checkpoint_stores_the_identity_of_the_config_it_ran_with(
    tmp_path: Path,
) -> None:
    # Prepare
    cfg = _smoke("fed.num_rounds=4")

    # Execute
    save_checkpoint(tmp_path, 2, _state(), {}, cfg)
    meta = json.loads((tmp_path / "state" / "round-002" / META_FILE).read_text())
    back = load_checkpoint(tmp_path / "state" / "round-002")

    # Assert
    assert meta["identity"]["fingerprint"] == fingerprint(run_identity(cfg))
    assert meta["identity"]["config"] == run_identity(cfg)
    assert back.identity == run_identity(cfg)


# ---------------------------------------------------------- resume checks
def test_a_resume_with_another_lr_is_refused_naming_both_values(
    tmp_path: Path,
) -> None:
    # Prepare
    run_dir = tmp_path / "x"
    _interrupted_run(run_dir, _smoke("fed.num_rounds=4", "name=x"))
    now = _smoke("fed.num_rounds=4", "name=x", "on_existing=resume", "train.lr=0.5")

    # Execute
    with pytest.raises(ValueError) as err:
        resume_checkpoint(now, run_dir)

    # Assert
    assert str(err.value) == (
        f"cannot resume {run_dir}: its config differs in train.lr (0.02 there, "
        f"0.5 now); rerun with the run's own config (--resume {run_dir}) or start "
        "a new run (another name)"
    )


def test_a_resume_names_every_key_that_differs(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "x"
    _interrupted_run(run_dir, _smoke("fed.num_rounds=4"))
    now = _smoke("fed.num_rounds=4", "seed=3", "model.name=minilm", "lora.r=8")

    # Execute
    with pytest.raises(ValueError) as err:
        resume_checkpoint(now, run_dir)

    # Assert
    assert str(err.value).startswith(
        f"cannot resume {run_dir}: its config differs in seed (0 there, 3 now), "
        'model.name ("tiny-bert" there, "minilm" now), lora.r (4 there, 8 now); '
    )


def test_a_resume_elsewhere_with_the_same_config_continues(tmp_path: Path) -> None:
    # Prepare
    run_dir = tmp_path / "x"
    _interrupted_run(run_dir, _smoke("fed.num_rounds=4"))
    now = _smoke(
        "fed.num_rounds=4",
        f"output_dir={tmp_path}",
        "name=x",
        "on_existing=resume",
        "compute.profile=true",
    )

    # Execute
    point = resume_checkpoint(now, run_dir)

    # Assert
    assert point is not None and point.counters["round"] == 2


def test_a_resume_before_any_checkpoint_is_checked_against_config_toml(
    tmp_path: Path,
) -> None:
    # Prepare: killed before round 1 ended: config.toml, no state/
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(_smoke("fed.num_rounds=4").to_toml())
    now = _smoke("fed.num_rounds=4", "train.lr=0.5")

    # Execute
    with pytest.raises(ValueError) as err:
        resume_checkpoint(now, run_dir)

    # Assert
    assert str(err.value).startswith(
        f"cannot resume {run_dir}: its config differs in train.lr (0.02 there, "
        "0.5 now); "
    )


def test_a_checkpoint_without_identity_is_checked_against_config_toml(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a checkpoint written before runs stored their identity
    run_dir = tmp_path / "x"
    cfg = _smoke("fed.num_rounds=4")
    _interrupted_run(run_dir, cfg)
    meta_path = run_dir / "state" / "round-002" / META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["identity"]
    meta_path.write_text(json.dumps(meta))

    # Execute
    with caplog.at_level(logging.WARNING, logger="lora_flwr"):
        point = resume_checkpoint(cfg, run_dir)
    with pytest.raises(ValueError) as err:
        resume_checkpoint(_smoke("fed.num_rounds=4", "train.lr=0.5"), run_dir)

    # Assert
    assert point is not None and point.counters["round"] == 2
    assert point.identity is None
    assert [r.getMessage() for r in caplog.records] == [
        f"{latest_checkpoint(run_dir)} was written without the run's config; only "
        "config.toml can be compared, and it holds the last attempt's config"
    ]
    assert "differs in train.lr (0.02 there, 0.5 now)" in str(err.value)


# ------------------------------------------- run_simulation.py, before Ray
@pytest.fixture
def main_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``simulation.main`` on smoke.toml with a stand-in engine, inside tmp_path."""
    monkeypatch.chdir(tmp_path)

    def call(argv: list[str]) -> int:
        started: list[ExperimentConfig] = []

        def record(cfg: ExperimentConfig, verbose: bool = False) -> None:
            started.append(cfg)

        code = simulation.main(
            ["--config", str(SMOKE), *argv], run_fn=record, hard_exit=False
        )
        call.started = started  # type: ignore[attr-defined]
        return code

    return call


def test_on_existing_resume_with_another_lr_exits_2_before_the_engine(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    _interrupted_run(tmp_path / "results" / "x", _smoke("name=x", "fed.num_rounds=4"))
    toml_before = (tmp_path / "results" / "x" / "config.toml").read_text()
    argv = ["--set", "name=x", "--set", "fed.num_rounds=4"]

    # Execute
    code = main_with([*argv, "--set", "on_existing=resume", "--set", "train.lr=0.5"])

    # Assert
    assert code == 2 and main_with.started == []
    assert capsys.readouterr().err.splitlines() == [
        "error: cannot resume results/x: its config differs in train.lr (0.02 "
        "there, 0.5 now); rerun with the run's own config (--resume results/x) or "
        "start a new run (another name)"
    ]
    assert (tmp_path / "results" / "x" / "config.toml").read_text() == toml_before


@pytest.mark.parametrize(
    ("section", "key", "value", "differs"),
    [
        ("train", "lr", "0.5", "train.lr (0.02 there, 0.5 now)"),
        ("", "seed", "7", "seed (0 there, 7 now)"),
        ("model", "max_length", "16", "model.max_length (32 there, 16 now)"),
        ("lora", "r", "8", "lora.r (4 there, 8 now)"),
    ],
)
def test_an_edited_config_toml_is_refused_by_resume(
    main_with: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    section: str,
    key: str,
    value: str,
    differs: str,
) -> None:
    # Prepare
    run_dir = tmp_path / "results" / "x"
    _interrupted_run(run_dir, _smoke("name=x", "fed.num_rounds=4"))
    _edit_toml(run_dir / "config.toml", section, key, value)

    # Execute
    code = main_with(["--resume", "results/x"])

    # Assert
    assert code == 2 and main_with.started == []
    assert capsys.readouterr().err.splitlines() == [
        "error: cannot resume results/x: its config.toml was edited after the run "
        f"started; it differs from the config its checkpoint was written with in "
        f"{differs}; restore config.toml or start a new run (another name)"
    ]


def test_resume_of_an_unedited_run_reaches_the_engine(
    main_with: Any, tmp_path: Path
) -> None:
    # Prepare
    _interrupted_run(tmp_path / "results" / "x", _smoke("name=x", "fed.num_rounds=4"))

    # Execute
    code = main_with(["--resume", "results/x"])

    # Assert
    assert code == 0
    assert [(c.name, c.on_existing, c.train.lr) for c in main_with.started] == [
        ("x", "resume", 0.02)
    ]


# ------------------------------------------------------------- ServerApp
def test_the_server_app_refuses_a_resume_with_another_config(tmp_path: Path) -> None:
    # Prepare: flwr run / the deployment scripts reach only the ServerApp
    from lora_flwr.fl.server_app import build_strategy
    from lora_flwr.rundir import release_run_dir

    run_dir = tmp_path / "x"
    _interrupted_run(run_dir, _smoke("fed.num_rounds=4", f"output_dir={tmp_path}"))
    toml_before = (run_dir / "config.toml").read_text()
    now = _smoke(
        "fed.num_rounds=4",
        f"output_dir={tmp_path}",
        "name=x",
        "on_existing=resume",
        "train.lr=0.5",
    )

    # Execute
    try:
        with pytest.raises(ValueError) as err:
            build_strategy(now, run_dir)
    finally:
        release_run_dir(run_dir)

    # Assert
    assert str(err.value).startswith(
        f"cannot resume {run_dir}: its config differs in train.lr (0.02 there, "
        "0.5 now); "
    )
    assert (run_dir / "config.toml").read_text() == toml_before


def test_the_server_app_keeps_the_first_attempts_config_toml_on_resume(
    tmp_path: Path,
) -> None:
    # Prepare
    from lora_flwr.fl.server_app import build_strategy
    from lora_flwr.rundir import release_run_dir

    run_dir = tmp_path / "x"  # killed before round 1 ended: no checkpoint yet
    run_dir.mkdir()
    first = _smoke("fed.num_rounds=4", f"output_dir={tmp_path}", "name=x")
    (run_dir / "config.toml").write_text(first.to_toml())
    toml_before = (run_dir / "config.toml").read_text()
    now = first.with_overrides(["on_existing=resume", "compute.profile=true"])

    # Execute
    try:
        strategy = build_strategy(now, run_dir)
    finally:
        release_run_dir(run_dir)

    # Assert
    assert strategy.offset == 0
    assert (run_dir / "config.toml").read_text() == toml_before
    assert 'on_existing = "refuse"' in toml_before
