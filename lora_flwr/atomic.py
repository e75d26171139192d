"""Atomic writes of files and directories (standard library only).

A file is written to a temp file in the same directory, fsynced, then renamed over
its target; a directory is filled as a temp sibling, every file in it fsynced, then
swapped in as one unit. After the rename the parent directory is fsynced too, so the
rename itself survives a power cut. Either way a crash leaves the old content or the
new one, never a half-written mix.

This module imports neither torch nor numpy: :mod:`lora_flwr.results` uses it and
must stay light.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_dir", "write_text_atomic"]


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


def _sibling_name(path: Path, suffix: str) -> Path:
    # Hidden and unique, in the same directory, so that a rename never crosses
    # file systems.
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}{suffix}")


def _make_temp_dir(path: Path) -> Path:
    # Not tempfile.mkdtemp: it creates mode 0o700, and the directory keeps its
    # mode once renamed into place. os.mkdir applies the umask like a plain mkdir.
    while True:
        tmp = _sibling_name(path, ".tmp")
        try:
            tmp.mkdir()
        except FileExistsError:  # pragma: no cover - 64 random bits collided
            continue
        return tmp


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    os.close(fd)
    tmp = Path(tmp_name)
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
    ``write`` did not recreate included.

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(path)
    old: Path | None = None
    try:
        write(tmp)
        _fsync_tree(tmp)
        if path.exists():
            old = _sibling_name(path, ".old")
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
        _remove(tmp)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        # The new directory is in place; a leftover old copy is only clutter.
        _remove(old)
