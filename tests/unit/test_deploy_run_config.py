"""lora_flwr.deploy.run_config: the experiment a launched run receives."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from lora_flwr.config import ExperimentConfig
from lora_flwr.deploy.run_config import (
    resolve_config,
    toml_value,
    with_supernodes,
    write_run_config,
)

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"


def test_the_flat_run_config_reads_back_as_the_same_experiment(
    tmp_path: Path,
) -> None:
    # Prepare: a string that needs escaping (quotes, a backslash); lists too.
    column = 'a "quoted" \\ column'
    cfg = ExperimentConfig.from_toml(SMOKE).with_overrides(
        [f"data.text_column={column!r}", "fed.num_rounds=3"]
    )
    assert cfg.data.text_column == column

    # Execute
    path = write_run_config(cfg, tmp_path / "deploy" / "run_config.toml")

    # Assert: one dotted key per line, every key, and the same experiment.
    lines = path.read_text().splitlines()
    assert [line.split(" = ")[0] for line in lines] == list(cfg.to_flat())
    assert ExperimentConfig.from_dict(tomllib.loads(path.read_text())) == cfg


def test_scalars_are_toml() -> None:
    assert [toml_value(v) for v in (True, False, 3, 0.5)] == [
        "true",
        "false",
        "3",
        "0.5",
    ]
    text = 'a "b" \\ c\nd'
    assert tomllib.loads("k = " + toml_value(text))["k"] == text


def test_a_relative_output_dir_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.chdir(tmp_path)

    # Execute
    cfg = resolve_config(SMOKE, ["name=x"], "out")
    default = resolve_config(SMOKE)

    # Assert
    assert cfg.output_dir == str((tmp_path / "out").resolve())
    assert cfg.name == "x"
    assert default.output_dir == str((tmp_path / "results").resolve())


def test_one_client_per_supernode() -> None:
    # Prepare
    cfg = ExperimentConfig.from_toml(SMOKE)

    # Execute
    same, kept = with_supernodes(cfg, None)
    more, num = with_supernodes(cfg, 3)

    # Assert
    assert (same, kept) == (cfg, cfg.fed.num_clients)
    assert num == 3 and more.fed.num_clients == 3


@pytest.mark.parametrize("launcher", ["deploy", "simulate"])
def test_a_resume_under_another_config_is_refused_before_any_process_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    # Prepare: a run of smoke.toml killed after round 1 of 3
    import numpy as np

    from lora_flwr.aggregation import ServerState
    from lora_flwr.deploy import local, local_sim
    from lora_flwr.deploy.options import DeployOptions
    from lora_flwr.fl.checkpoint import save_checkpoint

    first = resolve_config(SMOKE, ["name=x", "fed.num_rounds=3"], str(tmp_path))
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(first.to_toml())
    state = ServerState(1, {"a": np.zeros(2, np.float32)}, {}, (), {})
    save_checkpoint(run_dir, 1, state, {}, first)
    started: list[ExperimentConfig] = []
    monkeypatch.setattr(local, "deploy", lambda cfg, *a, **k: started.append(cfg))
    monkeypatch.setattr(local_sim, "simulate", lambda cfg, *a: started.append(cfg))
    options = DeployOptions(
        config=str(SMOKE),
        overrides=("name=x", "fed.num_rounds=3", "on_existing=resume", "train.lr=0.5"),
        output_dir=str(tmp_path),
        num_supernodes=None,
        timeout=60.0,
        keep_homes=False,
    )
    launch = {
        "deploy": local.deploy_from_options,
        "simulate": local_sim.simulate_from_options,
    }[launcher]

    # Execute
    with pytest.raises(ValueError) as err:
        launch(options)

    # Assert
    assert started == []
    assert str(err.value).startswith(
        f"cannot resume {run_dir}: its config differs in train.lr (0.02 there, "
        "0.5 now); "
    )
