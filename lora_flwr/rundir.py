"""A run directory that is never lost or mixed: existence policy and a live lock.

``<output_dir>/<name>`` belongs to one run. A new run refuses a directory that
already holds results unless asked to overwrite it (or to resume it); a second
live run on the same directory is refused by an OS file lock, which the kernel
releases when the holder dies (even by ``kill -9``), so a stale lock never blocks.

Nothing here follows a symbolic link: a run directory that is one is refused, and
so is a lock file that is one; an overwrite deletes only the entries a run writes
(:data:`RUN_OUTPUTS`), never the user's own files beside them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Literal

from lora_flwr.atomic import recover_all, remove_entry

OnExisting = Literal["refuse", "overwrite", "resume"]
LOCK_NAME = ".lock"
# The launchers' folder (lora_flwr/deploy/local.py and local_sim.py):
# logs and PIDs of the attempt under way, written before the ServerApp claims the
# directory; an overwrite keeps it (the launchers replace its files themselves).
LAUNCH_DIR = "deploy"
# Files whose presence means the directory holds a run's results.
RESULT_FILES = ("config.toml", "history.json", "adapter", "checkpoints")
# Every entry a run (or compare around it) writes at the top of its directory: all
# that an overwrite deletes. Found by grepping what writes into the run directory:
# fl/server_app.py (config, adapter, checkpoints), results.py (history, the PLOTS),
# fl/checkpoint.py (STATE_DIR), compare.py (wall time, local evaluation cache) and
# the trainer's metrics log; tests/unit/test_rundir.py checks the list against them.
RUN_OUTPUTS = (
    "config.toml",
    "history.json",
    "history.csv",
    "adapter",
    "checkpoints",
    "state",
    "loss.png",
    "accuracy.png",
    "perplexity.png",
    "bytes.png",
    "metrics.jsonl",
    "wall.json",
    "local_eval.json",
)

# Where the atomic writers write a run's files and folders (fl/checkpoint.py's
# STATE_DIR is "state"): a claim recovers what a killed save left there.
_SAVED_IN = (".", "checkpoints", "state")

_held: dict[Path, int] = {}  # run dir -> descriptor of its locked .lock


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
        live run, ``"resume"`` is asked of a directory without results, or the
        directory or its lock file is a symbolic link.
    """
    refuse_symlink(run_dir)
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

    The lock lasts until :func:`release_run_dir` or the process ends. Once locked,
    what a killed earlier run's saves left is recovered
    (:func:`lora_flwr.atomic.recover_all`); an overwrite then deletes
    :data:`RUN_OUTPUTS` only.

    Raises
    ------
    RunDirError
        As :func:`check_run_dir`, or when another process takes the lock first.
    """
    refuse_symlink(run_dir)  # before resolve(), which would follow the link
    run_dir = run_dir.resolve()
    if run_dir in _held:  # this process already owns it (the server restarted)
        return
    check_run_dir(run_dir, on_existing)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(run_dir, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(
            f"run directory {run_dir} is in use by a live run ({_lock_holder(run_dir)})"
        ) from None
    # Ours now: a plain file with one name, locked by this process.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir] = fd
    # No writer of this directory is alive now: undo what a killed one left
    # (an adapter set aside mid-swap is put back, temp siblings go).
    for folder in _SAVED_IN:
        if not (run_dir / folder).is_symlink():
            recover_all(run_dir / folder)
    if on_existing == "overwrite":
        for name in RUN_OUTPUTS:
            remove_entry(run_dir / name)


def refuse_symlink(run_dir: Path) -> None:
    """Refuse a run directory that is a symbolic link (its target is not touched).

    Raises
    ------
    RunDirError
        If ``run_dir`` is a symbolic link.
    """
    if run_dir.is_symlink():
        raise RunDirError(
            f"run directory {run_dir} is a symbolic link (to {os.readlink(run_dir)}); "
            "set output_dir to the folder that holds the real one, or remove the link"
        )


def release_run_dir(run_dir: Path) -> None:
    """Release this process's lock on ``run_dir`` (no-op if it holds none)."""
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _open_lock(run_dir: Path, flags: int) -> int:
    """Open ``run_dir``'s lock file without following a link; refuse a foreign one.

    No ``O_TRUNC``: the file is emptied only once it is known to be a plain file
    with one name, locked by this process.
    """
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise RunDirError(
                f"lock file {path} is a symbolic link; remove it (runs create their "
                "own) and start again"
            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise RunDirError(
            f"lock file {path} is not a plain file of its own (a hard link or a "
            "special file); remove it (runs create their own) and start again"
        )
    return fd


def _lock_holder(run_dir: Path) -> str | None:
    """Return the pid a live lock holder of ``run_dir`` wrote, or None if unlocked."""
    if run_dir.resolve() in _held:
        return None
    try:
        fd = _open_lock(run_dir, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown pid"
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return None
