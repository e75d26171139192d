"""Whether a finished run succeeded: its record, its status and the files it wrote.

``flwr run`` exits 0 even when the run failed, so the verdict comes from the
run's ``flwr ls`` record and from the results on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_flwr.deploy.errors import DeployError


def check_results(run_dir: Path, num_rounds: int) -> list[dict[str, Any]]:
    """Raise unless ``run_dir`` holds history for every round and the adapter."""
    history_path = run_dir / "history.json"
    if not history_path.is_file():
        raise DeployError(f"the run wrote no {history_path}")
    history: list[dict[str, Any]] = json.loads(history_path.read_text())
    rounds = sorted(int(r["round"]) for r in history if int(r.get("round", 0)) > 0)
    if rounds != list(range(1, num_rounds + 1)):
        raise DeployError(f"history has rounds {rounds}, expected 1..{num_rounds}")
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    if not adapter.is_file():
        raise DeployError(f"the run wrote no final adapter {adapter}")
    return history


def finish(
    run: dict[str, Any], run_dir: Path, deploy_dir: Path, num_rounds: int, sec: float
) -> None:
    """Save the run record and check it completed with every round written.

    Parameters
    ----------
    run
        The run's ``flwr ls`` record; saved as ``deploy_dir/runs.json``.
    run_dir
        ``<output_dir>/<name>``, where the ServerApp wrote the results.
    deploy_dir
        The launcher's folder of logs and records.
    num_rounds
        Rounds the history must hold (1..num_rounds).
    sec
        Wall seconds of the whole launch, for the summary line.

    Raises
    ------
    DeployError
        If the run did not end as ``finished:completed`` or left results missing.
    """
    (deploy_dir / "runs.json").write_text(json.dumps(run, indent=2) + "\n")
    status = run.get("status")
    if status != "finished:completed":
        raise DeployError(
            f"run {run.get('run-id')} ended as {status!r} "
            f"({run.get('status-details')}); logs in {deploy_dir}"
        )
    check_results(run_dir, num_rounds)
    print(
        f"\nrun {run.get('run-id')} finished:completed, {num_rounds} rounds in "
        f"{sec:.1f} s\nresults: {run_dir}\nlogs:    {deploy_dir}",
        flush=True,
    )
