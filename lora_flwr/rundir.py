"""A run directory that is never lost or mixed: existence policy and a live lock.

``<output_dir>/<name>`` belongs to one run. A new run refuses a directory that
already holds results unless asked to overwrite it (or to resume it); a second
live run on the same directory is refused by an OS file lock, which the kernel
releases when the holder dies (even by ``kill -9``), so a stale lock never blocks.

Nothing here follows a symbolic link: a run directory that is one is refused, and
so is a lock file that is one; an overwrite deletes only the entries a run writes
(:data:`RUN_OUTPUTS`), never the user's own files beside them.

A folder that cannot be written (a file in its place, read-only permissions, old
results that cannot be deleted) is refused by :func:`check_run_dir`, before
anything starts. A run that started anew and completed no round leaves nothing
behind when it is released (its ``config.toml``, history and lock go), so the
corrected rerun is not refused as "already holds results".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_flwr.atomic import recover_all, remove_entry, target_of, write_text_atomic

OnExisting = Literal["refuse", "overwrite", "resume"]
LOCK_NAME = ".lock"
# The launchers' folder (lora_flwr/deploy/local.py and local_sim.py):
# logs and PIDs of the attempt under way, written before the ServerApp claims the
# directory; an overwrite keeps it (the launchers replace its files themselves).
LAUNCH_DIR = "deploy"
CONFIG_FILE = "config.toml"  # the resolved config a run is started with
# Files whose presence means the directory holds a run's results.
RESULT_FILES = (CONFIG_FILE, "history.json", "adapter", "checkpoints")
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

# What a run writes before its first round completes: removed again on release
# when it completes none (a resumed run keeps them: they are its first attempt's).
_FIRST_WRITES = (CONFIG_FILE, "history.json", "history.csv")
# Written once a round completes (fl/server_app.py): the run has something to resume.
_ROUND_OUTPUTS = ("state", "checkpoints", "adapter")


@dataclass(frozen=True)
class _Claim:
    fd: int  # descriptor of the locked .lock
    wrote_config: bool  # this claim started the run anew and wrote config.toml


_held: dict[Path, _Claim] = {}  # run dir (resolved) -> this process's claim


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (exists, locked, missing)."""


class RunOutputError(RuntimeError):
    """A result could not be written mid-run (full disk, read-only folder).

    Every file is written atomically, so what was saved before is intact; the
    entry points add how to continue (``--resume``) to :attr:`reason`.
    """

    def __init__(self, path: Path, error: OSError, run_dir: Path) -> None:
        self.path = path
        self.run_dir = run_dir
        why = error.strerror or str(error)
        # The atomic writers fail on their temp sibling: name what it was for.
        where = target_of(Path(error.filename)) if error.filename else path
        self.reason = f"could not write {where} ({why})"
        super().__init__(
            f"{self.reason}; the results saved before it in {run_dir} are intact"
        )


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
    holder = _lock_holder(run_dir)
    if holder is not None:  # first: whatever else is true now, that run changes it
        raise RunDirError(_in_use(run_dir, holder))
    _check_writable(run_dir)
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
    if on_existing == "overwrite":
        _check_removable(run_dir)


def _in_use(run_dir: Path, holder: str) -> str:
    return (
        f"run directory {run_dir} is in use by a live run (pid {holder}); wait for "
        "it or choose another name"
    )


