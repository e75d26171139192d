"""lora_flwr.deploy.outcome: a run counts only when it completed every round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_flwr.deploy.errors import DeployError
from lora_flwr.deploy.outcome import finish

COMPLETED = {"run-id": 7, "status": "finished:completed"}


def _results(run_dir: Path, rounds: list[int], adapter: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    history = [{"round": r} for r in rounds]
    (run_dir / "history.json").write_text(json.dumps(history))
    if adapter:
        (run_dir / "adapter").mkdir()
        (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"x")


def test_a_completed_run_with_every_round_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    _results(tmp_path / "run", [0, 1, 2])

    # Execute
    finish(COMPLETED, tmp_path / "run", tmp_path, 2, 12.34)

    # Assert
    assert json.loads((tmp_path / "runs.json").read_text()) == COMPLETED
    out = capsys.readouterr().out
    assert "run 7 finished:completed, 2 rounds in 12.3 s" in out
    assert f"results: {tmp_path / 'run'}" in out


def test_a_failed_run_is_an_error_and_its_record_is_kept(tmp_path: Path) -> None:
    # Prepare
    run = {"run-id": 7, "status": "finished:failed", "status-details": "boom"}
    _results(tmp_path / "run", [0, 1, 2])

    # Execute / Assert
    with pytest.raises(DeployError, match=r"ended as 'finished:failed' \(boom\)"):
        finish(run, tmp_path / "run", tmp_path, 2, 1.0)
    assert json.loads((tmp_path / "runs.json").read_text()) == run


@pytest.mark.parametrize(
    ("rounds", "adapter", "message"),
    [
        ([0, 1], True, r"history has rounds \[1\], expected 1..2"),
        ([0, 1, 2], False, "no final adapter"),
    ],
)
def test_missing_results_are_an_error(
    tmp_path: Path, rounds: list[int], adapter: bool, message: str
) -> None:
    _results(tmp_path / "run", rounds, adapter)
    with pytest.raises(DeployError, match=message):
        finish(COMPLETED, tmp_path / "run", tmp_path, 2, 1.0)


def test_no_history_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="wrote no"):
        finish(COMPLETED, tmp_path / "run", tmp_path, 2, 1.0)
