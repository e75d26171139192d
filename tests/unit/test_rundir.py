"""A run directory is claimed safely: overwrite deletes only what runs write,
symbolic links are never followed, and the lock never clobbers another file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lora_flwr.fl.checkpoint import STATE_DIR
from lora_flwr.results import PLOTS
from lora_flwr.rundir import (
    LAUNCH_DIR,
    RUN_OUTPUTS,
    RunDirError,
    check_run_dir,
    claim_run_dir,
    release_run_dir,
)


@pytest.fixture
def claimed() -> Iterator[list[Path]]:
    """Run dirs a test claims; released afterwards, even when the test fails."""
    dirs: list[Path] = []
    yield dirs
    for run_dir in dirs:
        release_run_dir(run_dir)


def _claim(claimed: list[Path], run_dir: Path, on_existing: str = "overwrite") -> None:
    claimed.append(run_dir)
    claim_run_dir(run_dir, on_existing)  # type: ignore[arg-type]


def _old_run_in(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text("name = 'old'\n")
    (run_dir / "history.json").write_text("[]")
    (run_dir / "history.csv").write_text("round\n")
    (run_dir / "loss.png").write_bytes(b"png")
    for folder in ("adapter", "checkpoints/round-001", "state/round-001"):
        (run_dir / folder).mkdir(parents=True)
        (run_dir / folder / "f").write_bytes(b"x")


# ----------------------------------------------------------- item 1: overwrite
def test_overwrite_keeps_files_the_project_never_wrote(
    tmp_path: Path, claimed: list[Path]
) -> None:
    # Prepare: an old run, plus the user's own notes and folder beside it.
    run_dir = tmp_path / "o" / "n"
    _old_run_in(run_dir)
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "data").mkdir()
    (run_dir / "data" / "keep.csv").write_text("a,b\n")

    # Execute
    _claim(claimed, run_dir)

    # Assert: every result is gone, the user's files are as they were.
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "data", "notes.txt"]
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert (run_dir / "data" / "keep.csv").read_text() == "a,b\n"


def test_the_known_outputs_cover_every_name_a_run_writes() -> None:
    # Execute
    names = set(RUN_OUTPUTS)

    # Assert: the plots, the server state and every file a run or compare writes.
    assert {filename for filename, _, _ in PLOTS} <= names
    assert STATE_DIR in names
    assert {
        "config.toml",
        "history.json",
        "history.csv",
        "adapter",
        "checkpoints",
        "wall.json",
        "local_eval.json",
        "metrics.jsonl",
    } <= names
    assert LAUNCH_DIR not in names


def test_overwrite_removes_a_symlinked_result_without_following_it(
    tmp_path: Path, claimed: list[Path]
) -> None:
    # Prepare: the old run's adapter is a link to a folder elsewhere.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "weights.bin").write_bytes(b"precious")
    run_dir = tmp_path / "run"
    _old_run_in(run_dir)
    (run_dir / "adapter" / "f").unlink()
    (run_dir / "adapter").rmdir()
    (run_dir / "adapter").symlink_to(elsewhere, target_is_directory=True)

    # Execute
    _claim(claimed, run_dir)

    # Assert: the link is gone, the folder it pointed to is whole.
    assert not (run_dir / "adapter").is_symlink()
    assert (elsewhere / "weights.bin").read_bytes() == b"precious"


@pytest.mark.parametrize("on_existing", ["refuse", "overwrite", "resume"])
def test_a_run_dir_that_is_a_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path, claimed: list[Path], on_existing: str
) -> None:
    # Prepare: o/n is a link to a folder holding an old run and the user's notes.
    victim = tmp_path / "victim"
    _old_run_in(victim)
    (victim / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(victim)) for p in victim.rglob("*"))
    (tmp_path / "o").mkdir()
    run_dir = tmp_path / "o" / "n"
    run_dir.symlink_to(victim, target_is_directory=True)

    # Execute / Assert: one line naming the link and what to do.
    with pytest.raises(RunDirError, match="is a symbolic link") as info:
        check_run_dir(run_dir, on_existing)  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and str(run_dir) in str(info.value)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        _claim(claimed, run_dir, on_existing)
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*")) == before
    assert (victim / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------- item 2: lock
def test_a_symlinked_lock_is_refused_and_its_target_untouched(
    tmp_path: Path, claimed: list[Path]
) -> None:
    # Prepare: o/n/.lock links to a file of the user's.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run_dir = tmp_path / "o" / "n"
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").symlink_to(victim)

    # Execute / Assert
    with pytest.raises(RunDirError, match="lock file .* is a symbolic link") as info:
        _claim(claimed, run_dir, "refuse")
    assert "\n" not in str(info.value)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        check_run_dir(run_dir, "refuse")
    assert victim.read_text() == "precious\n"


def test_a_hard_linked_lock_is_refused_and_its_target_untouched(
    tmp_path: Path, claimed: list[Path]
) -> None:
    # Prepare: o/n/.lock is a second name of a file of the user's.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    run_dir = tmp_path / "o" / "n"
    run_dir.mkdir(parents=True)
    os.link(victim, run_dir / ".lock")

    # Execute / Assert
    with pytest.raises(RunDirError, match="lock file .* not a plain file"):
        _claim(claimed, run_dir, "refuse")
    assert victim.read_text() == "precious\n"


def test_a_claim_writes_its_pid_into_its_own_lock(
    tmp_path: Path, claimed: list[Path]
) -> None:
    # Prepare: a lock left by a dead run.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("99999999\nold\n")

    # Execute
    _claim(claimed, run_dir, "refuse")

    # Assert
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"


def test_the_deployment_launchers_refuse_a_symlinked_run_dir(tmp_path: Path) -> None:
    # Prepare: both launchers write deploy/ (through launch_dir) before the
    # ServerApp claims the run folder.
    from lora_flwr.config import ExperimentConfig
    from lora_flwr.deploy.errors import DeployError
    from lora_flwr.deploy.run_config import launch_dir

    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "n").symlink_to(victim, target_is_directory=True)
    cfg = ExperimentConfig(output_dir=str(tmp_path / "o"), name="n")

    # Execute / Assert
    with pytest.raises(DeployError, match="is a symbolic link"):
        launch_dir(cfg, ("runs.json", "nodes.json"))
    assert list(victim.iterdir()) == []


# --------------------------------------------- item 4: saves killed midway
def _killed_saves_in(run_dir: Path, killed_writer: Any) -> None:
    _old_run_in(run_dir)
    killed_writer(run_dir / "adapter", "dir", 1)  # between the swap's renames
    killed_writer(run_dir / "state" / "round-002", "dir", 0)  # while filling it
    killed_writer(run_dir / "history.json", "file", 0)  # while writing it
    assert not (run_dir / "adapter").exists()


def test_a_resume_claim_puts_back_what_a_killed_save_set_aside(
    tmp_path: Path, claimed: list[Path], killed_writer: Any
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    _killed_saves_in(run_dir, killed_writer)

    # Execute
    _claim(claimed, run_dir, "resume")

    # Assert: the last complete adapter is back; no temp sibling is left.
    assert (run_dir / "adapter" / "f").read_bytes() == b"x"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",
        "adapter",
        "checkpoints",
        "config.toml",
        "history.csv",
        "history.json",
        "loss.png",
        "state",
    ]
    assert [p.name for p in (run_dir / "state").iterdir()] == ["round-001"]


def test_an_overwrite_claim_leaves_no_temp_sibling_behind(
    tmp_path: Path, claimed: list[Path], killed_writer: Any
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    _killed_saves_in(run_dir, killed_writer)

    # Execute
    _claim(claimed, run_dir)

    # Assert
    assert [p.name for p in run_dir.iterdir()] == [".lock"]
