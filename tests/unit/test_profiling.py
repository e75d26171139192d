"""compute.profile: the phases of a call and of a round; off changes nothing."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_strategy import _Federation

from lora_flwr import profiling
from lora_flwr.config import ComputeConfig, ExperimentConfig
from lora_flwr.experiment import client_datasets, get_workspace
from lora_flwr.profiling import (
    CLIENT_PHASES,
    ROUND_PHASES,
    SERVER_PHASES,
    CallProfile,
    ClientCall,
    PhaseTimer,
    client_call,
    key,
    round_profile,
)

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"
CHILD = (
    "import json; from lora_flwr import profiling as p; print(json.dumps(p._startup))"
)
# History keys that hold wall-clock seconds: they differ between any two runs.
# Clock readings, which differ between any two runs.
TIMES = (
    "round_seconds",
    "eval_seconds",
    "client_seconds_",
    "started_at",
    "handshake_seconds",
    "fit_done_at",
)


def _call(stage: str, worker: str, **seconds: float) -> ClientCall:
    return ClientCall(stage, worker, {p: seconds.get(p, 0.0) for p in CLIENT_PHASES})


# ------------------------------------------------------------------ config
def test_profile_is_off_by_default_and_set_by_an_override() -> None:
    # Prepare
    cfg = ExperimentConfig.from_toml(SMOKE)

    # Execute
    on = cfg.with_overrides(["compute.profile=true"])

    # Assert
    assert cfg.compute.profile is False
    assert on.compute.profile is True
    assert ExperimentConfig.from_flat(on.to_flat()).compute.profile is True


@pytest.mark.parametrize("value", ["yes", 1, 0.0, "true"])
def test_a_profile_value_that_is_not_a_bool_is_refused(value: object) -> None:
    # Execute / Assert: from a run config (flwr run) and from code alike
    with pytest.raises(ValueError, match="`compute.profile` should be true or false"):
        ExperimentConfig.from_flat({"compute.profile": value})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="`compute.profile` should be true or false"):
        ComputeConfig(profile=value)  # type: ignore[arg-type]


# ------------------------------------------------------------------- timer
def test_nested_phases_are_exclusive_and_laps_cover_the_interval() -> None:
    # Prepare
    timer = PhaseTimer()

    # Execute
    before = time.perf_counter()
    with timer.phase("outer"):
        sum(range(20_000))
        with timer.phase("inner"):
            sum(range(20_000))
        sum(range(20_000))
    after = time.perf_counter()
    laps = PhaseTimer()
    laps.restart()
    first = laps._last
    for name in ("a", "b", "a"):
        sum(range(10_000))
        laps.lap(name)

    # Assert: outer + inner fit inside the block (no double counting), and laps
    # add up exactly to the time from restart to the last lap.
    assert set(timer.seconds) == {"outer", "inner"}
    assert all(v > 0 for v in timer.seconds.values())
    assert timer.seconds["outer"] + timer.seconds["inner"] <= after - before
    assert math.isclose(sum(laps.seconds.values()), laps._last - first, rel_tol=1e-9)


def test_a_snapshot_counts_an_open_phase_up_to_now() -> None:
    # Prepare
    timer = PhaseTimer()

    # Execute
    with timer.phase("open"):
        sum(range(10_000))
        snap = timer.snapshot()

    # Assert: the open phase is in the snapshot, and closing it adds to it
    assert 0 < snap["open"] <= timer.seconds["open"]


def test_call_profile_reports_every_phase_and_a_total_that_is_their_sum() -> None:
    # Prepare
    prof = CallProfile({"startup_process": 0.25})

    # Execute
    with prof.phase("serialization"):
        sum(range(10_000))
    prof.add_train({key("forward"): 0.5, key("backward"): 0.0625})
    metrics = prof.metrics()

    # Assert
    assert set(metrics) == {key(p) for p in (*CLIENT_PHASES, "total")}
    assert all(v >= 0 for v in metrics.values())
    assert metrics[key("startup_process")] == 0.25
    assert metrics[key("forward")] == 0.5
    assert metrics[key("serialization")] > 0
    assert math.isclose(
        metrics[key("total")], sum(metrics[key(p)] for p in CLIENT_PHASES)
    )


def test_call_profile_refuses_a_phase_that_is_not_a_client_phase() -> None:
    # Prepare
    prof = CallProfile()
    with prof.phase("warmup"):
        pass

    # Execute / Assert
    with pytest.raises(ValueError, match="not client phases: \\['warmup'\\]"):
        prof.metrics()


# ---------------------------------------------------------------- start-up
def test_process_age_is_the_age_of_this_process() -> None:
    # Execute: a fresh interpreter reports its own age right after start
    before = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - before
    startup = json.loads(out.stdout)

    # Assert: positive and inside the time the child existed at all
    assert 0 < startup["process_age"] <= wall + 0.02  # /proc ticks are 10 ms


def test_start_up_is_reported_once_and_only_by_a_fresh_clientapp_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: this process is no flwr-clientapp (nothing to report) ...
    monkeypatch.setattr(profiling, "_startup", dict(profiling._startup))
    profiling._startup.pop("taken", None)
    assert profiling.take_startup() == {}
    # ... unless it runs as one
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-clientapp", "--token", "x"])
    profiling.mark_app_imports_done()

    # Execute
    first = profiling.take_startup()
    second = profiling.take_startup()

    # Assert
    assert set(first) == {"startup_process", "startup_imports"}
    assert first["startup_process"] > 0 and first["startup_imports"] >= 0
    assert second == {}


# ------------------------------------------------------------------- round
def test_round_profile_splits_the_round_along_the_critical_path() -> None:
    # Prepare: worker w1 served two fit calls (3.5 s), w2 one (2.0 s); one
    # evaluate call; the server's own phases and a handshake.
    calls = [
        _call("fit", "w1", data=0.5, forward=1.0, backward=1.5),
        _call("fit", "w1", forward=0.25, other=0.25),
        _call("fit", "w2", forward=2.0),
        _call("evaluate", "w2", evaluation=0.75, serialization=0.25),
    ]
    server = {
        "server_serialization": 0.125,
        "server_aggregation": 0.25,
        "server_evaluation": 1.0,
        "server_other": 0.125,
        "handshake": 0.5,
    }

    # Execute
    out = round_profile(10.0, server, calls)

    # Assert: the critical path is w1's fit calls plus the evaluate call
    split = {p: out[key(p)] for p in ROUND_PHASES}
    assert split["client_forward"] == 1.25 + 0.0
    assert split["client_data"] == 0.5
    assert split["client_backward"] == 1.5
    assert split["client_other"] == 0.25
    assert split["client_evaluation"] == 0.75
    assert split["client_serialization"] == 0.25
    assert all(split[p] == server[p] for p in SERVER_PHASES)
    # flower = round - server - critical client time (3.5 + 1.0); the handshake
    # is reported but stays inside flower.
    assert split["flower"] == 10.0 - 1.5 - 3.5 - 1.0
    assert math.isclose(sum(split.values()), 10.0)
    assert out[key("round")] == 10.0
    assert out[key("overlap")] == 0.0
    assert out[key("handshake")] == 0.5
    assert (out["prof_fit_calls"], out["prof_evaluate_calls"]) == (3, 1)
    assert out["prof_fit_forward_sum_s"] == 3.25
    assert out["prof_fit_forward_median_s"] == 1.0
    assert out["prof_fit_total_median_s"] == 2.0
    assert out["prof_evaluate_total_sum_s"] == 1.0


def test_round_profile_reports_overlap_rather_than_a_negative_flower() -> None:
    # Prepare: clients claim more time than the round had
    calls = [_call("fit", "w", forward=3.0)]

    # Execute
    out = round_profile(2.0, {"server_aggregation": 0.5}, calls)

    # Assert
    assert out[key("flower")] == 0.0
    assert out[key("overlap")] == 1.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, True, "1.0", None])
def test_a_call_profile_with_a_bad_value_is_left_out(bad: object) -> None:
    # Prepare
    metrics: dict[str, Any] = {key(p): 0.5 for p in (*CLIENT_PHASES, "total")}
    metrics[key("forward")] = bad

    # Execute / Assert
    assert client_call("fit", metrics, 1) is None
    assert client_call("fit", {"train_loss": 0.5}, 1) is None  # no profile at all
    with pytest.raises(ValueError, match="`stage`"):
        client_call("train", {}, 1)


# ----------------------------------------------------------------- trainer
def test_a_profiled_training_run_is_the_same_run_with_its_phases_timed() -> None:
    # Prepare
    cfg = ExperimentConfig.from_toml(SMOKE).with_overrides(["train.local_steps=3"])
    ws = get_workspace(cfg)
    data, _ = client_datasets(ws, cfg, 0, 2)
    profiled = get_workspace(
        dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, profile=True))
    )

    # Execute: the same start, seed and data, profile off then on
    ws.reset_adapter()
    off = ws.trainer.train(data, seed=5, progress=False)
    weights_off = ws.adapter.get_weights()
    profiled.reset_adapter()
    on = profiled.trainer.train(data, seed=5, progress=False)
    weights_on = profiled.adapter.get_weights()

    # Assert: same loss and weights; off reports no phase, on the four
    assert not any(k.startswith(profiling.PREFIX) for k in off)
    phases = [key(p) for p in profiling.TRAIN_PHASES]
    assert set(on) - set(off) == set(phases)
    assert on["train_loss"] == off["train_loss"]
    assert all((a == b).all() for a, b in zip(weights_off, weights_on, strict=True))
    assert all(on[k] > 0 for k in phases)
    assert sum(on[k] for k in phases) <= on["seconds"]


# ------------------------------------------------------------ a federation
def _run(profile: bool, rounds: int = 2) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    fed = _Federation([f"compute.profile={profile}"])
    return [dict(fed.round(r)) for r in range(1, rounds + 1)]


def _without_times(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in record.items()
        if not k.startswith(TIMES) and not k.startswith(profiling.PREFIX)
    }


def test_a_profiled_round_splits_its_wall_time_into_every_phase() -> None:
    # Execute: real LoRAClients and the real strategy in this process
    records = _run(profile=True)

    # Assert: every phase present and >= 0, together at most the round's time
    for rec in records:
        split = {p: rec[key(p)] for p in ROUND_PHASES}
        assert all(v >= 0 for v in split.values()), split
        assert sum(split.values()) <= rec["round_seconds"] * (1 + 1e-9)
        assert rec[key("overlap")] == 0.0
        assert rec[key("round")] == rec["round_seconds"]
        assert rec["prof_fit_calls"] == rec["fit_sampled"] == 3
        assert rec["prof_evaluate_calls"] == rec["eval_ok"] == 3
        # One process served every call here: the critical path is all of them.
        assert math.isclose(
            rec[key("client_forward")],
            rec["prof_fit_forward_sum_s"] + rec["prof_evaluate_forward_sum_s"],
        )
        for phase in ("data", "forward", "backward", "optimizer", "serialization"):
            assert rec[f"prof_fit_{phase}_sum_s"] > 0, phase
        assert rec["prof_evaluate_evaluation_sum_s"] > 0
        assert rec[key("server_serialization")] > 0
        assert rec[key("server_aggregation")] > 0
        # No fresh process here: no process or import start-up is reported.
        assert rec[key("client_startup_process")] == 0.0
        assert rec[key("client_startup_imports")] == 0.0
        assert rec["prof_fit_total_median_s"] <= rec["prof_fit_total_sum_s"]


def test_profile_off_leaves_the_history_as_it_was() -> None:
    # Execute
    off = _run(profile=False)
    on = _run(profile=True)

    # Assert: no profile key when off, and profiling changes nothing else
    assert not any(k.startswith(profiling.PREFIX) for rec in off for k in rec)
    assert [_without_times(r) for r in on] == [_without_times(r) for r in off]
    assert set(on[0]) - set(off[0]) == {
        k for k in on[0] if k.startswith(profiling.PREFIX)
    }
