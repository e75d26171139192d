"""Atomic writes of files and directories (standard library only).

A file is written to a temp file in the same directory, fsynced, then renamed over
its target; a directory is filled as a temp sibling, every file in it fsynced, then
swapped in as one unit. After the rename the parent directory is fsynced too, so the
rename itself survives a power cut. Either way a crash leaves the old content or the
new one, never a half-written mix.

Files and directories get the permissions a plain ``open()`` or ``mkdir()`` would:
``0o666`` and ``0o777`` less the process umask (not ``mkstemp``'s owner-only 0600).

Every temp sibling is named ``.<target>.<host>-<pid>-<random>.<kind>`` (kind
``tmp``: being filled; ``old``: the previous directory, set aside during a swap;
``del``: being deleted). A writer killed midway leaves such siblings behind;
:func:`recover` (called by every write, and by a run directory's claim) removes
those of writers that are gone, and puts a set-aside ``old`` directory back if the
kill came between the swap's two renames. Siblings of a live writer (same host,
pid still running) or of another host are never touched.

This module imports neither torch nor numpy: :mod:`lora_flwr.results` uses it and
must stay light.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_dir",
    "recover",
    "recover_all",
    "remove_entry",
    "target_of",
    "write_text_atomic",
]

# .<target>.<host>-<pid>-<random>.<kind>: see the module docstring.
_LEFTOVER = re.compile(
    r"\.(?P<name>.+)\.(?P<token>(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{16})"
    r"\.(?P<kind>tmp|old|del)"
)


def _fsync_file(path: Path) -> None:
    # Windows only flushes a descriptor opened for writing; POSIX takes a read-only
    # one, which also works on files the writer left read-only.
    flags = os.O_RDWR if os.name == "nt" else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Best effort: Windows cannot open a directory, and some file systems refuse to
    # fsync one. The data itself is already on disk by then; only the rename's
    # durability is at stake.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # Bottom-up, so each directory is synced after the entries it holds.
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_file(Path(dirpath, name))
        _fsync_dir(Path(dirpath))


def _host_tag() -> str:
    # Short and stable per machine: a pid means nothing on another host (a
    # shared file system), so another host's siblings are never judged.
    return hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()


def _new_token() -> str:
    return f"{_host_tag()}-{os.getpid()}-{secrets.token_hex(8)}"


def _sibling(path: Path, token: str, kind: str) -> Path:
    # Hidden, in the same directory (a rename never crosses file systems), and
    # named after its writer so that a later one can tell whether it is gone.
    return path.with_name(f".{path.name}.{token}.{kind}")


def target_of(path: Path) -> Path:
    """Return what the temp sibling ``path`` is written for (``path`` if none)."""
    match = _LEFTOVER.fullmatch(path.name)
    return path.with_name(match["name"]) if match else path


def _make_temp(path: Path, make: Callable[[Path], None]) -> tuple[Path, str]:
    while True:
        token = _new_token()
        tmp = _sibling(path, token, "tmp")
        try:
            make(tmp)
        except FileExistsError:  # pragma: no cover - 64 random bits collided
            continue
        return tmp, token


def _create_file(tmp: Path) -> None:
    # Not tempfile.mkstemp: it creates mode 0o600, which the file keeps once
    # renamed into place. os.open applies the umask like a plain open().
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _create_dir(tmp: Path) -> None:
    # Not tempfile.mkdtemp (0o700), for the same reason: os.mkdir applies the umask.
    tmp.mkdir()


def remove_entry(path: Path, *, ignore_errors: bool = False) -> None:
    """Delete ``path`` if present; a symbolic link is unlinked, never followed.

    Parameters
    ----------
    path : Path
        A file, folder or link; it need not exist.
    ignore_errors : bool
        Leave what a folder's deletion cannot remove instead of raising.
    """
    if path.is_dir() and not path.is_symlink():
        # Links inside are unlinked only, not their targets.
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=True)


def _discard_old(old: Path, token: str, target: Path) -> None:
    # Renamed first, then deleted: a half-deleted copy is never left under the
    # ``old`` name that recover() would put back.
    doomed = _sibling(target, token, "del")
    try:
        os.replace(old, doomed)
    except FileNotFoundError:
        return
    remove_entry(doomed, ignore_errors=True)


def _writer_gone(host: str, pid: int) -> bool:
    """Whether the process that named a temp sibling has ended (False: unsure)."""
    if host != _host_tag() or pid == os.getpid() or os.name == "nt":
        # Another machine, this very process, or Windows (where os.kill(pid, 0)
        # would terminate the process): leave it.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: it runs, as another user
        return False
    return False


def recover(path: Path) -> None:
    """Undo what killed writers of ``path`` left behind (their temp siblings).

    A writer killed between a directory swap's two renames leaves ``path`` missing
    and the previous directory set aside: it is renamed back, so ``path`` holds the
    last complete copy. Every other sibling of a gone writer (a temp file or
    folder never renamed in, a set-aside copy never deleted) is removed. Siblings
    of live writers, and of writers on another host, are left alone.

    Parameters
    ----------
    path : Path
        A target of :func:`atomic_write` or :func:`atomic_write_dir`; it need not
        exist, nor its parent.
    """
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return
    stale: list[tuple[str, str, Path]] = []
    for name in names:
        match = _LEFTOVER.fullmatch(name)
        if (
            match is not None
            and match["name"] == path.name
            and _writer_gone(match["host"], int(match["pid"]))
        ):
            stale.append((match["kind"], match["token"], path.parent / name))
    restored = False
    for kind, token, leftover in sorted(stale, key=lambda item: item[0] != "old"):
        if kind == "old" and not restored and not os.path.lexists(path):
            try:
                os.replace(leftover, path)
            except OSError:  # another process recovered it first
                pass
            else:
                restored = True
                continue
        if kind == "old":
            _discard_old(leftover, token, path)
        else:
            remove_entry(leftover, ignore_errors=True)
    if restored:
        _fsync_dir(path.parent)


def recover_all(directory: Path) -> None:
    """Call :func:`recover` for every target in ``directory`` with temp siblings.

    Parameters
    ----------
    directory : Path
        A folder the atomic writers write into; it need not exist.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return
    targets = {m["name"] for n in names if (m := _LEFTOVER.fullmatch(n)) is not None}
    for name in sorted(targets):
        recover(directory / name)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it over.

    The temp file is fsynced before the rename and the parent directory after it.

    Parameters
    ----------
    path : Path
        Target file; its parent directories are created if missing.
    write : Callable[[Path], None]
        Writes the whole content to the path it is given.

    Raises
    ------
    Exception
        Whatever ``write`` or the rename raises; ``path`` is then left as it was
        and the temp file is removed.
    """
    recover(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, _ = _make_temp(path, _create_file)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8).

    Parameters
    ----------
    path : Path
        Target file; its parent directories are created if missing.
    text : str
        The whole content.
    """

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` on a temp directory, then make it ``path`` as one unit.

    ``tmp_dir`` is an empty sibling of ``path``. Once ``write`` returns, every file
    in it is fsynced. If ``path`` does not exist the directory is renamed to it;
    otherwise the old directory is renamed aside, the new one renamed in, and the
    old one deleted. Whatever was in the old directory is gone afterwards, files
    ``write`` did not recreate included. A kill between the two renames leaves
    ``path`` missing and the old directory aside: :func:`recover`, which this
    function calls first, puts it back.

    Parameters
    ----------
    path : Path
        Target directory; its parent directories are created if missing.
    write : Callable[[Path], None]
        Fills the directory it is given.

    Raises
    ------
    ValueError
        If ``path`` ends in ``.`` or ``..`` (or is empty).
    NotADirectoryError
        If ``path`` exists and is not a directory.
    Exception
        Whatever ``write``, an fsync or a rename raises; the old directory is then
        left in place and the temp directory removed.
    """
    if path.name in ("", ".", ".."):
        # Renaming the current directory (or a parent) away would pull it from
        # under this process.
        raise ValueError(f"{str(path)!r} does not name a directory to replace")
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    recover(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, token = _make_temp(path, _create_dir)
    old: Path | None = None
    try:
        write(tmp)
        _fsync_tree(tmp)
        if path.exists():
            old = _sibling(path, token, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                # Put the old directory back. Should that fail too, its error
                # propagates (chained to the first) and the old directory stays
                # under its aside name: never deleted.
                os.replace(old, path)
                raise
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_entry(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        # The new directory is in place; a leftover old copy is only clutter.
        _discard_old(old, token, path)
