"""`flwr run .` end to end: the app under a SuperLink-managed simulation.

It runs a non-default rule, ``flora``: nodes keep their folded base-weight delta in
``Context.state`` array records between rounds and catch up on the versions they
missed, which is the part of the plan API that the in-process path shares with no
other.

scripts/flwr_run_sim.py runs ``flwr run <repo> local --run-config <flat smoke toml>
--federation-config "num-supernodes=2 client-resources-num-cpus=1" --stream`` with a
private FLWR_HOME whose ``local`` connection (``address = ":local:"``) points flwr
at the local SuperLink, which the script starts (as flwr would) on free ports; it
reads the outcome from ``flwr ls --format json`` (saved as deploy/runs.json) and
stops every process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lora_flwr.config import ExperimentConfig
from lora_flwr.deploy.processes import process_alive

REPO = Path(__file__).resolve().parents[2]

SMOKE = REPO / "configs" / "smoke.toml"
TIMEOUT = 1500  # seconds; ≈ 2 min on an idle 2-core machine


def _tagged(var: str, tag: str) -> list[int]:
    """Live PIDs whose environment holds ``var=tag`` (what the script started)."""
    needle = f"{var}={tag}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ and process_alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _processes_left(deploy_dir: Path) -> dict[str, Any]:
    doc = json.loads((deploy_dir / "pids.json").read_text())
    deadline = time.monotonic() + 10  # helpers notice their parent's death
    while True:
        named = {n: p for n, p in doc["pids"].items() if process_alive(p)}
        tagged = _tagged(doc["tag_var"], doc["tag"])
        if not (named or tagged) or time.monotonic() > deadline:
            return {"named": named, "tagged": tagged, "pids": doc["pids"]}
        time.sleep(0.5)


def _initial_and_final(
    cfg: ExperimentConfig, run_dir: Path
) -> tuple[list[str], list[np.ndarray], dict[str, list[np.ndarray]]]:
    from lora_flwr.experiment import get_workspace

    ws = get_workspace(cfg)
    ws.reset_adapter()  # the seeded start the ServerApp used
    initial = ws.adapter.get_weights()
    saved = {}
    for name, path in (
        ("adapter", run_dir / "adapter"),
        ("round-001", run_dir / "checkpoints" / "round-001"),
        ("round-002", run_dir / "checkpoints" / "round-002"),
    ):
        ws.adapter.load(path)
        saved[name] = ws.adapter.get_weights()
    ws.reset_adapter()
    return ws.adapter.weight_names(), initial, saved


@pytest.mark.slow
def test_flwr_run_smoke_completes_and_trains_the_adapter(tmp_path: Path) -> None:
    name = "flwr-run-smoke"
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "flwr_run_sim.py"),
            "--config",
            str(SMOKE),
            "--num-supernodes",
            "2",
            "--output-dir",
            str(tmp_path),
            "--set",
            f"name={name}",
            "--set",
            "fed.aggregation=flora",
            "--timeout",
            str(TIMEOUT - 100),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    seconds = time.perf_counter() - start
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = tmp_path / name
    deploy_dir = run_dir / "deploy"

    # Every process is gone, whatever the outcome.
    left = _processes_left(deploy_dir)
    assert left["named"] == {} and left["tagged"] == [], left
    assert "local-superlink" in left["pids"], left  # the :local: SuperLink
    assert proc.returncode == 0, log

    # The run's status, as `flwr ls --format json` reported it.
    run = json.loads((deploy_dir / "runs.json").read_text())
    assert run["status"] == "finished:completed", run
    assert run["fab-name"] == "lora-flwr"
    print(f"flwr run smoke: {seconds:.1f} s, run elapsed {run['elapsed']:.1f} s")

    # The ServerApp received the smoke experiment through --run-config.
    expected = ExperimentConfig.from_toml(SMOKE).with_overrides(
        [f"name={name}", f"output_dir={tmp_path.resolve()}", "fed.aggregation=flora"]
    )
    assert ExperimentConfig.from_toml(run_dir / "config.toml") == expected

    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == [0, 1, 2]
    for rec in history[1:]:
        assert rec["fit_sampled"] == 2 and rec["fit_ok"] == 2, rec
        assert rec["fit_failed"] == 0 and rec["fit_dropped"] == 0, rec
        assert rec["aggregated"] is True
        assert rec["eval_ok"] == 2
        assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["test_loss"])
        assert 0.0 <= rec["test_accuracy"] <= 1.0
        assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0
        assert rec["agg_error"] < 1e-5  # stacking is exact
    # Each simulated node kept its Context.state across rounds: its fit count and
    # the base delta it folded (round 2 only sends the saved modules down, the
    # nodes already caught up with version 1 in round 1's evaluation).
    assert [r["client_fit_calls_max"] for r in history[1:]] == [1, 2]
    assert [r["base_version"] for r in history[1:]] == [1, 2]
    assert history[2]["test_loss"] < history[0]["test_loss"]

    # FLoRA folds every round's stacked product into the base weights and
    # restarts A and B: the global adapter is the seeded init plus the averaged
    # classifier head, and the model lives in base_delta.safetensors.
    names, initial, saved = _initial_and_final(expected, run_dir)
    final = saved["adapter"]
    for n, a, b in zip(names, initial, final, strict=True):
        if ".lora_" in n:
            np.testing.assert_array_equal(a, b, err_msg=n)
        else:
            assert not np.allclose(a, b), n  # the head is trained and averaged
    from lora_flwr.lora import load_base_delta

    deltas = [
        load_base_delta(run_dir / d / "base_delta.safetensors")
        for d in ("checkpoints/round-001", "checkpoints/round-002", "adapter")
    ]
    assert deltas[0].keys() == deltas[2].keys() and deltas[0]
    for module, delta in deltas[2].items():
        assert np.abs(delta).max() > 0, module
        np.testing.assert_array_equal(delta, deltas[1][module])
        assert not np.array_equal(delta, deltas[0][module])
