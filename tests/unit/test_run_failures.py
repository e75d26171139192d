"""Every failure ends in exit 2 (bad input, before Ray) or exit 1 (the run failed),
in one line naming the path or key and what to do; a run that failed before its
first round leaves nothing that blocks the corrected rerun."""

from __future__ import annotations

import errno
import io
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest

from lora_flwr import simulation
from lora_flwr.config import ExperimentConfig
from lora_flwr.results import write_history
from lora_flwr.rundir import RunOutputError, check_run_dir, release_run_dir
from lora_flwr.server.guards import RunAborted

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.toml"


@pytest.fixture
def main_with(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """``simulation.main`` run inside tmp_path; returns (exit code, stderr lines)."""
    monkeypatch.chdir(tmp_path)

    def call(
        argv: list[str], capsys: pytest.CaptureFixture[str], run_fn: Any = None
    ) -> tuple[int, list[str]]:
        started: list[ExperimentConfig] = []

        def record(cfg: ExperimentConfig, verbose: bool = False) -> None:
            started.append(cfg)

        code = simulation.main(
            ["--config", str(SMOKE), *argv],
            run_fn=record if run_fn is None else run_fn,
            hard_exit=False,
        )
        call.started = started  # type: ignore[attr-defined]
        return code, capsys.readouterr().err.strip().splitlines()

    return call


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable for this process: chmod, or for root chattr +i."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    # Root writes through permissions; an immutable folder stops it too.
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("running as root without chattr: nothing makes a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# ----------------------------------------------------- a folder that is no model
def _saved_config_only(path: Path) -> None:
    from lora_flwr.config.sections import ModelConfig
    from lora_flwr.models.loading import load_model

    load_model(ModelConfig(name="tiny-bert")).model.config.save_pretrained(path)


@pytest.mark.parametrize(
    ("holds", "message"),
    [
        ("notes", "but not a saved model: it has no config.json; point it at a "),
        ("pickle", "it holds pytorch_model.bin but has no config.json; point it at"),
        ("config", "with a config.json but no weights (no model.safetensors); "),
    ],
)
def test_a_folder_that_is_no_saved_model_exits_2_in_one_line(
    main_with: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    holds: str,
    message: str,
) -> None:
    # Prepare
    folder = tmp_path / "model"
    folder.mkdir()
    if holds == "notes":
        (folder / "notes.txt").write_text("no model here")
    elif holds == "pickle":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    else:
        _saved_config_only(folder)

    # Execute
    code, err = main_with(["--set", f"model.name={folder}"], capsys)

    # Assert
    assert code == 2 and main_with.started == []
    assert len(err) == 1, err
    assert err[0].startswith(f"error: `model.name` {str(folder)!r} is a local ")
    assert message in err[0]
    assert "save_pretrained" in err[0]
    assert not (tmp_path / "results").exists()


# ------------------------------------------------ output_dir that cannot be used
def test_an_output_dir_that_is_a_file_exits_2_before_anything_loads(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").write_text("a file")

    code, err = main_with(["--set", "output_dir=out"], capsys)

    assert code == 2 and main_with.started == []
    assert err == [
        "error: cannot use run directory out/smoke: out is a file, not a folder; "
        "set output_dir to a folder (it is created if missing), or move the file "
        "away"
    ]


def test_a_run_name_that_is_a_file_exits_2(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "smoke").write_text("a file")

    code, err = main_with(["--set", "output_dir=out"], capsys)

    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: cannot use run directory out/smoke: it is a file")


def test_a_read_only_output_dir_exits_2_naming_it(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()

    with read_only(out):
        code, err = main_with(["--set", f"output_dir={out}"], capsys)

    assert code == 2 and main_with.started == []
    assert err == [
        f"error: cannot write run directory {out}/smoke: {out} is read-only for "
        "this user; set output_dir to a folder you can write, or fix its "
        "permissions"
    ]


def test_old_results_that_cannot_be_deleted_exit_2_and_nothing_is_deleted(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: an old run whose round folder cannot be emptied.
    run_dir = tmp_path / "results" / "smoke"
    stuck = run_dir / "checkpoints" / "round-001"
    stuck.mkdir(parents=True)
    (stuck / "adapter_model.safetensors").write_bytes(b"x")
    (run_dir / "config.toml").write_text("name = 'old'\n")

    # Execute
    with read_only(stuck):
        code, err = main_with(["--overwrite"], capsys)

    # Assert
    assert code == 2 and main_with.started == []
    assert len(err) == 1
    stuck_rel = stuck.relative_to(tmp_path)
    assert err[0].startswith(
        f"error: cannot overwrite run directory results/smoke: {stuck_rel} "
        "is read-only, so the old results in it cannot be deleted (nothing was "
        "deleted); "
    )
    assert (run_dir / "config.toml").read_text() == "name = 'old'\n"


# ------------------------------------------------- an I/O failure mid-run
def _strategy(tmp_path: Path) -> Any:
    from lora_flwr.fl.server_app import build_strategy

    cfg = ExperimentConfig.from_toml(SMOKE).with_overrides(
        [f"output_dir={tmp_path}", "name=run"]
    )
    return build_strategy(cfg, tmp_path / "run")


def test_a_full_disk_mid_run_says_which_file_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the atomic writer of round 1's server state hits a full disk.
    from lora_flwr.fl import checkpoint

    def full(path: Path, write: Any) -> None:
        temp = path.parent / f".{path.name}.0a1b2c3d-{os.getpid()}-{'0' * 16}.tmp"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temp))

    run_dir = tmp_path / "run"
    try:
        strategy = _strategy(tmp_path)
        monkeypatch.setattr(checkpoint, "atomic_write_dir", full)

        # Execute
        with pytest.raises(RunOutputError) as info:
            strategy.on_round_end({"round": 1}, strategy)
    finally:
        release_run_dir(run_dir)

    # Assert
    assert info.value.reason == (
        f"could not write {run_dir}/state/round-001 (No space left on device)"
    )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("completed", [True, False])
def test_an_output_failure_exits_1_with_the_command_that_continues(
    main_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], completed: bool
) -> None:
    # Prepare
    run_dir = Path("results") / "smoke"
    error = OSError(errno.EROFS, os.strerror(errno.EROFS), "results/smoke/adapter")

    def fail(cfg: ExperimentConfig, verbose: bool = False) -> None:
        if completed:
            (tmp_path / run_dir / "state").mkdir(parents=True)
            (tmp_path / run_dir / "config.toml").write_text("")
        raise RunOutputError(run_dir / "adapter", error, run_dir)

    # Execute
    code, err = main_with([], capsys, run_fn=fail)

    # Assert
    assert code == 1 and len(err) == 1
    assert err[0].startswith(
        "error: could not write results/smoke/adapter (Read-only file system)"
    )
    if completed:
        assert err[0].endswith(
            "continue with: python run_simulation.py --resume results/smoke"
        )
    else:
        assert err[0].endswith("then run the same command again")


# --------------------------------------------- the claim comes before Ray
_HOLDER = """
import sys, time
from pathlib import Path
from lora_flwr.rundir import claim_run_dir
claim_run_dir(Path(sys.argv[1]), "refuse")
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_second_run_of_the_same_name_exits_2_before_ray_starts(
    main_with: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a first run claims the folder while this one is in pre-flight.
    from lora_flwr import preflight
    from lora_flwr.fl import engine

    holders: list[subprocess.Popen[str]] = []

    def first_run_claims(cfg: ExperimentConfig) -> None:
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(tmp_path / "results" / "smoke")],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        holders.append(holder)
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "claimed"

    engines: list[ExperimentConfig] = []
    monkeypatch.setattr(preflight, "preflight", first_run_claims)
    monkeypatch.setattr(engine, "run_engine", lambda cfg, *a, **k: engines.append(cfg))

    # Execute
    try:
        code, err = main_with([], capsys, run_fn=simulation.run)
    finally:
        for holder in holders:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()

    # Assert
    assert code == 2 and engines == []
    assert err == [
        f"error: run directory {tmp_path}/results/smoke is in use by a live run "
        f"(pid {holders[0].pid}); wait for it or choose another name"
    ]


def test_a_run_that_fails_before_its_first_round_leaves_nothing_behind(
    main_with: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the engine claims and writes round 0, as the ServerApp does, then
    # the run fails before round 1 completes.
    from lora_flwr.fl import engine, server_app

    def fails_in_round_1(cfg: ExperimentConfig, run_dir: Path, **_: Any) -> None:
        server_app._claim(cfg, run_dir)
        write_history([{"round": 0, "test_loss": 0.69}], run_dir)
        raise RunAborted("run stopped at round 1: no client replied")

    monkeypatch.setattr(engine, "run_engine", fails_in_round_1)
    run_dir = tmp_path / "results" / "smoke"

    # Execute
    code, err = main_with([], capsys, run_fn=simulation.run)

    # Assert: nothing there refuses the rerun, and no lock file stays.
    assert code == 1
    assert err == ["error: run stopped at round 1: no client replied"]
    assert not run_dir.exists() or sorted(p.name for p in run_dir.iterdir()) == []
    check_run_dir(run_dir, "refuse")


# ---------------------------------------------- the ServerApp under flwr run
def _context(tmp_path: Path, *overrides: str) -> Any:
    from flwr.app import RecordDict
    from flwr.common import Context

    cfg = ExperimentConfig.from_toml(SMOKE).with_overrides(
        [f"output_dir={tmp_path}", *overrides]
    )
    return Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=cfg.to_flat(),
    )


def test_the_server_app_fails_in_one_line_on_bad_data_and_writes_nothing(
    tmp_path: Path,
) -> None:
    # Prepare
    from lora_flwr.fl.server_app import RunFailed, make_server_app

    # Execute
    with pytest.raises(RunFailed) as info:
        make_server_app()(MagicMock(), _context(tmp_path, "data.name=nope"))

    # Assert
    message = str(info.value)
    assert "\n" not in message and "`data.name`" in message and "'nope'" in message
    assert not (tmp_path / "smoke").exists()


def test_the_server_app_releases_a_run_that_failed_before_its_first_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: Flower's loop fails once the folder is claimed.
    from lora_flwr.fl import server_app

    def loop_fails(**_: Any) -> None:
        raise RunAborted("run stopped at round 1: no client replied")

    monkeypatch.setattr(server_app, "start_grid", loop_fails)

    # Execute
    with pytest.raises(server_app.RunFailed, match="^run stopped at round 1"):
        server_app.make_server_app()(MagicMock(), _context(tmp_path))

    # Assert: the corrected rerun is not refused as "already holds results".
    run_dir = tmp_path / "smoke"
    assert not run_dir.exists() or sorted(p.name for p in run_dir.iterdir()) == []
    check_run_dir(run_dir, "refuse")


def test_an_output_failure_under_flwr_run_says_how_to_resume(tmp_path: Path) -> None:
    # Prepare: round 1 is saved, the final adapter hits a full disk.
    from lora_flwr.fl.server_app import run_failed

    (tmp_path / "state").mkdir()
    (tmp_path / "config.toml").write_text("")
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "adapter"))

    # Execute
    failed = run_failed(RunOutputError(tmp_path / "adapter", error, tmp_path), tmp_path)

    # Assert
    assert str(failed) == (
        f"could not write {tmp_path}/adapter (No space left on device); free space "
        'or fix the permissions, then run again with on_existing = "resume"'
    )


def test_flower_logs_a_run_failed_in_one_line() -> None:
    # Prepare
    from flwr.common.logger import FLOWER_LOGGER

    from lora_flwr.fl.compat import one_line_failures
    from lora_flwr.fl.server_app import RunFailed

    one_line_failures(RunFailed)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    FLOWER_LOGGER.addHandler(handler)
    try:
        # Execute: what flwr/simulation/app.py logs when the ServerApp raises.
        try:
            raise RunFailed("`data.name` 'nope' is not a built-in dataset")
        except RunFailed as exc:
            FLOWER_LOGGER.log(
                logging.ERROR, "%s raised an exception", "Simulation", exc_info=exc
            )
    finally:
        FLOWER_LOGGER.removeHandler(handler)

    # Assert
    assert stream.getvalue() == (
        "Simulation failed: `data.name` 'nope' is not a built-in dataset\n"
    )


# ------------------------------------------- the flwr run and deployment scripts
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.name=nope", "`data.name`"),
        ("model.name=/etc", "`model.name` '/etc' is a local directory (/etc) but"),
        ("no_such_key=1", "no_such_key"),
    ],
)
def test_the_flwr_run_launcher_exits_2_before_any_process_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    override: str,
    message: str,
) -> None:
    # Prepare
    from lora_flwr.deploy import local_sim, options

    started: list[ExperimentConfig] = []
    monkeypatch.setattr(local_sim, "simulate", lambda cfg, *a: started.append(cfg))
    argv = ["--config", str(SMOKE), "--set", override, "--output-dir", str(tmp_path)]

    # Execute
    code = options.exit_code(
        lambda: local_sim.simulate_from_options(options.parse_args(argv)),
        (ValueError,),
    )

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and started == []
    assert len(err) == 1 and err[0].startswith("ERROR: ") and message in err[0]
    assert list(tmp_path.iterdir()) == []
