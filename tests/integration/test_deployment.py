"""A real Flower deployment on loopback: scripts/deploy_local.py end to end.

The script starts ``flower-superlink --insecure`` and two ``flower-supernode
--insecure --node-config "partition-id=i num-partitions=2"`` processes (own
FLWR_HOME and port each), writes a ``[superlink.local-deployment]`` CLI connection,
runs ``flwr run . local-deployment --run-config <smoke> --stream``, polls
``flwr ls --format json`` and stops every process it started.
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

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"
TIMEOUT = 1500  # seconds; a deployment round costs ≈ 12-16 s of polling when idle


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone


def _tagged(var: str, tag: str) -> list[int]:
    """Live PIDs whose environment holds ``var=tag`` (what the script started)."""
    needle = f"{var}={tag}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ and _alive(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def _processes_left(deploy_dir: Path) -> dict[str, Any]:
    doc = json.loads((deploy_dir / "pids.json").read_text())
    deadline = time.monotonic() + 10  # helpers notice their parent's death
    while True:
        named = {n: p for n, p in doc["pids"].items() if _alive(p)}
        tagged = _tagged(doc["tag_var"], doc["tag"])
        if not (named or tagged) or time.monotonic() > deadline:
            return {"named": named, "tagged": tagged, "pids": doc["pids"]}
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["fedit", "fedsa"])
def test_deploy_local_two_supernodes_smoke(rule: str, tmp_path: Path) -> None:
    name = f"deploy-{rule}"
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "deploy_local.py"),
            "--config",
            str(SMOKE),
            "--num-supernodes",
            "2",
            "--output-dir",
            str(tmp_path),
            "--set",
            f"name={name}",
            "--set",
            f"fed.aggregation={rule}",
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

    # No SuperLink, SuperNode or helper it started is left, whatever the outcome.
    left = _processes_left(deploy_dir)
    assert left["named"] == {} and left["tagged"] == [], left
    assert set(left["pids"]) == {"superlink", "supernode-0", "supernode-1", "flwr-run"}
    for pid in left["pids"].values():
        assert f"pid={pid}" in proc.stdout  # the script printed what it started
    assert proc.returncode == 0, log
    assert f"results: {run_dir.resolve()}" in proc.stdout

    run = json.loads((deploy_dir / "runs.json").read_text())
    assert run["status"] == "finished:completed", run
    assert run["network-traffic"]["total-bytes"] > 0  # messages really travelled
    print(f"deployment smoke: {seconds:.1f} s, run elapsed {run['elapsed']:.1f} s")

    cfg = ExperimentConfig.from_toml(SMOKE).with_overrides(
        [f"name={name}", f"output_dir={tmp_path.resolve()}", f"fed.aggregation={rule}"]
    )
    assert ExperimentConfig.from_toml(run_dir / "config.toml") == cfg

    history = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in history] == list(range(cfg.fed.num_rounds + 1))
    # A SuperNode's Context.state outlives the per-message flwr-clientapp process.
    assert [r["client_fit_calls_max"] for r in history[1:]] == [1, 2]
    if rule == "fedsa":
        _check_fedsa(cfg, history, run_dir, tmp_path)
        return
    for rec in history[1:]:
        assert rec["fit_sampled"] == 2 and rec["fit_ok"] == 2, rec
        assert rec["fit_failed"] == 0 and rec["fit_dropped"] == 0, rec
        assert rec["aggregated"] is True
        assert rec["eval_ok"] == 2
        assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["test_loss"])
        assert rec["bytes_up"] > 0

    # The global adapter moved away from the seeded initial one.
    from lora_flwr.experiment import get_workspace

    ws = get_workspace(cfg)
    ws.reset_adapter()
    names = ws.adapter.weight_names()
    initial = ws.adapter.get_weights()
    ws.adapter.load(run_dir / "adapter")
    final = ws.adapter.get_weights()
    ws.reset_adapter()
    assert [a.shape for a in final] == [a.shape for a in initial]
    assert all(np.isfinite(a).all() for a in final)
    changed = [
        n
        for n, a, b in zip(names, initial, final, strict=True)
        if not np.allclose(a, b)
    ]
    assert changed, "the global adapter did not change from its seeded initial value"
    b_names = [n for n in names if "lora_B" in n]
    assert b_names and all(n in changed for n in b_names)  # B starts at 0, is trained


def _check_fedsa(
    cfg: ExperimentConfig, history: list[Any], run_dir: Path, tmp_path: Path
) -> None:
    """FedSA's B lives only in each SuperNode's Context.state (array records).

    Each node's B is written by one flwr-clientapp process (fit) and read by the
    next (evaluate, next round's fit), so the personalised metrics equal those of
    the in-process simulation of the same config only if it survived.
    """
    import dataclasses

    from lora_flwr.simulation import run

    for rec in history[1:]:
        assert rec["fit_ok"] == 2 and rec["eval_ok"] == 2, rec
        assert rec["bytes_up"] > 0 and "test_loss" not in rec
    sim_dir = run(dataclasses.replace(cfg, name="sim", output_dir=str(tmp_path)))
    sim = json.loads((sim_dir / "history.json").read_text())
    for key in ("personal_loss", "personal_accuracy", "train_loss"):
        got = [r[key] for r in history[1:]]
        want = [r[key] for r in sim[1:]]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
    # B never left the nodes: the global adapter's B is still the seeded zero.
    from lora_flwr.experiment import get_workspace

    ws = get_workspace(cfg)
    ws.reset_adapter()
    ws.adapter.load(run_dir / "adapter")
    for name, array in zip(
        ws.adapter.weight_names(), ws.adapter.get_weights(), strict=True
    ):
        if "lora_B" in name:
            assert not array.any(), name
    ws.reset_adapter()
