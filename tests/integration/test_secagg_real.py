"""SecAgg+ in the real Ray simulation: the global equals the plain run's.

Three smoke clients, one round, the same seeds: the clients' replies are the same
bits in both runs, so the only difference between the plain global and the SecAgg+
global is SecAgg+'s quantisation. The ``leave`` probe makes partition 2 fail every
fit: under SecAgg+ the server must rebuild and remove its masks from the other
clients' key shares, or the unmasked sum is noise modulo 2**32.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from probes import load_probes
from safetensors.numpy import load_file

from lora_flwr.fl.server_app import SECAGG_LEVELS

ROOT = Path(__file__).resolve().parents[2]


_probes = load_probes


def _adapter(last: dict[str, Any]) -> dict[str, np.ndarray]:
    path = Path(last["run_dir"]) / "adapter" / "adapter_model.safetensors"
    return load_file(str(path))


def _run(out: Path, probe: str, secagg: bool) -> dict[str, Any]:
    probes = _probes()
    sets: dict[str, dict[str, Any]] = {"fed": {"num_rounds": 1}}
    if secagg:
        sets.update(probes.SECAGG)
    return dict(
        probes.run_probe(
            out,
            probe,
            guards=False,  # the plain run averages exactly what SecAgg+ sums
            sets=sets,
            tag="secagg" if secagg else "plain",
        )
    )


def _quantisation_bound(counts: list[int], peak: float) -> float:
    """Largest difference SecAgg+'s quantisation can make to the weighted mean.

    Each client's value ``r_k x_k`` (``r_k = n_k / M``) is rounded stochastically
    to a step of ``2 C / L``, and its weight ``r_k`` to ``1 / L``; the sum is
    divided by ``sum r_k``. Plus float32 rounding of the mean.
    """
    probes = _probes()
    clip = float(probes.SECAGG["secagg"].get("clip", 2.0))
    max_weight = float(probes.SECAGG["secagg"]["max_weight"])
    k = len(counts)
    weight_sum = sum(counts) / max_weight
    step = 2 * clip / SECAGG_LEVELS
    return (k * step + 2 * k * peak / SECAGG_LEVELS) / weight_sum + 2.0**-23 * peak


@pytest.mark.slow
@pytest.mark.parametrize(
    ("probe", "clients"), [("honest", [0, 1, 2]), ("leave", [0, 1])]
)
def test_secagg_global_equals_the_plain_global_within_quantisation(
    tmp_path: Path, probe: str, clients: list[int]
) -> None:
    # Execute
    plain = _run(tmp_path, probe, secagg=False)
    secure = _run(tmp_path, probe, secagg=True)

    # Assert: the same clients aggregated, the dropped one's masks removed.
    assert secure["fit_ok"] == plain["fit_ok"] == len(clients)
    assert secure["fit_failed"] == plain["fit_failed"] == 3 - len(clients)
    assert secure["fit_partitions"] == plain["fit_partitions"] == "0,1,2"
    a, b = _adapter(plain), _adapter(secure)
    assert a.keys() == b.keys()
    peak = max(float(np.abs(v).max()) for v in a.values())
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    # Smoke partitions hold 97, 97 and 96 training examples.
    counts = [97, 97, 96][: len(clients)]
    bound = _quantisation_bound(counts, peak)
    assert 0 < diff <= bound, (diff, bound)
    assert bound < 1e-5
    assert abs(secure["test_loss"] - plain["test_loss"]) < 1e-3


@pytest.mark.slow
def test_secagg_under_flwr_run_reads_the_switch_from_the_run_config(
    tmp_path: Path,
) -> None:
    # Prepare: the module-level apps that `flwr run` loads have no closure config;
    # secagg.enabled reaches the ServerApp and every node through --run-config.
    import json
    import subprocess

    name = "flwr-run-secagg"
    sets = [
        f"name={name}",
        "fed.num_rounds=1",
        "secagg.enabled=true",
        "guards.norm_guard=off",
        "guards.weight_cap=0",
        "secagg.max_weight=200",
    ]
    args = [a for s in sets for a in ("--set", s)]

    # Execute
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "flwr_run_sim.py"),
            "--config",
            str(ROOT / "configs" / "smoke.toml"),
            "--output-dir",
            str(tmp_path),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )

    # Assert: completed; both nodes inside the masked sum; no per-client upload
    # was visible to the strategy (a plain round reports bytes_up).
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((tmp_path / name / "deploy" / "runs.json").read_text())
    assert run["status"] == "finished:completed", run
    history = json.loads((tmp_path / name / "history.json").read_text())
    last = history[-1]
    assert last["round"] == 1 and last["aggregated"] is True
    assert last["fit_ok"] == 2 and last["fit_failed"] == 0
    assert "bytes_up" not in last and "agg_error" not in last
    assert last["test_loss"] < history[0]["test_loss"]
