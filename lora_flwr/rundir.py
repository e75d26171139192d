"""A run directory that is never lost or mixed: existence policy and a live lock.

``<output_dir>/<name>`` belongs to one run. A new run refuses a directory that
already holds results unless asked to overwrite it (or to resume it); a second
live run on the same directory is refused by an OS file lock, which the kernel
releases when the holder dies (even by ``kill -9``), so a stale lock never blocks.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import IO, Literal

OnExisting = Literal["refuse", "overwrite", "resume"]
LOCK_NAME = ".lock"
# The launchers' folder (lora_flwr/deploy/local.py and local_sim.py):
# logs and PIDs of the attempt under way, written before the ServerApp claims the
# directory; an overwrite keeps it (the launchers replace its files themselves).
LAUNCH_DIR = "deploy"
# Files whose presence means the directory holds a run's results.
RESULT_FILES = ("config.toml", "history.json", "adapter", "checkpoints")

_held: dict[Path, IO[str]] = {}


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists, locked, missing)."""


def has_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds any result of an earlier run."""
    return any((run_dir / name).exists() for name in RESULT_FILES)


def check_run_dir(run_dir: Path, on_existing: OnExisting) -> None:
    """Refuse to start when ``run_dir`` is not usable as asked (touches nothing).

    Raises
    ------
    RunDirError
        If it holds results and ``on_existing`` is ``"refuse"``, it is locked by a
        live run, or ``"resume"`` is asked of a directory without results.
    """
    if on_existing == "resume" and not has_results(run_dir):
        raise RunDirError(
            f"cannot resume {run_dir}: it holds no run (no config.toml or history.json)"
        )
    if on_existing == "refuse" and has_results(run_dir):
        raise RunDirError(
            f"run directory {run_dir} already holds results; pass --overwrite "
            f"(on_existing = 'overwrite') to replace them, --resume {run_dir} to "
            "continue that run, or choose another name"
        )
    holder = _lock_holder(run_dir)
    if holder is not None:
        raise RunDirError(
            f"run directory {run_dir} is in use by a live run (pid {holder}); wait "
            "for it or choose another name"
        )


def claim_run_dir(run_dir: Path, on_existing: OnExisting) -> None:
    """Check ``run_dir``, lock it for this process and clear it on overwrite.

    The lock lasts until :func:`release_run_dir` or the process ends.

    Raises
    ------
    RunDirError
        As :func:`check_run_dir`, or when another process takes the lock first.
    """
    run_dir = run_dir.resolve()
    if run_dir in _held:  # this process already owns it (the server restarted)
        return
    check_run_dir(run_dir, on_existing)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_NAME, "a+")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirError(
            f"run directory {run_dir} is in use by a live run ({_lock_holder(run_dir)})"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[run_dir] = handle
    if on_existing == "overwrite":
        for child in run_dir.iterdir():
            if child.name in (LOCK_NAME, LAUNCH_DIR):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def release_run_dir(run_dir: Path) -> None:
    """Release this process's lock on ``run_dir`` (no-op if it holds none)."""
    handle = _held.pop(run_dir.resolve(), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _lock_holder(run_dir: Path) -> str | None:
    """Return the pid a live lock holder of ``run_dir`` wrote, or None if unlocked."""
    path = run_dir / LOCK_NAME
    if not path.is_file() or run_dir.resolve() in _held:
        return None
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "unknown pid"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