def _check_writable(run_dir: Path) -> None:
    """Refuse a run directory this user cannot create or write (touches nothing)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == run_dir and not existing.is_dir():
        raise RunDirError(
            f"cannot use run directory {run_dir}: it is a file, not a folder; "
            "choose another name, or move the file away"
        )
    if not existing.is_dir():
        raise RunDirError(
            f"cannot use run directory {run_dir}: {existing} is a file, not a "
            "folder; set output_dir to a folder (it is created if missing), or "
            "move the file away"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(
            f"cannot write run directory {run_dir}: {existing} is read-only for "
            "this user; set output_dir to a folder you can write, or fix its "
            "permissions"
        )


def _check_removable(run_dir: Path) -> None:
    """Refuse an overwrite that could delete only part of the old results."""
    for name in RUN_OUTPUTS:
        top = run_dir / name
        if top.is_symlink() or not top.is_dir():
            continue  # a file or link goes with run_dir, which is writable
        for folder, _, _ in os.walk(top, onerror=_raise):
            if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
                raise RunDirError(
                    f"cannot overwrite run directory {run_dir}: {folder} is "
                    "read-only, so the old results in it cannot be deleted "
                    "(nothing was deleted); fix its permissions (chmod -R u+w "
                    f"{top}) or choose another name"
                )


def _raise(error: OSError) -> None:
    raise RunDirError(
        f"cannot read old results at {error.filename} ({error.strerror}); fix its "
        "permissions or choose another name"
    )


def claim_run_dir(
    run_dir: Path, on_existing: OnExisting, config_text: str | None = None
) -> None:
    """Check ``run_dir``, lock it for this process and clear it on overwrite.

    The lock lasts until :func:`release_run_dir` or the process ends. Once locked,
    what a killed earlier run's saves left is recovered
    (:func:`lora_flwr.atomic.recover_all`); an overwrite then deletes
    :data:`RUN_OUTPUTS` only. ``config_text`` is then written as ``config.toml``,
    unless a resume finds the one its first attempt wrote. A claim that fails
    releases the lock it took.

    Raises
    ------
    RunDirError
        As :func:`check_run_dir`, when another process takes the lock first, or
        when the folder cannot be created, locked, cleared or written.
    """
    refuse_symlink(run_dir)  # before resolve(), which would follow the link
    run_dir = run_dir.resolve()
    if run_dir in _held:  # this process already owns it (the server restarted)
        return
    check_run_dir(run_dir, on_existing)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = _lock(run_dir)
    except OSError as exc:
        raise RunDirError(_cannot_write(run_dir, exc)) from None
    fresh = config_text is not None and (
        on_existing != "resume" or not (run_dir / CONFIG_FILE).is_file()
    )
    _held[run_dir] = _Claim(fd, wrote_config=fresh)
    try:
        # No writer of this directory is alive now: undo what a killed one left
        # (an adapter set aside mid-swap is put back, temp siblings go).
        for folder in _SAVED_IN:
            if not (run_dir / folder).is_symlink():
                recover_all(run_dir / folder)
        if on_existing == "overwrite":
            for name in RUN_OUTPUTS:
                remove_entry(run_dir / name)
        if fresh:
            assert config_text is not None
            write_text_atomic(run_dir / CONFIG_FILE, config_text)
    except OSError as exc:
        release_run_dir(run_dir)
        raise RunDirError(_cannot_write(run_dir, exc)) from None


def _lock(run_dir: Path) -> int:
    """Lock ``run_dir/.lock`` for this process and write its pid there.

    Retried when the file was replaced between its opening and its lock (a
    releasing run removed it): a lock on a name no longer in the folder is none.

    Raises
    ------
    RunDirError
        If a live run holds the lock.
    """
    for _ in range(3):
        fd = _open_lock(run_dir, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(run_dir) or "unknown pid"
            raise RunDirError(_in_use(run_dir, holder)) from None
        try:
            same = os.lstat(run_dir / LOCK_NAME).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            # Ours now: a plain file with one name, locked by this process.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise RunDirError(_in_use(run_dir, "unknown pid"))


def _cannot_write(run_dir: Path, exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else run_dir
    return (
        f"cannot write run directory {run_dir}: {where}: {exc.strerror or exc}; "
        "set output_dir to a folder you can write, or fix its permissions"
    )


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
    """Release this process's lock on ``run_dir`` (no-op if it holds none).

    A run this process started anew that completed no round leaves nothing: its
    ``config.toml``, history and lock file are removed (then the folder, if that
    empties it), so the corrected rerun starts as if it were the first.
    """
    run_dir = run_dir.resolve()
    claim = _held.pop(run_dir, None)
    if claim is None:
        return
    try:
        if claim.wrote_config and not any(
            (run_dir / name).exists() for name in _ROUND_OUTPUTS
        ):
            for name in _FIRST_WRITES:
                remove_entry(run_dir / name, ignore_errors=True)
            # Still locked: a run opening the file now finds it gone once it
            # holds the lock, and takes a new one (_lock).
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if nothing else is in it
    except OSError:
        pass  # a folder we cannot clean: the next claim says what is wrong
    finally:
        fcntl.flock(claim.fd, fcntl.LOCK_UN)
        os.close(claim.fd)


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
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None  # no lock, or a folder _check_writable refuses
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown pid"
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return None
