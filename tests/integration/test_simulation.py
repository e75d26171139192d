"""The in-process Flower simulation (Ray) on configs/smoke.toml, end to end.

Malformed client replies and failing clients are covered at the strategy level in
tests/unit/test_strategy.py; here every client is well behaved.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lora_flwr.config import ExperimentConfig
from lora_flwr.experiment import clear_caches, get_workspace
from lora_flwr.experiment import heldout_data as held_out_data
from lora_flwr.results import read_history
from lora_flwr.simulation import run

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smoke_simulation_learns_and_writes_outputs(tmp_path: Path) -> None:
    # Prepare
    clear_caches()
    cfg = dataclasses.replace(
        ExperimentConfig.from_toml(SMOKE), output_dir=str(tmp_path)
    )

    # Execute
    run_dir = run(cfg)

    # Assert: the run directory and the saved experiment.
    assert run_dir == tmp_path / "smoke"
    assert ExperimentConfig.from_toml(run_dir / "config.toml") == cfg
    # Every round, each with both clients' replies aggregated.
    history = read_history(run_dir)
    assert [r["round"] for r in history] == [0, 1, 2]
    ws = get_workspace(cfg)  # the server's workspace: same process
    adapter_bytes = ws.adapter.num_parameters() * 4
    for rec in history[1:]:
        assert rec["fit_ok"] == 2
        assert rec["fit_dropped"] == 0
        assert rec["fit_failed"] == 0
        assert rec["aggregated"] is True
        assert rec["eval_ok"] == 2
        # Serialized numpy arrays: the values plus a small header per tensor.
        assert 2 * adapter_bytes < rec["bytes_up"] < 2 * adapter_bytes + 20 * 128 * 2
        # Down: the adapter to 2 fit and 2 evaluate clients.
        assert rec["bytes_down"] == 2 * rec["bytes_up"]
        assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["fed_loss"])
    # Context.state survives between rounds on each simulated node.
    assert [r["client_fit_calls_max"] for r in history[1:]] == [1, 2]
    # It learns: the held-out loss falls well below the starting ~ln 2.
    assert history[0]["test_loss"] == pytest.approx(np.log(2), abs=0.05)
    assert history[-1]["test_loss"] < history[0]["test_loss"] - 0.1
    assert history[-1]["test_accuracy"] > history[0]["test_accuracy"]
    # Outputs.
    assert (run_dir / "history.csv").is_file()
    for name in ("loss.png", "accuracy.png", "bytes.png"):
        assert (run_dir / name).read_bytes()[:8] == PNG_MAGIC
    final = run_dir / "adapter"
    assert sorted(p.name for p in final.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "round-001",
        "round-002",
    ]
    # The final adapter is the last checkpoint, differs from the initial adapter
    # in every tensor, and reproduces the last round's test loss.
    ws.adapter.load(run_dir / "checkpoints" / "round-002")
    checkpoint = ws.adapter.get_weights()
    ws.adapter.load(final)
    trained = ws.adapter.get_weights()
    for got, want in zip(trained, checkpoint, strict=True):
        np.testing.assert_array_equal(got, want)
    for name, got, start in zip(
        ws.adapter.weight_names(), trained, ws.initial_weights, strict=True
    ):
        assert not np.array_equal(got, start), name
    loss = ws.trainer.evaluate(held_out_data(ws, cfg), progress=False)["loss"]
    assert loss == pytest.approx(history[-1]["test_loss"], rel=1e-5)


def _without_timing(rec: dict[str, object]) -> dict[str, object]:
    return {
        k: v
        for k, v in rec.items()
        if "seconds" not in k and not k.endswith("_at") and k != "workers"
    }


@pytest.mark.slow
def test_overlapped_evaluation_gives_the_same_run(tmp_path: Path) -> None:
    # Prepare: three rounds of the smoke job, evaluation in turn and overlapped.
    base = dataclasses.replace(
        ExperimentConfig.from_toml(SMOKE), output_dir=str(tmp_path)
    ).with_overrides(["fed.num_rounds=3"])
    runs = {}

    # Execute
    for overlap in (False, True):
        clear_caches()
        cfg = base.with_overrides(
            [f"name=overlap-{overlap}", f"eval.overlap={overlap}"]
        )
        runs[overlap] = run(cfg)

    # Assert: the same records (round 0 to 3, in order) and the same checkpoint
    # for every round: each round's own state, though written a round later.
    plain, overlapped = (read_history(runs[k]) for k in (False, True))
    assert [r["round"] for r in overlapped] == [0, 1, 2, 3]
    assert [_without_timing(r) for r in overlapped] == [
        _without_timing(r) for r in plain
    ]
    for rnd in ("round-001", "round-002", "round-003"):
        for path in sorted((runs[False] / "checkpoints" / rnd).iterdir()):
            twin = runs[True] / "checkpoints" / rnd / path.name
            assert twin.read_bytes() == path.read_bytes(), twin
    first = runs[True] / "checkpoints" / "round-001" / "adapter_model.safetensors"
    last = runs[True] / "adapter" / "adapter_model.safetensors"
    assert first.read_bytes() != last.read_bytes()
