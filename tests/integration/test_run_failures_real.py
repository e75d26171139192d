"""Failures of real runs end in one line: a checkpoint folder made read-only
mid-run (exit 1 with the ``--resume`` command, which then finishes the run), and a
ServerApp that fails under ``flwr run`` (reported as failed, one line in the log,
nothing left that refuses the corrected rerun)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"
TIMEOUT = 600  # seconds; a 3-round smoke run takes ≈ 40 s on an idle 2-core machine


@contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make folders unwritable for this user: chmod, or for root chattr +i."""
    root = os.geteuid() == 0
    done: list[Path] = []
    try:
        for path in paths:
            if root:
                if subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
                    pytest.skip("root without chattr: nothing makes a folder read-only")
            else:
                path.chmod(0o555)
            done.append(path)
        yield
    finally:
        for path in done:
            if root:
                subprocess.run(["chattr", "-i", str(path)], check=True)
            else:
                path.chmod(0o755)


def _run(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "run_simulation.py", "--config", str(SMOKE), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_a_checkpoint_folder_made_read_only_mid_run_exits_1_and_resumes(
    tmp_path: Path,
) -> None:
    # Prepare: a 3-round run; once round 1 is saved, its folders turn read-only.
    run_dir = tmp_path / "smoke"
    proc = _run("--set", f"output_dir={tmp_path}", "--set", "fed.num_rounds=3")
    saved = run_dir / "state" / "round-001" / "server_state.json"
    deadline = time.monotonic() + TIMEOUT
    while not saved.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert saved.is_file(), proc.communicate()

    # Execute
    with read_only(run_dir / "checkpoints", run_dir / "state"):
        _, err = proc.communicate(timeout=TIMEOUT)

    # Assert: one line naming the folder, the errno text and the command.
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert last.startswith(
        f"error: could not write {run_dir}/checkpoints/round-002 ("
    ), last
    assert last.endswith(
        "the rounds saved before it are intact: free space or fix the "
        f"permissions, then continue with: python run_simulation.py --resume {run_dir}"
    ), last

    # Nothing was lost: the printed command finishes the run.
    resumed = _run("--resume", str(run_dir))
    out, err = resumed.communicate(timeout=TIMEOUT)
    assert resumed.returncode == 0, err[-3000:]
    assert "finished 3 rounds" in out


@pytest.mark.slow
def test_a_server_app_failing_under_flwr_run_is_reported_in_one_line(
    tmp_path: Path,
) -> None:
    # Prepare: straight to flwr run, past the launcher's own pre-flight.
    from lora_flwr.deploy.errors import DeployError
    from lora_flwr.deploy.local_sim import simulate
    from lora_flwr.deploy.run_config import resolve_config
    from lora_flwr.rundir import check_run_dir

    cfg = resolve_config(SMOKE, ["data.name=nope"], str(tmp_path))
    run_dir = tmp_path / "smoke"

    # Execute
    with pytest.raises(DeployError) as info:
        simulate(cfg, 2, TIMEOUT)

    # Assert: the run is failed, in one line, and only the launcher's logs stay.
    message = str(info.value)
    assert "ended as 'finished:failed' (Simulation failed with exception: " in message
    assert "`data.name` = 'nope'" in message
    log = (run_dir / "deploy" / "flwr-run.log").read_text()
    failed = [line for line in log.splitlines() if "Simulation failed: " in line]
    assert len(failed) == 1 and "`data.name` = 'nope'" in failed[0], log
    assert "Traceback" not in log
    assert sorted(p.name for p in run_dir.iterdir()) == ["deploy"]
    check_run_dir(run_dir, "refuse")  # the corrected rerun is not refused
