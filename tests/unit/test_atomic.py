"""Atomic writes of files and directories (lora_flwr.atomic)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lora_flwr import atomic
from lora_flwr.atomic import atomic_write, atomic_write_dir, write_text_atomic


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _fill(files: dict[str, bytes]) -> Any:
    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)

    return write


# ---------------------------------------------------------------------- files
def test_write_text_atomic_writes_the_text_and_creates_parents(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "a" / "b" / "out.txt"

    # Execute
    write_text_atomic(path, "héllo\n")

    # Assert
    assert path.read_text(encoding="utf-8") == "héllo\n"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_write_text_atomic_replaces_an_existing_file(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "out.txt"
    path.write_text("old")

    # Execute
    write_text_atomic(path, "new")

    # Assert
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_keeps_the_old_file_when_write_raises(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    # Execute / Assert
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_fsyncs_the_file_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)

    # Execute
    write_text_atomic(tmp_path / "out.txt", "x")

    # Assert: file, rename, then (POSIX only) the parent directory
    assert events[:2] == ["fsync", "replace"]
    assert (tmp_path / "out.txt").read_text() == "x"


def test_atomic_write_survives_a_file_system_without_directory_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)

    # Execute
    write_text_atomic(tmp_path / "out.txt", "x")
    atomic_write_dir(tmp_path / "d", _fill({"f": b"y"}))

    # Assert
    assert (tmp_path / "out.txt").read_text() == "x"
    assert _tree(tmp_path / "d") == {"f": b"y"}


# ---------------------------------------------------------------- directories
def test_atomic_write_dir_creates_a_new_directory(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "parent" / "adapter"

    # Execute
    atomic_write_dir(path, _fill({"a.json": b"{}", "sub/w.bin": b"\x00\x01"}))

    # Assert
    assert _tree(path) == {"a.json": b"{}", "sub/w.bin": b"\x00\x01"}
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]


def test_atomic_write_dir_replaces_an_existing_directory_whole(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "adapter"
    atomic_write_dir(path, _fill({"a.json": b"old", "stale.txt": b"stale"}))

    # Execute
    atomic_write_dir(path, _fill({"a.json": b"new", "w.bin": b"w"}))

    # Assert
    assert _tree(path) == {"a.json": b"new", "w.bin": b"w"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_write_dir_keeps_the_old_directory_when_write_raises(
    tmp_path: Path,
) -> None:
    # Prepare
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "a.json").write_bytes(b"old")

    def write(tmp: Path) -> None:
        (tmp / "a.json").write_bytes(b"half")
        raise OSError("disk full")

    # Execute / Assert
    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(path, write)
    assert _tree(path) == {"a.json": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_write_dir_leaves_nothing_when_a_first_write_raises(
    tmp_path: Path,
) -> None:
    # Prepare
    def write(tmp: Path) -> None:
        (tmp / "a.json").write_bytes(b"half")
        raise KeyboardInterrupt

    # Execute / Assert
    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(tmp_path / "adapter", write)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_dir_puts_the_old_directory_back_when_the_swap_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "a.json").write_bytes(b"old")
    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def replace(src: Any, dst: Any) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old aside went fine; the new one's rename fails
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)

    # Execute / Assert
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_dir(path, _fill({"a.json": b"new"}))
    assert len(calls) == 3
    assert calls[0][0] == "adapter" and calls[2][1] == "adapter"
    assert _tree(path) == {"a.json": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_write_dir_fsyncs_every_file_before_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    synced: list[str] = []
    real_fsync_file = atomic._fsync_file

    def fsync_file(path: Path) -> None:
        synced.append(path.name)
        real_fsync_file(path)

    monkeypatch.setattr(atomic, "_fsync_file", fsync_file)
    files = {"a.json": b"{}", "w.bin": b"w", "sub/x": b"x"}

    # Execute
    atomic_write_dir(tmp_path / "adapter", _fill(files))

    # Assert
    assert sorted(synced) == ["a.json", "w.bin", "x"]


def test_atomic_write_dir_gives_the_directory_umask_permissions(
    tmp_path: Path,
) -> None:
    # Prepare
    if os.name == "nt":
        pytest.skip("POSIX permissions")
    umask = os.umask(0o022)
    os.umask(umask)
    reference = tmp_path / "plain"
    reference.mkdir()

    # Execute
    atomic_write_dir(tmp_path / "adapter", _fill({"a": b"a"}))

    # Assert
    assert (tmp_path / "adapter").stat().st_mode == reference.stat().st_mode


def test_atomic_write_dir_refuses_a_file_target(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "adapter"
    path.write_bytes(b"a file")

    # Execute / Assert
    with pytest.raises(NotADirectoryError):
        atomic_write_dir(path, _fill({"a": b"a"}))
    assert path.read_bytes() == b"a file"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_atomic_write_dir_refuses_dot_paths(tmp_path: Path) -> None:
    # Execute / Assert
    for path in (Path("."), tmp_path / "x" / ".."):
        with pytest.raises(ValueError, match="does not name a directory"):
            atomic_write_dir(path, _fill({"a": b"a"}))
    assert list(tmp_path.iterdir()) == []


def test_atomic_module_imports_neither_torch_nor_numpy() -> None:
    # Execute
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, lora_flwr.atomic, lora_flwr.results; "
            "print('torch' in sys.modules, 'numpy' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )

    # Assert
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ permissions
@pytest.fixture
def umask() -> Any:
    """Set the process umask for one test; the old one is put back afterwards."""
    if os.name == "nt":
        pytest.skip("POSIX permissions")
    saved = os.umask(0o022)
    os.umask(saved)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    yield set_umask
    os.umask(saved)


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_atomic_writes_follow_the_umask(
    tmp_path: Path, umask: Any, mask: int, file_mode: int, dir_mode: int
) -> None:
    # Prepare
    umask(mask)

    # Execute
    write_text_atomic(tmp_path / "history.json", "[]")
    atomic_write(tmp_path / "w.bin", lambda tmp: tmp.write_bytes(b"w"))
    atomic_write_dir(tmp_path / "adapter", _fill({"a.json": b"{}"}))

    # Assert: what a plain open() / mkdir() would have made, not owner-only.
    assert stat.S_IMODE((tmp_path / "history.json").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "w.bin").stat().st_mode) == file_mode
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "adapter" / "a.json").stat().st_mode) == file_mode


# ---------------------------------------------------- a writer killed midway
REPO = Path(__file__).resolve().parents[2]


def test_a_kill_between_the_swaps_renames_is_undone_by_recover(
    tmp_path: Path,
    killed_writer: Any,
) -> None:
    # Prepare: adapter/ holds the old copy; a writer dies with it renamed aside.
    path = tmp_path / "adapter"
    atomic_write_dir(path, _fill({"a.json": b"old"}))
    killed_writer(path, "dir", after=1)
    assert not path.exists()

    # Execute
    atomic.recover(path)

    # Assert: the old copy is back and the dead writer's folders are gone.
    assert _tree(path) == {"a.json": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_the_next_dir_write_recovers_a_kill_between_the_renames(
    tmp_path: Path,
    killed_writer: Any,
) -> None:
    # Prepare
    path = tmp_path / "adapter"
    atomic_write_dir(path, _fill({"a.json": b"old"}))
    killed_writer(path, "dir", after=1)

    # Execute
    atomic_write_dir(path, _fill({"a.json": b"newer"}))

    # Assert
    assert _tree(path) == {"a.json": b"newer"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


@pytest.mark.parametrize("after", [0, 2])
def test_the_next_dir_write_removes_a_dead_writers_leftovers(
    tmp_path: Path, killed_writer: Any, after: int
) -> None:
    # Prepare: killed while filling its temp folder (0), or after the swap but
    # before deleting the old copy (2).
    path = tmp_path / "adapter"
    atomic_write_dir(path, _fill({"a.json": b"old"}))
    killed_writer(path, "dir", after=after)
    assert len(list(tmp_path.iterdir())) == 2

    # Execute
    atomic_write_dir(path, _fill({"a.json": b"newer"}))

    # Assert
    assert _tree(path) == {"a.json": b"newer"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_the_next_file_write_removes_a_dead_writers_temp_file(
    tmp_path: Path, killed_writer: Any
) -> None:
    # Prepare
    path = tmp_path / "history.json"
    write_text_atomic(path, "old")
    killed_writer(path, "file", after=0)
    assert len(list(tmp_path.iterdir())) == 2

    # Execute
    write_text_atomic(path, "new")

    # Assert
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]


_SLOW_WRITER = """
import sys, time
from pathlib import Path
from lora_flwr import atomic

target, go = Path(sys.argv[1]), Path(sys.argv[2])


def write(tmp):
    (tmp / "a.json").write_bytes(b"theirs")
    print("writing", flush=True)
    while not go.exists():
        time.sleep(0.01)


atomic.atomic_write_dir(target, write)
"""


def test_a_live_writers_temp_folder_is_left_alone(tmp_path: Path) -> None:
    # Prepare: another process is filling its temp folder for the same target.
    path = tmp_path / "data" / "cache"
    go = tmp_path / "go"
    other = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(path), str(go)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "writing"

        # Execute: this process writes the same target meanwhile.
        atomic_write_dir(path, _fill({"a.json": b"mine"}))
        atomic.recover(path)
    finally:
        go.touch()
        code = other.wait(timeout=30)

    # Assert: the other writer finished unharmed; its copy is the last one in.
    assert code == 0
    assert _tree(path) == {"a.json": b"theirs"}
    assert [p.name for p in path.parent.iterdir()] == ["cache"]
