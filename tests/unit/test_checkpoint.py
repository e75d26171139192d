"""Server checkpoints: exact round trip, pruning, and what may resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora_flwr.aggregation import FoldBlock, ServerState
from lora_flwr.config import ExperimentConfig, FedConfig
from lora_flwr.fl.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)


def _state(round_: int) -> ServerState:
    rng = np.random.default_rng(round_)
    f32 = np.float32
    block = FoldBlock(
        {
            "q": (
                rng.normal(size=(6, 3)).astype(f32),
                rng.normal(size=(3, 5)).astype(f32),
            ),
            "v": (
                rng.normal(size=(6, 2)).astype(f32),
                rng.normal(size=(2, 5)).astype(f32),
            ),
        }
    )
    return ServerState(
        round=round_,
        arrays={"q.lora_A.weight": rng.normal(size=(2, 5)).astype(f32)},
        base_delta={"q": rng.normal(size=(6, 5)).astype(f32)},
        fold_log=(block, block),
        extra={"opt.m.q.lora_A.weight": rng.normal(size=(2, 5))},  # float64 kept
    )


def test_checkpoint_round_trip_is_exact_and_older_rounds_are_pruned(
    tmp_path: Path,
) -> None:
    counters = {"failed_rounds": 1, "aggregated_rounds": 2, "last_failure": "x"}
    save_checkpoint(tmp_path, 2, _state(2), counters, ExperimentConfig())
    state = _state(3)
    save_checkpoint(tmp_path, 4, state, counters, ExperimentConfig())  # no aggregate
    (tmp_path / "state" / ".round-005.tmp-123").mkdir()  # a write cut short

    path = latest_checkpoint(tmp_path)
    assert path == tmp_path / "state" / "round-004"
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        ".round-005.tmp-123",
        "round-004",
    ]
    back = load_checkpoint(path)

    assert back.counters == {**counters, "round": 4}
    assert back.state.round == 3
    for field in ("arrays", "base_delta", "extra"):
        got, want = getattr(back.state, field), getattr(state, field)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype
            assert got[k].tobytes() == want[k].tobytes()
    assert len(back.state.fold_log) == 2
    for got_block, want_block in zip(back.state.fold_log, state.fold_log, strict=True):
        for m, (b, a) in want_block.factors.items():
            assert got_block.factors[m][0].tobytes() == b.tobytes()
            assert got_block.factors[m][1].tobytes() == a.tobytes()


def test_no_checkpoint_means_start_from_scratch(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert resume_checkpoint(ExperimentConfig(), tmp_path) is None


def test_fedsa_cannot_resume(tmp_path: Path) -> None:
    cfg = ExperimentConfig(fed=FedConfig(aggregation="fedsa"))
    with pytest.raises(ValueError, match="keeps each client's B .* cannot be resumed"):
        resume_checkpoint(cfg, tmp_path)


def test_a_finished_run_has_nothing_to_resume(tmp_path: Path) -> None:
    cfg = ExperimentConfig(fed=FedConfig(num_rounds=2))
    save_checkpoint(tmp_path, 2, _state(2), {}, cfg)
    with pytest.raises(ValueError, match="already finished all fed.num_rounds=2"):
        resume_checkpoint(cfg, tmp_path)


def test_latest_checkpoint_puts_back_a_round_a_killed_rewrite_set_aside(
    tmp_path: Path, killed_writer: Any
) -> None:
    # Prepare: round 3 is being written again (a resume) and the writer is
    # killed between the swap's two renames.
    save_checkpoint(tmp_path, 3, _state(3), {}, ExperimentConfig())
    killed_writer(tmp_path / "state" / "round-003", "dir", 1)
    assert not (tmp_path / "state" / "round-003").exists()

    # Execute
    path = latest_checkpoint(tmp_path)

    # Assert
    assert path == tmp_path / "state" / "round-003"
    assert load_checkpoint(path).counters == {"round": 3}
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["round-003"]
